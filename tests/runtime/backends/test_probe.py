"""What the installed onnxruntime's provider libraries need (ELF DT_NEEDED), and the install advice built from it.

The fixture is a real ELF file: stand-in libraries compiled here with the system C compiler (gcc or cc), and a
`libonnxruntime_providers_tensorrt.so` linked against them the way onnxruntime-gpu 1.31.1's is (libnvinfer.so.10,
libnvonnxparser.so.10, libcudart.so.13). Skipped, saying so, where no C compiler exists.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from edgevl.runtime.backends import table as backends
from edgevl.runtime.backends import doctor, elf, packages, probe

CC = shutil.which("gcc") or shutil.which("cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (gcc/cc) to build the ELF fixture")


def _shared(folder, soname: str, links: tuple[str, ...] = ()) -> None:
    """A shared object named `soname` in `folder`, linked against `links` (sonames of objects already there)."""
    source = folder / "stub.c"
    source.write_text("int edgevl_stub(void) { return 0; }\nint getInferLibVersion(void) { return 100300; }\n")
    libs = [f"-l:{name}" for name in links]
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(folder / soname), f"-Wl,-soname,{soname}", str(source),
                    f"-L{folder}", "-Wl,--no-as-needed", *libs], check=True, capture_output=True)


@pytest.fixture(scope="module")
def onnxruntime_gpu(tmp_path_factory):
    """A folder shaped like onnxruntime-gpu 1.31.1's package: capi/libonnxruntime_providers_tensorrt.so and its
    NVIDIA libraries (in lib/, outside any search path)."""
    if CC is None:
        pytest.skip("no C compiler (gcc/cc) to build the ELF fixture")
    root = tmp_path_factory.mktemp("ortgpu")
    lib, capi = root / "lib", root / "onnxruntime" / "capi"
    lib.mkdir()
    capi.mkdir(parents=True)
    sonames = ("libnvinfer.so.10", "libnvonnxparser.so.10", "libcudart.so.13")
    for soname in sonames:
        _shared(lib, soname)
    _shared(lib, "libonnxruntime_providers_tensorrt.so", sonames)
    shutil.move(lib / "libonnxruntime_providers_tensorrt.so", capi)
    return root


@needs_cc
def test_elf_reader_reads_needed_and_soname(onnxruntime_gpu):
    provider = elf.read_dynamic(onnxruntime_gpu / "onnxruntime" / "capi" / "libonnxruntime_providers_tensorrt.so")
    assert provider.needed[:3] == ("libnvinfer.so.10", "libnvonnxparser.so.10", "libcudart.so.13")
    assert "libc.so.6" in provider.needed
    assert elf.read_dynamic(onnxruntime_gpu / "lib" / "libnvinfer.so.10").soname == "libnvinfer.so.10"
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        elf.read_dynamic(onnxruntime_gpu / "lib" / "stub.c")


@needs_cc
def test_provider_library_needs_and_what_does_not_load(onnxruntime_gpu):
    folder = onnxruntime_gpu / "onnxruntime"
    lib = probe.provider_library("tensorrt", folder, loadable=lambda soname: soname == "libcudart.so.13")
    assert lib.needed == ("libnvinfer.so.10", "libnvonnxparser.so.10", "libcudart.so.13")   # C runtime left out
    assert lib.missing == ("libnvinfer.so.10", "libnvonnxparser.so.10")
    assert (lib.major("libnvinfer"), lib.major("libcudart"), lib.major("libcudnn")) == (10, 13, None)
    assert probe.provider_library("cuda", folder).path is None                  # no CUDA provider in the fixture


@needs_cc
def test_the_real_loader_decides_what_loads(onnxruntime_gpu):
    """In a fresh process (the stand-ins must not stay loaded here): libraries loaded once are found by soname,
    the ones nowhere on the search path are missing."""
    script = textwrap.dedent(f"""
        import ctypes
        from pathlib import Path
        from edgevl.runtime.backends import probe
        ctypes.CDLL(r"{onnxruntime_gpu / 'lib' / 'libnvinfer.so.10'}")          # as `import tensorrt_libs` does
        lib = probe.provider_library("tensorrt", Path(r"{onnxruntime_gpu / 'onnxruntime'}"))
        print(",".join(n for n in lib.missing if n != "libcudart.so.13"))
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "libnvonnxparser.so.10"


