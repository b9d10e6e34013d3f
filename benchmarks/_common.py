"""Shared benchmark options: ``--device`` (default ``auto``: CUDA when present, so ``make bench`` runs there)
and ``--dtype``, a timing that waits for the device, and a line describing the machine (CPU model and load
average, or the GPU), so every printed table says where it ran."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mechvit._io import atomic_write_text, strict_json  # a reader never sees half a file

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


class _Tee:
    """Writes to the terminal and keeps a copy (what the benchmark printed)."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, s: str) -> int:
        self.parts.append(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


def _git(*args: str) -> str:
    import subprocess

    try:
        out = subprocess.run(  # in this checkout, wherever the command runs from
            ["git", "-C", str(Path(__file__).parent), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclasses.dataclass
class Kept:
    """What :func:`kept_output` yields. Set ``data`` (anything ``json.dumps`` takes) inside the block to keep it
    beside the markdown, in ``<same name>.json`` with the run's provenance; after a finished block ``path`` and
    ``data_path`` name the files written (both stay None for an interrupted run)."""

    data: Any = None
    path: Path | None = None
    data_path: Path | None = None


@contextlib.contextmanager
def kept_output(
    name: str, folder: str | os.PathLike | None = None, command: Sequence[str] | None = None
) -> Iterator[Kept]:
    """Run a benchmark's ``main()`` inside this: what it prints goes to the terminal and, when it finishes, to
    ``benchmarks/results/<name>-<UTC date>-<commit>.md`` with a header naming the commit (``+dirty`` when the
    tree has changes), the command line, the date and the CPU, so a figure the docs quote can name its file.
    ``folder`` (else ``MECHVIT_BENCH_RESULTS``) moves the folder; an interrupted run writes nothing. ``command``
    (default ``python`` and ``sys.argv``) is the command line recorded. The :class:`Kept` it yields takes a
    machine-readable copy of the results (``data``), written to ``<same name>.json`` with the same provenance
    (scripts/sae_sweep.py keeps its table that way)."""
    import datetime
    import json
    import sys

    folder = Path(folder or os.environ.get("MECHVIT_BENCH_RESULTS") or Path(__file__).parent / "results")
    kept = Kept()
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield kept
    finally:
        sys.stdout = tee.stream
    command = " ".join(["python", *sys.argv] if command is None else command)
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    now = datetime.datetime.now(datetime.timezone.utc)
    header = (
        f"# {name}\n\n`{command}` at commit {commit}{'+dirty' * dirty}, "
        f"{now:%Y-%m-%d %H:%M} UTC; CPU {cpu_name()}, {os.cpu_count()} cores\n\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{now:%Y%m%d-%H%M}-{commit}{'+dirty' * dirty}.md"
    data_text, data_error = None, None
    if kept.data is not None:
        provenance = {
            "name": name,
            "command": command,
            "commit": commit,
            "dirty": dirty,
            "utc": f"{now:%Y-%m-%dT%H:%M:%SZ}",
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "markdown": path.name,
        }
        try:  # strict JSON (NaN and inf -> null; numpy and torch numbers -> Python), made before any write
            data_text = json.dumps({**provenance, "data": strict_json(kept.data)}, indent=1, allow_nan=False)
        except (TypeError, ValueError) as e:
            data_error = e
    if data_text is not None:
        data_path = path.with_suffix(".json")
        atomic_write_text(data_path, data_text + "\n")
        kept.data_path = data_path
    atomic_write_text(path, header + "".join(tee.parts))  # last: a kept .md means its .json is there too
    kept.path = path
    print(f"kept: {path}", file=sys.stderr)
    if data_error is not None:  # the printed results are kept; the machine-readable copy could not be
        raise ValueError(f"kept {path}, but not its data: it is not JSON ({data_error})") from data_error


# the shipped base model's shape (configs/train_base.yaml): what a benchmark falls back to before it is trained
SHIPPED_SHAPE = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=4, mlp_ratio=2.0
)


def load_shipped_base(device, dtype) -> tuple[Any, str]:
    """The shipped base checkpoint as a HookedViT in eval mode on ``device`` / ``dtype``, and where it came from;
    a randomly initialised model of its shape when the checkpoint is not there."""
    import timm

    from mechvit import HookedViT

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist_vit_base"
    if (ckpt / "card.json").is_file():
        from mechvit.training.checkpoint import load_checkpoint

        model = HookedViT.from_timm(load_checkpoint(ckpt))
        return model.to(device, dtype).eval(), str(ckpt.relative_to(ckpt.parents[1]))
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SHIPPED_SHAPE)
    return HookedViT.from_timm(m).to(device, dtype).eval(), "random init, shipped shape (no checkpoint yet)"
