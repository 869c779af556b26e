"""The Triton Python-backend model's logic: the repository's `model.py` puts edgevl on the stub's path and
hands every call here.

    initialize  config.pbtxt's parameters -> Pipeline.load(artifact, backend) (sha256s checked unless
                verify is "false") -> a scheduler (serve/scheduler/batching.py), one per model instance
    execute     decoupled (the default): each request becomes a Job on the scheduler and execute returns at
                once; text deltas go out as responses while it decodes (the scheduler batches the instance's
                concurrent requests continuously), the last response carries the finish reason and token ids
                and the FINAL flag. Not decoupled: one response per request, when it is done.
    finalize    the scheduler stops; unfinished requests end with an error

`pb_utils` (Triton's `triton_python_backend_utils`) is passed in, so this module imports nothing of Triton and
the tests drive it with a stand-in. A request's problems (bad JSON, an undecodable image, a too-long prompt,
sampling values out of range) are INVALID_ARG errors with the sentence `edgevl serve` answers with (serve/requests.py,
the place in the request before it where the sentence does not name it); a full instance is UNAVAILABLE; anything
else is INTERNAL with the exception's type only (its text can hold paths), the traceback in Triton's log.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevl.errors import EdgevlError
from edgevl.runtime.generate import Decoding
from edgevl.serve.scheduler.batching import make_scheduler
from edgevl.serve.scheduler.jobs import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFILL_CHUNK,
    Job,
    QueueFull,
    RequestCancelled,
)
from edgevl.serve.errors import RequestError, out_of_memory
from edgevl.serve.requests import RequestLimits
from edgevl.serve.triton.protocol import TRITON_LIMITS, Request, inputs, parse_request

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class ParameterError(EdgevlError):
    """A config.pbtxt parameter is wrong: the model fails to load with this sentence in Triton's log."""


@dataclass(frozen=True)
class ModelSettings:
    """The model's config.pbtxt `parameters` (string values), validated."""

    artifact: Path
    verify: bool = True
    backend: str = "ort-cpu"
    threads: int = 0
    max_context: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    max_image_patches: int | None = None
    precision: str = "graph"
    engine_cache: str | None = None
    cuda_graph: bool = False
    fast_load: bool = False
    int8_prefill: bool | None = None      # None: as the artifact and the CPU say (BackendOptions)
    limits: RequestLimits = TRITON_LIMITS

    @classmethod
    def from_parameters(cls, params: dict[str, str], version_dir: Path) -> ModelSettings:
        """`version_dir`: the model's version folder (REPO/NAME/1); a relative artifact path is inside it."""
        def text(key, default=None):
            value = params.get(key, "")
            return value if value != "" else default

        def integer(key, default=None, low=0):
            value = text(key)
            if value is None:
                return default
            try:
                number = int(value)
            except ValueError:
                raise ParameterError(f"parameter {key} must be an integer, got {value!r}.") from None
            if number < low:
                raise ParameterError(f"parameter {key} must be at least {low}, got {number}.")
            return number

        def flag(key, default):
            value = (text(key) or "").lower()
            if value in TRUE:
                return True
            if value in FALSE:
                return default if value == "" else False
            raise ParameterError(f"parameter {key} must be true or false, got {params[key]!r}.")

        artifact = text("artifact")
        if artifact is None:
            raise ParameterError("parameter artifact is missing; it names the edgevl artifact folder to serve.")
        path = Path(artifact)
        video_mb, base = text("max_video_mb"), TRITON_LIMITS
        try:
            video_bytes = int(float(video_mb) * 1024 * 1024) if video_mb else base.max_video_bytes
        except ValueError:
            raise ParameterError(f"parameter max_video_mb must be a number, got {video_mb!r}.") from None
        limits = dataclasses.replace(base, default_max_tokens=integer("default_max_tokens", base.default_max_tokens, 1),
                                     max_image_pixels=integer("max_image_pixels", base.max_image_pixels, 1),
                                     max_video_bytes=video_bytes,
                                     max_video_frames=integer("max_video_frames", base.max_video_frames, 2))
        return cls(artifact=path if path.is_absolute() else version_dir / path, verify=flag("verify", True),
                   backend=text("backend", "ort-cpu"), threads=integer("threads", 0),
                   max_context=integer("max_context", None, 1), max_batch=integer("max_batch", DEFAULT_MAX_BATCH, 1),
                   max_queue=integer("max_queue", DEFAULT_MAX_QUEUE, 0),
                   prefill_chunk=integer("prefill_chunk", DEFAULT_PREFILL_CHUNK, 1),
                   max_image_patches=integer("max_image_patches", None, 1), precision=text("precision", "graph"),
                   engine_cache=text("engine_cache"), cuda_graph=flag("cuda_graph", False),
                   fast_load=flag("fast_load", False), int8_prefill=flag("int8_prefill", None), limits=limits)