def _gpu_machine(monkeypatch, lib: probe.ProviderLibrary, jetson: str | None = None):
    monkeypatch.setattr(probe, "onnxruntime_info", lambda: ("1.31.1", ["TensorrtExecutionProvider",
                                                                       "CUDAExecutionProvider", "CPUExecutionProvider"]))
    monkeypatch.setattr(probe, "no_gpu_reason", lambda: "")
    monkeypatch.setattr(probe, "jetson_model", lambda: jetson)
    monkeypatch.setattr(probe, "module_available", lambda name: name == "onnx")
    monkeypatch.setattr(probe, "provider_library", lambda name: lib if name == lib.name else probe.ProviderLibrary(name, None))


@needs_cc
def test_ort_trt_names_the_tensorrt_its_provider_was_linked_against(onnxruntime_gpu, monkeypatch):
    """onnxruntime-gpu 1.31.1 links TensorRT 10 for CUDA 13: an installed TensorRT 11 does not count, and the
    advice names tensorrt-cu13 10.x (not `pip install tensorrt`, which gives 11.x)."""
    folder = onnxruntime_gpu / "onnxruntime"
    read = probe.provider_library
    lib = read("tensorrt", folder, loadable=lambda soname: soname in ("libcudart.so.13", "libnvinfer.so.11"))
    everything = read("tensorrt", folder, loadable=lambda soname: True)
    _gpu_machine(monkeypatch, lib)
    ok, reason = backends.available_ort_trt()
    assert not ok
    assert "needs libnvinfer.so.10, libnvonnxparser.so.10" in reason
    assert 'pip install "tensorrt-cu13==10.*"' in reason and "not 11.x" in reason
    _gpu_machine(monkeypatch, everything)
    assert backends.available_ort_trt() == (True, "")
    _gpu_machine(monkeypatch, lib, jetson="NVIDIA Jetson AGX Orin Developer Kit")
    assert "JetPack" in backends.available_ort_trt()[1]


def test_cuda_libraries_name_their_packages(monkeypatch):
    lib = probe.ProviderLibrary("cuda", None, needed=("libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10",
                                                      "libcudart.so.13", "libcuda.so.1"),
                                missing=("libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10"))
    text = packages.provider_libraries(lib, "1.31.1", jetson=False)
    assert text.startswith("onnxruntime 1.31.1's cuda provider library needs libcublasLt.so.13")
    assert "pip install nvidia-cublas nvidia-curand (CUDA 13)" in text
    old = probe.ProviderLibrary("cuda", None, needed=("libcudart.so.12",), missing=("libcudart.so.12",))
    assert "nvidia-cuda-runtime-cu12" in packages.provider_libraries(old, None, jetson=False)


def test_doctor_names_a_package_for_every_backend_that_does_not_work(monkeypatch):
    """Off a GPU machine every GPU backend still says what to install (besides the GPU it lacks)."""
    monkeypatch.setattr(probe, "onnxruntime_info", lambda: ("1.32.0", ["CPUExecutionProvider"]))
    monkeypatch.setattr(probe, "module_available", lambda name: name == "onnx")
    monkeypatch.setattr(probe, "cuda_python_module", lambda: None)
    monkeypatch.setattr(probe, "jetson_model", lambda: None)
    monkeypatch.setattr(probe, "cuda_driver", lambda: ([], 12080, "the NVIDIA driver found no GPU"))
    report = doctor.collect()
    for name in ("trt", "ort-trt", "ort-cuda"):
        entry = report["backends"][name]
        assert not entry["ok"] and "pip install" in entry["reason"], (name, entry)
    assert 'pip install "onnxruntime-gpu==1.31.1"; it is built for CUDA 13 and this driver supports CUDA 12.8' \
        in report["backends"]["ort-cuda"]["reason"]
    assert "pip install tensorrt-cu12" in report["backends"]["trt"]["reason"]
    assert "pip install" in doctor.format_report(report)
