"""Activation store: stream a HookedViT's activations at one hook over a dataset, bounded in memory.

Two ways to feed an SAE, both yielding float32 batches of exactly ``batch_size`` rows:

- ``stream_batches``: run the model batch by batch (only up to the hook: a hook raises a stop exception,
  so later blocks never run), optionally corrupting a fraction of the images on the fly, and mix the rows
  in a shuffle buffer of ``buffer_size`` rows;
- ``cache_activations`` + ``CachedActivations.batches``: write the rows once to float16 ``.npy`` shards with
  a JSON manifest (model hash, hook, token selection, dataset, corruption mix, count), read back
  memory-mapped. A rerun keeps the finished shards and computes only the missing ones.

Memory is bounded by the shuffle buffer (``buffer_size`` rows) and one shard, whatever the dataset size.
Token order follows timm: ``[cls, (dist), reg..., patches]``; ``tokens`` picks ``all``, ``cls``,
``prefix`` (cls, dist and register tokens) or ``patches``.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechvit._io import atomic_write_text
from mechvit.corruptions import corruption_problem, severity_problem

__all__ = [
    "TOKEN_SELECTIONS",
    "ActivationStoreConfig",
    "CachedActivations",
    "CorruptionMix",
    "cache_activations",
    "check_hook",
    "hook_width",
    "iter_activations",
    "model_fingerprint",
    "run_to_hook",
    "run_to_hooks",
    "select_tokens",
    "shuffle_batches",
    "stream_batches",
]

TokenSelection = Literal["all", "cls", "patches", "prefix"]
TOKEN_SELECTIONS: tuple[str, ...] = ("all", "cls", "patches", "prefix")
MANIFEST = "manifest.json"
PARTIAL_GLOB = "manifest.rank*.json"  # per-rank progress of a distributed run
FORMAT = "mechvit-activations/1"
ImageTransform = Callable[[Tensor], Tensor]


@dataclass
class CorruptionMix:
    """Corrupt ``fraction`` of the images, each with one ``(name, severity)`` drawn uniformly from the list."""

    fraction: float = 0.0
    corruptions: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.fraction) <= 1.0:
            raise ValueError(f"corruption fraction must be in [0, 1], got {self.fraction}")
        pairs = []
        for item in self.corruptions:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"each corruption must be a (name, severity) pair, got {item!r}")
            sev = item[1]
            if (problem := severity_problem(sev)) is not None:
                raise ValueError(f"corruption {item[0]!r}: {problem}")
            pairs.append((item[0], int(sev)))
        self.corruptions = tuple(pairs)

    @property
    def active(self) -> bool:
        return self.fraction > 0

    def validate(self) -> None:
        """Check the names against ``mechvit.corruptions.CORRUPTIONS`` (imported only when needed). Called
        when the mix is used, not at construction: a mix with a fraction and no corruptions yet is a template
        (the study's ``sae.store.mix`` gets each SAE's condition)."""
        if not self.active:
            return
        if not self.corruptions:
            raise ValueError(f"fraction={self.fraction} corrupts images but no (name, severity) was given")
        problems = [
            f"({name!r}, {sev}): {p}" for name, sev in self.corruptions if (p := corruption_problem(name))
        ]
        if problems:
            raise ValueError("corruption mix: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": float(self.fraction), "corruptions": [list(c) for c in self.corruptions]}


@dataclass
class ActivationStoreConfig:
    """Where to read activations and how to batch them."""

    hook: str
    tokens: TokenSelection = "patches"
    model_batch_size: int = 64  # images per forward pass
    mix: CorruptionMix = field(default_factory=CorruptionMix)
    buffer_size: int = 32_768  # rows in the shuffle buffer
    seed: int = 0
    device: str | None = None  # None: the model's device

    def __post_init__(self) -> None:
        if isinstance(self.mix, dict):
            self.mix = CorruptionMix(**self.mix)
        if not isinstance(self.hook, str) or not self.hook:
            raise ValueError(
                f"hook must be a hook name such as 'blocks.3.hook_resid_post', got {self.hook!r}"
            )
        for name in ("model_batch_size", "buffer_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.tokens not in TOKEN_SELECTIONS:
            raise ValueError(f"tokens must be one of {TOKEN_SELECTIONS}, got {self.tokens!r}")
        if self.model_batch_size < 1 or self.buffer_size < 1:
            raise ValueError(
                f"model_batch_size and buffer_size must be >= 1, got "
                f"{self.model_batch_size} and {self.buffer_size}"
            )

    def identity(self) -> dict[str, Any]:
        """What decides the cached rows (everything but buffer size and device)."""
        d = asdict(self)
        d["mix"] = self.mix.to_dict()
        for key in ("buffer_size", "device"):
            d.pop(key)
        return d


# ---- the model side ------------------------------------------------------------------------------


class _StopForward(Exception):
    pass


def check_hook(model: Any, hook: str) -> None:
    if hook not in model.hook_dict:
        blocks = [h for h in model.hook_dict if h.startswith("blocks.0.")]
        raise ValueError(
            f"hook {hook!r} is not a hook of this model; expected a name from model.hook_dict, "
            f"e.g. {blocks[:4] + ['hook_embed']}"
        )


def _model_device(model: Any) -> torch.device:
    return next(iter(model.parameters())).device


def _input_weight(model: Any) -> Tensor:
    """The weight whose dtype the model wants its images in: a HookedViT's patch embedding (what its forward
    checks), else the first floating-point parameter."""
    weight = getattr(getattr(getattr(model, "embed", None), "proj", None), "weight", None)
    if isinstance(weight, Tensor):
        return weight
    params = list(model.parameters())
    return next((p for p in params if p.is_floating_point()), params[0])


def run_to_hooks(model: Any, images: Tensor, hooks: Iterable[str]) -> dict[str, Tensor]:
    """The activations at ``hooks`` (detached, as ``run_with_cache`` keeps them); the forward stops once the
    last of them has fired (later blocks never run: a hook at block 0 of 6 costs a sixth of a forward). The
    model's mode is left as it is."""
    wanted = set(hooks)
    got: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        got[hook.name] = act.detach()
        if len(got) == len(wanted):
            raise _StopForward

    try:
        with model.hooks(fwd_hooks=[(n, keep) for n in sorted(wanted)]):
            model(images)
    except _StopForward:
        pass
    missing = sorted(wanted - got.keys())
    if missing:
        raise ValueError(
            f"hooks {missing} exist but did not fire in the forward pass (are they switched on?)"
        )
    return got


