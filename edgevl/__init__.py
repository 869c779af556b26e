"""edgevl: Qwen2-VL export, calibration and a torch-free runtime."""

__version__ = "0.1.0"
