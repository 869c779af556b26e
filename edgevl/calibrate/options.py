"""What the user asked `edgevl quantize` for, checked once before anything slow runs."""

from __future__ import annotations

from dataclasses import dataclass

from edgevl.errors import EdgevlError

RECIPE_NAMES = ("fp16", "int8", "w4a16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_ACTIVATIONS = ("auto", "static", "dynamic")
W4_ALGORITHMS = ("rtn", "hqq", "gptq", "awq")


@dataclass(frozen=True)
class QuantizeOptions:
    recipe: str
    calib: str | None = None          # folder of images or .jsonl; None = built-in photographs
    samples: int = 16                 # calibration samples
    eval_samples: int = 4             # held-out samples for the report and the gate
    method: str = "minmax"            # static int8 activation ranges
    activations: str = "auto"         # int8 activations: static (QDQ, TensorRT) | dynamic | auto (measure both)
    max_drop: float | None = None     # None: the recipe's default
    seed: int = 0
    new_tokens: int = 8               # greedy tokens per held-out sample
    calib_steps: int = 4              # decode steps recorded per calibration sample
    block_size: int = 128             # w4a16: rows per 4-bit scale
    w4_algorithm: str = "rtn"
    force: bool = False               # replace OUT_Q, and keep it even when the gate fails
    progress: bool = True             # tqdm bars

    def check(self) -> None:
        """EdgevlError naming the first bad option (before the long calibration capture)."""
        for value, allowed, flag in ((self.recipe, RECIPE_NAMES, "--recipe"),
                                     (self.method, CALIBRATION_METHODS, "--method"),
                                     (self.activations, INT8_ACTIVATIONS, "--activations"),
                                     (self.w4_algorithm, W4_ALGORITHMS, "--w4-algorithm")):
            if value not in allowed:
                raise EdgevlError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}.")
        if self.samples < 1 or self.eval_samples < 1:
            raise EdgevlError("--samples and --eval-samples must be at least 1.")
        if self.max_drop is not None and not 0 <= self.max_drop <= 1:
            raise EdgevlError(f"--max-drop must be between 0 and 1, not {self.max_drop}.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise EdgevlError(f"--block-size must be a power of two of at least 16, not {self.block_size}.")
        if self.new_tokens < 1 or self.calib_steps < 1:
            raise EdgevlError("--new-tokens must be at least 1.")