@torch.no_grad()
def run_to_hook(model: Any, images: Float[Tensor, "b c h w"], hook: str) -> Tensor:
    """The activation at ``hook``; the forward stops there (later blocks never run). Eval mode."""
    check_hook(model, hook)
    was_training = model.training
    model.eval()
    try:
        return run_to_hooks(model, images, [hook])[hook]
    finally:
        model.train(was_training)


def resume_layer(hook: str) -> int | None:
    """The block a forward can start at (``forward(start_at_layer=...)``) with the hook's activation as input,
    for a residual-stream hook (``blocks.L.hook_resid_pre`` -> L, ``blocks.L.hook_resid_post`` -> L + 1);
    None for any other hook."""
    import re

    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook)
    return None if m is None else int(m.group(1)) + (m.group(2) == "post")


def _flat(act: Tensor, hook: str) -> Tensor:
    """[B, T, D] as is; [B, T, H, d_head] -> [B, T, H*d_head]; [B, D] -> [B, 1, D]."""
    if act.ndim == 2:
        return act[:, None, :]
    if "pattern" in hook or "attn_scores" in hook:
        raise ValueError(
            f"hook {hook!r} gives attention maps [batch, heads, query, key]; the store needs "
            "[batch, tokens, features] activations"
        )
    if act.ndim == 4:
        return act.flatten(2)
    if act.ndim != 3:
        raise ValueError(f"hook {hook!r} gives shape {tuple(act.shape)}; expected [batch, tokens, features]")
    return act


