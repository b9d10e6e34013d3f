"""Shared benchmark options: ``--device`` (default ``auto``: CUDA when present, so ``make bench`` runs there)
and ``--dtype``, a timing that waits for the device, and a line describing the machine (CPU model and load
average, or the GPU), so every printed table says where it ran."""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_device_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available, else CPU; the default), cpu, cuda or cuda:N",
    )
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of our side")


def resolve(args) -> tuple[torch.device, torch.dtype]:
    """The device and dtype asked for, or a clear error when that device is not there."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
    return device, DTYPES[args.dtype]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for ``fn()``, with the device's queue drained before and after (CUDA runs asynchronously)."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average n/a"


def machine(device: torch.device, dtype: torch.dtype) -> str:
    """One line: the device (GPU model, or CPU model with cores and torch threads), the dtype, the load."""
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    return f"{where}; {str(dtype).replace('torch.', '')}; torch {torch.__version__}; {load()}"
