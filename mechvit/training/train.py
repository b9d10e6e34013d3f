"""Training from scratch, corruption fine-tuning and PGD adversarial training, all from one ``TrainConfig``.

AdamW, linear warmup + cosine decay (per step), label smoothing, random-crop/flip augmentation. All
randomness of epoch ``e`` (order, augmentation, corruptions, PGD starts) comes from a generator seeded with
``(seed, e)``, and ``train_state.pt`` (model, optimizer, scheduler, RNG, history) is written atomically after
every epoch, so a run resumed after an interruption ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn
from tqdm.auto import tqdm

from mechvit.analysis.robustness import MetricAccumulator, robustness_matrix
from mechvit.data.loading import stratified_order
from mechvit.runtime import machine_fingerprint
from mechvit.training.attacks import pgd
from mechvit.training.checkpoint import (
    TRAIN_STATE,
    build_timm,
    load_checkpoint,
    load_train_state,
    read_card,
    save_checkpoint,
    save_train_state,
)
from mechvit.training.config import TrainConfig, to_dict
from mechvit.training.data import Normalized, augment, batches, load_split, n_items
from mechvit.training.evaluate import card_accuracy

# config keys that may change between an interrupted run and its resumption
_RESUME_FREE = {"device", "num_threads", "keep_state", "eval"}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup from 1/warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def resolve_model(cfg: TrainConfig, model: nn.Module | None) -> tuple[nn.Module, dict]:
    """The model to train and its architecture spec ``{name, kwargs}`` for the card."""
    spec = None if cfg.model is None else {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs)}
    if cfg.init_from is not None:
        parent = read_card(cfg.init_from)["model"]
        parent = {"name": parent["name"], "kwargs": parent.get("kwargs", {})}
        if spec is not None and spec != parent:
            raise ValueError(
                f"model {spec} differs from the architecture of init_from={cfg.init_from}: {parent}"
            )
        spec = parent
        if model is None:
            model = load_checkpoint(cfg.init_from)
    elif model is None:
        model = build_timm(cfg.model.name, cfg.model.kwargs, pretrained=cfg.model.pretrained)
    return model, spec


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_for_resume(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _RESUME_FREE}


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 500, device=None) -> dict[str, float]:
    """Clean metrics (top-1, top-5, NLL, ECE, ...) of ``model`` on ``data``."""
    model.eval()
    acc = None
    for x, y in batches(data, batch_size, shuffle=False):
        logits = model(x.to(device) if device else x)
        if acc is None:
            acc = MetricAccumulator(logits.shape[-1])
        acc.add(logits, y)
    return acc.result()


def train(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    *,
    data: tuple | None = None,
    resume: bool = True,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train (or fine-tune) per ``cfg`` and write the checkpoint folder ``cfg.out``; returns its path.

    ``model`` (a timm model or a HookedViT) replaces the one ``cfg`` would build; the card still needs the
    architecture spec from ``cfg.model`` or ``cfg.init_from``. ``data=(train, test)`` (each ``(images,
    labels)`` tensors or a ``Dataset``) replaces the data ``cfg.data`` names. With ``resume``, an existing
    ``train_state.pt`` of the same config in ``cfg.out`` is continued. ``on_epoch_end(epoch, record)`` is
    called after each epoch's state is saved.
    """
    out = Path(cfg.out)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model, spec = resolve_model(cfg, model)
    model = model.to(device)
    net = Normalized(model, cfg.data.mean, cfg.data.std).to(device)

    if data is not None:
        train_data, test_data = data
    else:
        train_data, test_data = load_split(cfg.data, "train", model), load_split(cfg.data, "test", model)
    check_not_empty(train_data, test_data, cfg if data is None else None)
    steps_per_epoch = math.ceil(n_items(train_data) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(total, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr / cfg.lr)
    )

    config_dict = to_dict(cfg)
    start_epoch, history, elapsed = 0, [], 0.0
    state = load_train_state(out) if resume else None
    if state is not None:
        if _config_for_resume(state["config"]) != _config_for_resume(config_dict):
            raise ValueError(
                f"{out / TRAIN_STATE} was written by a different config; delete it or choose another `out`"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch, history, elapsed = state["epoch"], list(state["history"]), float(state["elapsed_s"])

    if cfg.corruption is not None:
        from mechvit.corruptions import corrupt
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        g = epoch_generator(cfg.seed, epoch)
        net.train()
        loss_sum = correct = seen = n_corrupted = n_adv = 0
        bar = tqdm(
            batches(train_data, cfg.batch_size, generator=g), total=steps_per_epoch, disable=not progress,
            desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
        )  # fmt: skip
        for x, y in bar:
            x = augment(x.to(device), cfg.augment, g)
            y = y.to(device)
            if cfg.corruption is not None and torch.rand((), generator=g) < cfg.corruption.p:
                c = cfg.corruption
                name = c.seen[int(torch.randint(len(c.seen), (), generator=g))]
                sev = c.severities[int(torch.randint(len(c.severities), (), generator=g))]
                x = corrupt(x, name, sev, seed=int(torch.randint(2**31 - 1, (), generator=g)))
                n_corrupted += 1
            if cfg.adversarial is not None and torch.rand((), generator=g) < cfg.adversarial.p:
                a = cfg.adversarial
                x = pgd(net, x, y, eps=a.eps, steps=a.steps, step_size=a.step_size,
                        random_start=a.random_start, generator=g)  # fmt: skip
                n_adv += 1
            logits = net(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        test = accuracy(net, test_data, device=device)
        elapsed += time.time() - t0
        record = {
            "epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": correct / seen,
            "test_top1": test["top1"], "lr": sched.get_last_lr()[0], "epoch_s": round(time.time() - t0, 2),
            "corrupted_batches": n_corrupted, "adversarial_batches": n_adv,
        }  # fmt: skip
        history.append(record)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} train {record['train_top1']:.4f} "
                f"test {record['test_top1']:.4f} ({record['epoch_s']:.0f}s)"
            )
        save_train_state(out, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": _rng_state(), "epoch": epoch + 1, "history": history, "elapsed_s": elapsed,
            "config": config_dict,
        })  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)

    card = {
        "model": spec,
        "config": config_dict,
        "init_from": None if cfg.init_from is None else _card_ref(cfg.init_from),
        "data": {
            "dataset": cfg.data.dataset if data is None else "in-memory (passed to train)",
            "root": cfg.data.root,
            "n_train": n_items(train_data),
            "n_test": n_items(test_data),
            "img_size": cfg.data.img_size,
            "mean": cfg.data.mean,
            "std": cfg.data.std,
        },  # fmt: skip
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "wall_time_s": round(elapsed, 3),
        "history": history,
        "environment": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            # the CPU/GPU and kernel level: what the wall time and the float rounding depend on
            "machine": machine_fingerprint(str(device)),
        },  # fmt: skip
    }
    card.update(evaluate_for_card(net, cfg, test_data, device, progress))
    save_checkpoint(out, model, card)
    if not cfg.keep_state:
        (out / TRAIN_STATE).unlink(missing_ok=True)
    return out


