"""How graphs run: the backend table (table.py, the only place that knows execution providers and engines), the
runner interface (runner.py) and its onnxruntime (ort.py, ort_session.py) and TensorRT (trt.py) runners, the
tensors they exchange (tensors.py), shapes and memory (sizing.py), machine probes (probe.py, packages.py, elf.py,
doctor.py), what each GPU stack accepts (ort_placement.py, trt_parser.py) and the ort-cpu graph edits made at load
(grouped_decode.py, int8_prefill.py)."""
