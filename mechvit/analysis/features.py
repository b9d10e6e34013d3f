"""Everything the feature explorer shows about one SAE's latents, computed in one place (no plotting).

:func:`feature_stats` runs a HookedViT over a set of images (and, optionally, corrupted versions of them),
encodes the patch tokens at the SAE's hook and returns a :class:`FeatureStats` with, per latent:

- **density** (fraction of patch tokens on which it fires), **mean activation** (mean over the clean tokens
  where it fires; NaN when it never fires on a clean token) and the same over the corrupted tokens, max
  activation, and a histogram of its non-zero activations;
- its **top images** (by the strongest patch; ties: the lower image index first) with the per-patch activation map,
  from the clean images and, separately, from the corrupted ones;
- the **classes** of its top ``n_assoc`` images and an **automatic label**: the class association
  (``"Sneaker 94%"``, ``"Shirt / T-shirt"``, or ``"mixed"``) plus where on the patch grid it fires
  (``"top-left"``, ``"centre"``, ``"everywhere"`` ...). The images are its top clean ones when it fires on a
  clean token; its top corrupted ones (with the corrupted images' labels) when it fires only on corrupted ones;
  none (``"-"``) when it never fires. :attr:`FeatureStats.label_set` says which (``"clean"``, ``"corrupted"``,
  ``"none"``), and :meth:`FeatureStats.shown_label` marks a label from corrupted images as such;
- its **direct logit effect**: the mean change of each class logit when ``a * d`` (``d`` = the decoder
  direction in the hook's units, ``sae.decode(e_f) - sae.decode(0)``) is added to the tokens the readout
  reads (the class token for token pooling, every pooled token otherwise) of the *final* residual stream of
  real (clean) images, through the model's own non-linear readout (final LayerNorm, pooling, fc_norm, head):
  ``unembed(resid + a * d) - unembed(resid)`` averaged over ``n_readout`` images. ``a`` is the latent's
  firing mean on the clean tokens (``mean_act``); for a latent that never fires on a clean token but does on
  a corrupted one, its firing mean on the corrupted tokens (``mean_act_corrupted``); for a latent that never
  fires at all the effect is NaN (not measured). :attr:`FeatureStats.effect_basis` says which, per latent
  (``"clean"``, ``"corrupted"``, ``"none"``). It is the direct path only: the blocks between the SAE's hook
  and the readout are skipped (as the logit lens does);
- the **measured effect** of ablating it (activation x 0) and of doubling it (x 2) on its top images: the
  feature's decoded contribution ``c_f(token) * d`` is removed / added once more at every patch token of the
  hook, with the SAE's reconstruction error kept, so "before" is exactly the model's own prediction and
  "after" differs from it only by this one latent (the rest of the forward runs as usual). The top images are
  those of the set :attr:`FeatureStats.ablation_set` names, per latent: its top clean images when it fires on a
  clean token (``"clean"``); its top corrupted images when it fires only on corrupted ones (``"corrupted"``: the
  corrupted images go through the model, the splice at the hook; "before" is the model's prediction on that
  corrupted image, :attr:`FeatureStats.probs_corrupted`); ``"none"`` when it never fires or its effects were
  not computed (``max_effect_latents``): not measured. The same rule as ``effect_basis``.

Both effects cost one readout per latent, and the ablate/double effect a forward from the hook per latent
and top image: ``max_effect_latents`` bounds them to the live latents that fire on the most patch tokens
(:attr:`FeatureStats.effect_latents` lists those; the other live latents' effects stay 0 and their
``ablation_set`` is ``"none"``, the direct logit effect of a latent that never fires is NaN).

:func:`nearest_cosine` gives, for each latent of one SAE, the most similar decoder direction of another
(used for seed stability across replicates and for change under fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechvit.sae.metrics import encode as sae_encode

__all__ = [
    "CORRUPTED_MARK",
    "FeatureStats",
    "automatic_label",
    "decoder_directions",
    "feature_stats",
    "location_label",
    "mark_label",
    "most_active_latents",
    "nearest_cosine",
]


@dataclass
class FeatureStats:
    """Per-latent data of one SAE on one model (arrays over all ``d_sae`` latents; numpy, CPU).

    Activations are the SAE's codes on the model's patch tokens at ``hook``. ``top_*`` hold ``k`` entries per
    latent, padded with index -1 / value 0 where the latent fires on fewer than ``k`` images."""

    hook: str
    grid: tuple[int, int]
    n_images: int
    n_corrupted: int
    density: np.ndarray  # [F] fraction of clean patch tokens where the code is > 0
    density_corrupted: np.ndarray | None  # [F] the same on the corrupted images
    mean_act: np.ndarray  # [F] mean code over the clean tokens where it is > 0 (NaN if never)
    max_act: np.ndarray  # [F] largest code over clean and corrupted tokens
    hist: np.ndarray  # [F, n_bins] counts of clean non-zero codes in n_bins equal bins over (0, max_act]
    top_idx: np.ndarray  # [F, k] clean image indices by the strongest patch, best first (-1 = none)
    top_val: np.ndarray  # [F, k] that strongest patch's code
    top_maps: np.ndarray  # [F, k, gh, gw] per-patch codes of those images
    top_idx_corrupted: np.ndarray | None  # [F, k] the same among the corrupted images
    top_val_corrupted: np.ndarray | None
    top_maps_corrupted: np.ndarray | None
    # [F, C] classes of the top n_assoc images where it fires, of the set label_set names (clean, else corrupted)
    class_counts: np.ndarray
    location: np.ndarray  # [F, gh, gw] mean of the (max-normalised) maps of those images
    label: list[str]  # automatic label: class association and location (shown_label adds where it comes from)
    label_class: list[str]
    label_where: list[str]
    # [F, C] direct effect of a * decoder direction on each class logit, a = the firing mean effect_basis names
    # (NaN where the latent never fires)
    logit_effect: np.ndarray
    probs: np.ndarray  # [N, C] the model's class probabilities on each clean image ("before")
    # [F, k, C] on top image j of the set ablation_set names (top_idx or top_idx_corrupted) with the latent's
    # contribution removed / doubled; 0 where not measured (no such image, or ablation_set "none")
    probs_ablate: np.ndarray
    probs_double: np.ndarray
    n_assoc: int
    # the latents whose logit_effect / probs_ablate / probs_double were computed (sorted); None: every latent
    effect_latents: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # [F] mean code over the corrupted tokens where it is > 0 (NaN if never); None without corrupted images
    mean_act_corrupted: np.ndarray | None = None
    # [F] the activation logit_effect is computed at: "clean" (mean_act), "corrupted" (mean_act_corrupted: the
    # latent never fires on a clean token) or "none" (it never fires: logit_effect is NaN). None (stats made
    # before it existed): "clean" wherever the latent fires on a clean token, else "none"
    effect_basis: np.ndarray | None = None
    # [M, C] the model's class probabilities on each corrupted image ("before" of an ablation on corrupted
    # images); None without corrupted images or when no ablation was measured on them
    probs_corrupted: np.ndarray | None = None
    # [F] the images probs_ablate / probs_double were measured on: "clean" (the top clean images: the latent fires
    # on a clean token), "corrupted" (the top corrupted images: it fires only on corrupted ones) or "none" (not
    # measured: it never fires, or its effects were not computed). None (stats made before it existed): see
    # ablated_on
    ablation_set: np.ndarray | None = None
    # [F] the images class_counts, location and label come from: "clean" (its top n_assoc clean images: it fires
    # on a clean token), "corrupted" (its top n_assoc corrupted images, with their labels: it fires only on
    # corrupted ones) or "none" (it never fires: label "-"). None (stats made before it existed): see labelled_on
    label_set: np.ndarray | None = None

    @property
    def d_sae(self) -> int:
        return int(self.density.shape[0])

    @property
    def basis(self) -> np.ndarray:
        """:attr:`effect_basis`, or for stats that do not record it (older ones): ``"clean"`` where the latent
        fires on a clean token, else ``"none"`` (their effect was computed at a mean activation of 0)."""
        if self.effect_basis is not None:
            return np.asarray(self.effect_basis)
        return np.where(np.asarray(self.density) > 0, "clean", "none")

    @property
    def ablated_on(self) -> np.ndarray:
        """:attr:`ablation_set`, or for stats that do not record it (older ones, which measured the ablation on
        clean top images only): ``"clean"`` where the latent fires on a clean token and its effects were
        computed, else ``"none"``."""
        if self.ablation_set is not None:
            return np.asarray(self.ablation_set)
        on = np.asarray(self.density) > 0
        if self.effect_latents is not None:
            on &= np.isin(np.arange(len(on)), self.effect_latents)
        return np.where(on, "clean", "none")

    @property
    def labelled_on(self) -> np.ndarray:
        """:attr:`label_set`, or for stats that do not record it (older ones, which labelled every latent from its
        clean top images): ``"clean"`` where those images hold a class count, else ``"none"``."""
        if self.label_set is not None:
            return np.asarray(self.label_set)
        return np.where(np.asarray(self.class_counts).sum(1) > 0, "clean", "none")

    def shown_label(self, feature: int) -> str:
        """Latent ``feature``'s automatic label as the explorer and the feature card show it: :attr:`label`, marked
        ``" (corrupted images)"`` when it comes from its top corrupted images (:attr:`labelled_on`)."""
        f = int(feature)
        return mark_label(self.label[f], str(self.labelled_on[f]))

    def ablation_images(self, feature: int) -> tuple[str, np.ndarray]:
        """The set latent ``feature``'s ablate/double effect was measured on and the image indices of that set,
        one per column of ``probs_ablate[feature]`` (-1: no image there, nothing measured); ``("none", all -1)``
        when it was not measured."""
        f = int(feature)
        which = str(self.ablated_on[f])
        width = self.probs_ablate.shape[1]
        idx = np.full(width, -1, dtype=np.int64)
        src = {"clean": self.top_idx, "corrupted": self.top_idx_corrupted}.get(which)
        if src is not None:
            n = min(width, src.shape[1])
            idx[:n] = src[f, :n]
        return which, idx

    @property
    def live(self) -> np.ndarray:
        """Latents that fire on at least one clean or corrupted patch token of these images."""
        return np.flatnonzero(self.max_act > 0)

    def most_active(self, n: int) -> np.ndarray:
        """The ``n`` live latents that fire on the most clean + corrupted patch tokens (sorted by index)."""
        dens_c = self.density_corrupted
        return most_active_latents(self.live, self.density, dens_c, self.n_images, self.n_corrupted, n)

    @property
    def with_effects(self) -> np.ndarray:
        """The live latents whose effects were computed (every live latent unless ``max_effect_latents``)."""
        live = self.live
        return live if self.effect_latents is None else np.intersect1d(live, self.effect_latents)


CORRUPTED_MARK = "corrupted images"  # what marks a label that comes from the top corrupted images


def mark_label(label: str, label_set: str) -> str:
    """``label`` as shown: followed by ``" (corrupted images)"`` when it comes from the top corrupted images."""
    return f"{label} ({CORRUPTED_MARK})" if label_set == "corrupted" else label


def most_active_latents(
    live: np.ndarray,
    density: np.ndarray,
    density_corrupted: np.ndarray | None,
    n_images: int,
    n_corrupted: int,
    n: int,
) -> np.ndarray:
    """Of ``live``, the ``n`` latents that fire on the most patch tokens (clean density x images + corrupted
    density x corrupted images; ties: the lower index), sorted by index."""
    fired = density[live].astype(np.float64) * n_images
    if density_corrupted is not None:
        fired += density_corrupted[live].astype(np.float64) * n_corrupted
    return np.sort(live[np.argsort(-fired, kind="stable")[:n]])


def decoder_directions(sae: Any) -> Float[Tensor, "d_sae d_in"]:
    """Each latent's direction in the hook's units: ``sae.decode(e_f) - sae.decode(0)`` (this includes any
    activation-normalisation scale sae-lens applies on the way out; the decoder is affine)."""
    with torch.no_grad():
        dev, dt = sae.W_dec.device, sae.W_dec.dtype
        eye = torch.eye(int(sae.cfg.d_sae), device=dev, dtype=dt)
        return (sae.decode(eye) - sae.decode(torch.zeros_like(eye[:1]))).float().cpu()


def nearest_cosine(w_a: Tensor, w_b: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``w_a`` [Fa, d]: the index of the row of ``w_b`` [Fb, d] with the largest cosine, and
    that cosine. Zero rows get cosine 0."""
    if w_a.ndim != 2 or w_b.ndim != 2 or w_a.shape[1] != w_b.shape[1]:
        raise ValueError(
            f"expected two decoder matrices [F, d] of the same width, got {tuple(w_a.shape)} and "
            f"{tuple(w_b.shape)}"
        )
    a = torch.nn.functional.normalize(w_a.float(), dim=1)
    b = torch.nn.functional.normalize(w_b.float(), dim=1)
    idx, cos = [], []
    for s in range(0, len(a), 1024):
        c = a[s : s + 1024] @ b.T
        v, i = c.max(1)
        idx.append(i)
        cos.append(v)
    return torch.cat(idx).numpy(), torch.cat(cos).numpy()


