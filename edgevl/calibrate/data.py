"""Calibration data: image + prompt samples, the seeded calibration / held-out split, and captured graph feeds.

Sources (`load_samples`):
  built-in   scikit-image's sample photographs, cropped and resized to varied sizes and aspect
             ratios (at most 448 x 448 px, so CPU calibration stays quick), with varied prompts
  folder     every image in a folder (sorted by name), prompts cycled from PROMPTS
  JSONL      one {"image": path | "images": [paths], "prompt": text} per line (paths relative to the file)

Capture (`capture`): the samples run through the real FP32 `Pipeline` with its vision and
decoder runners wrapped by a recorder, so the feeds are exactly what the runtime produces:

  vision   pixel_values [n, C*T*P*P], rotary_pos_ids [n, 2] per image (-> image_embeds kept as reference)
  decoder  prefill (inputs_embeds [1,S,H], position_ids [3,1,S], the cache's length inputs, empty past KV)
           then one feed per greedy decode step with the FP32 past KV (-> logits [1, vocab] kept); an
           in-place cache's buffers are stored cut to the positions already written (`replayable`)

Each feed is written to its own .npz as it is produced and read back lazily: memory holds one
feed at a time, never the whole calibration set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevl.artifact import names
from edgevl.errors import EdgevlError
from edgevl.runtime.backends.tensors import to_host

BUILTIN = "builtin:skimage"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "coins", "colorwheel",
          "clock", "page", "text", "hubble_deep_field", "moon", "cat", "brick", "grass")
# (width, height), all <= 448 * 448 px and multiples of 28 (one merged vision token = 28 x 28 px).
SIZES = ((448, 448), (336, 224), (224, 336), (392, 196), (196, 392), (280, 280), (224, 224), (448, 252),
         (168, 336), (112, 112), (308, 168))
PROMPTS = ("Describe this image.", "What is in this picture?", "Describe the image in one sentence.",
           "What colours dominate this image?", "Is there any text in the image? Read it.",
           "Count the objects you can see.", "What is happening here?", "Where might this photo have been taken?",
           "Write a short caption for this picture.", "What is the main subject, and what surrounds it?",
           "Describe the lighting and the mood.", "List three details a person might miss at first glance.")
TEXT_ONLY_PROMPTS = ("Write a haiku about the sea.", "Explain what a rainbow is in two sentences.",
                     "Give me three tips for a good photograph.")
OUT = "__out__"   # prefix of recorded outputs inside a feed's .npz


@dataclass(frozen=True)
class Sample:
    """One calibration / evaluation input: a prompt and its images (PIL images or file paths)."""

    prompt: str
    images: tuple = ()
    name: str = ""


# ----------------------------------------------------------------------------- sources
def builtin_samples(count: int, seed: int) -> list[Sample]:
    """`count` samples from scikit-image photographs; the same seed gives the same crops, sizes and prompts."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        if i % 7 == 6:   # a text-only prompt now and then: the decoder also sees prompts without image tokens
            samples.append(Sample(TEXT_ONLY_PROMPTS[int(rng.integers(len(TEXT_ONLY_PROMPTS)))], (), f"text-{i}"))
            continue
        photo = PHOTOS[(i + int(rng.integers(len(PHOTOS)))) % len(PHOTOS)]
        img = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB")
        frac = rng.uniform(0.6, 1.0)                                   # a random crop, then a varied size
        cw, ch = int(img.width * frac), int(img.height * frac)
        x0, y0 = int(rng.integers(img.width - cw + 1)), int(rng.integers(img.height - ch + 1))
        size = SIZES[int(rng.integers(len(SIZES)))]
        img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.BICUBIC)
        samples.append(Sample(PROMPTS[int(rng.integers(len(PROMPTS)))], (img,), f"{photo}-{size[0]}x{size[1]}"))
    return samples


def folder_samples(folder: Path) -> list[Sample]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise EdgevlError(f"--calib folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}).")
    return [Sample(PROMPTS[i % len(PROMPTS)], (str(p),), p.name) for i, p in enumerate(images)]