def select_tokens(act: Tensor, model_cfg: Any, tokens: str, hook: str = "") -> Float[Tensor, "n d"]:
    """Rows of ``act`` ([B, T, ...] or [B, D]) at the chosen tokens, flattened to [n, d]."""
    if tokens not in TOKEN_SELECTIONS:
        raise ValueError(f"tokens must be one of {TOKEN_SELECTIONS}, got {tokens!r}")
    if act.ndim == 2:
        if tokens != "all":
            raise ValueError(
                f"hook {hook!r} has one vector per image (shape {tuple(act.shape)}); "
                f"tokens must be 'all', got {tokens!r}"
            )
        return act
    act = _flat(act, hook)
    return act[:, token_slice(model_cfg, tokens, act.shape[1])].reshape(-1, act.shape[-1])


def token_slice(model_cfg: Any, tokens: str, n_tokens: int) -> slice:
    """The token positions of ``tokens`` (all / cls / prefix / patches) in a ``n_tokens`` residual stream:
    the one token-selection rule of mechvit (the SAE store and :func:`mechvit.analysis.collect_activations`)."""
    if tokens not in TOKEN_SELECTIONS:
        raise ValueError(f"tokens must be one of {TOKEN_SELECTIONS}, got {tokens!r}")
    n_prefix = int(model_cfg.n_prefix_tokens)
    if tokens == "all":
        return slice(None)
    if tokens == "cls":
        if not model_cfg.class_token:
            raise ValueError("tokens='cls' but this model has no class token")
        return slice(0, 1)
    if tokens == "prefix":
        if n_prefix == 0:
            raise ValueError(
                "tokens='prefix' but this model has no prefix tokens (no cls, dist or registers)"
            )
        return slice(0, n_prefix)
    if n_tokens <= n_prefix:
        raise ValueError(
            f"tokens='patches' but the activation has only {n_tokens} tokens ({n_prefix} prefix tokens)"
        )
    return slice(n_prefix, None)


def hook_width(model: Any, hook: str, tokens: str = "all") -> int:
    """Width of the rows the store yields for ``hook`` (runs one blank image up to the hook, in the dtype and
    on the device of the model's weights: a bfloat16 or float64 model refuses float32 images)."""
    cfg = model.cfg
    weight = _input_weight(model)
    blank = torch.zeros(1, cfg.in_chans, *cfg.img_size, dtype=weight.dtype, device=weight.device)
    return int(select_tokens(run_to_hook(model, blank, hook), cfg, tokens, hook).shape[-1])


def model_fingerprint(model: Any) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _dataset_id(data: Any, name: str | None) -> str:
    if name is not None:
        return name
    images = _as_image_tensor(data)
    if images is not None:
        h = hashlib.sha256()
        for part in images.detach().split(1024):  # piecewise: no copy of the whole dataset
            h.update(part.cpu().contiguous().view(torch.uint8).numpy())
        return f"tensor{list(images.shape)}:sha256:{h.hexdigest()[:16]}"
    dataset = getattr(data, "dataset", data)
    size = len(dataset) if hasattr(dataset, "__len__") else "?"
    return f"{type(dataset).__name__}[{size}]"


def _as_image_tensor(data: Any) -> Tensor | None:
    if isinstance(data, Tensor):
        return data
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor) and data[0].ndim == 4:
        return data[0]
    return None


def _image_batches(data: Any, batch_size: int) -> Iterator[Tensor]:
    """Batches of exactly ``batch_size`` images (the last may be short) from a tensor, an
    ``(images, labels)`` pair, or any iterable of image batches / ``(images, labels, ...)`` tuples."""
    images = _as_image_tensor(data)
    if images is not None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
        return
    pending: list[Tensor] = []
    n = 0
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(
                f"data must yield image batches [B, C, H, W] (or tuples starting with one), "
                f"got {type(x).__name__} {getattr(x, 'shape', '')}"
            )
        pending.append(x)
        n += len(x)
        while n >= batch_size:
            cat = torch.cat(pending)
            yield cat[:batch_size]
            pending, n = [cat[batch_size:]], n - batch_size
    if n:
        yield torch.cat(pending)


def _batch_seed(seed: int, epoch: int, batch_index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + batch_index) % (2**31 - 1)