def model_parameters(model_config: dict) -> dict[str, str]:
    """config.pbtxt `parameters { key: K value: { string_value: V } }` -> {K: V}."""
    return {k: str((v or {}).get("string_value", "")) for k, v in (model_config.get("parameters") or {}).items()}


class EdgevlTritonModel:
    """One model instance: a Pipeline and its scheduler, driven by Triton's execute calls."""

    def __init__(self, pb_utils, args: dict):
        from edgevl.runtime.backends.table import get_backend
        from edgevl.runtime.backends.options import BackendOptions
        from edgevl.runtime.pipeline import Pipeline

        t0 = time.perf_counter()
        self.pb = pb_utils
        if int(np.__version__.split(".")[0]) >= 2:
            self.log(f"numpy {np.__version__} in the Python backend's stub: a stub built against numpy 1 (the one in "
                     f"nvidia-pytriton 0.7.0, Triton 2.51, is) receives empty or garbled tensors and crashes with it; "
                     f"if requests fail, put numpy<2 first on python_path.", warn=True)
        self.config = json.loads(args["model_config"])
        self.name = args.get("model_instance_name") or args.get("model_name", "edgevl")
        self.decoupled = bool((self.config.get("model_transaction_policy") or {}).get("decoupled", False))
        version_dir = Path(args["model_repository"]) / str(args.get("model_version", "1"))
        self.settings = s = ModelSettings.from_parameters(model_parameters(self.config), version_dir)
        self.limits = s.limits
        # Triton places each KIND_GPU instance on its GPU (instance_group gpus); KIND_CPU ones have none.
        device = int(args.get("model_instance_device_id") or 0) if args.get("model_instance_kind") == "GPU" else 0
        options = BackendOptions.from_settings(s, device, self.log)
        self.pipe = Pipeline.load(s.artifact, backend=get_backend(s.backend, options), verify=s.verify)
        self.scheduler = make_scheduler(self.pipe, s.max_batch, s.max_queue, s.prefill_chunk)
        kind = type(self.scheduler).__name__
        self.log(f"{self.name}: {s.artifact} on {self.pipe.backend.name}"
                 f"{f' (GPU {device})' if args.get('model_instance_kind') == 'GPU' else ''}, "
                 f"{'decoupled (streaming)' if self.decoupled else 'one response per request'}, {kind} "
                 f"(max_batch {s.max_batch}, max_queue {s.max_queue}), loaded in {time.perf_counter() - t0:.1f} s")

    # ------------------------------------------------------------------ Triton's calls
    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        held = [self._submit(request) for request in requests]
        return [self._unary_response(item) for item in held]

    def finalize(self) -> None:
        self.scheduler.close()

    # ------------------------------------------------------------------ requests
    def _read(self, request) -> tuple[Request, Decoding, object]:
        """The request parsed, its decoding (sampling validated once) and its plan (`Pipeline.plan_messages`): its cost checked against the context from
        the images' and videos' headers, before any pixel is decoded."""
        tensors = {}
        for decl in inputs(self.decoupled):
            tensor = self.pb.get_input_tensor_by_name(request, decl.name)
            if tensor is not None:
                # Copied: a request's input buffers are released when execute returns, the job runs later.
                tensors[decl.name] = np.array(tensor.as_numpy(), copy=True)
        req = parse_request(tensors, self.limits, self.decoupled)
        try:
            # the values it will use (over the model's generation_config), checked before any work
            decoding = self.pipe.decoding(req.max_tokens, req.stop, **req.sampling)
            return req, decoding, self.pipe.plan_messages(req.messages, req.images, req.videos)
        except EdgevlError as e:
            raise RequestError(str(e)) from None

    def _job(self, decoding: Decoding, plan, on_text=None, cancelled=None) -> Job:
        pipe = self.pipe

        def prepare():
            if cancelled is not None and cancelled():
                raise RequestCancelled()     # the client left while the request waited
            return pipe.prepare_plan(plan)   # decodes only what the plan keeps
        return Job(prepare, decoding, on_text)

    def _submit(self, request):
        """Not decoupled: a submitted Job, or the error response for a request refused at once."""
        try:
            _, decoding, plan = self._read(request)
            job = self._job(decoding, plan)
            self.scheduler.submit(job)
            return job
        except Exception as e:  # noqa: BLE001 - told to the client
            return self._error(e)

    def _unary_response(self, item):
        if not isinstance(item, Job):
            return item
        try:
            result = item.future.result()
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        return self._response(result.text, result.finish_reason, result.token_ids, len(result.prompt_token_ids))

    def _stream(self, request) -> None:
        """Decoupled: submit and return; responses are sent from the scheduler's threads."""
        sender = request.get_response_sender()
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            req, decoding, plan = self._read(request)
        except Exception as e:  # noqa: BLE001
            return self._send(sender, self._error(e), final)
        job = None

        def on_text(delta: str) -> None:
            if _cancelled(sender):
                job.cancel()       # the client went away: its row is freed at the scheduler's next step
            elif req.stream and delta:
                self._send(sender, self._response(delta), 0)

        def done(future) -> None:
            error = future.exception()
            if error is None:
                r = future.result()
                self._send(sender, self._response("" if req.stream else r.text, r.finish_reason, r.token_ids,
                                                  len(r.prompt_token_ids)), final)
            elif isinstance(error, RequestCancelled) and _cancelled(sender):
                self._send(sender, None, final)
            else:
                self._send(sender, self._error(error), final)

        job = self._job(decoding, plan, on_text, lambda: _cancelled(sender))
        try:
            self.scheduler.submit(job)
        except Exception as e:  # noqa: BLE001 - QueueFull, a closed scheduler: nothing will answer it but us
            return self._send(sender, self._error(e), final)
        job.future.add_done_callback(done)

    # ------------------------------------------------------------------ responses
    def _response(self, text: str, finish_reason: str = "", token_ids=(), prompt_tokens: int = 0):
        pb = self.pb
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)),
            pb.Tensor("token_ids", np.asarray(list(token_ids), dtype=np.int64)),
            pb.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int64)),
        ])

    def _error(self, exc: BaseException):
        code, message = self.classify(exc)
        if code == "INTERNAL":
            self.log("".join(traceback.format_exception(exc)).rstrip(), error=True)
        error_type = self.pb.TritonError
        try:
            error = error_type(message, getattr(error_type, code))
        except (TypeError, AttributeError):   # older Python backends: a message only
            error = error_type(message)
        return self.pb.InferenceResponse(output_tensors=[], error=error)

    @staticmethod
    def classify(exc: BaseException) -> tuple[str, str]:
        """(TritonError code name, the client's sentence) for a request's failure."""
        if isinstance(exc, QueueFull):
            return "UNAVAILABLE", (f"this model instance is busy ({exc.running} running, {exc.waiting} waiting, "
                                   f"max_batch {exc.max_batch}, max_queue {exc.max_queue}); retry later.")
        if isinstance(exc, RequestCancelled):
            return "CANCELLED", "the request was cancelled (the model is shutting down)."
        if isinstance(exc, RequestError) and exc.param and not exc.message.startswith(exc.param):
            return "INVALID_ARG", f"{exc.param}: {exc.message}"     # where in the request, as the server's `param`
        if isinstance(exc, EdgevlError):
            return "INVALID_ARG", str(exc)
        if out_of_memory(exc):
            return "INVALID_ARG", ("the request is too large for this server's memory; send a smaller image, "
                                   "fewer video frames or a shorter prompt.")
        return "INTERNAL", f"internal error ({type(exc).__name__})."

    def _send(self, sender, response, flags: int) -> None:
        try:
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)
        except Exception as e:  # noqa: BLE001 - a client that went away; nothing to tell it
            self.log(f"{self.name}: could not send a response ({type(e).__name__}: {e})", error=True)

    def log(self, message: str, error: bool = False, warn: bool = False) -> None:
        logger = getattr(self.pb, "Logger", None)
        if logger is None:
            return
        (logger.log_error if error else logger.log_warn if warn else logger.log_info)(message)


def _cancelled(sender) -> bool:
    check = getattr(sender, "is_cancelled", None)
    try:
        return bool(check()) if check else False
    except Exception:  # noqa: BLE001 - a sender already closed
        return False

