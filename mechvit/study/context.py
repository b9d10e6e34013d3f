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
from mechvit.data.loading import n_items as split_size
from mechvit.study.config import Condition, ConfigError, ModelEntry, StudyConfig


@dataclass
class ModelInfo:
    """A resolved model entry: where it comes from, its content hash, the corruptions it has seen and whether
    it is a clean fine-tune control (:func:`resolve_model`)."""

    name: str
    entry: ModelEntry
    sha256: str
    seen: list[str]
    source: str
    card: dict = field(default_factory=dict)
    control: bool = False

    def to_dict(self) -> dict[str, Any]:
        clean = (self.card.get("clean") or {}) if self.card else {}
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "seen": self.seen,
            "control": self.control,
            "card_clean_top1": clean.get("top1"),
        }

    def card_training(self) -> dict[str, Any]:
        """What the card says about the fine-tuning (``config.corruption``, ``config.adversarial``): it decides
        the seen corruptions, the trained severities and the control, so it is part of the model's hash."""
        c = (self.card or {}).get("config") or {}
        return {k: c.get(k) for k in ("corruption", "adversarial") if k in c}


def _key(i: int) -> str:
    return "models.base" if i == 0 else f"models.finetuned[{i - 1}]"


def card_says_clean(card: dict) -> bool | None:
    """From a checkpoint card: True when it says the model was trained without corruptions
    (``config.corruption`` null, ``p: 0`` or no ``seen``) and without adversarial training; False when it says
    otherwise; None when it does not say (no ``config.corruption`` key)."""
    cfg = card.get("config")
    if not isinstance(cfg, dict) or "corruption" not in cfg:
        return None
    c = cfg["corruption"] or {}
    return (not c.get("seen") or c.get("p") == 0) and not cfg.get("adversarial")


def _seen_and_control(
    entry: ModelEntry, key: str, card: dict | None, is_base: bool
) -> tuple[list[str], bool]:
    """The corruptions a model has seen and whether it is a clean fine-tune control: ``seen``/``control`` of
    the config where given, else what the checkpoint card says (a card with ``p: 0`` has seen nothing)."""
    says_clean = None if card is None else card_says_clean(card)
    c = ((card or {}).get("config") or {}).get("corruption") or {}
    card_seen = [] if c.get("p") == 0 else list(c.get("seen") or [])
    seen = list(entry.seen) if entry.seen is not None else card_seen
    if is_base:
        if seen:
            raise ConfigError(
                f"{key}: the checkpoint card says the base was fine-tuned on {seen}; the base is the reference "
                f"of every comparison and has seen no corruption (set {key}.seen: [] to use it as one anyway)"
            )
        return [], False
    if entry.control is not None:
        if entry.control and seen:
            raise ConfigError(
                f"{key}.control: a clean control has seen no corruption, but its checkpoint card says it was "
                f"fine-tuned on {seen} (set {key}.seen: [] to override the card)"
            )
        return seen, entry.control
    if entry.seen is None and says_clean is None:
        raise ConfigError(
            f"{key}: the checkpoint card of {entry.checkpoint} does not say what it was fine-tuned on (no "
            f"config.corruption); give `seen: [<corruptions>]` ([] for none) or `control: true`"
        )
    return seen, bool(says_clean) and not seen


