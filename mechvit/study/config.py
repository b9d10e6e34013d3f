"""The ``mechvit study`` config: dataclasses loaded from YAML and validated in one pass.

The sections that configure a library function ARE that function's config object, nested rather than copied:
``data`` is :class:`mechvit.data.DataConfig`, ``sae.store`` is :class:`mechvit.sae.ActivationStoreConfig`,
``sae.train`` is :class:`mechvit.sae.SAETrainingConfig` and ``sae.overlap`` is
:class:`mechvit.analysis.OverlapConfig`. The few fields of those objects that the study sets itself per run
(listed in :data:`SET_BY_STUDY`, e.g. each SAE's architecture, seed and sample count) must not appear in the
YAML. A nested section given in the YAML starts from the study's defaults for it, not the class defaults.

Every YAML key must name a field; a wrong type, an unknown corruption, a severity outside 1..5 or a hook
name no ViT has raises ONE ``ValueError`` (:class:`ConfigError`) that starts with the key path, e.g.
``sae.store.hook: unknown hook 'blocks.3.hook_foo'`` (keys and types: :mod:`mechvit._dataclass_yaml`, which
also turns a nested object's own ``__post_init__`` check into ``key.path: message``). Hook layer indices are
checked against the real model when the study starts (:func:`check_hooks_against_model`).

``load_study_config(None)`` returns the embedded default (``configs/fashion_mnist.yaml``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechvit._dataclass_yaml import ConfigError, apply_overrides, from_dict, read_yaml_extending
from mechvit.analysis.controls import ControlsConfig
from mechvit.analysis.overlap import OverlapConfig
from mechvit.data.loading import DataConfig
from mechvit.sae.activations import ActivationStoreConfig, CorruptionMix
from mechvit.sae.train import SAETrainingConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent.parent / "configs" / "fashion_mnist.yaml"

# fields of the nested library configs that the study sets per run; giving them in the YAML is an error
SET_BY_STUDY: dict[str, dict[str, str]] = {
    "data": {"limit_train": "the step sizes (n_images, sae.n_train_images)", "limit_test": "the step sizes"},
    "sae.train": {
        "architecture": "sae.architectures", "total_samples": "sae.epochs x sae.n_train_images x tokens",
        "seed": "the study seed", "device": "the study device", "log_every": "the run length",
    },
    "sae.store": {"seed": "the study seed", "device": "the study device"},
    "sae.store.mix": {"corruptions": "the study's conditions"},
    "sae.controls": {"reference": "models.base", "seed": "the study seed"},
}  # fmt: skip

# hooks a HookedViT can have (see mechvit/model/hooked_vit.py); the layer index is checked against the model
_BLOCK_HOOKS = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_result",
    "attn.hook_attn_scores", "attn.hook_pattern", "mlp.hook_pre", "mlp.hook_post",
)  # fmt: skip
_GLOBAL_HOOKS = (
    "hook_embed", "hook_pos_embed", "hook_full_embed", "ln_pre.hook_scale", "ln_pre.hook_normalized",
    "ln_final.hook_scale", "ln_final.hook_normalized", "hook_pooled", "hook_logits",
)  # fmt: skip
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
# hooks whose activation is [batch, tokens, d] (what an SAE over tokens reads)
_TOKEN_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "ln1.hook_normalized",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
)  # not attn.hook_z ([batch, tokens, heads, d_head]): the study's held-out rows, splices and ablation gap
# read [batch, tokens, d]; mechvit.sae trains SAEs on hook_z directly (its store flattens the heads)


def check_hook_name(hook: str, key: str, token_hook: bool = False) -> None:
    m = _BLOCK_RE.fullmatch(hook)
    ok = hook in _GLOBAL_HOOKS if m is None else m.group(2) in _BLOCK_HOOKS
    if ok and token_hook and (m is None or m.group(2) not in _TOKEN_HOOKS):
        raise ConfigError(
            f"{key}: hook {hook!r} does not give per-token activations; expected "
            f"blocks.<layer>.<one of {', '.join(_TOKEN_HOOKS)}>"
            + (
                " (attn.hook_z is per head: train its SAEs with mechvit.sae directly)"
                if hook.endswith("attn.hook_z")
                else ""
            )
        )
    if not ok:
        raise ConfigError(
            f"{key}: unknown hook {hook!r}; expected blocks.<layer>.<{'|'.join(_BLOCK_HOOKS)}> "
            f"or one of {', '.join(_GLOBAL_HOOKS)}"
        )


def check_corruption(name: str, key: str) -> None:
    """``name`` one of ``mechvit.corruptions.CORRUPTIONS``: its message, prefixed with the key."""
    from mechvit.corruptions import corruption_problem

    if (problem := corruption_problem(name)) is not None:
        raise ConfigError(f"{key}: {problem}")


def check_severity(sev: int, key: str) -> None:
    """``sev`` an integer in 1..5: ``mechvit.corruptions.severity_problem``'s message, prefixed with the key."""
    from mechvit.corruptions import severity_problem

    if (problem := severity_problem(sev)) is not None:
        raise ConfigError(f"{key}: {problem}")


