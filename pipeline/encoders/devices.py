"""Choosing the device and the compute precision the encoder runs on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


_CLAIMED_GPU: Any = None  # the open lock file that reserves this process's GPU


def claim_gpu(lock_dir: Path | None = None) -> str:
    """``cuda:i`` for the first GPU no other worker on this machine holds (a lock held until exit).

    Several embed workers (or runs) on one machine thus spread over its GPUs; with more workers
    than GPUs, the extra ones share GPUs round-robin.
    """
    global _CLAIMED_GPU
    import fcntl
    import tempfile

    import torch

    count = torch.cuda.device_count()
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"llark-gpu-locks-{os.getuid()}"
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        # Named by the GPU's UUID, so processes that see it under another index (CUDA_VISIBLE_DEVICES) agree.
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", index))
        handle = open(lock_dir / f"gpu-{uuid}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _CLAIMED_GPU = handle
        return f"cuda:{index}"
    return f"cuda:{os.getpid() % max(count, 1)}"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_compute_dtype(compute_dtype: str, device: str) -> str:
    if compute_dtype != "auto":
        return compute_dtype
    return "float16" if device.startswith("cuda") else "float32"



def check_device(device_option: str, compute_option: str, devices_here: bool) -> tuple[str, str]:
    """``--device`` and ``--compute-dtype`` resolved and checked against this machine (when the
    workers run here); raises StageConfigError naming the option."""
    import re

    import torch

    from pipeline.runner import StageConfigError

    if not devices_here and device_option == "auto":
        raise StageConfigError("--device: say cpu or cuda when the workers run on other machines")
    device = resolve_device(device_option)
    if not (device in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise StageConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device_option!r}")
    compute = resolve_compute_dtype(compute_option, device)
    if devices_here and device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StageConfigError(f"--device {device_option}: CUDA is not available on this machine")
        if compute == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise StageConfigError("--compute-dtype bfloat16: this GPU does not support bfloat16; use float16")
    return device, compute
