"""`edgevl doctor`: what this machine has, and which backends will run on it.

    report = collect()            # plain dict (JSON-able): platform, GPU, driver, CUDA, cuDNN,
    print(format_report(report))  # TensorRT, onnxruntime, every backend's (ok, reason)

Runs anywhere, GPU or not: every fact comes from `probe` (ctypes and file reads), so a
missing piece is reported, never raised. With an artifact folder it also prints the
memory the model will need (weights, KV cache at the chosen context).
"""

from __future__ import annotations

import platform

from edgevl import __version__
from edgevl.runtime.backends import probe
from edgevl.runtime.backends.table import availability
from edgevl.runtime.backends.options import BackendOptions


def collect(artifact=None, options: BackendOptions | None = None) -> dict:
    """Everything `edgevl doctor` reports, as a dict. `artifact`: an Artifact for the memory plan."""
    gpus, driver_cuda, no_gpu = probe.cuda_driver()
    ort_version, providers = probe.onnxruntime_info()
    backends = availability()
    report = {
        "edgevl": __version__,
        "python": platform.python_version(),
        "platform": {"machine": probe.machine(), "system": platform.system(), "release": platform.release(),
                     "jetson_model": probe.jetson_model(), "l4t": probe.l4t_release()},
        "gpus": [{"index": g.index, "name": g.name, "compute_capability": g.sm,
                  "memory_gib": round(g.total_memory_bytes / 2**30, 1)} for g in gpus],
        "no_gpu_reason": no_gpu or None,
        "nvidia_smi": probe.nvidia_smi(),
        "cuda_driver": probe.format_cuda_version(driver_cuda),
        "cuda_runtime": probe.cuda_runtime_version(),
        "cudnn": probe.cudnn_version(),
        "tensorrt": probe.tensorrt_version(),
        "cuda_python": probe.cuda_python_module() is not None,
        "onnxruntime": {"version": ort_version, "providers": providers,
                        "provider_libraries": {lib.name: {"needs": list(lib.needed), "missing": list(lib.missing)}
                                               for lib in map(probe.provider_library, ("cuda", "tensorrt"))
                                               if lib.path is not None}},
        "backends": {name: {"ok": ok, "reason": reason} for name, (ok, reason) in backends.items()},
        "default_backend": next((name for name, (ok, _) in backends.items() if ok), None),
    }
    if artifact is not None:
        from edgevl.runtime.backends.sizing import memory_plan
        opts = options or BackendOptions()
        limits = opts.limits(artifact.config)
        report["memory"] = {"batch": limits.max_batch, "max_context": limits.max_context,
                            **memory_plan(artifact, limits.max_batch, limits.max_context)}
    return report


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_report(r: dict) -> str:
    p = r["platform"]
    where = f"{p['jetson_model']} ({p['l4t']})" if p["jetson_model"] else "not a Jetson"
    lines = [f"edgevl {r['edgevl']} doctor (Python {r['python']})",
             f"platform      {p['machine']} {p['system']} {p['release']}, {where}"]
    if r["gpus"]:
        for g in r["gpus"]:
            lines.append(f"GPU {g['index']}         {g['name']}, compute capability {g['compute_capability']}, "
                         f"{g['memory_gib']} GiB")
    else:
        lines.append(f"GPU           none usable: {r['no_gpu_reason']}")
    smi = r["nvidia_smi"]
    smi_text = ("not installed (normal on Jetson)" if smi is None else
                smi.get("error") or f"driver {smi['driver_version']}")
    lines += [f"nvidia-smi    {smi_text}",
              f"CUDA          driver API {r['cuda_driver'] or '-'}, runtime library {r['cuda_runtime'] or 'not found'}",
              f"cuDNN         {r['cudnn'] or 'not found'}",
              f"TensorRT      {r['tensorrt'] or 'not found'}",
              f"cuda-python   {'yes' if r['cuda_python'] else 'no'}"]
    ort = r["onnxruntime"]
    lines.append(f"onnxruntime   {ort['version'] or 'not installed'}"
                 + (f" ({', '.join(ort['providers'])})" if ort["providers"] else ""))
    for name, lib in ort.get("provider_libraries", {}).items():
        lines.append(f"  {name} EP links {', '.join(lib['needs']) or 'nothing of NVIDIA'}"
                     + (f"; not loadable here: {', '.join(lib['missing'])}" if lib["missing"] else ""))
    lines.append("backends      (preference order; without --backend the first that works is used; each that does "
                 "not work says what to install)")
    for name, b in r["backends"].items():
        mark = "works" if b["ok"] else "no"
        extra = "  <- default" if name == r["default_backend"] else ""
        lines.append(f"  {name:<9} {mark:<5} {b['reason']}{extra}")
    if not r["gpus"]:
        lines.append("No GPU is usable here: only the CPU backend will run.")
    if "memory" in r:
        m = r["memory"]
        lines.append(f"memory        at batch {m['batch']}, max context {m['max_context']}:")
        for key, value in m.items():
            if key not in ("batch", "max_context"):
                lines.append(f"  {key:<22} {_size(value)}")
    return "\n".join(lines)
