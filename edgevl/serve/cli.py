"""`edgevl serve` arguments and entry point."""

from __future__ import annotations

import ipaddress
import sys

from edgevl.errors import EdgevlError


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve an export over an OpenAI-compatible HTTP API",
        description="Start an HTTP server with /v1/chat/completions (streaming with \"stream\": true), "
                    "/v1/models and /health. Requests run one at a time in arrival order. Needs "
                    "`pip install 'edgevl[serve]'` (FastAPI + uvicorn).")
    p.add_argument("artifact", metavar="OUT", help="folder written by `edgevl export` (or `edgevl quantize`)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--model-name", default=None,
                   help="model id clients must send (default: the artifact folder's name)")
    p.add_argument("--allow-local-files", action="store_true",
                   help="accept image_url and video_url values that are paths on this machine (off by default: "
                        "clients could read any image or video file the server can)")
    p.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body in MiB (default: 32)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="largest image or video frame accepted, in pixels (default: 16777216 = 4096x4096)")
    p.add_argument("--max-video-mb", type=float, default=24.0,
                   help="largest video in a data URL, in MiB after base64 decoding (default: 24, what a "
                        "32 MiB request can carry; video needs the video extra, PyAV)")
    p.add_argument("--max-video-frames", type=int, default=768, metavar="N",
                   help="at most N frames sampled (at 2 fps) per video (default: 768); sampled frames are held "
                        "at their full size until resized, so this bounds memory")
    from edgevl.cli import add_runtime_args
    add_runtime_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from edgevl.serve.app import ServerLimits, create_app
    except ImportError as e:
        raise EdgevlError(f"`edgevl serve` needs the serve extra ({e.name} is missing); install it with "
                          f"`pip install 'edgevl[serve]'`.") from None
    from pathlib import Path

    from edgevl.cli import load_pipeline

    if args.max_video_frames < 2:   # Qwen2-VL sees a video as pairs of frames
        raise EdgevlError("--max-video-frames must be at least 2.")
    pipe = load_pipeline(args)
    name = args.model_name or Path(args.artifact).resolve().name
    mib = 1024 * 1024
    limits = ServerLimits(max_request_bytes=int(args.max_request_mb * mib), max_image_pixels=args.max_image_pixels,
                          allow_local_files=args.allow_local_files, max_video_bytes=int(args.max_video_mb * mib),
                          max_video_frames=args.max_video_frames)
    if not _is_loopback(args.host):
        print(f"warning: binding to {args.host} exposes the server beyond this machine; it has no "
              f"authentication.", file=sys.stderr)
    print(f"serving '{name}' on http://{args.host}:{args.port}/v1 (backend {pipe.backend.name})", file=sys.stderr)
    uvicorn.run(create_app(pipe, name, limits), host=args.host, port=args.port, log_level="warning")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