def check_not_empty(train_data, test_data, cfg: TrainConfig | None = None) -> None:
    """A ``ValueError`` naming the split when the training or test data holds no image (before any training:
    an empty training set used to fail with a ZeroDivisionError after the first epoch, an empty test set with
    an AttributeError)."""
    for split, d in (("train", train_data), ("test", test_data)):
        if n_items(d) == 0:
            where = (
                "the data passed to train(data=...)"
                if cfg is None
                else f"data.dataset={cfg.data.dataset!r} (root {cfg.data.root or 'default'})"
            )
            raise ValueError(f"the {split} split is empty (0 images) in {where}: nothing to train or test on")


def _card_ref(directory: str) -> dict:
    card = read_card(directory)
    return {"path": str(directory), "sha256": card.get("weights", {}).get("sha256")}


def evaluate_for_card(net: nn.Module, cfg: TrainConfig, test_data, device, progress: bool) -> dict:
    """Clean metrics on the whole test set and, with ``cfg.eval``, top-1 per corruption x severity on the first
    ``eval.n_test`` test images (of an ImageFolder in class order: its seeded stratified subset, as
    ``data.limit_test`` takes; :func:`mechvit.data.loading.stratified_order`)."""
    order = None
    if not isinstance(test_data, tuple):
        targets = getattr(
            test_data, "targets", None
        )  # an ImageFolder (a limited one is a Subset, mixed already)
        if targets is not None:
            order = torch.tensor(stratified_order(targets), dtype=torch.long)
        xs, ys = zip(*[(x, y) for x, y in test_data], strict=True)
        test_data = (torch.stack(xs), torch.tensor(ys))
    e = cfg.eval
    # with which images were right: the card keeps them (packed bits) for paired tests between checkpoints
    if e is None:
        rows, hits = robustness_matrix(
            {"m": net}, *test_data, [], seed=0, device=device, progress=False, return_correct=True
        )
        return card_accuracy(rows, "m", n_test=len(test_data[1]), seed=0, correct=hits)
    from mechvit.corruptions import CORRUPTIONS

    names = list(e.corruptions) if e.corruptions is not None else list(CORRUPTIONS)
    clean, hits = robustness_matrix(
        {"m": net}, *test_data, [], seed=e.seed, device=device, progress=False, return_correct=True
    )
    if e.n_test is None:
        x, y = test_data
    elif order is None:
        x, y = (t[: e.n_test] for t in test_data)
    else:
        x, y = (t[order[: e.n_test]] for t in test_data)
    rows, more = robustness_matrix(
        {"m": net}, x, y, names, e.severities, seed=e.seed, batch_size=e.batch_size, device=device,
        include_clean=False, progress=progress, return_correct=True,
    )  # fmt: skip
    fields = card_accuracy(clean + rows, "m", n_test=len(y), seed=e.seed, correct={**hits, **more})
    fields["evaluation"]["n_test_clean"] = len(test_data[1])
    return fields


def finetune(cfg: TrainConfig, model: nn.Module | None = None, **kwargs) -> Path:
    """Fine-tuning is ``train`` with ``cfg.init_from`` set (and ``corruption`` or ``adversarial``)."""
    if cfg.init_from is None and model is None:
        raise ValueError("fine-tuning needs cfg.init_from (a checkpoint folder) or a model")
    return train(cfg, model, **kwargs)
