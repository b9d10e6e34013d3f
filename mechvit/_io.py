"""The one place mechvit writes files: atomic writes of bytes, text, JSON and safetensors, atomic folder
swaps, content hashes, and a lock for an output folder.

Every writer goes through :func:`atomic_write` (a temporary file in the target's folder, fsync, then
``os.replace``), so a reader sees the old file or the new one, never half of one. Files get the
permissions ``open()`` would give them under the user's umask (``tempfile.mkstemp`` alone makes them 0600,
which colleagues on a shared server cannot read). JSON is strict: NaN and infinities become ``null``
(``json.dumps`` would write bare ``NaN``, which strict parsers and browsers' ``JSON.parse`` reject).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FolderLock",
    "LockError",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "default_dir_mode",
    "default_file_mode",
    "replace_dir",
    "staged_dir",
    "sha256_bytes",
    "sha256_file",
    "strict_json",
]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def default_dir_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (tuples become lists; tensors and numpy
    scalars/arrays become Python numbers/lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors, numpy arrays and scalars
        return strict_json(obj.tolist())
    return obj


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (NaN/inf -> null; ``allow_nan=False`` guards the rest)."""
    text = json.dumps(strict_json(obj), indent=indent, allow_nan=False, sort_keys=False)
    return atomic_write_text(path, text + "\n")


def atomic_save_safetensors(
    path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors.torch.save`` into ``path`` atomically (tensors made contiguous)."""
    from safetensors.torch import save

    data = save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata) if metadata else None
    )
    return atomic_write_bytes(path, data)


def replace_dir(staging: str | Path, final: str | Path) -> Path:
    """Move a finished ``staging`` folder onto ``final``, replacing an older ``final`` if there is one.
    The old folder is moved aside first, so ``final`` is never a mix of both."""
    staging, final = Path(staging), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class LockError(RuntimeError):
    """Another process holds the lock of an output folder."""


class FolderLock:
    """An exclusive, non-blocking lock on ``folder/.lock`` (``fcntl.flock``: released by the kernel when the
    process dies, so a killed run never leaves a stale lock). Use as a context manager::

        with FolderLock(out):        # raises LockError naming the holder's pid when taken
            ...
    """

    def __init__(self, folder: str | Path, name: str = ".lock"):
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 64, 0).decode().strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                who = f" (pid {holder})" if holder else ""
                raise LockError(
                    f"{self.folder} is in use by another run{who}; wait for it or choose another output folder"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``final``; on success it replaces ``final`` (see :func:`replace_dir`),
    on error it is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-"))
    os.chmod(staging, default_dir_mode())
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, final)
