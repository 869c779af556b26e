"""`edgevl bench`: per-stage latency, memory and rooflines, optionally against transformers.

stats.py (pure statistics and roofline arithmetic), compute.py (FLOPs per stage and the measured
GEMM rate: the compute roofline of vision and prefill), machine.py (machine description, memory
bandwidth, peak RSS / GPU memory), measure.py (the shared stage loop and the edgevl engine),
reference.py (the transformers engine, torch imported lazily), presets.py (cached random-weight
preset exports), suite.py (the sweep), report.py (table / Markdown / JSON / PNG), cli.py.
"""