def resolve_model(
    entry: ModelEntry, key: str, progress: bool = True, is_base: bool | None = None
) -> ModelInfo:
    """Check the entry's source exists (training it first when ``train_config`` says how) and hash it; what it
    has seen and whether it is a clean control come from the config or its card (:func:`_seen_and_control`).
    ``is_base`` (default: ``key`` is ``models.base``): the base may have seen nothing and is no control."""
    is_base = key == "models.base" if is_base is None else is_base
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
        seen, control = _seen_and_control(entry, key, card, is_base)
        return ModelInfo(
            entry.name, entry, sha256_file(weights), seen, f"checkpoint {folder}", card, control=control
        )
    seen, control = _seen_and_control(entry, key, None, is_base)
    if entry.hooked is not None:
        folder = Path(entry.hooked)
        files = [folder / "config.json", folder / "model.safetensors"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{key}.hooked: {folder} is not a HookedViT folder (missing {missing})")
        digest = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
        return ModelInfo(entry.name, entry, digest, seen, f"HookedViT folder {folder}", control=control)
    spec = f"timm:{entry.timm}:pretrained={entry.pretrained}:{sorted(entry.timm_kwargs.items())}"
    return ModelInfo(
        entry.name,
        entry,
        hashlib.sha256(spec.encode()).hexdigest(),
        seen,
        f"timm {entry.timm}" + (" (pretrained)" if entry.pretrained else ""),
        control=control,
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


def check_single_controls(cfg: StudyConfig, controls: list[str]) -> None:
    """A clean fine-tune control needs replicated SAEs when the study trains SAEs: the feature claim sets each
    fine-tune's overlap against the control's, and one SAE has no seed pair (a control is known only once its
    checkpoint card is read, so this is checked with the models, not with the config alone)."""
    single = [c for c in controls if c in cfg.sae.single_models]
    if cfg.sae.enabled and single:
        raise ConfigError(
            f"sae.single_models: {single} {'is a' if len(single) == 1 else 'are'} clean fine-tune control"
            f"{'' if len(single) == 1 else 's'} (the feature claim compares every fine-tune's overlap with the "
            "control's, which needs its seed pairs): put it in sae.models"
        )


def validate_models(cfg: StudyConfig) -> str | None:
    """``mechvit study --validate``'s checks that need the models, without running the study: every model's
    source exists (:func:`resolve_model`), and the config fits the base model (:func:`check_hooks_against_model`:
    the SAE hook, the SAE step's run length and k, attention's view layers, patching's positions). Raises
    ConfigError; returns None when everything was checked, else what was not: a checkpoint the study would
    train first, pretrained timm weights (not downloaded here), a checkpoint folder not made yet (which the
    study would refuse); without the base model its checks are left to the start of the study."""
    from mechvit.study.config import check_hooks_against_model
    from mechvit.training.checkpoint import CARD

    notes, missing, base_checked, controls = [], [], False, []
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
            if info.control:
                controls.append(entry.name)
            if i == 0:
                base = load_hooked(info, torch.device("cpu"))
                check_hooks_against_model(cfg, base)
                check_split_sizes(cfg, base)
                base_checked = True
    check_single_controls(cfg, controls)
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


def needed_test_images(cfg: StudyConfig) -> dict[str, int]:
    """``{config key: test images it asks for}`` over the enabled sections (a disabled section's size plays no
    part: it neither loads images nor changes the corrupted ones)."""
    c, out = cfg, {}
    if c.robustness.enabled:
        out["robustness.n_images"] = c.robustness.n_images
    if c.logit_lens.enabled:
        out["logit_lens.n_images"] = c.logit_lens.n_images
    if c.attention.enabled:
        out["attention.n_images"] = c.attention.n_images
    if c.sae.enabled:
        out["sae.n_eval_images"] = c.sae.n_eval_images
        for k in ("n_fidelity_images", "n_heldout_images"):
            if getattr(c.sae, k):
                out[f"sae.{k}"] = getattr(c.sae, k)
    if c.sae.enabled and c.explorer.enabled:  # the explorer's clean images and the same under each condition
        out["explorer.n_images"] = c.explorer.n_images
    if c.patching.enabled:
        out["patching.n_images"] = c.patching.n_images
    if c.cka.enabled:
        out["cka.n_images"] = c.cka.n_images
    return out


def needed_train_images(cfg: StudyConfig) -> dict[str, int]:
    """``{config key: train images it asks for}`` over the enabled sections (the SAEs' training images)."""
    return {"sae.n_train_images": cfg.sae.n_train_images} if cfg.sae.enabled else {}


def _too_many(split: str, held: int, asked: dict[str, int]) -> None:
    over = {k: v for k, v in asked.items() if v > held}
    if over:
        raise ConfigError(
            f"{', '.join(over)}: the {split} split holds {held} images, the config asks for "
            f"{max(over.values())} ({'; '.join(f'{k}: {v}' for k, v in over.items())})"
        )


def check_split_sizes(cfg: StudyConfig, model: torch.nn.Module | None = None) -> None:
    """Each image count of the config fits its split (a :class:`ConfigError` naming the keys otherwise):
    ``mechvit study --validate`` checks it up front, where the study would find out when it first loads the
    images. An ImageFolder without ``data.img_size`` takes ``model``'s timm transform; its files are listed,
    not decoded."""
    for split, asked in (("test", needed_test_images(cfg)), ("train", needed_train_images(cfg))):
        if asked:
            data = dataclasses.replace(cfg.data, limit_train=None, limit_test=None)  # as the study loads them
            _too_many(split, split_size(load_split(data, split, model)), asked)


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
        check_single_controls(cfg, self.control_names)
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
        """The clean fine-tune controls: the fine-tunes with ``control: true``, or whose checkpoint card says
        they were fine-tuned without corruptions (:func:`resolve_model`)."""
        return [n for n in self.finetuned_names if self.infos[n].control]

    @property
    def model_names(self) -> list[str]:
        return list(self.infos)

    @property
    def sae_model_names(self) -> list[str]:
        """The models that get ``sae.replicates`` SAEs each and the overlap comparisons (``sae.models``, default
        every model), in ``model_names``' order (base first)."""
        chosen = self.cfg.sae.models or self.model_names
        return [n for n in self.model_names if n in chosen]

    @property
    def sae_single_names(self) -> list[str]:
        """The models that get one SAE each (``sae.single_models``), in ``model_names``' order."""
        return [n for n in self.model_names if n in self.cfg.sae.single_models]

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = load_hooked(self.infos[name], self.device)
        return self._models[name]

    def model_hashes(self) -> dict[str, dict]:
        """Per model what every step's hash holds: the weights' sha256, the seen corruptions, whether it is a
        control, and the card's training block (its trained severities decide the robustness step's cells)."""
        return {
            n: {"sha256": i.sha256, "seen": i.seen, "control": i.control, "card": i.card_training()}
            for n, i in self.infos.items()
        }

    def seen_conditions(self, name: str) -> list[Condition]:
        """The study conditions of the corruptions model ``name`` was fine-tuned on."""
        return [c for c in self.cfg.conditions if c.corruption in self.infos[name].seen]

    # ---- images -----------------------------------------------------------------------------------------
    def _data_cfg(self, limit_test: int | None = None, limit_train: int | None = None):
        return dataclasses.replace(self.cfg.data, limit_train=limit_train, limit_test=limit_test)

    def needed_test_images(self) -> dict[str, int]:
        """``{config key: test images}`` of the enabled sections: the study loads the largest (and corrupts that
        many images per condition, :meth:`corrupted`)."""
        return needed_test_images(self.cfg)

    def _n_test_needed(self) -> int:
        """The test images the study loads and corrupts: the largest of :meth:`needed_test_images`. Some corruptions
        (fog, frost, snow, glass_blur, shot_noise) draw differently for a larger batch, so this number decides
        the corrupted images every step sees: it is in the hash of every step that reads them
        (:func:`mechvit.study.runner.step_hash`)."""
        return max(self.needed_test_images().values(), default=1)

    def test_images(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` test images in [0, 1] (CPU) and their labels."""
        if self._test is None:
            test = as_tensors(load_split(self._data_cfg(limit_test=self._n_test_needed()), "test"))
            _too_many("test", len(test[1]), self.needed_test_images())
            self._test = test
        x, y = self._test
        if n > len(y):
            raise ConfigError(f"data: the test split holds {len(y)} images, the config asks for {n}")
        return x[:n], y[:n]

    def train_images(self, n: int) -> Tensor:
        if self._train is None or len(self._train) < n:
            self._train = as_tensors(load_split(self._data_cfg(limit_train=n), "train"))[0]
        _too_many("train", len(self._train), {"sae.n_train_images": n})
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