def _corrupt(images: Tensor, mix: CorruptionMix, seed: int) -> Tensor:
    """Corrupt a random ``mix.fraction`` of the batch; deterministic in ``seed``."""
    if not mix.active:
        return images
    from mechvit.corruptions import corrupt

    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(len(images), generator=g) < mix.fraction
    which = torch.randint(len(mix.corruptions), (len(images),), generator=g)
    out = images.clone()
    for j, (name, severity) in enumerate(mix.corruptions):
        idx = torch.nonzero(chosen & (which == j)).flatten()
        if len(idx):
            idx = idx.to(images.device)
            out[idx] = corrupt(images[idx], name, severity, seed=seed + 1 + j)
    return out


def iter_activations(
    model: Any,
    data: Any,
    cfg: ActivationStoreConfig,
    *,
    epoch: int = 0,
    transform: ImageTransform | None = None,
    skip_batch: Callable[[int], bool] | None = None,
    batch_offset: int = 0,
) -> Iterator[tuple[int, Tensor]]:
    """``(batch_index, rows [n, d])`` per image batch, in dataset order.

    Images are corrupted per ``cfg.mix`` (seeded by ``cfg.seed``, ``epoch`` and the batch index, so a rerun
    gives the same rows), then passed through ``transform`` (e.g. the model's normalisation) and the model.
    Batches for which ``skip_batch(index)`` is true are not run. ``batch_offset``: ``data`` starts at that
    batch of a larger dataset (a shard of it): indices and corruption seeds are those of the whole dataset.
    """
    check_hook(model, cfg.hook)
    cfg.mix.validate()
    device = torch.device(cfg.device) if cfg.device else _model_device(model)
    model_device = _model_device(model)
    for b, images in enumerate(_image_batches(data, cfg.model_batch_size), start=batch_offset):
        if skip_batch is not None and skip_batch(b):
            continue
        images = _corrupt(images.to(model_device, torch.float32), cfg.mix, _batch_seed(cfg.seed, epoch, b))
        if transform is not None:
            images = transform(images)
        act = run_to_hook(model, images, cfg.hook)
        yield b, select_tokens(act, model.cfg, cfg.tokens, cfg.hook).float().to(device)


# ---- shuffling -----------------------------------------------------------------------------------


