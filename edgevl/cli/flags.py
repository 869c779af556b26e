"""Flag groups shared by the commands, and how they become options objects.

    add_backend_flags(p)   --backend --threads --max-context --max-batch --max-image-patches --precision
                           --engine-cache --device --cuda-graph --fast-load -> backend_from_args(args)
    add_generation_flags(p, N)  --max-new-tokens and --greedy --temperature --top-k --top-p --repetition-penalty --seed
                                                                      -> sampling_from_args(args)
    add_artifact_flags(p)  OUT and --no-verify

Every command that runs graphs (run, chat, serve, quantize, bench, build) takes the same backend
flags, so an engine built by `edgevl build --max-context 8192` is the one `edgevl run
--max-context 8192` finds.

Every numeric flag of every command parses with a `Number` (`whole(...)`, `real(...)`) as its argparse
`type=`: nan, inf and values outside the flag's range are refused while the command line is parsed, in one
sentence naming the flag (`Parser.error`), before anything loads.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass

from edgevl.runtime.limits import max_threads
from edgevl.runtime.sampling import MAX_SEED, MAX_TEMPERATURE

MAX_BATCH = 256          # KV-cache rows: memory is rows x --max-context positions
MAX_QUEUE = 100_000      # requests waiting beyond the running ones (serve, triton)
MAX_MIB = 1 << 20        # a size flag in MiB: at most 1 TiB


# ----------------------------------------------------------------------------- numbers and the parser
@dataclass(frozen=True)
class Number:
    """The argparse `type=` of a numeric flag: a whole number (`whole`) or a finite real one, from `low`
    (excluded when `above`) to `high`; nan, inf and anything outside are refused with the rule."""

    whole: bool
    low: float | None = None
    high: float | None = None
    above: bool = False

    @property
    def rule(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        low, high = _show(self.low), _show(self.high)
        if low is None:
            return kind if high is None else f"{kind} of at most {high}"
        if self.above:
            return f"{kind} greater than {low}" + ("" if high is None else f" and at most {high}")
        return f"{kind} of at least {low}" if high is None else f"{kind} from {low} to {high}"

    def allows(self, value: int | float) -> bool:
        return ((self.whole or math.isfinite(value))
                and (self.low is None or value > self.low or (value == self.low and not self.above))
                and (self.high is None or value <= self.high))

    def __call__(self, text: str) -> int | float:
        try:
            value = int(text) if self.whole else float(text)
        except ValueError:
            value = None
        if value is None or not self.allows(value):
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise argparse.ArgumentTypeError(f"must be {self.rule}, not {shown!r}")
        return value


def _show(bound: float | None) -> str | None:
    return None if bound is None else str(bound) if isinstance(bound, int) else f"{bound:g}"


def whole(low: int | None = None, high: int | None = None) -> Number:
    return Number(True, low, high)


def real(low: float | None = None, high: float | None = None, above: bool = False) -> Number:
    return Number(False, low, high, above)


_FLAG_RULE = re.compile(r"argument (\S+): (must be .*)")


class Parser(argparse.ArgumentParser):
    """argparse with one-sentence errors: no usage block; a flag refused by its Number reads `--flag must be
    ..., not 'x'.` (subcommands' parsers are this class too)."""

    def error(self, message: str):
        flag = _FLAG_RULE.fullmatch(message)
        text = f"{flag[1]} {flag[2]}." if flag else f"{message}; see `{self.prog} --help`."
        self.exit(2, f"{self.prog}: error: {text}\n")


def logger(prefix: str):
    return lambda msg: print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- artifact
def add_artifact_flags(p, what: str = "folder written by `edgevl export` (or `edgevl quantize`)") -> None:
    p.add_argument("artifact", metavar="OUT", help=what)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")


# ----------------------------------------------------------------------------- backend
def add_backend_flags(p, backend_help: str | None = None, multiple: bool = False, max_batch: int | None = None) -> None:
    """`multiple`: --backend takes several names (bench sweeps them); `max_batch`: the command's default for
    --max-batch (serve: 8; otherwise 1, what one prompt needs)."""
    from edgevl.runtime.backends.table import BACKENDS
    g = p.add_argument_group("backend")
    help_text = backend_help or ("execution backend (default: the fastest available here, see `edgevl doctor`; "
                                 "the choice is printed)")
    if multiple:
        g.add_argument("--backend", action="extend", nargs="+", metavar="NAME",
                       help=help_text + f"; several to sweep them ({', '.join(BACKENDS)})")
    else:
        g.add_argument("--backend", choices=list(BACKENDS), default=None, help=help_text)
    g.add_argument("--threads", type=whole(0, max_threads()), default=0, metavar="N",
                   help="CPU threads of onnxruntime's one pool, shared by the process's sessions (0 = onnxruntime's "
                        "default, one per physical core)")
    g.add_argument("--max-context", type=whole(1), metavar="N",
                   help="most tokens per sequence, prompt + generated: the KV-cache size (TensorRT engines are "
                        "built for it; default 4096 for trt/ort-trt, the model's context otherwise)")
    g.add_argument("--max-batch", type=whole(1, MAX_BATCH), metavar="N", default=max_batch,
                   help="most sequences decoded together: the rows `edgevl serve` batches requests into (each a KV "
                        "cache of --max-context positions) and the largest batch TensorRT engines are built for "
                        f"(default: {max_batch or 1})")
    g.add_argument("--max-image-patches", type=whole(1), metavar="N",
                   help="most 14x14-pixel patches per image the vision engine accepts (default 4096 = 896x896 "
                        "pixels; a 448x448 image is 1024)")
    g.add_argument("--precision", choices=["graph", "fp16", "int8"], default="graph",
                   help="TensorRT precision: graph = the artifact's own types (strongly typed), fp16 = allow fp16 "
                        "for an fp32 export, int8 = allow int8 (quantized exports); default: graph")
    g.add_argument("--engine-cache", metavar="DIR",
                   help="where engines are cached (default: $EDGEVL_CACHE or ~/.cache/edgevl)")
    g.add_argument("--device", type=whole(0), default=0, metavar="N", help="GPU index (default: 0)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="ort-cuda: capture decode steps as CUDA graphs and replay them (fixed-address inputs, KV "
                        "buffers and outputs; greedy tokens come back as B integers per step). Not yet measured on "
                        "a GPU")
    g.add_argument("--fast-load", action="store_true",
                   help="ort-cpu: skip onnxruntime's pre-packing of float (fp32/fp16) weights at load: a 2B-width "
                        "fp32 decoder loads in ~0.1 s instead of 2-9 s, vision runs ~10 %% and decode ~5-10 %% "
                        "slower; quantized graphs stay packed. For one-shot runs of float exports, not servers")
    g.add_argument("--int8-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="ort-cpu, w4a16 artifacts: run prompts (prefill) on int8 copies of the 4-bit weights made at "
                        "load, decode steps on the 4-bit ones: ~2x faster prefill for one more byte per 4-bit weight in "
                        "memory and a longer first load (the copies are then kept under $EDGEVL_CACHE/int8-prefill, "
                        "one byte per weight on disk, and read by later loads); tokens can differ from the plain "
                        "w4a16 run's. Default: on where `edgevl quantize` measured it within its accuracy budget (the "
                        "manifest's int8_prefill), the CPU has AVX-512 VNNI or AVX-VNNI and the copy takes at most a "
                        "quarter of the available memory; --no-int8-prefill turns it off")


def backend_options(args, log=None):
    """The backend flags -> BackendOptions (validated there)."""
    from edgevl.runtime.backends.options import BackendOptions
    return BackendOptions.from_settings(args, args.device, log or logger("backend"))


def backend_from_args(args, log=None, name: str | None = ...):
    """The Backend the flags ask for (one name; `name` overrides --backend), or EdgevlError naming what is
    missing."""
    from edgevl.runtime.backends.table import get_backend
    return get_backend(args.backend if name is ... else name, backend_options(args, log))


# ----------------------------------------------------------------------------- generation
def add_generation_flags(p, max_new_tokens: int, what: str = "stop after N generated tokens") -> None:
    """--max-new-tokens and the sampling flags."""
    p.add_argument("--max-new-tokens", type=whole(1), default=max_new_tokens, metavar="N",
                   help=f"{what} (default: {max_new_tokens})")
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (overrides sampling settings)")
    g.add_argument("--temperature", type=real(0, MAX_TEMPERATURE),
                   help=f"sampling temperature, 0..{MAX_TEMPERATURE:g} (0 = greedy)")
    g.add_argument("--top-k", type=whole(0), help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=real(0, 1, above=True),
                   help="nucleus sampling: smallest set with probability >= p, 0 < p <= 1")
    g.add_argument("--repetition-penalty", type=real(0, above=True),
                   help="penalty > 1 discourages repeating seen tokens")
    g.add_argument("--seed", type=whole(0, MAX_SEED), help="random seed for sampling, >= 0 (default: nondeterministic)")


def sampling_from_args(args) -> dict:
    """Sampling flags (already in the runtime's ranges: their Numbers) -> Pipeline sampling keywords; flags not
    given keep the model's generation_config."""
    if args.greedy:
        sampling = {"do_sample": False}
    else:
        sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
        if any(v is not None for v in sampling.values()):
            sampling["do_sample"] = True
    return {**sampling, "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def decoding_from_args(args, pipe, max_new_tokens: int | None = None):
    """The generation flags -> the pipeline's `Decoding` (the model's generation_config under the flags given),
    validated once here."""
    return pipe.decoding(max_new_tokens or args.max_new_tokens, tuple(getattr(args, "stop", None) or ()),
                         **sampling_from_args(args))


def load_pipeline(args):
    """The artifact named by OUT on the backend the flags ask for."""
    from edgevl.runtime.pipeline import Pipeline
    from edgevl.runtime.backends.ort_session import share_thread_pool
    backend = backend_from_args(args)            # checks --threads first
    share_thread_pool(args.threads)
    return Pipeline.load(args.artifact, backend=backend, verify=not args.no_verify)