def location_label(mean_map: np.ndarray) -> str:
    """Where on the patch grid a latent fires, from its mean normalised map: ``"everywhere"`` when more
    than half of the patches reach half the peak, otherwise the third of the grid (top/middle/bottom x
    left/centre/right) holding the centre of mass (``"centre"`` for the middle one)."""
    m = np.clip(np.asarray(mean_map, dtype=np.float64), 0, None)
    if m.sum() <= 0:
        return "nowhere"
    if (m >= 0.5 * m.max()).mean() > 0.5:
        return "everywhere"
    gh, gw = m.shape
    rows, cols = np.mgrid[0:gh, 0:gw]
    r = (rows * m).sum() / m.sum() / max(gh - 1, 1)
    c = (cols * m).sum() / m.sum() / max(gw - 1, 1)
    vert = ("top", "middle", "bottom")[min(int(r * 3), 2)]
    horiz = ("left", "centre", "right")[min(int(c * 3), 2)]
    if vert == "middle" and horiz == "centre":
        return "centre"
    if vert == "middle":
        return f"middle-{horiz}"
    return f"{vert}-{horiz}" if horiz != "centre" else f"{vert}-centre"


def automatic_label(counts: np.ndarray, class_names: Sequence[str]) -> str:
    """Class association of a latent's top images: the class when it holds >= 60% of them (with its share),
    the two leading classes when together they hold >= 75%, else ``"mixed"``; with fewer than 5 images the leading class and its count
    (``"Bag (2 of 3)"``); ``"-"`` with no images."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return "-"
    order = np.argsort(-counts, kind="stable")
    p1, p2 = counts[order[0]] / total, counts[order[1]] / total if len(order) > 1 else 0.0
    if total < 5:  # too few images for a share: say how many
        return f"{class_names[order[0]]} ({int(counts[order[0]])} of {int(total)})"
    if p1 >= 0.6:
        return f"{class_names[order[0]]} {round(100 * p1)}%"
    if p1 + p2 >= 0.75:
        return f"{class_names[order[0]]} / {class_names[order[1]]}"
    return "mixed"


# feature_stats keeps the first pass's non-zero codes for the second (False: encodes twice, the reference)
_REUSE_CODES = True
# feature_stats ranks the top images of this many latents per sort (bounds the memory of the sort: at 2,000 images
# the block's copy, sorted values and indices take 131 MB)
_SORT_BLOCK = 4096


def _patch_rows(model: Any) -> slice:
    return slice(int(model.cfg.n_prefix_tokens), None)


def _model_device(model: Any) -> torch.device:
    return next(iter(model.parameters())).device


@torch.no_grad()
def _hook_acts(model: Any, x: Tensor, hook: str, batch_size: int) -> Tensor:
    """The full activation at ``hook`` [N, T, D] (CPU float32), forward stopped at the hook."""
    from mechvit.sae import run_to_hook

    out = [
        run_to_hook(model, x[s : s + batch_size], hook).float().cpu() for s in range(0, len(x), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def _forward_from_hook(
    model: Any, images: Tensor | None, resid: Tensor, delta: Tensor, hook: str, layer: int | None
) -> Tensor:
    """Logits with ``delta`` [B, P, D] added to the patch tokens of the hook's activation ``resid`` [B, T, D]."""
    dev = _model_device(model)
    rows = _patch_rows(model)
    if layer is not None:
        x = resid.to(dev).clone()
        x[:, rows] += delta.to(dev)
        return model(x, start_at_layer=layer, readout_only=True).float().cpu()

    def add(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        act[:, rows] += delta.to(act.device, act.dtype)
        return act

    return model.run_with_hooks(images.to(dev), fwd_hooks=[(hook, add)]).float().cpu()


@torch.no_grad()
def feature_stats(
    model: Any,
    sae: Any,
    images: Float[Tensor, "n c h w"],
    labels: Tensor | Sequence[int],
    class_names: Sequence[str],
    *,
    corrupted: Float[Tensor, "n c h w"] | None = None,
    corrupted_labels: Tensor | Sequence[int] | None = None,
    hook: str | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    k: int = 8,
    n_assoc: int = 32,
    n_bins: int = 24,
    n_readout: int = 64,
    batch_size: int = 256,
    effect_batch: int = 512,
    max_effect_latents: int | None = None,
    progress: bool = True,
    cache: dict | None = None,
    ablate_batch: int | None = None,
) -> FeatureStats:
    """Compute :class:`FeatureStats` for every latent of ``sae`` on ``model`` (a HookedViT).

    ``images`` (and ``corrupted``, any number of images) are what the model takes after ``transform``
    (e.g. the study's normalisation; None = as given). ``corrupted_labels``: the class of each corrupted image,
    for the automatic label of a latent that fires only on corrupted images (None: ``labels``, when there are as
    many corrupted images as clean ones, e.g. the same images corrupted; otherwise they must be given). ``hook``
    defaults to the SAE's recorded ``cfg.metadata.hook_name``. Only patch tokens are encoded (the maps live on the patch grid).

    ``cache``: a dict shared by calls on the same ``model``, ``images``, ``corrupted`` and ``transform`` (e.g.
    the seed replicates of one model's SAE) keeps the model's own activations and probabilities, computed
    once; the results are the same as without it.

    ``max_effect_latents``: compute the direct logit effect and the ablate/double probabilities only for
    this many live latents, those active on the most clean + corrupted patch tokens (ties: lower index);
    None: every latent.

    The ablate/double effect of a latent is measured on its top clean images, or on its top corrupted images when
    it never fires on a clean token (:attr:`FeatureStats.ablation_set`). ``ablate_batch``: (latent, image) pairs
    per forward from the hook; None: 64 on a CPU (small batches keep the activations in cache: 22% less CPU time
    than 512 for the default study's model, one thread of the 2-core Xeon), ``effect_batch`` elsewhere."""
    from mechvit.sae.activations import check_hook, resume_layer
    from mechvit.sae.metrics import check_sae_hook

    hook = hook or getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not hook:
        raise ValueError("the SAE records no hook name (cfg.metadata.hook_name); pass hook='blocks.L....'")
    check_hook(model, hook)
    check_sae_hook(sae, hook)
    labels = torch.as_tensor(labels).long().cpu()
    if not isinstance(images, Tensor) or images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"expected images [n, c, h, w] with one label each (n >= 1), got {got} and {len(labels)}"
        )
    if len(class_names) != model.cfg.num_classes:
        raise ValueError(f"expected {model.cfg.num_classes} class names, got {len(class_names)}")
    if corrupted is not None and (corrupted.ndim != 4 or corrupted.shape[1:] != images.shape[1:]):
        raise ValueError(
            f"corrupted images must be [m, {', '.join(map(str, images.shape[1:]))}], got {tuple(corrupted.shape)}"
        )
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(
            f"labels must index the {len(class_names)} classes, got range [{labels.min()}, {labels.max()}]"
        )
    labels_c = None
    if corrupted is not None:
        if corrupted_labels is None and len(corrupted) != len(labels):
            raise ValueError(
                f"give corrupted_labels: {len(corrupted)} corrupted images but {len(labels)} labels (the default, "
                "labels, fits only as many corrupted images as clean ones)"
            )
        labels_c = labels if corrupted_labels is None else torch.as_tensor(corrupted_labels).long().cpu()
        if labels_c.ndim != 1 or len(labels_c) != len(corrupted):
            raise ValueError(
                f"{len(corrupted)} corrupted images but {len(labels_c)} corrupted labels: give one label each"
            )
        if len(labels_c) and (labels_c.min() < 0 or labels_c.max() >= len(class_names)):
            raise ValueError(
                f"corrupted_labels must index the {len(class_names)} classes, got range "
                f"[{labels_c.min()}, {labels_c.max()}]"
            )
    elif corrupted_labels is not None:
        raise ValueError("corrupted_labels given without corrupted images")
    if max_effect_latents is not None and max_effect_latents < 1:
        raise ValueError(f"max_effect_latents must be >= 1 or None, got {max_effect_latents}")
    gh, gw = model.cfg.grid_size
    P, F, C = gh * gw, int(sae.cfg.d_sae), len(class_names)
    dev = _model_device(model)
    sdev, sdt = sae.W_dec.device, sae.W_dec.dtype
    prep = transform or (lambda t: t)
    was_training = model.training
    model.eval()
    sae.eval()
    try:
        memo = cache if cache is not None else {}

        def once(name: str, fn: Callable[[], Tensor]) -> Tensor:
            key = (id(model), id(images), id(corrupted), hook, n_readout, name)
            if key not in memo:
                memo[key] = fn()
            return memo[key]

        resid = once(
            "resid", lambda: _hook_acts(model, prep(images.to(dev, torch.float32)), hook, batch_size)
        )
        if resid.ndim != 3 or resid.shape[1] - int(model.cfg.n_prefix_tokens) != P:
            raise ValueError(
                f"hook {hook!r} gives {tuple(resid.shape)}; expected [n, tokens, d] with {P} patches"
            )
        if resid.shape[-1] != int(sae.cfg.d_in):
            raise ValueError(f"the SAE has d_in={sae.cfg.d_in} but hook {hook!r} has width {resid.shape[-1]}")
        resid_c = None
        if corrupted is not None:
            resid_c = once(
                "resid_c", lambda: _hook_acts(model, prep(corrupted.to(dev, torch.float32)), hook, batch_size)
            )
        rows = _patch_rows(model)

        def codes(acts: Tensor):
            for s in range(0, len(acts), batch_size):
                chunk = acts[s : s + batch_size, rows]
                z = sae_encode(sae, chunk.reshape(-1, chunk.shape[-1]).to(sdev, sdt)).float().cpu()
                yield s, z.reshape(chunk.shape[0], P, F)

        n_top = max(k, n_assoc)
        kept: dict[int, list] = {}  # id(acts) -> each chunk's non-zero codes from pass_one, for gather_maps

        def pass_one(acts: Tensor, desc: str):
            img_max = torch.zeros(len(acts), F)
            active = torch.zeros(F, dtype=torch.float64)
            total = torch.zeros(F, dtype=torch.float64)
            chunks = kept.setdefault(id(acts), []) if _REUSE_CODES else None
            for s, z in tqdm(
                codes(acts), total=-(-len(acts) // batch_size), desc=desc, disable=not progress, leave=False
            ):
                img_max[s : s + len(z)] = z.amax(1)
                if chunks is None:
                    active += (z > 0).sum((0, 1)).double()
                else:  # the same counts from the non-zero codes, kept (sparse) for the second pass
                    nz = torch.nonzero(z, as_tuple=True)
                    v = z[nz]
                    chunks.append((s, z.shape[0], nz, v))
                    active += torch.bincount(nz[2][v > 0], minlength=F).double()
                total += z.sum((0, 1)).double()
            return img_max, active, total

        def firing_mean(total: Tensor, active: Tensor) -> Tensor:
            """Mean code over the tokens where the latent fires; NaN where it never does (not 0: that would
            read as a measured, weakest activation)."""
            return torch.where(active > 0, total / active.clamp_min(1), torch.nan).float()

        def codes_again(acts: Tensor):
            """The codes of pass_one again: rebuilt from the kept non-zero codes (the same numbers up to the
            sign of zero) instead of a second encode."""
            if id(acts) not in kept:
                yield from codes(acts)
                return
            for s, n, nz, v in kept.pop(id(acts)):
                z = torch.zeros(n, P, F)
                z[nz] = v
                yield s, z

        def top_of(img_max: Tensor, n: int) -> tuple[Tensor, Tensor]:
            """Each latent's top ``n`` images [F, n] by their strongest patch ``img_max`` [N, F]: indices and values,
            by value descending, ties by the lower image index (a stable sort, so the first k of a ranking of n > k
            are the ranking of k; topk's order among equal values is unspecified); -1 / 0 where it does not fire.
            Sorted in blocks of latents, to bound the memory of the sort."""
            n = min(n, len(img_max))
            idx = torch.empty(img_max.shape[1], n, dtype=torch.long)
            val = torch.empty(img_max.shape[1], n)
            for s in range(0, img_max.shape[1], _SORT_BLOCK):
                v, i = torch.sort(
                    img_max[:, s : s + _SORT_BLOCK].T.contiguous(), dim=1, descending=True, stable=True
                )
                val[s : s + len(v)], idx[s : s + len(v)] = v[:, :n], i[:, :n]
            idx[val <= 0] = -1
            val[val <= 0] = 0
            return idx, val

        def gather_maps(
            acts: Tensor, wanted: Sequence[tuple[Tensor, Tensor | None]], hist_max: Tensor | None
        ) -> tuple[list[Tensor], Tensor]:
            """In one pass over the codes of ``acts``: for each ``(idx, rows)`` of ``wanted``, the per-patch maps
            [R, w, gh, gw] of the images ``idx`` [R, w] names (-1: none, a zero map) for the latents ``rows`` [R]
            (None: every latent, R = F); and, with ``hist_max``, the histogram [F, n_bins] of the non-zero codes."""
            maps = [torch.zeros(*idx.shape, P) for idx, _ in wanted]
            hist = torch.zeros(F * n_bins, dtype=torch.float64)
            for s, z in codes_again(acts):
                e = s + len(z)
                for (idx, rows), out in zip(wanted, maps, strict=True):
                    r_sel, j_sel = torch.nonzero((idx >= s) & (idx < e), as_tuple=True)
                    if len(r_sel):
                        f_sel = r_sel if rows is None else rows[r_sel]
                        out[r_sel, j_sel] = z[idx[r_sel, j_sel] - s, :, f_sel]
                if hist_max is not None:
                    flat = z.reshape(-1, F)
                    r, f = torch.nonzero(flat > 0, as_tuple=True)
                    b = (flat[r, f] / hist_max[f] * n_bins).long().clamp_(0, n_bins - 1)
                    hist += torch.bincount(f * n_bins + b, minlength=F * n_bins).double()
            shaped = [m.reshape(*idx.shape, gh, gw) for m, (idx, _) in zip(maps, wanted, strict=True)]
            return shaped, hist.reshape(F, n_bins)

        img_max, active, total = pass_one(resid, "encode clean")
        max_act = img_max.amax(0)
        dens_c = img_max_c = mean_act_c = None
        active_c = torch.zeros(F, dtype=torch.float64)
        if resid_c is not None:
            img_max_c, active_c, total_c = pass_one(resid_c, "encode corrupted")
            max_act = torch.maximum(max_act, img_max_c.amax(0))
            dens_c = (active_c / (len(resid_c) * P)).float().numpy()
            mean_act_c = firing_mean(total_c, active_c)
        density = (active / (len(images) * P)).float().numpy()
        effect_latents = None
        if max_effect_latents is not None:
            live = np.flatnonzero(max_act.numpy() > 0)
            n_c = 0 if resid_c is None else len(resid_c)
            effect_latents = torch.from_numpy(
                most_active_latents(live, density, dens_c, len(images), n_c, max_effect_latents)
            )
        idx_all, val_all = top_of(img_max, n_top)
        (maps_all,), hist = gather_maps(resid, [(idx_all, None)], max_act.clamp_min(1e-12))
        # which images label a latent (and which the activation of its direct logit effect is): the clean ones where
        # it fires on a clean token, else the corrupted ones where it fires on a corrupted token, else none
        basis = np.where(active.numpy() > 0, "clean", np.where(active_c.numpy() > 0, "corrupted", "none"))
        # [R] the latents labelled from their top corrupted images (they fire only on corrupted ones)
        only_c_ids = torch.from_numpy(np.flatnonzero(basis == "corrupted"))
        top_idx_c = top_val_c = maps_c = None
        if resid_c is not None:
            # one ranking of n_top: its first k are the top images shown (maps for every latent); a latent that
            # fires only on corrupted images is labelled from its first n_assoc (maps for those latents alone)
            idx_c_all, val_c_all = top_of(img_max_c, n_top)
            top_idx_c, top_val_c = idx_c_all[:, :k], val_c_all[:, :k]
            idx_c_only, val_c_only = idx_c_all[only_c_ids, :n_assoc], val_c_all[only_c_ids, :n_assoc]
            (maps_c, maps_c_only), _ = gather_maps(
                resid_c, [(top_idx_c, None), (idx_c_only, only_c_ids)], None
            )

        def association(
            idx: Tensor, val: Tensor, maps: Tensor, classes: Tensor
        ) -> tuple[Tensor, Tensor, Tensor]:
            """Class counts [R, C] and mean normalised map [R, gh, gw] over the top n_assoc images where each of
            R latents (the rows of ``idx`` [R, w]) fires, and whether it has such an image [R]."""
            na = idx[:, :n_assoc]
            valid = na >= 0
            counts = torch.zeros(len(idx), C, dtype=torch.long)
            counts.scatter_add_(1, classes[na.clamp_min(0)], valid.long())
            norm = maps[:, :n_assoc] / val[:, :n_assoc, None, None].clamp_min(1e-12)
            loc = (norm * valid[..., None, None]).sum(1) / valid.sum(1).clamp_min(1)[:, None, None]
            return counts, loc, valid.any(1)

        class_counts, location, has_images = association(idx_all, val_all, maps_all, labels)
        if resid_c is not None and len(only_c_ids):  # from the top corrupted images, with their labels
            counts_c, location_c, has_c = association(idx_c_only, val_c_only, maps_c_only, labels_c)
            class_counts[only_c_ids] = counts_c
            location[only_c_ids] = location_c
            has_images[only_c_ids] = has_c
        label_set = basis.copy()
        label_class = [automatic_label(c, class_names) for c in class_counts.numpy()]
        label_where = [
            location_label(m) if v else "-" for m, v in zip(location.numpy(), has_images.numpy(), strict=True)
        ]
        label = [c if c == "-" else f"{c} · {w}" for c, w in zip(label_class, label_where, strict=True)]
        mean_act = firing_mean(total, active)
        amplitude = mean_act.clone()
        if mean_act_c is not None:
            amplitude = torch.where(active > 0, mean_act, mean_act_c)
        measured = torch.from_numpy(basis != "none")

        directions = decoder_directions(sae)  # [F, D]
        # direct logit effect through the model's own readout on the final residual stream
        n_layers = model.cfg.n_layers
        final = once(
            "final",
            lambda: _hook_acts(
                model,
                prep(images[:n_readout].to(dev, torch.float32)),
                f"blocks.{n_layers - 1}.hook_resid_post",
                batch_size,
            ),
        )
        read = model.readout_rows() or slice(
            0 if model.cfg.pool_include_prefix else int(model.cfg.n_prefix_tokens), None
        )
        if model.readout_rows() is not None:
            final = final[:, : read.stop]  # the rows the pooling reads are the first ones
        base_logits = model.unembed(final.to(dev)).float().cpu()  # [M, C]
        logit_effect = torch.zeros(F, C)
        logit_effect[~measured] = torch.nan  # never fires: nothing to measure it at
        which = torch.arange(F) if effect_latents is None else effect_latents
        which = which[measured[which]]
        step = max(1, effect_batch // max(1, len(final)))
        for s in tqdm(
            range(0, len(which), step), desc="direct logit effect", disable=not progress, leave=False
        ):
            fs = which[s : s + step]
            d = (directions[fs] * amplitude[fs, None]).to(dev)  # [f, D]
            x = final.to(dev)[None].repeat(len(d), 1, 1, 1)  # [f, M, T', D]
            x[:, :, read] += d[:, None, None, :]
            lg = model.unembed(x.reshape(-1, *x.shape[2:])).float().cpu().reshape(len(d), len(final), C)
            logit_effect[fs] = (lg - base_logits[None]).mean(1)

        # before/after: the model's own probabilities, and with the latent's contribution removed / doubled
        probs = once(
            "probs",
            lambda: torch.cat(
                [
                    model(prep(images[s : s + batch_size].to(dev, torch.float32))).float().softmax(-1).cpu()
                    for s in range(0, len(images), batch_size)
                ]
            ),
        )
        layer = resume_layer(hook)
        top_idx, top_val, top_maps = idx_all[:, :k], val_all[:, :k], maps_all[:, :k]
        width = top_idx.shape[1]
        # which top images each latent's ablate/double effect is measured on: the set its direct effect's basis
        # names (clean where it fires on a clean token, else corrupted), none where its effects are not computed
        computed = np.ones(F, dtype=bool)
        if effect_latents is not None:
            computed = np.isin(np.arange(F), effect_latents.numpy())
        ablation_set = np.where(computed, basis, "none")
        p_abl = torch.zeros(F, width, C)
        p_dbl = torch.zeros(F, width, C)
        sets = [("clean", top_idx, top_maps, resid, images)]
        if resid_c is not None:  # at most as many corrupted top images as p_abl has columns
            sets.append(("corrupted", top_idx_c[:, :width], maps_c[:, :width], resid_c, corrupted))
        probs_c = None
        if ablate_batch is None:
            ablate_batch = 64 if dev.type == "cpu" else effect_batch

        def own_probs(source: Tensor, acts: Tensor) -> Tensor:
            """The model's probabilities on ``source``: the forward the ablations run (from the hook's activation
            ``acts``, or the whole model with a hook) with nothing added, so "before" and "after" differ by the
            splice alone."""
            out = []
            for s in range(0, len(source), ablate_batch):
                a = acts[s : s + ablate_batch]
                imgs = prep(source[s : s + ablate_batch].to(dev, torch.float32)) if layer is None else None
                zero = torch.zeros(len(a), P, a.shape[-1])
                out.append(_forward_from_hook(model, imgs, a, zero, hook, layer).softmax(-1))
            return torch.cat(out)

        for name, idx, maps, acts, source in sets:
            pairs = torch.nonzero((idx >= 0) & torch.from_numpy(ablation_set == name)[:, None])  # [(f, j)]
            if not len(pairs):
                continue
            if name == "corrupted":  # "before" on a corrupted image: the model's own prediction there
                probs_c = once("probs_c", lambda: own_probs(corrupted, resid_c))
            for s in tqdm(
                range(0, len(pairs), ablate_batch),
                desc=f"ablate / double ({name})",
                disable=not progress,
                leave=False,
            ):
                f, j = pairs[s : s + ablate_batch].T
                img = idx[f, j]
                contrib = maps[f, j].reshape(len(f), P, 1) * directions[f][:, None, :]  # [b, P, D]
                imgs = prep(source[img].to(dev, torch.float32)) if layer is None else None
                for factor, out in ((0.0, p_abl), (2.0, p_dbl)):
                    lg = _forward_from_hook(model, imgs, acts[img], (factor - 1.0) * contrib, hook, layer)
                    out[f, j] = lg.softmax(-1)
    finally:
        model.train(was_training)

    def np_(t):
        return None if t is None else t.numpy()

    return FeatureStats(
        hook=hook,
        grid=(gh, gw),
        n_images=len(images),
        n_corrupted=0 if corrupted is None else len(corrupted),
        density=density,
        density_corrupted=dens_c,
        mean_act=mean_act.numpy(),
        max_act=max_act.numpy(),
        hist=hist.numpy().astype(np.int64),
        top_idx=top_idx.numpy(),
        top_val=top_val.numpy(),
        top_maps=top_maps.numpy(),
        top_idx_corrupted=np_(top_idx_c),
        top_val_corrupted=np_(top_val_c),
        top_maps_corrupted=np_(maps_c),
        class_counts=class_counts.numpy(),
        location=location.numpy(),
        label=label,
        label_class=label_class,
        label_where=label_where,
        logit_effect=logit_effect.numpy(),
        probs=probs.numpy(),
        probs_ablate=p_abl.numpy(),
        probs_double=p_dbl.numpy(),
        n_assoc=n_assoc,
        effect_latents=None if effect_latents is None else effect_latents.numpy(),
        mean_act_corrupted=np_(mean_act_c),
        effect_basis=basis,
        probs_corrupted=np_(probs_c),
        ablation_set=ablation_set,
        label_set=label_set,
    )
