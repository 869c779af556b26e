"""Which package, at which version, supplies what a GPU backend is missing here: the install advice in the sentences
of `backends.available_*` and `edgevl doctor`.

The facts come from probe.py (what the installed onnxruntime's provider libraries were linked against, the driver's
CUDA version, Jetson or not); the package names are PyPI's (checked with `pip index versions`) and NVIDIA's Jetson
ones. onnxruntime-gpu 1.31.1 from PyPI is built for CUDA 13: its TensorRT EP links libnvinfer.so.10,
libnvonnxparser.so.10 and libcudart.so.13, so it wants a TensorRT 10.x build for CUDA 13 (tensorrt-cu13 10.13 ..
10.16), not the 11.x that `pip install tensorrt` gives; its CUDA EP links cuBLAS 13, cuRAND 10 and the CUDA 13
runtime, and loads cuDNN 9 itself.
"""

from __future__ import annotations

from edgevl.runtime.backends.probe import ProviderLibrary

JETSON_ORT_INDEX = "https://pypi.jetson-ai-lab.io/jp6/cu126"     # NVIDIA's aarch64 onnxruntime-gpu for JetPack 6
ORT_GPU = "onnxruntime-gpu==1.31.1"                              # the CUDA 13 build edgevl's tables describe

# soname stem -> (package for CUDA 13, package for CUDA 12)
CUDA_PACKAGES = {
    "libcudart": ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12"),
    "libcublas": ("nvidia-cublas", "nvidia-cublas-cu12"),
    "libcublasLt": ("nvidia-cublas", "nvidia-cublas-cu12"),
    "libcurand": ("nvidia-curand", "nvidia-curand-cu12"),
    "libcufft": ("nvidia-cufft", "nvidia-cufft-cu12"),
    "libnvrtc": ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12"),
    "libcudnn": ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12"),
}
TENSORRT_STEMS = ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin")


def _stem(soname: str) -> str:
    return soname.partition(".so")[0]


def provider_libraries(lib: ProviderLibrary, ort_version: str | None, jetson: bool) -> str:
    """One clause: which of the provider library's NVIDIA libraries do not load here, and what installs them."""
    cuda = lib.major("libcudart")
    trt = lib.major("libnvinfer")
    who = f"onnxruntime {ort_version}'s" if ort_version else "onnxruntime's"
    what = f"{who} {lib.name} provider library needs {', '.join(lib.missing)}"
    fixes = []
    if any(_stem(n) in TENSORRT_STEMS for n in lib.missing):
        fixes.append(tensorrt_for_onnxruntime(trt, cuda, jetson))
    cuda_missing = sorted({_stem(n) for n in lib.missing if _stem(n) in CUDA_PACKAGES})
    if cuda_missing:
        if jetson:
            fixes.append("JetPack's CUDA libraries (sudo apt install nvidia-jetpack)")
        else:
            column = 0 if cuda is None or cuda >= 13 else 1
            packages = sorted({CUDA_PACKAGES[s][column] for s in cuda_missing})
            fixes.append(f"pip install {' '.join(packages)} (CUDA {cuda or 13}), with their lib folders on "
                         f"LD_LIBRARY_PATH")
    if "libcuda.so.1" in lib.missing:
        fixes.append("an NVIDIA driver")
    return f"{what}, which do not load here: {'; '.join(fixes) or 'install them'}"


def tensorrt_for_onnxruntime(trt: int | None, cuda: int | None, jetson: bool) -> str:
    """The TensorRT an onnxruntime TensorRT EP linked against libnvinfer.so.<trt> and libcudart.so.<cuda> loads."""
    if jetson:
        return (f"TensorRT {trt or 10}.x from JetPack (sudo apt install nvidia-jetpack; JetPack 6 has 10.3), "
                f"with NVIDIA's onnxruntime-gpu for that JetPack")
    trt, cuda = trt or 10, cuda or 13
    return (f"TensorRT {trt}.x for CUDA {cuda}, not 11.x: pip install \"tensorrt-cu{cuda}=={trt}.*\" and put its "
            f"tensorrt_libs folder on LD_LIBRARY_PATH (python -c \"import tensorrt_libs, os; "
            f"print(os.path.dirname(tensorrt_libs.__file__))\")")


def onnxruntime_gpu(jetson: bool, driver_cuda: int | None) -> str:
    """How to get an onnxruntime with the CUDA and TensorRT EPs here."""
    if jetson:
        return f"NVIDIA's onnxruntime-gpu for JetPack: pip install onnxruntime-gpu --extra-index-url {JETSON_ORT_INDEX}"
    driver = "" if driver_cuda is None or driver_cuda >= 13000 else (
        f"; it is built for CUDA 13 and this driver supports CUDA {driver_cuda // 1000}.{driver_cuda % 1000 // 10}: "
        f"update the driver")
    return f"pip uninstall -y onnxruntime && pip install \"{ORT_GPU}\"{driver}"


def tensorrt_python(jetson: bool, driver_cuda: int | None) -> str:
    """How to get TensorRT's Python package for the trt backend here (10.x and 11.x both work)."""
    if jetson:
        return "JetPack's python3-libnvinfer (sudo apt install python3-libnvinfer; JetPack 6: TensorRT 10.3)"
    cuda = 12 if driver_cuda is not None and driver_cuda < 13000 else 13
    return f"pip install tensorrt-cu{cuda}"


def cuda_python(jetson: bool, runtime_cuda: str | None, driver_cuda: int | None) -> str:
    """cuda-python of the CUDA major the machine runs (JetPack 6: 12.6)."""
    major = int(runtime_cuda.split(".")[0]) if runtime_cuda else (12 if jetson or (driver_cuda or 13000) < 13000 else 13)
    return f"pip install \"cuda-python>={major},<{major + 1}\""
