"""diffprobe's extraction stage: images -> guided-diffusion U-Net -> the feature store.

Modules: `unet` (presets, checkpoints, block table, capture), `images` (sources and
preprocessing), `noise`, `plan`, `extraction` (the loop), `job` (config -> run), `cli`.
"""
