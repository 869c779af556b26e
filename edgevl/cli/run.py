"""`edgevl run OUT --prompt TEXT`: one generation, streamed to stdout (or one JSON object)."""

from __future__ import annotations

import json
import sys

from edgevl.cli.flags import (
    add_artifact_flags,
    add_backend_flags,
    add_generation_flags,
    load_pipeline,
    real,
    decoding_from_args,
    whole,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="generate text from an export folder (torch-free runtime)",
        description="Preprocess images, run the vision encoder, build the prompt with the model's chat "
                    "template and generate with a KV cache. Text streams to stdout as it is generated; "
                    "sampling defaults come from the model's generation_config.json.")
    add_artifact_flags(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file; repeat for several images in one prompt (in order)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video file (needs the video extra, PyAV); repeatable; images come first in the message")
    p.add_argument("--fps", type=real(0, above=True), default=2.0,
                   help="frames per second sampled from each video (default: 2, as Qwen2-VL was trained)")
    p.add_argument("--max-frames", type=whole(2), default=768, metavar="N",
                   help="at most N frames per video (default: 768); bounds the number of video tokens")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT (not included in the output); repeatable")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (prompt_token_ids, token_ids, text, timings) instead of "
                        "streaming text")
    add_generation_flags(p, max_new_tokens=128)
    add_backend_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    pipe = load_pipeline(args)
    decoding = decoding_from_args(args, pipe)
    from edgevl.runtime.inputs.video import probe_video
    # Headers only: the prompt's cost is checked (a long video fitted to the context) before any frame is decoded.
    videos = [probe_video(v, fps=args.fps, max_frames=args.max_frames) for v in args.video]

    def stream(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = pipe.generate(args.prompt, images=args.image, videos=videos, on_text=None if args.json else stream,
                           decoding=decoding)
    if args.json:
        print(json.dumps({**result.to_json(), "backend": pipe.backend.name}))
        return 0
    print(flush=True)
    t = result.timings
    steps = t.decode_s_per_token
    per_token = sum(steps) / len(steps) * 1e3 if steps else float("nan")
    print(f"[{len(result.token_ids)} tokens, {result.finish_reason}; preprocess {t.preprocess_s*1e3:.0f} ms, "
          f"vision {t.vision_s*1e3:.0f} ms, prefill {t.prefill_s*1e3:.0f} ms, "
          f"decode {per_token:.1f} ms/token on {pipe.backend.name}]", file=sys.stderr)
    return 0
