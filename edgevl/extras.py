"""Optional extras: one guard for "this needs `pip install 'edgevl[EXTRA]'`", worded the same everywhere."""

from __future__ import annotations

from contextlib import contextmanager

from edgevl.errors import EdgevlError

WHAT = {"export": "torch, transformers, onnx", "quantize": "onnx, scikit-image, tqdm",
        "serve": "FastAPI, uvicorn, prometheus-client", "video": "PyAV", "bench": "matplotlib, psutil, tqdm"}


def install_hint(extra: str) -> str:
    return f"pip install 'edgevl[{extra}]'"


@contextmanager
def requires(extra: str, what: str):
    """Wrap the imports of an optional feature: an ImportError becomes one sentence naming the extra.

        with requires("serve", "`edgevl serve`"):
            import uvicorn
    """
    try:
        yield
    except ImportError as e:
        raise EdgevlError(f"{what} needs the {extra} extra ({e.name or 'a package'} is missing); install it with "
                          f"`{install_hint(extra)}`.") from None
