"""`Pipeline`: an artifact folder -> text, through preprocess, vision, prefill and decode.

    pipe = Pipeline.load("out/")
    result = pipe.generate("Describe the image.", images=["photo.jpg"], max_new_tokens=64)
    print(result.text)

Stages and where they live:
  plan          inputs.plan_inputs: every image's and video's tokens from its header (budget.py), checked
                against the context (a video fitted to it) before any pixel is decoded
  preprocess    image_processing.preprocess_image   (PIL + numpy, identical to transformers)
  prompt        template.ChatTemplate, prompt.expand_vision_pads / Tokenizer
  vision        vision runner, one call per image (memory linear in the number of images)
  embeddings    gather from embed_tokens.npy, image embeddings scattered into the pad slots
  positions     rope_index.mrope_position_ids (3-D M-RoPE)
  generate      generate.generate over the decoder runner
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace

import numpy as np

from edgevl.artifact import names
from edgevl.artifact.folder import Artifact, load_artifact
from edgevl.errors import EdgevlError
from edgevl.runtime.backends.runner import Runner
from edgevl.runtime.backends.table import Backend, get_backend
from edgevl.runtime.backends.options import BackendOptions
from edgevl.runtime.constrained import GrammarCompiler
from edgevl.runtime.embeddings import EmbeddingTable
from edgevl.runtime.generate import Decoding, Prompt, Result, Sequence, Timings, generate
from edgevl.runtime.guide import Guide, OutputOptions
from edgevl.runtime.inputs.budget import PerFramePixels, PromptTooLong
from edgevl.runtime.inputs.plan import InputPlan, VideoPatches, decode_inputs, image_patches, plan_inputs, video_patches
from edgevl.runtime.inputs.qwen3_vl_prompt import expand_video_placeholders, timestamp_text
from edgevl.runtime.inputs.qwen3_vl_video import ClipPixels
from edgevl.runtime.kv_cache import make_cache
from edgevl.runtime.inputs.prompt import (
    StreamDecoder,
    Tokenizer,
    expand_vision_pads,
    user_message,
)
from edgevl.runtime.inputs.rope_index import mrope_position_ids, qwen3_vl_mrope_position_ids
from edgevl.runtime.sampling import SAMPLING_RULES, SamplingOptions
from edgevl.runtime.vision import VisionEncoder, VisionFeatures, scatter_vision
from edgevl.runtime.inputs.template import ChatTemplate

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"


@dataclass
class PreparedPrompt:
    """One prompt row after preprocessing: token ids and its images' and videos' patches."""

    input_ids: np.ndarray                     # [S] int64, vision pads already expanded
    pixel_values: list[np.ndarray]            # per image [t*h*w, C*T*P*P]
    grids: list[tuple[int, int, int]]         # per image (t, h, w)
    video_pixel_values: list[np.ndarray] = field(default_factory=list)  # per video [t*h*w, C*T*P*P]
    video_grids: list[tuple[int, int, int]] = field(default_factory=list)
    video_seconds: list[float] = field(default_factory=list)   # per video: seconds per temporal patch
    video_timestamps: list[tuple[float, ...]] = field(default_factory=list)  # per video: each patch's time (Qwen3-VL)


class Pipeline:
    def __init__(self, artifact: Artifact, backend: Backend | str | None = None, options: BackendOptions | None = None):
        """backend: a Backend, a name from backends.BACKENDS, or None for the fastest available here
        (`options` apply to a name or None)."""
        t0 = time.perf_counter()
        self.artifact = artifact
        self.config = artifact.config
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend, options)
        # Longest sequence (prompt + generated) = KV-cache positions: resolved once, by the backends' one rule.
        self.max_context = self.backend.context_limit(self.config)
        self.tokenizer = Tokenizer(artifact.file("tokenizer.json"))
        self.template = ChatTemplate.from_file(artifact.file("chat_template.jinja"))
        self.image_settings = artifact.manifest.image_processor
        self.video_settings = artifact.manifest.video_processor
        self.generation_config = artifact.read_json("generation_config.json")
        vision, decoder = self.backend.graphs(artifact)
        self.decoder_spec = decoder.spec
        vision_runner, self.decoder = self.backend.load([vision, decoder])
        self.vision_encoder = VisionEncoder(vision_runner, self.config, self.image_settings.merge_size)
        self._timestamp_tokens: dict[str, int] = {}     # `<1.5 seconds>` -> its tokens (Qwen3-VL's video text)
        self.frame_planner = ClipPixels(self.video_settings, self.video_text_tokens) if self.config.timestamped_video \
            else PerFramePixels(self.video_settings)
        self.dtype = self.decoder.input_metadata()[names.INPUTS_EMBEDS].dtype
        # Memory-mapped: only the rows of tokens actually used are read from disk.
        self.embeddings = EmbeddingTable(artifact.manifest.embeddings, artifact.file, self.dtype)
        self.load_s = time.perf_counter() - t0

    @property
    def vision(self) -> Runner:
        """The vision graph's runner (held by the vision encoder, which feeds it)."""
        return self.vision_encoder.runner

    @vision.setter
    def vision(self, runner: Runner) -> None:
        self.vision_encoder.runner = runner

    @classmethod
    def load(cls, path, backend: Backend | str | None = None, verify: bool = True,
             options: BackendOptions | None = None) -> "Pipeline":
        return cls(load_artifact(path, verify=verify), backend=backend, options=options)


    # ------------------------------------------------------------------ stages
    def prepare(self, prompt: str, images=(), videos=()) -> PreparedPrompt:
        """One user message (images, then videos, then text) -> token ids and vision patches.

        images: paths, bytes, PIL images or ImageInputs; videos: paths (sampled at 2 fps), VideoInputs
        (`probe_video`: other fps, --max-frames) or decoded `VideoClip`s. PromptTooLong, before any pixel is
        decoded, when they cannot fit the context.
        """
        if not prompt or not prompt.strip():
            raise EdgevlError("the prompt is empty; pass some text with --prompt.")
        message = user_message(prompt, num_images=len(images), num_videos=len(videos))
        return self.prepare_messages([message], images, videos)

    def prepare_messages(self, messages: list[dict], images=(), videos=(), tools: list[dict] | None = None
                         ) -> PreparedPrompt:
        """A whole conversation in Hugging Face content format -> ids; images/videos fill its slots in order.
        tools: function definitions for a chat template that takes them (`template.takes("tools")`)."""
        return self.prepare_plan(self.plan_messages(messages, images, videos, tools))

    def plan_messages(self, messages: list[dict], images=(), videos=(), tools: list[dict] | None = None,
                      prior_grids=(), prior_video_grids=()) -> InputPlan:
        """The conversation's cost from its images' and videos' headers, checked against the context before any
        pixel is decoded (a video that does not fit gets fewer or smaller frames): `inputs.plan_inputs`."""
        return plan_inputs(self, messages, images, videos, tools, prior_grids, prior_video_grids)

    def prepare_plan(self, plan: InputPlan) -> PreparedPrompt:
        """Decode a plan's images and videos (one at a time, a video's planned frames only), then tokenize."""
        processed, videos = decode_inputs(self, plan)
        grids = [grid for _, grid in processed]
        video_grids = [v.grid for v in videos]
        timestamps = [v.timestamps for v in videos]
        return PreparedPrompt(self.tokenize_messages(plan.messages, grids, video_grids, plan.tools, timestamps),
                              [pv for pv, _ in processed], grids, [v.pixel_values for v in videos], video_grids,
                              [v.seconds for v in videos], timestamps)

    def image_patches(self, images) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        """Paths, bytes, PIL images or ImageInputs -> (pixel_values, grid) per image."""
        return image_patches(self, images)

    def video_patches(self, videos) -> list[VideoPatches]:
        """Paths (sampled at 2 fps), VideoInputs or `VideoClip`s -> VideoPatches per video, without a token budget
        (`plan_messages` fits videos to the context)."""
        return video_patches(self, videos)

    @property
    def video_temporal(self) -> int:
        return self.video_settings.temporal_patch_size

    def tokenize_messages(self, messages: list[dict], grids: list[tuple[int, int, int]],
                          video_grids: list[tuple[int, int, int]] = (), tools: list[dict] | None = None,
                          video_timestamps: list = ()) -> np.ndarray:
        """Chat template -> one vision pad per merged vision token -> token ids [S]. Qwen3-VL: each video's
        temporal patches as timestamped blocks (`<1.5 seconds><|vision_start|>pads<|vision_end|>`, one per entry
        of video_timestamps[i])."""
        text = self.template.render(messages, **({"tools": tools} if tools else {}))
        text = expand_vision_pads(text, IMAGE_PAD, grids, self.image_settings.merge_size)
        if self.config.timestamped_video:
            patches = [((len(ts), h, w), ts) for (_, h, w), ts in zip(video_grids, video_timestamps)]
            text = expand_video_placeholders(text, patches, self.video_settings.merge_size)
        else:
            text = expand_vision_pads(text, VIDEO_PAD, list(video_grids), self.video_settings.merge_size)
        return self.tokenizer.encode_bounded(text, self.max_context)

    def video_text_tokens(self, timestamps) -> int:
        """Tokens of the text around a video's temporal patches: Qwen3-VL's timestamps and vision start / end of
        each; 0 for the families whose videos are one run of pads."""
        if not self.config.timestamped_video:
            return 0
        counts = self._timestamp_tokens
        for t in timestamps:
            text = timestamp_text(t)
            if text not in counts:
                counts[text] = len(self.tokenizer.encode(text))
        return sum(counts[timestamp_text(t)] + 2 for t in timestamps)

    def encode(self, pixel_values: np.ndarray, grid: tuple[int, int, int]) -> VisionFeatures:
        """[t*h*w, D] patches -> the image's (or video's) features: one vision call per temporal patch, each
        attending alone (runtime/vision.py)."""
        return self.vision_encoder(pixel_values, grid)

    def encode_image(self, pixel_values: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
        """[t*h*w, D] patches -> [t*h*w/merge^2, hidden] embeddings (`encode(...).embeds`)."""
        return self.encode(pixel_values, grid).embeds

    def embed(self, input_ids: np.ndarray, image_embeds: list[np.ndarray],
              video_embeds: list[np.ndarray] = ()) -> np.ndarray:
        """input_ids [S] -> [S, hidden] with image/video pad rows replaced by vision embeddings, in order."""
        return scatter_vision(input_ids, self.embeddings.rows(input_ids), self._vision_rows(image_embeds, video_embeds))

    def deepstack(self, input_ids: np.ndarray, image_levels: list[np.ndarray | None],
                  video_levels: list[np.ndarray | None] = ()) -> np.ndarray | None:
        """Qwen3-VL: the DeepStack features [levels, S, hidden] of a prompt, each image's and video's levels at its
        pad rows, zeros elsewhere; None for a model without DeepStack."""
        levels = len(self.config.vision_deepstack_indexes)
        if not levels:
            return None
        base = np.zeros((levels, len(input_ids), self.config.hidden_size), self.dtype)
        return scatter_vision(input_ids, base, self._vision_rows(image_levels, video_levels), axis=1)

    def _vision_rows(self, images: list, videos: list) -> dict:
        return {"image": (self.config.image_token_id, list(images)), "video": (self.config.video_token_id, list(videos))}

    # ------------------------------------------------------------------ generation
    def decoding(self, max_new_tokens: int = 128, stop=(), output: OutputOptions | None = None,
                 **sampling) -> Decoding:
        """How a reply is made, from the model's generation_config with `sampling` (do_sample, temperature, top_k,
        top_p, repetition_penalty, seed; None = the config's) on top: validated here, once."""
        unknown = sorted(set(sampling) - set(SAMPLING_RULES))
        if unknown:
            raise EdgevlError(f"{', '.join(unknown)}: not a generation setting; they are max_new_tokens, stop, "
                              f"output and {', '.join(SAMPLING_RULES)}.")
        return Decoding(self.sampling_options(**sampling), max_new_tokens, tuple(stop), output or OutputOptions())

    def generate(self, prompt: str, images=(), videos=(), on_text=None, decoding: Decoding | None = None,
                 **settings) -> Result:
        """One prompt. `on_text(delta)` receives text as it is generated (streaming). `decoding`, or its settings
        as keywords (`max_new_tokens`, `stop`, the sampling options: see `decoding`)."""
        decoding = self.resolve_decoding(decoding, settings)
        t0 = time.perf_counter()
        row = self.prepare(prompt, images, videos)
        return self.generate_prepared([row], decoding, (lambda _, delta: on_text(delta)) if on_text else None,
                                      preprocess_s=time.perf_counter() - t0)[0]

    def generate_batch(self, prompts: list[str], images: list[list] | None = None, on_text=None,
                       decoding: Decoding | None = None, **settings) -> list[Result]:
        """Several prompts at once, padded into one batch (`on_text(row, delta)`); one decoding for all."""
        decoding = self.resolve_decoding(decoding, settings)
        images = images or [[] for _ in prompts]
        t0 = time.perf_counter()
        rows = [self.prepare(p, imgs) for p, imgs in zip(prompts, images)]
        return self.generate_prepared(rows, decoding, on_text, preprocess_s=time.perf_counter() - t0)

    def resolve_decoding(self, decoding: Decoding | None, settings: dict) -> Decoding:
        """`decoding` as given, or one made from its settings (`decoding`); not both."""
        if decoding is not None and settings:
            raise EdgevlError(f"give either decoding= or its settings ({', '.join(settings)}), not both.")
        return decoding or self.decoding(**settings)

    def generate_prepared(self, rows: list[PreparedPrompt], decoding: Decoding, on_text=None, on_logprobs=None,
                          preprocess_s: float = 0.0) -> list[Result]:
        """Vision, embeddings, M-RoPE positions and decoding for already tokenized rows (fresh cache).
        on_text, on_logprobs: as `decode`."""
        longest = max(len(r.input_ids) for r in rows)
        self.check_context(longest)       # before the vision encoder: a long video is refused cheaply
        t0 = time.perf_counter()
        features = [self.encode_vision(r) for r in rows]
        row_embeds = [self.embed(r.input_ids, [f.embeds for f in im], [f.embeds for f in vid])
                      for r, (im, vid) in zip(rows, features)]
        row_levels = [self.deepstack(r.input_ids, [f.deepstack for f in im], [f.deepstack for f in vid])
                      for r, (im, vid) in zip(rows, features)]
        timings = Timings(preprocess_s=preprocess_s, vision_s=time.perf_counter() - t0)
        cache = self.new_cache(len(rows))
        ids, mask, embeds = self._pad(rows, row_embeds, longest, cache.padding)
        deepstack = self._pad_levels(rows, row_levels, longest, cache.padding)
        position_ids, rope_deltas = self.positions(ids, mask, [g for r in rows for g in r.grids],
                                                   [g for r in rows for g in r.video_grids],
                                                   [s for r in rows for s in r.video_seconds])
        prompt = Prompt(embeds, ids, position_ids, rope_deltas, mask.sum(1), deepstack)
        return self.decode(prompt, mask, cache, decoding, on_text, on_logprobs, timings)

    def encode_vision(self, row: PreparedPrompt) -> tuple[list[VisionFeatures], list[VisionFeatures]]:
        """Features per image and per video (a video is a t > 1 grid through the same graph)."""
        return ([self.encode(pv, g) for pv, g in zip(row.pixel_values, row.grids)],
                [self.encode(pv, g) for pv, g in zip(row.video_pixel_values, row.video_grids)])

    def check_context(self, length: int) -> None:
        if length >= self.max_context:
            raise PromptTooLong(f"the prompt is {length} tokens long but the model's context is {self.max_context} "
                                f"tokens; shorten it or use smaller images or shorter videos.", length, self.max_context)

    def max_new_tokens(self, decoding: Decoding, prompt_length: int) -> int:
        """The reply's length bound: what it asked for, cut to what the context leaves (at least one token; the
        prompt has passed `check_context`)."""
        return max(1, min(decoding.max_new_tokens, self.max_context - prompt_length))

    def positions(self, ids: np.ndarray, mask: np.ndarray, grids: list, video_grids: list = (),
                  video_seconds: list = ()) -> tuple[np.ndarray, np.ndarray]:
        """M-RoPE ids [3, B, S] and rope deltas [B, 1] for (padded) rows of token ids; mask: 1 = real token.
        video_seconds: per video, seconds per temporal patch (Qwen2.5-VL spaces video time ids by them)."""
        def as_array(g):
            return np.array(g, np.int64).reshape(-1, 3) if len(g) else None
        cfg = self.config
        if cfg.timestamped_video:       # Qwen3-VL: each temporal patch of a video is its own (1, h, w) run of pads
            return qwen3_vl_mrope_position_ids(ids, mask, cfg.image_token_id, cfg.video_token_id, as_array(grids),
                                               as_array(video_grids), cfg.spatial_merge_size)
        tps = cfg.tokens_per_second
        intervals = [np.float32(tps) * np.float32(s) for s in video_seconds] if tps is not None else None
        return mrope_position_ids(ids, mask, cfg.image_token_id, cfg.video_token_id,
                                  as_array(grids), as_array(video_grids), cfg.spatial_merge_size, intervals)

    def new_cache(self, batch: int):
        """An empty KV cache of the kind the decoder graph has (kv_cache.py), for `batch` rows."""
        return make_cache(self.decoder_spec.kv_cache, self.decoder, self.config, batch, self.max_context, self.dtype)

    def decode(self, prompt: Prompt, context_mask: np.ndarray, cache, decoding: Decoding, on_text=None,
               on_logprobs=None, timings: Timings | None = None) -> list[Result]:
        """Prefill `prompt` (the tokens not yet in `cache`) and generate one reply per row (generate.Sequence).

        context_mask [B, T]: which of prompt.context_ids are real tokens (the prompt ids each Result reports).
        on_text(row, delta) receives text as it is printed, on_logprobs(row, entries) just before it the logprobs
        of the tokens that text holds (when decoding.output asks for them).
        """
        max_new_tokens = self.max_new_tokens(decoding, int(context_mask.sum(1).max()))
        timings = timings or Timings()
        sequences = [self.sequence(decoding, prompt.context_ids[b], max_new_tokens,
                                   (lambda d, b=b: on_text(b, d)) if on_text else None,
                                   (lambda e, b=b: on_logprobs(b, e)) if on_logprobs else None)
                     for b in range(len(context_mask))]
        generate(self.decoder, cache, self.embeddings, prompt, sequences, self.pad_id, timings)
        timings.load_s = self.load_s
        return [seq.result(prompt.context_ids[b][context_mask[b] == 1], replace(timings))
                for b, seq in enumerate(sequences)]

    def sequence(self, decoding: Decoding, context: np.ndarray, max_new_tokens: int, on_text=None,
                 on_logprobs=None, guide: Guide | None = None) -> Sequence:
        """One reply's state (generate.Sequence) over `context` (the ids its tokens are chosen after); `guide`: one
        made ahead (a scheduler compiles a grammar off its decode loop), else made here."""
        return Sequence(decoding, guide or self.guide(decoding.output), StreamDecoder(self.tokenizer, decoding.stop),
                        context, tuple(self.config.eos_token_id), max_new_tokens, on_text, on_logprobs)

    def sampling_options(self, **sampling) -> SamplingOptions:
        """The model's generation_config with `sampling` (do_sample, temperature, top_k, top_p,
        repetition_penalty, seed; None = keep the config's) on top, validated."""
        return SamplingOptions.from_generation_config(self.generation_config, **sampling)

    def guide(self, options: OutputOptions) -> Guide:
        """A reply's Guide (runtime/guide.py): its grammar, if any, compiled here."""
        return Guide(options, self.grammars.constraint(options.grammar) if options.grammar else None)

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """Grammars over this model's vocabulary (llguidance, loaded on first use: GrammarUnavailable without it)."""
        return GrammarCompiler(self.tokenizer.impl.to_str(), self.config.vocab_size, tuple(self.config.eos_token_id))

    @property
    def pad_id(self) -> int:
        """The token padding rows and fed to finished rows: the model's pad token, else its first EOS."""
        pad = self.config.pad_token_id
        return int(pad if pad is not None else self.config.eos_token_id[0])

    def _pad_levels(self, rows, row_levels, length: int, side: str) -> np.ndarray | None:
        """DeepStack rows padded like `_pad`'s embeds: [levels, B, L, hidden], zeros at padding; None without."""
        if row_levels[0] is None:
            return None
        out = np.zeros((row_levels[0].shape[0], len(rows), length, row_levels[0].shape[2]), self.dtype)
        for b, (row, levels) in enumerate(zip(rows, row_levels)):
            n = len(row.input_ids)
            out[:, b, slice(length - n, length) if side == "left" else slice(0, n)] = levels
        return out

    def _pad(self, rows, row_embeds, length: int, side: str):
        """Pad every row to `length` on `side` ("left" | "right", the cache's): ids and mask [B, L] int64,
        embeds [B, L, hidden] (padding positions hold the pad token's embedding)."""
        bsz, hidden = len(rows), row_embeds[0].shape[1]
        ids = np.full((bsz, length), self.pad_id, np.int64)
        mask = np.zeros((bsz, length), np.int64)
        embeds = np.empty((bsz, length, hidden), self.dtype)
        embeds[:] = self.embeddings.rows([self.pad_id])[0]
        for b, (row, e) in enumerate(zip(rows, row_embeds)):
            n = len(row.input_ids)
            where = slice(length - n, length) if side == "left" else slice(0, n)
            ids[b, where], mask[b, where], embeds[b, where] = row.input_ids, 1, e
        return ids, mask, embeds