def _positive(obj: Any, prefix: str, names: tuple[str, ...]) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and not v > 0:
            raise ConfigError(f"{prefix}{n}: must be > 0, got {v!r}")


# ---------------------------------------------------------------------------------------------------------
# schema


TOKEN_WORDS = {
    "patches": "patch tokens",
    "all": "all tokens",
    "cls": "class token",
    "prefix": "prefix tokens",
}


def token_words(tokens: str) -> str:
    """``sae.store.tokens`` in words: "patches" -> "patch tokens", "cls" -> "class token", ... (the SAE step's
    captions and the report's notes)."""
    return TOKEN_WORDS.get(tokens, f"{tokens} tokens")


@dataclass
class ModelEntry:
    """One model. Exactly one source: ``checkpoint`` (a mechvit checkpoint folder: model.safetensors +
    card.json), ``hooked`` (a HookedViT folder from ``save_pretrained``/``mechvit convert``) or ``timm`` (a timm
    model name, ``pretrained`` weights from the hub, ``timm_kwargs`` to ``timm.create_model``).
    ``seen``: the corruptions it was fine-tuned on (None: read from the checkpoint card; ``[]``: none).
    ``control``: a clean fine-tune control (fine-tuned like the others, without corruptions): the reference every
    claim sets a fine-tune's change against (None: a checkpoint whose card says it was fine-tuned without
    corruptions, ``config.corruption`` null or ``p: 0``, and without adversarial training, is one; nothing else
    is). A ``hooked``/``timm`` fine-tune has no card: it needs ``seen`` or ``control: true``.
    ``train_config``: a ``mechvit train`` YAML that writes ``checkpoint`` when it does not exist yet."""

    name: str
    checkpoint: str | None = None
    hooked: str | None = None
    timm: str | None = None
    pretrained: bool = False
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    seen: list[str] | None = None
    control: bool | None = None
    train_config: str | None = None


@dataclass
class ModelsSection:
    base: ModelEntry
    finetuned: list[ModelEntry] = field(default_factory=list)


@dataclass
class Condition:
    """A corrupted input condition: every image corrupted by ``corruption`` at ``severity``."""

    corruption: str
    severity: int = 4

    @property
    def label(self) -> str:
        return f"{self.corruption}/{self.severity}"


@dataclass
class RobustnessSection:
    """The robustness matrix (every model x corruption x severity); unseen = every corruption a model was
    not fine-tuned on."""

    enabled: bool = True
    corruptions: list[str] | None = None  # None: all of mechvit.corruptions.CORRUPTIONS
    severities: list[int] = field(default_factory=lambda: [1, 2, 4])
    n_images: int = 1000
    batch_size: int = 250
    # CPU: processes scoring groups of the models at once, then computing the models' CIs, one thread each
    # (None: num_threads); 1: every model in this process. The same numbers bit for bit (a HookedViT's logits
    # do not depend on the thread count; each CI gets the same arguments and seed)
    parallel_models: int | None = None


