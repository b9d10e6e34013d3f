"""Process-level settings that make CPU interpretability work faster. Nothing here runs on import."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

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
