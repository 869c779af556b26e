"""`edgevl serve OUT`: the OpenAI-compatible HTTP server (edgevl/serve/) on one artifact."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from edgevl.cli.flags import (
    MAX_MIB,
    MAX_QUEUE,
    add_artifact_flags,
    add_backend_flags,
    load_pipeline,
    real,
    whole,
)
from edgevl.extras import requires
from edgevl.serve.scheduler.jobs import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK
from edgevl.serve.connections import DEFAULT_BODY_TIMEOUT_S, ConnectionTimeouts


MAX_TIMEOUT_S = 24 * 3600


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve an export over an OpenAI-compatible HTTP API",
        description="Start an HTTP server with /v1/chat/completions (streaming with \"stream\": true), "
                    "/v1/models, /health and /metrics (Prometheus). Requests are batched continuously: each joins the "
                    "running batch at the next decode step and leaves it when done (up to --max-batch at once, "
                    "--max-queue more waiting, HTTP 429 beyond); an artifact exported with --variant standard runs "
                    "them one at a time in arrival order. Needs `pip install 'edgevl[serve]'` (FastAPI, uvicorn, "
                    "prometheus-client).")
    add_artifact_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=whole(1, 65535), default=8000, help="TCP port (default: 8000)")
    p.add_argument("--model-name", default=None,
                   help="model id clients must send (default: the artifact folder's name)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--allow-local-files", action="store_true",
                        help="accept image_url and video_url values that are paths on this machine (off by default: "
                             "clients could read any image or video file the server can)")
    limits.add_argument("--max-request-mb", type=real(0, MAX_MIB, above=True), default=32.0,
                        help="largest request body in MiB (default: 32)")
    limits.add_argument("--max-image-pixels", type=whole(1), default=4096 * 4096,
                        help="largest image or video frame accepted, in pixels (default: 16777216 = 4096x4096)")
    limits.add_argument("--max-video-mb", type=real(0, MAX_MIB, above=True), default=24.0,
                        help="largest video in a data URL, in MiB after base64 decoding (default: 24, what a "
                             "32 MiB request can carry; video needs the video extra, PyAV)")
    limits.add_argument("--max-video-frames", type=whole(2), default=768, metavar="N",
                        help="at most N frames sampled (at 2 fps) per video (default: 768); bounds memory and "
                             "the number of video tokens")
    limits.add_argument("--max-queue", type=whole(0, MAX_QUEUE), default=DEFAULT_MAX_QUEUE, metavar="N",
                        help=f"requests accepted beyond the --max-batch running ones; more get HTTP 429 "
                             f"(default: {DEFAULT_MAX_QUEUE})")
    limits.add_argument("--prefill-chunk", type=whole(1), default=DEFAULT_PREFILL_CHUNK, metavar="N",
                        help=f"while other requests decode, a joining prompt is prefilled N tokens per decode step "
                             f"(an even number: N-1 for an odd N), so a long prompt does not stall them (default: "
                             f"{DEFAULT_PREFILL_CHUNK})")
    limits.add_argument("--prefix-cache", action="store_true",
                        help="keep each finished request's KV cache in its row: a later request that starts with "
                             "the same tokens and images (a chat resending its history) prefills only the rest "
                             "and skips those images' vision calls (usage.prompt_tokens_details.cached_tokens). "
                             "Needs an `--variant ort` export. Off by default: the reused positions can differ in the "
                             "last bits from a fresh prefill's (int8 artifacts: the new positions quantize with "
                             "other activation scales), so tokens can differ from the request's own run")
    connections = p.add_argument_group("connections (slow clients are cut off)")
    defaults = ConnectionTimeouts()
    connections.add_argument("--header-timeout", type=real(0, MAX_TIMEOUT_S, above=True), default=defaults.header_s,
                             metavar="S", help="seconds a client has to send a request's line and headers, from "
                                               "connecting (or from the first byte of its next request on a kept-alive "
                                               f"connection); then the connection is closed (default: "
                                               f"{defaults.header_s:g})")
    connections.add_argument("--body-timeout", type=real(0, MAX_TIMEOUT_S, above=True),
                             default=DEFAULT_BODY_TIMEOUT_S, metavar="S",
                             help="seconds a client has to send a whole request body, from its headers; then HTTP 408 "
                                  f"and the connection is closed (default: {DEFAULT_BODY_TIMEOUT_S:g})")
    connections.add_argument("--keep-alive-timeout", type=real(0, MAX_TIMEOUT_S, above=True),
                             default=defaults.keep_alive_s, metavar="S",
                             help=f"seconds an idle connection stays open between requests (default: "
                                  f"{defaults.keep_alive_s:g})")
    add_backend_flags(p, max_batch=DEFAULT_MAX_BATCH)
    p.set_defaults(func=run)


def run(args) -> int:
    with requires("serve", "`edgevl serve`"):
        import prometheus_client  # noqa: F401 - /metrics
        import uvicorn

        from edgevl.serve.app import ServerSettings, create_app
        from edgevl.serve.connections import server_config
        from edgevl.serve.requests import RequestLimits

    pipe = load_pipeline(args)
    name = args.model_name or Path(args.artifact).resolve().name
    mib = 1024 * 1024
    limits = RequestLimits(max_image_pixels=args.max_image_pixels, max_video_bytes=int(args.max_video_mb * mib),
                           max_video_frames=args.max_video_frames, allow_local_files=args.allow_local_files)
    settings = ServerSettings(limits, max_request_bytes=int(args.max_request_mb * mib),
                              body_timeout_s=args.body_timeout, max_batch=args.max_batch, max_queue=args.max_queue,
                              prefill_chunk=args.prefill_chunk, prefix_cache=args.prefix_cache)
    if not _is_loopback(args.host):
        print(f"warning: binding to {args.host} exposes the server beyond this machine; it has no "
              f"authentication.", file=sys.stderr)
    app = create_app(pipe, name, settings)
    if app.state.scheduler.max_batch > 1:
        batching = f"continuous batching, up to {settings.max_batch} requests at once"
    elif settings.max_batch > 1:   # the standard variant's concat cache has no rows to batch in
        batching = "one request at a time (a --variant standard decoder; a --variant ort export batches requests)"
    else:
        batching = "one request at a time"
    cache = ", prefix cache on" if settings.prefix_cache else ""
    print(f"serving '{name}' on http://{args.host}:{args.port}/v1 (backend {pipe.backend.name}; {batching}, "
          f"{settings.max_queue} more queued{cache})", file=sys.stderr)
    timeouts = ConnectionTimeouts(header_s=args.header_timeout, keep_alive_s=args.keep_alive_timeout)
    server = uvicorn.Server(server_config(app, args.host, args.port, timeouts))
    server.run()
    return 0 if server.started else STARTUP_FAILURE     # uvicorn has said why (a port in use, ...)


STARTUP_FAILURE = 3          # uvicorn.run's exit status when the server could not start


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
