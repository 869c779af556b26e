"""What goes into the model, torch-free: images and videos loaded (image_loading.py, video.py), their token cost
planned from headers (budget.py, plan.py), preprocessed exactly as transformers does (image_processing.py,
pos_embed.py, windows.py), the chat template and tokens (template.py, prompt.py) and M-RoPE positions
(rope_index.py); Qwen3-VL's video sampling and timestamped prompt text (qwen3_vl_video.py, qwen3_vl_prompt.py)."""
