"""What every study step needs: the models (HookedViTs), the images, their corrupted copies, the device.

Models are resolved once per run (content hashes for the step cache), loaded lazily; images are the
first ``n`` of the test split (deterministic), corrupted copies are made once per condition with a seed
derived from the study seed and the condition, so every step and model sees the same corrupted images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechvit._io import sha256_file
from mechvit.data.loading import as_tensors, load_split
from mechvit.study.config import Condition, ConfigError, ModelEntry, StudyConfig


@dataclass
class ModelInfo:
    """A resolved model entry: where it comes from, its content hash and the corruptions it has seen."""

    name: str
    entry: ModelEntry
    sha256: str
    seen: list[str]
    source: str
    card: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        clean = (self.card.get("clean") or {}) if self.card else {}
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "seen": self.seen,
            "card_clean_top1": clean.get("top1"),
        }


def _key(i: int) -> str:
    return "models.base" if i == 0 else f"models.finetuned[{i - 1}]"


def resolve_model(entry: ModelEntry, key: str, progress: bool = True) -> ModelInfo:
    """Check the entry's source exists (training it first when ``train_config`` says how) and hash it."""
    if entry.checkpoint is not None:
        from mechvit.training.checkpoint import CARD, WEIGHTS, read_card

        folder = Path(entry.checkpoint)
        if not (folder / CARD).is_file() and entry.train_config is not None:
            from mechvit.training.config import load_config
            from mechvit.training.train import train

            tcfg = load_config(entry.train_config)
            if Path(tcfg.out).resolve() != folder.resolve():
                raise ConfigError(
                    f"{key}.train_config: {entry.train_config} writes {tcfg.out}, not the checkpoint {folder}"
                )
            train(tcfg, progress=progress)
        if not (folder / CARD).is_file():
            raise ConfigError(
                f"{key}.checkpoint: {folder} is not a mechvit checkpoint folder (no {CARD}); "
                "train it first (mechvit train) or fix the path"
            )
        card = read_card(folder)
        weights = folder / card.get("weights", {}).get("file", WEIGHTS)
        if not weights.is_file():
            raise ConfigError(f"{key}.checkpoint: weights file {weights} is missing")
        seen = (
            entry.seen
            if entry.seen is not None
            else list(((card.get("config") or {}).get("corruption") or {}).get("seen") or [])
        )
        return ModelInfo(entry.name, entry, sha256_file(weights), seen, f"checkpoint {folder}", card)
    if entry.hooked is not None:
        folder = Path(entry.hooked)
        files = [folder / "config.json", folder / "model.safetensors"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{key}.hooked: {folder} is not a HookedViT folder (missing {missing})")
        digest = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
        return ModelInfo(entry.name, entry, digest, list(entry.seen or []), f"HookedViT folder {folder}")
    spec = f"timm:{entry.timm}:pretrained={entry.pretrained}:{sorted(entry.timm_kwargs.items())}"
    return ModelInfo(
        entry.name,
        entry,
        hashlib.sha256(spec.encode()).hexdigest(),
        list(entry.seen or []),
        f"timm {entry.timm}" + (" (pretrained)" if entry.pretrained else ""),
    )


def load_hooked(info: ModelInfo, device: torch.device):
    """The HookedViT of a resolved entry, in eval mode on ``device``."""
    from mechvit.model import HookedViT

    e = info.entry
    if e.checkpoint is not None:
        from mechvit.training.checkpoint import load_checkpoint

        model = HookedViT.from_timm(load_checkpoint(e.checkpoint), device=device)
    elif e.hooked is not None:
        model = HookedViT.from_pretrained(e.hooked, device=device)
    else:
        model = HookedViT.from_timm(e.timm, pretrained=e.pretrained, device=device, **e.timm_kwargs)
    return model.eval()


def validate_models(cfg: StudyConfig) -> str | None:
    """``mechvit study --validate``'s checks that need the models, without running the study: every model's
    source exists (:func:`resolve_model`), and the config fits the base model (:func:`check_hooks_against_model`:
    the SAE hook, the SAE step's run length and k, attention's view layers, patching's positions). Raises
    ConfigError; returns None when everything was checked, else what was not: a checkpoint the study would
    train first, pretrained timm weights (not downloaded here), a checkpoint folder not made yet (which the
    study would refuse); without the base model its checks are left to the start of the study."""
    from mechvit.study.config import check_hooks_against_model
    from mechvit.training.checkpoint import CARD

    notes, missing, base_checked = [], [], False
    for i, entry in enumerate(cfg.model_entries()):
        if entry.checkpoint is not None and not (Path(entry.checkpoint) / CARD).is_file():
            if entry.train_config is not None:
                notes.append(f"{_key(i)} is trained by the study first ({entry.train_config})")
            else:
                missing.append(entry.checkpoint)
        elif entry.checkpoint is None and entry.hooked is None and entry.pretrained:
            notes.append(f"{_key(i)}'s pretrained timm weights ({entry.timm}) are not downloaded to validate")
        else:
            info = resolve_model(entry, _key(i), progress=False)
            if i == 0:
                check_hooks_against_model(cfg, load_hooked(info, torch.device("cpu")))
                base_checked = True
    if missing:
        notes.append(
            f"no checkpoint yet at {', '.join(missing)} (mechvit train {'it' if len(missing) == 1 else 'them'} "
            "first: the study stops at a missing one)"
        )
    if not base_checked:
        notes.append("the checks against the base model run when the study starts")
    return "; ".join(notes) or None


def resolve_device(device: str | None) -> torch.device:
    """The study's device: ``None`` is cuda when available, else cpu; a bad string is a :class:`ConfigError`."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device: expected cpu, cuda, cuda:<n> or mps, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: expected an available device, got {device!r} (no CUDA here)")
    return dev


def _condition_seed(seed: int, cond: Condition, tag: str) -> int:
    return zlib.crc32(f"{seed}/{tag}/{cond.corruption}/{cond.severity}".encode()) & 0x7FFFFFFF


class StudyContext:
    """Shared, lazily loaded state of one study run."""

    def __init__(self, cfg: StudyConfig, out: Path):
        self.cfg = cfg
        self.out = out
        self.device = resolve_device(cfg.device)
        self.progress = cfg.progress
        self.infos: dict[str, ModelInfo] = {}
        for i, entry in enumerate(cfg.model_entries()):
            self.infos[entry.name] = resolve_model(entry, _key(i), progress=cfg.progress)
        self._models: dict[str, Any] = {}
        self._test: tuple[Tensor, Tensor] | None = None
        self._train: Tensor | None = None
        self._corrupted: dict[tuple[str, str], Tensor] = {}
        m = cfg.data.mean
        self._mean = None if m is None else torch.tensor(m, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = None if m is None else torch.tensor(cfg.data.std, dtype=torch.float32).view(1, -1, 1, 1)

    # ---- models -----------------------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        return self.cfg.models.base.name

    @property
    def finetuned_names(self) -> list[str]:
        return [m.name for m in self.cfg.models.finetuned]

    @property
    def control_names(self) -> list[str]:
        """The clean fine-tune controls: the fine-tunes whose checkpoint card names no corruption."""
        return [n for n in self.finetuned_names if not self.infos[n].seen]

    @property
    def model_names(self) -> list[str]:
        return list(self.infos)

    @property
    def sae_model_names(self) -> list[str]:
        """The models that get SAEs (``sae.models``, default all), in ``model_names``' order (base first)."""
        chosen = self.cfg.sae.models or self.model_names
        return [n for n in self.model_names if n in chosen]

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = load_hooked(self.infos[name], self.device)
        return self._models[name]

    def model_hashes(self) -> dict[str, dict]:
        return {n: {"sha256": i.sha256, "seen": i.seen} for n, i in self.infos.items()}

    def seen_conditions(self, name: str) -> list[Condition]:
        """The study conditions of the corruptions model ``name`` was fine-tuned on."""
        return [c for c in self.cfg.conditions if c.corruption in self.infos[name].seen]

    # ---- images -----------------------------------------------------------------------------------------
    def _data_cfg(self, limit_test: int | None = None, limit_train: int | None = None):
        return dataclasses.replace(self.cfg.data, limit_train=limit_train, limit_test=limit_test)

    def _n_test_needed(self) -> int:
        c = self.cfg
        sizes = [
            c.robustness.n_images,
            c.logit_lens.n_images,
            c.attention.n_images,
            c.sae.n_eval_images,
            c.sae.n_fidelity_images or 0,
            c.sae.n_heldout_images or 0,
            c.patching.n_images,
            c.cka.n_images,
        ]
        return max(sizes)

    def test_images(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` test images in [0, 1] (CPU) and their labels."""
        if self._test is None:
            self._test = as_tensors(load_split(self._data_cfg(limit_test=self._n_test_needed()), "test"))
        x, y = self._test
        if n > len(y):
            raise ConfigError(f"data: the test split holds {len(y)} images, the config asks for {n}")
        return x[:n], y[:n]

    def train_images(self, n: int) -> Tensor:
        if self._train is None or len(self._train) < n:
            self._train = as_tensors(load_split(self._data_cfg(limit_train=n), "train"))[0]
        return self._train[:n]

    def corrupted(self, cond: Condition, n: int) -> Tensor:
        """The first ``n`` test images under ``cond`` (seeded per condition; the same for every step)."""
        key = (cond.label, "test")
        cached = self._corrupted.get(key)
        if cached is None or len(cached) < n:
            from mechvit.corruptions import corrupt

            x, _ = self.test_images(self._n_test_needed())
            cached = corrupt(
                x, cond.corruption, cond.severity, seed=_condition_seed(self.cfg.seed, cond, "test")
            )
            self._corrupted[key] = cached
        return cached[:n]

    def prep(self, x: Tensor) -> Tensor:
        """[0, 1] images -> what the models take (normalised when data.mean/std are set), on the device."""
        x = x.to(self.device, torch.float32)
        if self._mean is not None:
            x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x

    def wrapped(self, name: str):
        """The model taking [0, 1] images (``mechvit.data.Normalized``), for the robustness matrix."""
        from mechvit.data.loading import Normalized

        return Normalized(self.model(name), self.cfg.data.mean, self.cfg.data.std).to(self.device)

    def inputs(self, n: int) -> dict[str, Tensor]:
        """{"clean": x, "<corruption>/<severity>": corrupted x} for the first ``n`` test images ([0, 1], CPU)."""
        x, _ = self.test_images(n)
        return {"clean": x, **{c.label: self.corrupted(c, n) for c in self.cfg.conditions}}

    def preload(self) -> None:
        """Load every model, the test images and their corrupted versions now (before forking workers, so
        that they inherit them instead of each loading its own)."""
        for name in self.model_names:
            self.model(name)
        self.inputs(self._n_test_needed())

    def bar(self, total: int, desc: str):
        """A progress bar for a step's runs (silent with ``progress: false``)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="run", leave=False, disable=not self.progress)


def parallel_workers(ctx: Any, n_models: int, section: Any) -> int:
    """How many forked one-thread processes work on the models at once in a step: ``section.parallel_models``
    of its config section (None: one per thread of ``num_threads``), never more than the models; 1 where
    :func:`fork_workers` says so."""
    return fork_workers(ctx, n_models, section.parallel_models)


def fork_workers(ctx: Any, n_items: int, want: int | None) -> int:
    """How many forked one-thread processes (:func:`mechvit.runtime.forked_map`) share ``n_items`` pieces of
    work: ``want`` (None: one per thread of ``num_threads``), never more than the items; 1 on an accelerator,
    under torchrun, where processes cannot fork (Windows) and inside a forked worker (no nesting)."""
    import multiprocessing as mp

    from mechvit.runtime import in_forked_worker, rank_and_world

    if n_items < 2 or ctx.device.type != "cpu" or rank_and_world()[1] > 1 or in_forked_worker():
        return 1
    if "fork" not in mp.get_all_start_methods():  # Windows
        return 1
    want = want or ctx.cfg.num_threads or torch.get_num_threads()
    return max(1, min(want, n_items))


def slug(label: str) -> str:
    """A condition label as a file-name part (``gaussian_blur/4`` -> ``gaussian_blur-4``)."""
    return label.replace("/", "-")
