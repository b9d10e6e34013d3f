"""Checkpoints: a folder with ``model.safetensors`` (a timm state dict) and ``card.json`` (how to rebuild it).

``load_checkpoint(dir)`` returns the timm model; ``HookedViT.from_timm(load_checkpoint(dir))`` hooks it.
The resumable training state (optimizer, scheduler, RNG, epoch) lives beside it in ``train_state.pt``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from torch import nn

from mechvit._io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, sha256_file

WEIGHTS = "model.safetensors"
CARD = "card.json"
TRAIN_STATE = "train_state.pt"
CARD_FORMAT = "mechvit-checkpoint/1"


def timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The timm state dict of a timm model or a HookedViT (via ``to_timm_state_dict``)."""
    sd = model.to_timm_state_dict() if hasattr(model, "to_timm_state_dict") else model.state_dict()
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(directory: str | Path, model: nn.Module, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``model.safetensors`` and ``card.json`` (with the weights' sha256 and size) into ``directory``.

    ``card`` must hold ``model: {name, kwargs}`` so the architecture can be rebuilt. Returns the card written.
    """
    directory = Path(directory)
    if "model" not in card or "name" not in card["model"]:
        raise ValueError("card must hold model.name and model.kwargs (the timm architecture)")
    sd = timm_state_dict(model)
    atomic_save_safetensors(directory / WEIGHTS, sd)
    card = {"format": CARD_FORMAT, **card}
    card["weights"] = {
        "file": WEIGHTS,
        "sha256": sha256_file(directory / WEIGHTS),
        "bytes": (directory / WEIGHTS).stat().st_size,
        "n_params": int(sum(v.numel() for v in sd.values())),
    }
    atomic_write_json(directory / CARD, card)
    return card


def read_card(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"no {CARD} in {directory} (expected a mechvit checkpoint folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e


def card_normalisation(directory: str | Path) -> tuple[list[float] | None, list[float] | None]:
    """``(mean, std)`` a checkpoint's images were normalised with in training (its card's ``config.data``);
    ``(None, None)`` for a folder without a card (a HookedViT folder) or a card without them."""
    if not (Path(directory) / CARD).is_file():
        return None, None
    data_cfg = read_card(directory).get("config", {}).get("data", {}) or {}
    mean, std = data_cfg.get("mean"), data_cfg.get("std")
    if mean is None or std is None:
        return None, None
    return [float(v) for v in mean], [float(v) for v in std]


def update_card(directory: str | Path, **fields) -> dict[str, Any]:
    card = read_card(directory)
    card.update(fields)
    atomic_write_json(Path(directory) / CARD, card)
    return card


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        return safetensors.torch.load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises SafetensorError (not public) on truncated/garbled files
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or damaged: {e}); "
            f"{path.stat().st_size} bytes on disk"
        ) from e


def load_state_checked(model: nn.Module, sd: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(sd)``, with an error naming ``source`` and every key/shape mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:8]))
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the checkpoint: {missing[:8]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: {unexpected[:8]}")
        raise ValueError(
            f"{source} does not fit the {type(model).__name__} architecture (another model's checkpoint?): "
            + " | ".join(parts)
        )
    model.load_state_dict(sd)


def build_timm(name: str, kwargs: dict | None = None, pretrained: bool = False) -> nn.Module:
    return timm.create_model(name, pretrained=pretrained, **(kwargs or {}))


def load_checkpoint(
    directory: str | Path,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    verify: bool = True,
) -> nn.Module:
    """Rebuild the timm model a checkpoint folder describes and load its weights (eval mode).

    With ``model`` given, the weights are loaded into it instead. ``verify`` checks the weights' sha256
    against the card. Wrong architecture or a damaged file raises ``ValueError`` naming the file.
    """
    directory = Path(directory)
    card = read_card(directory)
    wpath = directory / card.get("weights", {}).get("file", WEIGHTS)
    if verify and "sha256" in card.get("weights", {}) and wpath.is_file():
        digest = sha256_file(wpath)
        if digest != card["weights"]["sha256"]:
            raise ValueError(
                f"{wpath}: sha256 {digest} does not match the card's {card['weights']['sha256']} "
                "(file damaged or replaced)"
            )
    sd = load_weights(wpath)
    if model is None:
        spec = card["model"]
        model = build_timm(spec["name"], spec.get("kwargs"))
    load_state_checked(model, sd, wpath)
    if device is not None:
        model = model.to(device)
    return model.eval()


def save_train_state(directory: str | Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(directory) / TRAIN_STATE, buf.getvalue())


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable training state (truncated or damaged: {e})") from e