def jsonl_samples(path: Path) -> list[Sample]:
    samples = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgevlError(f"{path} line {lineno} is not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise EdgevlError(f"{path} line {lineno} needs a non-empty \"prompt\" string.")
        images = row.get("images", [row["image"]] if "image" in row else [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise EdgevlError(f"{path} line {lineno}: \"image\" must be a path and \"images\" a list of paths.")
        resolved = [str(p if Path(p).is_absolute() else path.parent / p) for p in images]
        missing = [p for p in resolved if not Path(p).is_file()]
        if missing:
            raise EdgevlError(f"{path} line {lineno} names an image that does not exist: {missing[0]}.")
        samples.append(Sample(row["prompt"], tuple(resolved), f"line-{lineno}"))
    if not samples:
        raise EdgevlError(f"{path} has no samples; write one JSON object per line.")
    return samples


def load_samples(calib: str | None, count: int, seed: int) -> tuple[list[Sample], str]:
    """All samples of a source and the source's description; `count` is how many built-in ones to make."""
    if calib is None:
        return builtin_samples(count, seed), BUILTIN
    path = Path(calib)
    if path.is_dir():
        return folder_samples(path), str(path)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        return jsonl_samples(path), str(path)
    if not path.exists():
        raise EdgevlError(f"--calib {calib} does not exist; pass a folder of images or a .jsonl file.")
    raise EdgevlError(f"--calib {calib} is neither a folder of images nor a .jsonl file.")


def split_samples(samples: list[Sample], n_calib: int, n_eval: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split into disjoint calibration and held-out evaluation samples.

    With fewer samples than asked for, evaluation keeps a quarter (at least one) and
    calibration the rest.
    """
    if len(samples) < 2:
        raise EdgevlError(f"calibration needs at least 2 samples (one to calibrate, one to evaluate), "
                          f"the source has {len(samples)}.")
    if len(samples) < n_calib + n_eval:
        n_eval = min(n_eval, max(1, len(samples) // 4))
        n_calib = len(samples) - n_eval
    order = np.random.default_rng(seed).permutation(len(samples))
    return [samples[i] for i in order[n_eval:n_eval + n_calib]], [samples[i] for i in order[:n_eval]]


def samples_digest(samples: list[Sample]) -> str:
    """sha256 over prompts and decoded image pixels: the identity of a calibration set."""
    from edgevl.runtime.inputs.image_loading import load_image

    h = hashlib.sha256()
    for s in samples:
        h.update(s.prompt.encode() + b"\0")
        for img in s.images:
            pixels = np.asarray(load_image(img))
            h.update(f"{pixels.shape}".encode() + pixels.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- captured feeds
class FeedStore:
    """A folder of recorded graph feeds: `{graph}-{sample:04d}-{step:04d}.npz`, outputs under OUT + name."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, graph: str, sample: int, step: int, feed: dict, outputs: dict) -> None:
        np.savez(self.folder / f"{graph}-{sample:04d}-{step:04d}.npz", **feed,
                 **{OUT + k: v for k, v in outputs.items()})

    def files(self, graph: str, samples: int | None = None) -> list[Path]:
        """Feed files of one graph in order; `samples` keeps only the first that many samples."""
        files = sorted(self.folder.glob(f"{graph}-*.npz"))
        if samples is not None:
            files = [f for f in files if int(f.stem.split("-")[1]) < samples]
        return files

    @staticmethod
    def load(path: Path) -> tuple[dict, dict]:
        """(inputs, recorded outputs) of one feed file."""
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        return ({k: v for k, v in arrays.items() if not k.startswith(OUT)},
                {k[len(OUT):]: v for k, v in arrays.items() if k.startswith(OUT)})

    def decoder_sequences(self, samples: int | None = None) -> Iterator[list[tuple[dict, np.ndarray]]]:
        """Per sample, lazily: [(feed, fp32 logits [1, vocab])] for prefill then each decode step."""
        by_sample: dict[int, list[Path]] = {}
        for f in self.files(names.DECODER, samples):
            by_sample.setdefault(int(f.stem.split("-")[1]), []).append(f)
        for files in by_sample.values():
            yield [(feed, out[names.LOGITS]) for feed, out in map(self.load, files)]


def replayable(feed: dict) -> dict:
    """A runtime feed as plain numpy that any session can run again (onnxruntime's calibrators, a quantized
    candidate): an in-place cache's past buffers are cut to the positions written before this call (a
    batch-1 feed), which a decoder then reads as a past that present grows from. The rows before those
    positions are the same after the call, so the feed may be taken after it ran."""
    out = {name: to_host(value) for name, value in feed.items()}
    if names.SEQLENS_K in feed:
        past = int(np.max(out[names.SEQLENS_K])) + 1 - out[names.INPUTS_EMBEDS].shape[1]
        out.update({name: np.ascontiguousarray(value[:, :, :past]) for name, value in out.items()
                    if names.is_past(name)})
    return out


class _Recorder:
    """A Runner that passes every call through and writes the feed (and chosen outputs) to a FeedStore."""

    def __init__(self, inner, store: FeedStore, graph: str, keep: tuple[str, ...]):
        self.inner, self.store, self.graph, self.keep = inner, store, graph, keep
        self.sample, self.step = 0, 0

    def infer(self, feed: dict, bindings: dict | None = None) -> dict:
        out = self.inner.infer(feed, bindings)
        self.store.add(self.graph, self.sample, self.step, replayable(feed), {k: to_host(out[k]) for k in self.keep})
        self.step += 1
        return out

    def __getattr__(self, name):   # activate, input_metadata, ... go to the wrapped runner
        return getattr(self.inner, name)


def capture(pipe, samples: list[Sample], store: FeedStore, new_tokens: int, progress=None) -> list[list[int]]:
    """Run each sample through the FP32 pipeline (greedy, `new_tokens` tokens), recording every graph feed.

    Returns the greedy token ids per sample. `pipe` is restored afterwards.
    """
    vision, decoder = pipe.vision, pipe.decoder
    recorders = [_Recorder(vision, store, names.VISION, (names.IMAGE_EMBEDS,)),
                 _Recorder(decoder, store, names.DECODER, (names.LOGITS,))]
    pipe.vision, pipe.decoder = recorders
    tokens = []
    try:
        for i, sample in enumerate(progress(samples) if progress else samples):
            for r in recorders:
                r.sample, r.step = i, 0
            result = pipe.generate(sample.prompt, images=list(sample.images), max_new_tokens=new_tokens,
                                   do_sample=False, repetition_penalty=1.0)
            tokens.append(result.token_ids)
    finally:
        pipe.vision, pipe.decoder = vision, decoder
    return tokens


def feed_reader(store: FeedStore, graph: str, samples: int | None = None, desc: str | None = None):
    """An onnxruntime CalibrationDataReader over recorded feeds (lazy, rewindable, deep-copyable).

    With `desc`, a tqdm bar (made on the first read, so copies stay plain) counts the feeds.
    `set_range` lets onnxruntime calibrate in strides (CalibStridedMinMax), so a histogram
    calibrator holds one stride of activations at a time instead of all of them.
    """
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self, files):
            self.files, self.pos, self.bar = list(files), 0, None
            self.end = len(self.files)

        def get_next(self):
            if self.pos == 0 and desc and self.bar is None:
                from tqdm import tqdm
                self.bar = tqdm(total=len(self.files), desc=desc, unit="feed", leave=False)
            if self.pos >= self.end:
                if self.bar is not None and self.end >= len(self.files):
                    self.bar.close()
                    self.bar = None
                return None
            feed, _ = FeedStore.load(self.files[self.pos])
            self.pos += 1
            if self.bar is not None:
                self.bar.update()
            return feed

        def rewind(self):
            self.pos, self.end = 0, len(self.files)

        def set_range(self, start_index: int, end_index: int):
            self.pos, self.end = start_index, min(end_index, len(self.files))

        def __len__(self):
            return len(self.files)

    return FeedReader(store.files(graph, samples))