@dataclass
class LogitLensSection:
    enabled: bool = True
    n_images: int = 500
    include_embed: bool = True
    mode: Literal["first", "stable"] = "first"
    batch_size: int = 100


@dataclass
class AttentionSection:
    enabled: bool = True
    n_images: int = 200
    n_views: int = 2  # images shown in the circuitsvis views (per model and condition)
    # layers in the circuitsvis views (negative: from the last, -1 = last block); None = every layer. A view of
    # every layer of ViT-B/16 is 12 x 12 heads x 197^2 values, ~30 MB of page per image: pick a few there
    view_layers: list[int] | None = None
    batch_size: int = 50


def _default_store() -> ActivationStoreConfig:
    return ActivationStoreConfig(
        hook="blocks.3.hook_resid_post", model_batch_size=128, buffer_size=16384, mix=CorruptionMix(0.5)
    )


@dataclass
class SAESection:
    """Replicate SAEs on ``store.hook`` (``store.tokens``) for every model of ``models`` (None: all of them),
    all trained on ONE data mix: ``store.mix.fraction`` of the training images carry one of the study's
    conditions (drawn uniformly), the same images and corruptions for every model (the store's seed is the
    study's), so that SAEs of different models differ by the model only. Each architecture gets
    ``replicates`` SAEs per model, each with its own init and data-order seed
    (``mechvit.sae.derive_seed(seed, architecture, model, replicate)``); the replicates of one model are the
    seed-noise ceiling every between-model comparison is set against (``controls``). The SAEs of one model
    train in one pass over its cached activations (``mechvit.sae.train_saes``, sae-lens's trainer per SAE),
    ``epochs`` passes over ``n_train_images`` images' tokens.

    ``single_models`` get ONE SAE per architecture each (replicate 0, the same seed rule), trained and judged
    like the others (held-out EV, L0, dead, dense, spliced fidelity against the same bars) but in no overlap
    comparison, which needs seed pairs within each model: what sets a model's SAE quality beside the compared
    ones at a fifth of their cost (the default study: the severity-1 and -2 fine-tunes)."""

    enabled: bool = True
    architectures: list[Literal["batchtopk", "standard", "topk", "jumprelu"]] = field(
        default_factory=lambda: ["batchtopk"]
    )
    models: list[str] | None = None  # None: every model of the study (then single_models must be empty)
    replicates: int = 3
    single_models: list[str] = field(default_factory=list)  # one SAE each, no overlap comparison
    epochs: float = 1.0
    n_train_images: int = 20_000
    n_eval_images: int = 200
    # clean test images for the spliced top-1 drop and KL (CIs over them) and the hook's ablation gap; None:
    # n_eval_images. The overlap controls of sae_analysis use n_eval_images
    n_fidelity_images: int | None = None
    # test images for held-out EV / L0 / dead / dense (these images clean and under each condition); None:
    # n_fidelity_images. Apart because their CIs are narrow at a few hundred images, while the top-1 drop, a
    # difference of two accuracies, needs thousands
    n_heldout_images: int | None = None
    # CPU: processes training the models' SAE groups at once, one thread each (None: num_threads); 1: one
    # after the other in this process. The SAEs equal a one-thread sequential run's
    parallel_models: int | None = None
    ablation_warn_nats: float = 0.1  # the report warns when the hook's mean-ablation KL is below this
    top_features: int = 6  # features with a feature page, per SAE pair (sae_analysis)
    top_images: int = 6  # images per feature (sae_analysis)
    store: ActivationStoreConfig = field(default_factory=_default_store)
    train: SAETrainingConfig = field(default_factory=lambda: SAETrainingConfig(expansion_factor=32))
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    controls: ControlsConfig = field(default_factory=ControlsConfig)

    @property
    def fidelity_images(self) -> int:
        """The clean test images of the spliced numbers and the ablation gap: ``n_fidelity_images``, else
        ``n_eval_images``."""
        return self.n_fidelity_images or self.n_eval_images

    @property
    def heldout_images(self) -> int:
        """The test images of held-out EV / L0 / dead / dense: ``n_heldout_images``, else
        :attr:`fidelity_images`."""
        return self.n_heldout_images or self.fidelity_images

    @property
    def hook(self) -> str:
        return self.store.hook

    @property
    def tokens(self) -> str:
        return self.store.tokens

    def rows_per_image(self, model_cfg: Any) -> int:
        """Activations one image gives the SAEs: its tokens of ``sae.store.tokens`` in ``model_cfg``."""
        c = model_cfg
        return {"patches": c.n_patches, "all": c.n_tokens, "cls": 1, "prefix": c.n_prefix_tokens}[self.tokens]

    def total_samples(self, rows_per_epoch: int) -> int:
        """Activations each SAE trains on: ``epochs`` passes over ``rows_per_epoch``, in whole batches, at
        least one."""
        b = self.train.batch_size
        return max(b, int(self.epochs * rows_per_epoch) // b * b)


@dataclass
class PatchingSection:
    """Activation patching: clean -> corrupted within the base model per condition (``component`` by layer x
    position, and ``z`` by layer x head), and across models on corrupted images (fine-tuned activations
    into the base model)."""

    enabled: bool = True
    n_images: int = 32
    component: Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"] = "resid_pre"
    heads: bool = True
    across_models: bool = True
    method: Literal["exact", "attribution"] = "exact"  # attribution: mechvit.analysis.attribution_patching
    batch_size: int = 32
    max_rows: int = 2048
    # the token positions the by-position sweeps patch (0 = the class token of a ViT with one, then the patch
    # grid row by row); None: every token (the sweep's cost grows with their number: 197 on ViT-B/16 at 224)
    positions: list[int] | None = None


@dataclass
class CKASection:
    enabled: bool = True
    n_images: int = 256
    hook: Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"] = "resid_post"
    # the headline: the readout token (the class token the head reads); every token as examples is secondary
    token_reduction: Literal["flatten", "cls", "mean_patches", "tokens"] = "cls"
    secondary_reduction: Literal["flatten", "cls", "mean_patches", "tokens"] | None = "tokens"
    batch_size: int = 64


@dataclass
class ExplorerSection:
    """The feature explorer ``explorer/features.html`` (:func:`mechvit.viz.write_explorer`) over the SAEs of the
    ``sae`` step (every one, or the first ``replicates`` of each model): ``n_images`` clean test images, and the same images under each of the study's conditions
    pooled into the page's one corrupted set; ``top_images`` per latent (clean and corrupted), the classes of
    the top ``n_assoc`` images for the automatic label, ``histogram_bins`` bins per activation histogram, and
    feature cards (PNG + SVG) of each SAE's ``cards`` densest latents (0: none)."""

    enabled: bool = True
    n_images: int = 500
    # the first this many seed replicates of each model of sae.models (and the one SAE of each of
    # sae.single_models) are on the page; None (or sae.replicates or more): every SAE of the sae step. Seed
    # stability matches a latent against the other replicates shown
    replicates: int | None = None
    top_images: int = 6
    n_assoc: int = 32
    histogram_bins: int = 24
    cards: int = 1
    # per SAE, the page lists at most this many live latents, those firing on the most clean + corrupted patch
    # tokens, and measures the per-latent effects (ablate/double on the top images, direct logit effect) of
    # those only; None: every live latent (cost and page size grow with d_sae x top_images x classes)
    max_latents: int | None = None
    # CPU: processes computing the models' per-latent statistics at once, one thread each (None: num_threads);
    # 1: one model after the other in this process. The same numbers to float rounding of the forwards
    parallel_models: int | None = None


@dataclass
class StudyConfig:
    """Everything ``mechvit study`` does; see configs/fashion_mnist.yaml for a commented example."""

    models: ModelsSection
    name: str = "study"
    title: str = "mechvit study"
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    num_threads: int | None = None
    # CPU: how many of the steps that gain more from a process than from a second thread (SAE analysis,
    # patching, CKA) run at once, each in a forked one-thread process, after the other steps (None:
    # num_threads); 1: every step in this process, one after the other, in the order of the report
    parallel_steps: int | None = None
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    conditions: list[Condition] = field(
        default_factory=lambda: [Condition("gaussian_blur", 4), Condition("gaussian_noise", 4)]
    )
    robustness: RobustnessSection = field(default_factory=RobustnessSection)
    logit_lens: LogitLensSection = field(default_factory=LogitLensSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    sae: SAESection = field(default_factory=SAESection)
    patching: PatchingSection = field(default_factory=PatchingSection)
    cka: CKASection = field(default_factory=CKASection)
    explorer: ExplorerSection = field(default_factory=ExplorerSection)

    def model_entries(self) -> list[ModelEntry]:
        return [self.models.base, *self.models.finetuned]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# semantic checks


FORKING_SECTIONS = ("robustness", "sae", "explorer")  # the sections with parallel_models


DEVICES = "cpu, cuda, cuda:<n>, mps"  # the devices the study runs on (validate's device check)
_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?|mps")
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # no separators, no leading '.' ('..' included)


def check_file_name(name: str, key: str, what: str) -> None:
    """``name`` is used as a file or folder name (``what``): letters, digits, '_', '.', '-', not starting
    with '.'."""
    if not _FILE_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{key}: use letters, digits, '_', '.', '-' only, not starting with '.' (it names {what}), "
            f"got {name!r}"
        )


def check_distinct(values: list, key: str) -> None:
    """Each entry of the list ``key`` once: a repeat would be run (and counted) twice."""
    for i, v in enumerate(values):
        if v in values[:i]:
            raise ConfigError(
                f"{key}[{i}]: {v!r} is listed twice (also {key}[{values.index(v)}]); give each entry once"
            )


def check_timm_name(name: str, key: str) -> None:
    """A ``timm:`` source must name a timm model (``timm.is_model``, pretrained tags such as ``.augreg_in21k``
    included); ``hf-hub:`` / ``local-dir:`` names are left to timm."""
    import timm
    from timm.models import parse_model_name

    source, model = parse_model_name(name)
    if source is None and not timm.is_model(model):
        close = sorted(timm.list_models(f"{model.split('.')[0][:8]}*"))[:3]
        raise ConfigError(
            f"{key}: unknown timm model {name!r}; expected a name of timm.list_models() (an hf-hub:/local-dir: "
            "name, or a checkpoint/hooked folder for local weights)"
            + (f", e.g. {', '.join(close)}" if close else "")
        )


def _check_model_entry(m: ModelEntry, key: str, is_base: bool) -> None:
    check_file_name(m.name, f"{key}.name", "files")
    sources = [s for s in ("checkpoint", "hooked", "timm") if getattr(m, s) is not None]
    if len(sources) != 1:
        raise ConfigError(f"{key}: give exactly one of checkpoint, hooked, timm; got {sources or 'none'}")
    if m.timm is None:
        for k, default in (("pretrained", False), ("timm_kwargs", {})):
            if getattr(m, k) != default:
                raise ConfigError(
                    f"{key}.{k}: applies to a timm source only; this entry's source is {sources[0]} "
                    f"(got {getattr(m, k)!r})"
                )
    else:
        check_timm_name(m.timm, f"{key}.timm")
    if m.train_config is not None and m.checkpoint is None:
        raise ConfigError(f"{key}.train_config: needs `checkpoint` (the folder the training writes)")
    for j, c in enumerate(m.seen or []):
        check_corruption(c, f"{key}.seen[{j}]")
    if is_base:
        if m.seen:
            raise ConfigError(
                f"{key}.seen: expected null or [] (the base is the reference every fine-tune is compared with; "
                f"it has seen no corruption), got {m.seen!r}"
            )
        if m.control is not None:
            raise ConfigError(
                f"{key}.control: expected no value (the base is the reference, not a fine-tune control), "
                f"got {m.control!r}"
            )
        return
    if m.control and m.seen:
        raise ConfigError(
            f"{key}.control: a clean control has seen no corruption, but {key}.seen is {m.seen!r}; "
            "give one of them"
        )
    if m.checkpoint is None and m.seen is None and not m.control:
        raise ConfigError(
            f"{key}: a {sources[0]} fine-tune has no checkpoint card to say what it was fine-tuned on; give "
            "`seen: [<corruptions>]` ([] for none) or `control: true` (a clean fine-tune control)"
        )


def validate(cfg: StudyConfig) -> StudyConfig:
    """Check values that types cannot: corruption names, severities, hooks, sources, sizes, the device string
    (its form only: a config for a GPU still validates on a laptop; availability is checked at run time)."""
    check_file_name(cfg.name, "name", "the default out folder runs/<name>")
    if cfg.seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {cfg.seed}")
    if cfg.num_threads is not None and cfg.num_threads < 1:
        raise ConfigError(
            f"num_threads: expected null (torch's default thread count) or an integer >= 1, got {cfg.num_threads}"
        )
    if cfg.device is not None and not _DEVICE_RE.fullmatch(cfg.device):
        raise ConfigError(f"device: expected {DEVICES} or null (auto), got {cfg.device!r}")
    names = [m.name for m in cfg.model_entries()]
    for i, m in enumerate(cfg.model_entries()):
        key = "models.base" if i == 0 else f"models.finetuned[{i - 1}]"
        if m.name in names[:i]:
            raise ConfigError(f"{key}.name: model name {m.name!r} is used twice")
        _check_model_entry(m, key, is_base=i == 0)
    if not cfg.conditions:
        raise ConfigError("conditions: give at least one {corruption, severity} condition")
    for i, c in enumerate(cfg.conditions):
        check_corruption(c.corruption, f"conditions[{i}].corruption")
        check_severity(c.severity, f"conditions[{i}].severity")
    check_distinct([c.label for c in cfg.conditions], "conditions")
    r = cfg.robustness
    if r.corruptions is not None and not r.corruptions:
        raise ConfigError(
            "robustness.corruptions: expected null (all 19 corruptions of mechvit.corruptions) or a non-empty "
            "list, got []"
        )
    for i, c in enumerate(r.corruptions or []):
        check_corruption(c, f"robustness.corruptions[{i}]")
    check_distinct(r.corruptions or [], "robustness.corruptions")
    for i, s in enumerate(r.severities):
        check_severity(s, f"robustness.severities[{i}]")
    if not r.severities:
        raise ConfigError("robustness.severities: give at least one severity")
    check_distinct(r.severities, "robustness.severities")
    if cfg.attention.view_layers is not None and not cfg.attention.view_layers:
        raise ConfigError(
            "attention.view_layers: expected null (every layer) or a non-empty list of block indices, got [] "
            "(attention.n_views: 0 leaves the views out)"
        )
    check_hook_name(cfg.sae.store.hook, "sae.store.hook", token_hook=True)
    if not cfg.sae.architectures:
        raise ConfigError("sae.architectures: give at least one architecture")
    check_distinct(cfg.sae.architectures, "sae.architectures")
    if cfg.sae.replicates < 2:
        raise ConfigError(
            f"sae.replicates: expected at least 2 (two seeds per model are the seed-noise control of every "
            f"overlap number), got {cfg.sae.replicates}"
        )
    names = [m.name for m in cfg.model_entries()]
    for key, listed in (("models", cfg.sae.models or []), ("single_models", cfg.sae.single_models)):
        check_distinct(listed, f"sae.{key}")
        unknown = [m for m in listed if m not in names]
        if unknown:
            raise ConfigError(f"sae.{key}: unknown model(s) {unknown}; the study's models are {names}")
    if cfg.sae.models is not None and cfg.models.base.name not in cfg.sae.models:
        raise ConfigError(
            f"sae.models: must include the base model {cfg.models.base.name!r} (the reference of the "
            f"controls), got {cfg.sae.models}"
        )
    if cfg.sae.models is None and cfg.sae.single_models:
        raise ConfigError(
            f"sae.models: null means every model, which would include sae.single_models {cfg.sae.single_models}: "
            "list sae.models, or set sae.single_models: [] for replicated SAEs on every model"
        )
    both = [m for m in cfg.sae.single_models if m in (cfg.sae.models or [])]
    if both:  # the base is in sae.models (above), so this refuses it here too
        raise ConfigError(
            f"sae.single_models: {both} also in sae.models (replicated SAEs; the base model, the reference of the "
            "controls, needs them): a model is in one of the two lists"
        )
    if cfg.sae.store.buffer_size < cfg.sae.train.batch_size:
        raise ConfigError(
            f"sae.store.buffer_size: expected at least sae.train.batch_size ({cfg.sae.train.batch_size}), "
            f"got {cfg.sae.store.buffer_size}"
        )
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise ConfigError("data: give both mean and std or neither")
    if cfg.data.dataset == "imagefolder" and not cfg.data.root:
        raise ConfigError("data.root: an imagefolder dataset needs its root folder")
    _positive(r, "robustness.", ("n_images", "batch_size"))
    _positive(cfg.logit_lens, "logit_lens.", ("n_images", "batch_size"))
    _positive(cfg.attention, "attention.", ("n_images", "batch_size"))
    _positive(
        cfg.sae,
        "sae.",
        ("epochs", "n_train_images", "n_eval_images", "top_features", "top_images"),
    )
    _positive(cfg.patching, "patching.", ("n_images", "batch_size", "max_rows"))
    pos = cfg.patching.positions
    if pos is not None and (not pos or min(pos) < 0 or len(set(pos)) != len(pos)):
        raise ConfigError(
            f"patching.positions: expected null (every token) or a non-empty list of distinct token indices "
            f">= 0, got {pos!r}"
        )
    _positive(cfg.cka, "cka.", ("batch_size",))
    for key, default in (("n_fidelity_images", "n_eval_images"), ("n_heldout_images", "n_fidelity_images")):
        n = getattr(cfg.sae, key)
        if n is not None and (isinstance(n, bool) or n < 2):
            raise ConfigError(f"sae.{key}: expected null ({default}) or >= 2 images for a CI, got {n!r}")
    for key, workers in [
        (f"{s}.parallel_models", getattr(cfg, s).parallel_models) for s in FORKING_SECTIONS
    ] + [("parallel_steps", cfg.parallel_steps)]:
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise ConfigError(
                f"{key}: expected null (one process per thread of num_threads) or a number of processes >= 1, "
                f"got {workers!r}"
            )
    if cfg.sae.enabled and cfg.sae.n_eval_images < 2:
        raise ConfigError(
            f"sae.n_eval_images: the code cosine's mismatched-patch baseline needs at least 2 images, got "
            f"{cfg.sae.n_eval_images}"
        )
    if cfg.cka.n_images < 4:
        raise ConfigError(f"cka.n_images: debiased CKA needs at least 4 images, got {cfg.cka.n_images}")
    if cfg.attention.n_views < 0:
        raise ConfigError(f"attention.n_views: must be >= 0, got {cfg.attention.n_views}")
    _positive(
        cfg.explorer,
        "explorer.",
        ("n_images", "replicates", "top_images", "n_assoc", "histogram_bins", "max_latents"),
    )
    if cfg.explorer.cards < 0:
        raise ConfigError(f"explorer.cards: must be >= 0, got {cfg.explorer.cards}")
    return cfg


def check_hooks_against_model(cfg: StudyConfig, model: Any) -> None:
    """``sae.hook`` must exist in ``model.hook_dict`` (the layer index must fit the model),
    ``attention.view_layers`` must name its blocks, and ``patching.positions`` must index its tokens."""
    if cfg.sae.enabled and cfg.sae.hook not in model.hook_dict:
        raise ConfigError(
            f"sae.store.hook: unknown hook {cfg.sae.hook!r}; this model has {model.cfg.n_layers} blocks "
            f"(blocks.0 .. blocks.{model.cfg.n_layers - 1})"
        )
    if cfg.sae.enabled:  # the run length and width the SAE step will use, before any step runs
        from mechvit.sae.activations import hook_width

        s = cfg.sae
        width = hook_width(model, s.hook, s.tokens)
        try:  # at most n_train_images: a smaller training split makes fewer steps (checked again in training)
            s.train.check_run_length(s.total_samples(s.n_train_images * s.rows_per_image(model.cfg)))
            for arch in s.architectures:
                s.train.for_architecture(arch).check_d_in(width)
        except ValueError as e:
            raise ConfigError(f"sae.train: {e}") from None
    depth, layers = int(model.cfg.n_layers), cfg.attention.view_layers
    bad = [i for i in layers or [] if not -depth <= i < depth]
    if cfg.attention.enabled and bad:
        raise ConfigError(
            f"attention.view_layers: {bad} out of range; this model has {depth} blocks "
            f"(0 .. {depth - 1}, or -{depth} .. -1 from the last)"
        )
    if cfg.attention.enabled and layers is not None and len({i % depth for i in layers}) != len(layers):
        raise ConfigError(f"attention.view_layers: {layers} names a block twice (of {depth} blocks)")
    pos, n_tokens = cfg.patching.positions, int(model.cfg.n_tokens)
    if cfg.patching.enabled and pos is not None and max(pos) >= n_tokens:
        raise ConfigError(
            f"patching.positions: token index {max(pos)} is out of range; this model has {n_tokens} tokens "
            f"(0 .. {n_tokens - 1})"
        )


def check_set_by_study(data: Any) -> None:
    """Refuse YAML keys of the nested library configs that the study sets itself (:data:`SET_BY_STUDY`)."""
    for section, fields_ in SET_BY_STUDY.items():
        d = data
        for part in section.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        if not isinstance(d, dict):
            continue
        for name, source in fields_.items():
            if name in d:
                raise ConfigError(
                    f"{section}.{name}: expected no value (the study sets it from {source}), got {d[name]!r}"
                )


def study_config_from_dict(data: dict, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Build and validate a :class:`StudyConfig`; ``overrides`` maps dotted keys to values."""
    data = apply_overrides(data, overrides or {})
    check_set_by_study(data)
    return validate(from_dict(StudyConfig, data))


def load_study_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Load and validate a YAML study config (``None``: the embedded default, configs/fashion_mnist.yaml).

    Relative paths in ``models`` and ``data.root`` are taken as they are (relative to the working
    directory), like every other mechvit command. A top-level ``extends: <file>`` (relative to this file's
    folder) starts from that config and lays this file's keys over it: sections merge key by key, lists and
    values replace (configs/fashion_mnist_all_saes.yaml extends the default this way).
    """
    return study_config_from_dict(
        read_yaml_extending(path if path is not None else DEFAULT_CONFIG), overrides
    )


__all__ = [
    "AttentionSection", "CKASection", "Condition", "ConfigError", "DataConfig", "LogitLensSection", "ModelEntry",
    "ExplorerSection", "ModelsSection", "OverlapConfig", "PatchingSection", "SET_BY_STUDY", "RobustnessSection", "SAESection", "StudyConfig",
    "check_hook_name", "check_hooks_against_model", "load_study_config", "study_config_from_dict", "validate",
]  # fmt: skip
