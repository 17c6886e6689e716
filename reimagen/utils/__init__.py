"""Helpers every room uses; nothing here imports the rest of ``reimagen``.

    atomic.py     writes that never leave a half-written file (temporary name, then rename)
    compat.py     the CPU-torch / CUDA-torchvision shim (docs/install.md)
    precision.py  fp32 / bf16 / fp16 autocast
    seeding.py    per-sample seeds: a sample is a function of (seed, prompt id, sample index, stage, stream)
    launch.py     the launcher's environment (RANK / WORLD_SIZE) and rank 0's wait for file-sharded work
    cliutil.py    the CLI's error helper: a clear message and a non-zero exit instead of a traceback
"""