def shuffle_batches(
    chunks: Iterable[Tensor],
    batch_size: int,
    buffer_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    keep_fraction: float = 0.5,
) -> Iterator[Float[Tensor, "batch d"]]:
    """Re-batch a stream of [n_i, d] chunks into [batch_size, d] batches through a shuffle buffer.

    The buffer holds ``buffer_size`` rows; when full it is permuted, all but ``keep_fraction`` of it is
    served, and the kept rows mix with the next chunks. Every batch has exactly ``batch_size`` rows: at
    the very end of the stream fewer than ``batch_size`` leftover rows are dropped. Chunks are detached (no
    autograd through the buffer); no ``torch.no_grad`` decorator: on a generator it is re-entered when the
    generator is finalised, which at interpreter exit (a half-used endless stream) printed a traceback.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle and buffer_size < 2 * batch_size:
        raise ValueError(f"buffer_size ({buffer_size}) must be at least 2 * batch_size ({2 * batch_size})")
    buffer_size = max(buffer_size, batch_size)
    keep = int(buffer_size * keep_fraction) if shuffle else 0
    g = torch.Generator().manual_seed(seed)
    buf: Tensor | None = None
    n = 0

    def serve(n_rows: int, reserve: int) -> Iterator[Tensor]:
        # each served row is copied once (the gather); kept rows move to the front of the buffer
        nonlocal n
        assert buf is not None
        n_serve = ((n_rows - reserve) // batch_size) * batch_size
        if shuffle:
            order = torch.randperm(n_rows, generator=g).to(buf.device)
            for i in range(0, n_serve, batch_size):
                yield buf[order[i : i + batch_size]].float()
            rest = buf[order[n_serve:]]
        else:
            for i in range(0, n_serve, batch_size):
                yield buf[i : i + batch_size].to(torch.float32, copy=True)
            rest = buf[n_serve:n_rows].clone()
        buf[: len(rest)] = rest
        n = len(rest)

    for chunk in chunks:
        chunk = chunk.detach()
        if chunk.ndim != 2:
            raise ValueError(f"chunks must be [n, d], got shape {tuple(chunk.shape)}")
        if buf is None:
            # float16 chunks (the disk cache) stay float16 in the buffer: half the memory and copies
            dtype = chunk.dtype if chunk.dtype in (torch.float16, torch.bfloat16) else torch.float32
            buf = torch.empty(buffer_size, chunk.shape[1], dtype=dtype, device=chunk.device)
        elif chunk.shape[1] != buf.shape[1]:
            raise ValueError(f"chunk width changed from {buf.shape[1]} to {chunk.shape[1]}")
        pos = 0
        while pos < len(chunk):
            take = min(buffer_size - n, len(chunk) - pos)
            buf[n : n + take] = chunk[pos : pos + take]
            n, pos = n + take, pos + take
            if n == buffer_size:
                yield from serve(buffer_size, keep)
    if buf is not None and n:
        yield from serve(n, 0)


def _epochs(epochs: int | None) -> Iterator[int]:
    e = 0
    while epochs is None or e < epochs:
        yield e
        e += 1


def stream_batches(
    model: Any,
    data: Any,
    cfg: ActivationStoreConfig,
    batch_size: int,
    *,
    epochs: int | None = None,
    transform: ImageTransform | None = None,
) -> Iterator[Float[Tensor, "batch d"]]:
    """Shuffled [batch_size, d] float32 batches straight from the model (endless when ``epochs`` is None).
    An epoch that yields no activation (no images, or a one-shot iterator already used up) raises
    ValueError instead of looping forever."""

    def chunks() -> Iterator[Tensor]:
        for e in _epochs(epochs):
            n = 0
            for _, rows in iter_activations(model, data, cfg, epoch=e, transform=transform):
                n += len(rows)
                yield rows
            if n == 0:
                raise ValueError(
                    f"stream_batches: epoch {e} of data gave no activations; expected images (a tensor, an "
                    "(images, labels) pair, a Dataset or a re-iterable of batches), got none"
                    + (" (a one-shot iterator is used up after one epoch)" if e else "")
                )

    return shuffle_batches(chunks(), batch_size, cfg.buffer_size, seed=cfg.seed)


# ---- disk cache ----------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))  # mechvit._io: the one atomic writer


def cache_identity(
    model: Any,
    data: Any,
    cfg: ActivationStoreConfig,
    *,
    dataset: str | None = None,
    batches_per_shard: int = 16,
    dtype: str = "float16",
) -> dict[str, Any]:
    """What decides a cache's rows (the manifest's identity keys): format, model hash, dataset id, shard
    size, dtype and the store config. Two caches with equal identities hold the same rows."""
    if batches_per_shard < 1:
        raise ValueError(f"batches_per_shard must be >= 1, got {batches_per_shard}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    return {
        "format": FORMAT,
        "model_sha256": model_fingerprint(model),
        "dataset": _dataset_id(data, dataset),
        "batches_per_shard": int(batches_per_shard),
        "dtype": dtype,
        **cfg.identity(),
    }


def _partial_manifests(out: Path) -> list[Path]:
    """Per-rank progress files of a distributed run (``mechvit.sae.distributed``), merged into the manifest
    when every rank has finished."""
    return sorted(out.glob(PARTIAL_GLOB))


def finished_shards(
    out: Path, identity: dict[str, Any], *, overwrite: bool = False
) -> dict[int, dict[str, Any]]:
    """The shard records of ``out`` that match ``identity`` and whose files exist: from ``manifest.json``
    and from per-rank progress files of an interrupted distributed run. A folder holding a different cache
    raises ``ValueError``, or with ``overwrite`` is emptied of its shards."""
    shards: dict[int, dict[str, Any]] = {}
    sources = [out / MANIFEST] + _partial_manifests(out)
    for path in sources:
        if not path.is_file():
            continue
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in identity} != identity:
            if not overwrite:
                diff = sorted(k for k in identity if old.get(k) != identity[k])
                raise ValueError(
                    f"{out} holds a different activation cache (differs in {diff}); "
                    "pass overwrite=True or use another directory"
                )
            for s in old.get("shards", []):
                (out / s["file"]).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            continue
        for s in old.get("shards", []):
            if (out / s["file"]).is_file():
                shards[int(s["index"])] = s
    return shards


def write_manifest(
    out: Path,
    identity: dict[str, Any],
    shards: dict[int, dict[str, Any]],
    d: int | None,
    complete: bool,
    name: str = MANIFEST,
) -> None:
    """``manifest.json`` (or a per-rank progress file ``name``), written atomically; shards in index order."""
    ordered = [shards[i] for i in sorted(shards)]
    _write_json(
        out / name,
        {
            **identity,
            "hook_width": d,
            "complete": complete,
            "count": int(sum(s["rows"] for s in ordered)),
            "shards": ordered,
        },
    )


def write_shard(
    out: Path, index: int, parts: list[np.ndarray], first_batch: int, dtype: str, hook: str
) -> dict[str, Any]:
    """Write shard ``index`` (the rows of ``len(parts)`` image batches from ``first_batch`` on) atomically
    as ``shard_<index>.npy``; returns its manifest record."""
    arr = np.concatenate(parts)
    if not np.isfinite(arr).all():
        raise ValueError(f"activations at {hook!r} overflow {dtype}; cache with dtype='float32'")
    name = f"shard_{index:06d}.npy"
    tmp = out / (name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, out / name)
    return {
        "index": int(index),
        "file": name,
        "rows": int(arr.shape[0]),
        "width": int(arr.shape[1]),
        "first_batch": int(first_batch),
        "n_batches": len(parts),
    }


def cache_activations(
    model: Any,
    data: Any,
    out_dir: str | os.PathLike,
    cfg: ActivationStoreConfig,
    *,
    dataset: str | None = None,
    batches_per_shard: int = 16,
    dtype: Literal["float16", "float32"] = "float16",
    transform: ImageTransform | None = None,
    overwrite: bool = False,
) -> CachedActivations:
    """Write the activations at ``cfg.hook`` over ``data`` to ``out_dir``; resumable.

    Shard ``i`` holds image batches ``[i * batches_per_shard, (i + 1) * batches_per_shard)``. The manifest
    is rewritten after every shard, so an interrupted run keeps its finished shards and a rerun with the
    same model, data and config computes only the rest. A directory holding a different cache raises
    ``ValueError`` unless ``overwrite``. ``data`` must come in the same order every time (no shuffling
    DataLoader); name it with ``dataset`` (tensors are fingerprinted automatically). Several processes
    (torchrun) write one cache with :func:`mechvit.sae.distributed.cache_activations_distributed`.
    """
    identity = cache_identity(
        model, data, cfg, dataset=dataset, batches_per_shard=batches_per_shard, dtype=dtype
    )
    check_hook(model, cfg.hook)
    cfg.mix.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = finished_shards(out, identity, overwrite=overwrite)

    d_in = next((s["width"] for s in shards.values()), None)
    n_images = len(_as_image_tensor(data)) if _as_image_tensor(data) is not None else None
    total = None if n_images is None else -(-n_images // cfg.model_batch_size)
    pending: list[np.ndarray] = []
    current = -1
    first_batch = 0

    def flush() -> None:
        nonlocal pending
        if not pending:
            return
        shards[current] = write_shard(out, current, pending, first_batch, dtype, cfg.hook)
        pending = []
        write_manifest(out, identity, shards, shards[current]["width"], False)

    done = set(shards)
    rows_iter = iter_activations(
        model, data, cfg, transform=transform, skip_batch=lambda b: b // batches_per_shard in done
    )
    with tqdm(total=total, desc=f"caching {cfg.hook}", unit="batch", leave=False) as bar:
        bar.update(sum(s["n_batches"] for s in shards.values()))
        for b, rows in rows_iter:
            shard = b // batches_per_shard
            if shard != current:
                flush()
                current, first_batch = shard, b
            pending.append(rows.cpu().numpy().astype(dtype))
            d_in = rows.shape[1]
            bar.update(1)
        flush()
    if d_in is None:
        raise ValueError("no images in data: nothing to cache")
    write_manifest(out, identity, shards, d_in, True)
    for path in _partial_manifests(out):  # merged above
        path.unlink(missing_ok=True)
    return CachedActivations(out)


class CachedActivations:
    """A finished activation cache, read back memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(f"{self.path} is not an activation cache (no {MANIFEST})")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(
                f"{manifest_path} has format {self.manifest.get('format')!r}, expected {FORMAT!r}"
            )
        if not self.manifest.get("complete"):
            raise ValueError(f"the activation cache in {self.path} is incomplete; rerun cache_activations")
        self._shards = [np.load(self.path / s["file"], mmap_mode="r") for s in self.manifest["shards"]]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])

    @property
    def d_in(self) -> int:
        return int(self.manifest["hook_width"])

    @property
    def hook(self) -> str:
        return self.manifest["hook"]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def rows(self, start: int = 0, stop: int | None = None) -> Float[Tensor, "n d"]:
        """Rows ``[start, stop)`` as a float32 tensor (reads only those rows)."""
        stop = len(self) if stop is None else min(stop, len(self))
        parts = []
        for i, shard in enumerate(self._shards):
            lo, hi = max(start, self._starts[i]), min(stop, self._starts[i + 1])
            if lo < hi:
                parts.append(np.asarray(shard[lo - self._starts[i] : hi - self._starts[i]], dtype=np.float32))
        if not parts:
            return torch.empty(0, self.d_in)
        return torch.from_numpy(np.concatenate(parts))

    def sample(self, n: int, *, seed: int = 0) -> Float[Tensor, "n d"]:
        """``n`` rows drawn uniformly without replacement, in random order, as float32: a sample of the whole
        cache (``batches`` serves rows of nearby images together: its shuffle buffer mixes a few hundred
        images at a time, so a few dozen of its batches are a sample of a few thousand images, not of every
        one). Reads only those rows."""
        if not 0 < int(n) <= len(self):
            raise ValueError(f"sample size must be in [1, {len(self)}] (the cache's rows), got {n}")
        g = np.random.default_rng(seed)
        idx = np.sort(g.choice(len(self), int(n), replace=False))
        parts = []
        for i, shard in enumerate(self._shards):
            lo, hi = np.searchsorted(idx, [self._starts[i], self._starts[i + 1]])
            if lo < hi:
                parts.append(np.asarray(shard[idx[lo:hi] - self._starts[i]], dtype=np.float32))
        rows = np.concatenate(parts)
        return torch.from_numpy(rows[g.permutation(len(rows))])

    def chunks(self, chunk_rows: int, *, seed: int = 0, shuffle: bool = True) -> Iterator[Tensor]:
        """[<= chunk_rows, d] pieces in the stored dtype, in random shard and piece order when ``shuffle``."""
        g = np.random.default_rng(seed)
        order = g.permutation(len(self._shards)) if shuffle else range(len(self._shards))
        for i in order:
            shard = self._shards[i]
            starts = list(range(0, len(shard), chunk_rows))
            if shuffle:
                g.shuffle(starts)
            for s in starts:
                yield torch.from_numpy(
                    np.array(shard[s : s + chunk_rows])
                )  # stored dtype; batches are float32

    def batches(
        self,
        batch_size: int,
        *,
        buffer_size: int = 32_768,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        device: str | torch.device = "cpu",
    ) -> Iterator[Float[Tensor, "batch d"]]:
        """[batch_size, d] float32 batches through a shuffle buffer (endless when ``epochs`` is None)."""
        if len(self) < batch_size:
            raise ValueError(f"the cache holds {len(self)} rows, fewer than one batch of {batch_size}")
        chunk_rows = max(batch_size, buffer_size // 8)
        chunks = (c for e in _epochs(epochs) for c in self.chunks(chunk_rows, seed=seed + e, shuffle=shuffle))
        for batch in shuffle_batches(chunks, batch_size, buffer_size, seed=seed, shuffle=shuffle):
            yield batch.to(device)
