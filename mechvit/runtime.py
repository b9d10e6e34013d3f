"""Process-level settings that make CPU interpretability work faster, and the two helpers every multi-process
(torchrun) code path shares. Nothing here runs on import."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(max_block_bytes: int = 1 << 30) -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    A full ``run_with_cache`` keeps every activation (about 1 GB for ViT-B at batch 32). With glibc's
    defaults, blocks that large are mapped fresh on every call and page-faulted in, which costs more than the
    hooks themselves (measured: full cache 1.25-1.82x timm's forward; with this setting 1.005-1.07x). This
    changes the allocator of the whole process, so it is opt-in; the ``mechvit`` command calls it.
    Returns False, changing nothing, where the C library is not glibc.
    """
    if not 0 < max_block_bytes < 2**31:
        raise ValueError(f"max_block_bytes must be in (0, 2**31), got {max_block_bytes}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(max_block_bytes)) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[None]:
    """With ``enabled=False``, every tqdm bar made inside the block is silent, mechvit's and the libraries'
    (sae-lens's training and norm-estimation bars among them), by forcing ``disable=True`` in tqdm's base
    class for the duration. tqdm's own ``TQDM_DISABLE`` variable is read once at import, so it cannot do this
    for a process that already imported tqdm (a notebook, the ``mechvit`` command)."""
    if enabled:
        yield
        return
    from tqdm import std

    original = std.tqdm.__init__

    @functools.wraps(original)
    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = silent
    try:
        yield
    finally:
        std.tqdm.__init__ = original


# ---- forked one-thread workers (CPU) ------------------------------------------------------------------------

# the function of the running forked_map, inherited by its workers
_FORKED: Callable[[Any], Any] | None = None
_IN_WORKER = False  # True in a forked_map worker


def _one_thread() -> None:
    import torch

    global _IN_WORKER
    _IN_WORKER = True
    torch.set_num_threads(1)


def in_forked_worker() -> bool:
    """True inside a :func:`forked_map` worker (where another forked_map cannot start)."""
    return _IN_WORKER


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a :func:`forked_map` worker (the ``__cause__`` of the exception
    re-raised in the parent), as multiprocessing's pool gives it."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""


def _forked_child(conn: Any, item: Any) -> None:
    """A worker: ``_FORKED(item)`` in one torch thread, its pickled ``(True, (item, result))`` or
    ``(False, (exception, traceback))`` sent back as bytes."""
    import traceback

    _one_thread()
    try:
        out = (True, (item, _FORKED(item)))  # type: ignore[misc]
    except BaseException as e:  # noqa: BLE001 (every error goes back to the parent)
        out = (False, (e, traceback.format_exc()))
    # plain pickle, not multiprocessing's: torch registers reductions there that move a tensor into shared
    # memory and pass its file descriptor from a thread of the sending process, which a worker that exits
    # after its one item may no longer serve (the parent then waits for ever)
    try:
        blob = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001
        blob = pickle.dumps(
            (
                False,
                (RuntimeError(f"forked_map: the worker's result for {item!r} cannot be pickled: {e}"), ""),
            )
        )
    conn.send_bytes(blob)
    conn.close()


def forked_map(fn: Callable[[Any], T], items: Iterable[Any], workers: int) -> Iterator[tuple[Any, T]]:
    """``(item, fn(item))`` for every item, in the order they finish, computed in ``workers`` forked processes
    (never more than the items) of one torch thread each, a fresh process per item. ``fn`` may be any
    callable, a closure over models and images included: the workers inherit it, with the rest of this
    process, by fork; only the items and the results are pickled. A worker's exception is raised here (its
    traceback as the ``__cause__``), and the other workers are killed. Linux (fork) and CPU work only: a
    process holding a CUDA context cannot fork. Why processes (the SAE step's numbers): on 2 cores two
    one-thread processes of small matrix products and Python run 1.28x one two-thread process.

    Written on ``multiprocessing.Process`` and a pipe per item rather than ``multiprocessing.Pool``: after a
    worker raised, the pool's ``terminate()`` sometimes waited for ever joining its handler threads (1 in 6
    runs of tests/test_study_sae_parallel.py's worker-error test); here no thread of ours is involved."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    global _FORKED
    if _FORKED is not None:
        raise RuntimeError("forked_map does not nest: a forked_map is already running in this process")
    pending = list(items)
    pending.reverse()  # pop() from the end: the items start in their order
    n = max(1, min(int(workers), len(pending)))
    ctx = mp.get_context("fork")
    running: dict[Any, tuple[Any, Any]] = {}  # the parent's end of each pipe -> (process, item)
    _FORKED = fn
    try:
        while pending or running:
            while pending and len(running) < n:
                item = pending.pop()
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_forked_child, args=(send, item), daemon=True)
                proc.start()
                send.close()  # the child holds its copy: EOF here when it dies
                running[recv] = (proc, item)
            for conn in wait(list(running)):
                proc, item = running.pop(conn)
                try:
                    blob = conn.recv_bytes()
                except EOFError:
                    blob = None
                conn.close()
                proc.join()
                if blob is None:
                    raise RuntimeError(
                        f"forked_map: the worker for {item!r} died without a result (exit code {proc.exitcode})"
                    )
                ok, payload = pickle.loads(blob)
                if not ok:
                    err, tb = payload
                    raise err from RemoteTraceback(tb)
                yield payload
    finally:
        _FORKED = None
        for conn, (proc, _) in running.items():
            proc.kill()
            proc.join()
            conn.close()


# ---- several processes (torchrun) ---------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default ``torch.distributed`` process group; ``(0, 1)`` when there is
    none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank0_runs(fn: Callable[[], T], what: str) -> T:
    """``fn()`` run on rank 0 only, its (picklable) value returned on every rank: the way the other ranks
    wait while rank 0 does file work (saving, evaluating, a study step that is not distributed). A
    collective: every rank calls it at the same point. An exception on rank 0 is raised there and becomes a
    ``RuntimeError`` naming ``what`` on the other ranks, which would otherwise wait for rank 0 forever. One
    process: just ``fn()``."""
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            box = [("ok", fn())]
        except BaseException as e:  # the other ranks must hear of it, whatever it is
            error, box = e, [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed while {what}: {value}")
    return value


# Environment variables that change which kernels torch, MKL and oneDNN run (and so the float rounding of every
# matrix product): a metrics.json records the ones that are set.
KERNEL_ENV = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUBLAS_WORKSPACE_CONFIG",
)
# the CPU flags that pick a SIMD code path in torch / MKL / oneDNN
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpuinfo(text: str | None = None) -> tuple[str | None, list[str]]:
    """(CPU model name, its SIMD flags among :data:`SIMD_FLAGS`) from ``/proc/cpuinfo`` (or ``text``); None and
    [] where there is no such file (macOS, Windows)."""
    if text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return None, []
    name, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name, [f for f in SIMD_FLAGS if f in flags]


def machine_fingerprint(device: str = "cpu") -> dict[str, Any]:
    """What decides the float rounding of a run beyond the package versions: the CPU (model, SIMD flags), the
    kernel level torch dispatches to (``torch.backends.cpu.get_cpu_capability()``: e.g. AVX512 or AVX2), MKL and
    oneDNN, the kernel-selecting environment variables that are set, and on CUDA the GPU and its libraries.
    Two runs of the same code agree bit for bit only where this agrees (README, "Reproducibility")."""
    import os
    import platform

    import torch

    name, flags = _cpuinfo()
    out: dict[str, Any] = {
        "cpu": name or platform.processor() or None,
        "cpu_flags": flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        out.update(
            gpu=torch.cuda.get_device_name(dev),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return out
