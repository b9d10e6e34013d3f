"""Feature overlap between two SAEs of the same hook (e.g. base vs fine-tuned model), and the seed paper's
clean-vs-corrupted code similarity.

Works with any ``sae_lens`` SAE (``encode``, ``decode``, ``W_dec [d_sae, d_in]``).

Matching and classification (``OverlapConfig`` holds every threshold):

- decoder cosine is *signed*: ``cos(W_dec_a[i], W_dec_b[j])``. SAE codes are non-negative, so a feature
  whose direction is flipped writes the opposite vector: it is a different feature, never "persistent".
- one-to-one matching: ``scipy.optimize.linear_sum_assignment`` maximising the summed cosine, with negative
  cosines counted as 0 (an opposite direction is no better a partner than an orthogonal one); the pair keeps
  its signed cosine for the classification.
- classes: a matched pair with cosine ``>= persistent_cos`` (default 0.9) is *persistent*; a matched pair with
  ``shifted_cos <= cosine < persistent_cos`` (default 0.5) is *shifted*; otherwise (cosine below
  ``shifted_cos`` or no partner because the dictionaries differ in size) the SAE-a feature is *lost* and the
  SAE-b feature is *new*. With ``min_act_corr`` set and activations given, a pair whose activation
  correlation is below it (or undefined) is demoted from persistent to shifted.
- dead features: with activations given, a feature that never fires on its own model's activations
  (``alive_a``/``alive_b`` may also be passed) is *dead*: it is left out of the matching, the mean max cosines
  and the four classes, and counted apart. Two SAEs trained from the same seed keep their dead features at
  the same initial directions; matching those would report them as persistent.
- activation correlation: Pearson correlation, over every token of the same inputs, between SAE a's code
  on model a's activations and SAE b's matched code on model b's activations (``nan`` when a feature never
  varies, e.g. dead).
- top-k Jaccard: each image's feature activation is its maximum over tokens; the Jaccard overlap of the two
  matched features' ``k`` most activating images.
- cross-application: each SAE applied to both models' activations: explained variance
  ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` and L0 (mean number of non-zero codes per token).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from mechvit.analysis._utils import check_images, run_hook_batches
from mechvit.analysis.similarity import write_rows_csv
from mechvit.sae.activations import TOKEN_SELECTIONS, token_slice
from mechvit.sae.metrics import encode as sae_encode

CLASSES = ("persistent", "shifted", "lost", "new", "dead")
TOKEN_SETS = TOKEN_SELECTIONS


def _decoder(sae_or_matrix) -> Tensor:
    w = sae_or_matrix if isinstance(sae_or_matrix, Tensor) else getattr(sae_or_matrix, "W_dec", None)
    if not isinstance(w, Tensor) or w.ndim != 2:
        raise ValueError(
            f"expected an SAE with W_dec [d_sae, d_in] or such a matrix, got {type(sae_or_matrix).__name__}"
        )
    return w.detach().to(torch.float32)


def decoder_cosine(sae_a, sae_b) -> Float[Tensor, "f_a f_b"]:
    """Signed cosine similarity between every decoder direction of ``sae_a`` and of ``sae_b`` (on CPU)."""
    wa, wb = _decoder(sae_a).cpu(), _decoder(sae_b).cpu()
    if wa.shape[1] != wb.shape[1]:
        raise ValueError(
            f"SAEs must read the same hook (same d_in), got d_in {wa.shape[1]} and {wb.shape[1]}"
        )
    wa = wa / wa.norm(dim=1, keepdim=True).clamp_min(1e-12)
    wb = wb / wb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return wa @ wb.T


def mean_max_cosine(cos: Tensor) -> tuple[float, float]:
    """(mean over a of the best cosine in b, mean over b of the best cosine in a)."""
    return float(cos.max(1).values.mean()), float(cos.max(0).values.mean())


def match_features(cos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One-to-one matching: (index in a, index in b, signed cosine of the pair).

    Maximises the summed cosine with negative cosines counted as 0: an opposite direction is no better a
    partner than an orthogonal one, and must not be traded for a good match elsewhere.
    """
    rows, cols = linear_sum_assignment(cos.clamp_min(0).double().numpy(), maximize=True)
    ia, ib = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    return ia, ib, cos[ia, ib]


@torch.no_grad()
def encode(sae, acts: Tensor, batch_size: int = 4096) -> Tensor:
    """SAE codes of ``acts [..., d_in]`` as ``[..., d_sae]`` (on CPU), computed in chunks."""
    d_in = sae.cfg.d_in
    if acts.shape[-1] != d_in:
        raise ValueError(f"activations must end in d_in={d_in}, got shape {tuple(acts.shape)}")
    flat = acts.reshape(-1, d_in)
    dev = sae.W_dec.device
    out = [
        sae_encode(sae, flat[s : s + batch_size].to(dev)).cpu() for s in range(0, flat.shape[0], batch_size)
    ]
    return torch.cat(out).reshape(*acts.shape[:-1], -1)


@dataclass
class SparseCodes:
    """SAE codes ``[*lead, d_sae]`` kept as their non-zero entries, row by row (CSR over the flattened
    tokens): the same numbers as :func:`encode` (built from its chunks, so bit for bit), at a fraction of the
    memory (a BatchTopK/TopK SAE keeps ~k of d_sae codes per token), and cheap to reduce per feature.

    ``lead`` is the activations' shape without ``d_in`` (``[n_images, n_tokens]`` or ``[n_images]``);
    ``indptr [n_rows + 1]``, ``cols [nnz]`` (ascending within a row) and ``vals [nnz]`` (float32, non-zero)
    hold the rows of ``codes.reshape(-1, d_sae)``; ``batch_size`` is the chunk size they were encoded in."""

    lead: tuple[int, ...]
    d_sae: int
    indptr: Tensor
    cols: Tensor
    vals: Tensor
    batch_size: int = 4096

    @classmethod
    @torch.no_grad()
    def encode(cls, sae, acts: Tensor, batch_size: int = 4096) -> SparseCodes:
        """:func:`encode` of ``acts [..., d_in]``, kept sparse (chunk by chunk, never dense in full)."""
        d_in = sae.cfg.d_in
        if acts.shape[-1] != d_in:
            raise ValueError(f"activations must end in d_in={d_in}, got shape {tuple(acts.shape)}")
        flat = acts.reshape(-1, d_in)
        dev = sae.W_dec.device
        counts, cols, vals = [], [], []
        for s in range(0, flat.shape[0], batch_size):
            z = sae_encode(sae, flat[s : s + batch_size].to(dev)).cpu()
            r, c = torch.nonzero(z, as_tuple=True)  # row-major: rows ascending, columns ascending within
            counts.append(torch.bincount(r, minlength=z.shape[0]))
            cols.append(c)
            vals.append(z[r, c].float())
        n = flat.shape[0]
        counts_t = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
        indptr = torch.zeros(n + 1, dtype=torch.long)
        indptr[1:] = counts_t.cumsum(0)
        return cls(
            lead=tuple(acts.shape[:-1]),
            d_sae=int(sae.cfg.d_sae),
            indptr=indptr,
            cols=torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long),
            vals=torch.cat(vals) if vals else torch.zeros(0),
            batch_size=batch_size,
        )

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_images(self) -> int:
        return self.lead[0]

    @property
    def n_tokens(self) -> int:
        """Tokens per image (1 for ``[n_images, d_in]`` activations)."""
        return math.prod(self.lead[1:])

    def rows(self) -> Tensor:
        """The row of each stored entry [nnz]."""
        return torch.repeat_interleave(torch.arange(self.n_rows), self.indptr.diff())

    def dense(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of the flattened codes as a dense float32 ``[rows, d_sae]``."""
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        out = torch.zeros(stop - start, self.d_sae)
        r = torch.repeat_interleave(torch.arange(stop - start), self.indptr[start : stop + 1].diff())
        out[r, self.cols[a:b]] = self.vals[a:b]
        return out

    def to_dense(self) -> Tensor:
        return self.dense().reshape(*self.lead, self.d_sae)

    def fired(self) -> Tensor:
        """bool [d_sae]: the features with a code > 0 on some row."""
        pos = self.vals > 0
        return torch.bincount(self.cols[pos], minlength=self.d_sae) > 0

    def image_max(self) -> Tensor:
        """``codes.amax(tokens)``: each image's largest code per feature, float32 [n_images, d_sae] (the
        same numbers: a maximum is exact)."""
        n, t, f = self.n_images, self.n_tokens, self.d_sae
        key = torch.div(self.rows(), t, rounding_mode="floor") * f + self.cols
        out = torch.full((n * f,), -math.inf)
        out.scatter_reduce_(0, key, self.vals, reduce="amax")
        # a zero code wherever fewer than n_tokens rows of the image hold an entry for the feature
        full = torch.bincount(key, minlength=n * f) >= t
        return torch.where(full, out, out.clamp_min(0)).reshape(n, f)

    def take_images(self, idx: Tensor) -> SparseCodes:
        """The codes of images ``idx`` (``codes[idx]``)."""
        t = self.n_tokens
        rows = (idx.long()[:, None] * t + torch.arange(t)).reshape(-1)
        counts = self.indptr[rows + 1] - self.indptr[rows]
        indptr = torch.zeros(len(rows) + 1, dtype=torch.long)
        indptr[1:] = counts.cumsum(0)
        ent = torch.repeat_interleave(self.indptr[rows] - indptr[:-1], counts) + torch.arange(int(indptr[-1]))
        return SparseCodes(
            (len(idx), *self.lead[1:]), self.d_sae, indptr, self.cols[ent], self.vals[ent], self.batch_size
        )


def sparse_row_cosine(a: SparseCodes, b: SparseCodes) -> Tensor:
    """Cosine of each row of ``a`` with the same row of ``b``, float64 ``[*lead]``; nan where either row is
    zero. The numbers of the dense ``sum(a * b) / (|a| |b|)`` in float64, summed over the non-zero entries
    only (a zero adds nothing; only the order of the float64 additions differs: ~1e-16 relative)."""
    if a.lead != b.lead or a.d_sae != b.d_sae:
        raise ValueError(f"codes must have the same shape, got {a.lead} and {b.lead}")
    n, f = a.n_rows, a.d_sae
    ra, rb = a.rows(), b.rows()
    va, vb = a.vals.double(), b.vals.double()
    na = torch.zeros(n, dtype=torch.float64).index_add_(0, ra, va * va).sqrt()
    nb = torch.zeros(n, dtype=torch.float64).index_add_(0, rb, vb * vb).sqrt()
    ka, kb = ra * f + a.cols, rb * f + b.cols  # ascending (row-major)
    pos = torch.searchsorted(kb, ka).clamp_max(max(len(kb) - 1, 0))
    hit = kb[pos] == ka if len(kb) else torch.zeros(len(ka), dtype=torch.bool)
    dot = torch.zeros(n, dtype=torch.float64).index_add_(0, ra[hit], va[hit] * vb[pos[hit]])
    c = dot / (na * nb).clamp_min(1e-300)
    return torch.where((na > 0) & (nb > 0), c, torch.full_like(c, math.nan)).reshape(a.lead)


def _sparse_pearson(a: SparseCodes, ia: Tensor, b: SparseCodes, ib: Tensor) -> Tensor:
    """:func:`_pearson` of ``codes_a[:, ia]`` and ``codes_b[:, ib]`` (float64 [M]) from the non-zero entries:
    centred sums as the dense formula (each feature's zero rows add ``(0 - mean)`` terms in closed form), in
    another order of float64 additions (~1e-15 relative)."""
    n, m = a.n_rows, len(ia)
    out = torch.full((m,), math.nan, dtype=torch.float64)
    if m == 0 or n == 0:
        return out
    pa = torch.full((a.d_sae,), -1, dtype=torch.long)
    pa[ia] = torch.arange(m)
    pb = torch.full((b.d_sae,), -1, dtype=torch.long)
    pb[ib] = torch.arange(m)

    def entries(c: SparseCodes, p: Tensor):
        pair = p[c.cols]
        keep = pair >= 0
        return pair[keep], c.rows()[keep], c.vals[keep].double()

    ja, ra, va = entries(a, pa)
    jb, rb, vb = entries(b, pb)
    cnt_a = torch.bincount(ja, minlength=m).double()
    cnt_b = torch.bincount(jb, minlength=m).double()
    mean_a = torch.zeros(m, dtype=torch.float64).index_add_(0, ja, va) / n
    mean_b = torch.zeros(m, dtype=torch.float64).index_add_(0, jb, vb) / n
    da, db = va - mean_a[ja], vb - mean_b[jb]
    ss_a = torch.zeros(m, dtype=torch.float64).index_add_(0, ja, da * da) + (n - cnt_a) * mean_a**2
    ss_b = torch.zeros(m, dtype=torch.float64).index_add_(0, jb, db * db) + (n - cnt_b) * mean_b**2
    # the rows where a or b is non-zero (per pair): both centred values; elsewhere (-mean_a) * (-mean_b)
    keys, inv = torch.unique(torch.cat([ja * n + ra, jb * n + rb]), return_inverse=True)
    ua = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inv[: len(ja)], va)
    ub = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inv[len(ja) :], vb)
    ju = torch.div(keys, n, rounding_mode="floor")
    cnt_u = torch.bincount(ju, minlength=m).double()
    prod = (ua - mean_a[ju]) * (ub - mean_b[ju])
    cov = torch.zeros(m, dtype=torch.float64).index_add_(0, ju, prod) + (n - cnt_u) * mean_a * mean_b
    denom = ss_a.sqrt() * ss_b.sqrt()
    return torch.where(denom > 0, cov / denom.clamp_min(1e-300), out)


@torch.no_grad()
def sae_fit(sae, acts: Tensor, batch_size: int = 4096, codes: SparseCodes | None = None) -> dict[str, float]:
    """Explained variance and L0 of ``sae`` on ``acts [..., d_in]`` (every token one example).

    ``codes``: ``SparseCodes.encode(sae, acts, batch_size)`` when the caller has them (the same numbers;
    the encode is skipped)."""
    d_in = sae.cfg.d_in
    if acts.shape[-1] != d_in:
        raise ValueError(f"activations must end in d_in={d_in}, got shape {tuple(acts.shape)}")
    flat = acts.reshape(-1, d_in).double()
    mean = flat.mean(0)
    sse = sst = l0 = 0.0
    dev = sae.W_dec.device
    # reusable only when they are the codes sae_fit would compute: same rows, chunks and input dtype
    reuse = (
        codes is not None
        and codes.n_rows == flat.shape[0]
        and codes.batch_size == batch_size
        and acts.dtype == sae.W_dec.dtype
    )
    for s in range(0, flat.shape[0], batch_size):
        x = flat[s : s + batch_size]
        if reuse:
            z = codes.dense(s, s + batch_size).to(dev, sae.W_dec.dtype)
        else:
            z = sae_encode(sae, x.to(dev, sae.W_dec.dtype))
        x_hat = sae.decode(z).double().cpu()
        sse += float((x - x_hat).pow(2).sum())
        sst += float((x - mean).pow(2).sum())
        l0 += float((z != 0).sum())
    return {"explained_variance": 1.0 - sse / sst if sst > 0 else float("nan"), "l0": l0 / flat.shape[0]}


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    denom = a.norm(dim=0) * b.norm(dim=0)
    return torch.where(denom > 0, (a * b).sum(0) / denom.clamp_min(1e-300), torch.full_like(denom, math.nan))


def _topk_jaccard(img_a: Tensor, img_b: Tensor, k: int) -> Tensor:
    """Jaccard overlap of each matched pair's top-``k`` images (``img_* [n_images, M]``: a feature's largest
    code per image), each set holding only images where the feature fires (> 0): a feature firing on fewer
    than ``k`` images has a smaller set instead of one filled up with non-firing images, which ``topk``
    picks by tie-breaking (two rare features would share those). NaN where neither fires."""
    k = min(k, img_a.shape[0])
    val_a, top_a = img_a.topk(k, dim=0)
    val_b, top_b = img_b.topk(k, dim=0)
    fires_a, fires_b = (val_a > 0).T, (val_b > 0).T  # [M, k]
    same = (top_a.T[:, :, None] == top_b.T[:, None, :]) & fires_a[:, :, None] & fires_b[:, None, :]
    inter = same.any(-1).sum(-1).double()
    union = fires_a.sum(-1) + fires_b.sum(-1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, math.nan))


@dataclass
class OverlapConfig:
    persistent_cos: float = 0.9
    shifted_cos: float = 0.5
    min_act_corr: float | None = None
    top_k: int = 20
    batch_size: int = 4096

    def __post_init__(self):
        if not -1.0 <= self.shifted_cos <= self.persistent_cos <= 1.0:
            raise ValueError(
                "need -1 <= shifted_cos <= persistent_cos <= 1, got "
                f"shifted_cos={self.shifted_cos}, persistent_cos={self.persistent_cos}"
            )
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class FeatureOverlap:
    """Result of :func:`feature_overlap`. Tensors are on CPU; ``pairs`` index features of a and b."""

    cosine: Tensor  # [F_a, F_b] signed decoder cosine
    mean_max_cos_a_to_b: float
    mean_max_cos_b_to_a: float
    idx_a: Tensor  # [M] matched pairs
    idx_b: Tensor  # [M]
    matched_cos: Tensor  # [M]
    class_a: list[str]  # per SAE-a feature: persistent / shifted / lost / dead
    class_b: list[str]  # per SAE-b feature: persistent / shifted / new / dead
    act_corr: Tensor | None = None  # [M]
    topk_jaccard: Tensor | None = None  # [M]
    cross: dict[str, dict[str, float]] | None = None  # {"a_on_a": {...}, "a_on_b": ..., "b_on_b", "b_on_a"}
    config: OverlapConfig = field(default_factory=OverlapConfig)

    def counts(self) -> dict[str, int]:
        return {
            "persistent": self.class_a.count("persistent"),
            "shifted": self.class_a.count("shifted"),
            "lost": self.class_a.count("lost"),
            "new": self.class_b.count("new"),
            "dead_a": self.class_a.count("dead"),
            "dead_b": self.class_b.count("dead"),
        }

    def rows(self) -> list[dict]:
        """One row per matched pair, then one per unmatched feature."""
        out = []
        for m, (i, j) in enumerate(zip(self.idx_a.tolist(), self.idx_b.tolist(), strict=True)):
            out.append(
                {
                    "feature_a": i,
                    "feature_b": j,
                    "cosine": float(self.matched_cos[m]),
                    "class_a": self.class_a[i],
                    "class_b": self.class_b[j],
                    "act_corr": float(self.act_corr[m]) if self.act_corr is not None else None,
                    "topk_jaccard": float(self.topk_jaccard[m]) if self.topk_jaccard is not None else None,
                }
            )
        matched_a, matched_b = set(self.idx_a.tolist()), set(self.idx_b.tolist())
        out += [
            {"feature_a": i, "feature_b": None, "class_a": self.class_a[i]}
            for i in range(len(self.class_a))
            if i not in matched_a
        ]
        out += [
            {"feature_a": None, "feature_b": j, "class_b": self.class_b[j]}
            for j in range(len(self.class_b))
            if j not in matched_b
        ]
        return out

    def to_dict(self) -> dict:
        def _nanmean(t):
            return None if t is None else float(np.nanmean(t.numpy())) if t.numel() else None

        return {
            "n_features_a": len(self.class_a),
            "n_features_b": len(self.class_b),
            "mean_max_cos_a_to_b": self.mean_max_cos_a_to_b,
            "mean_max_cos_b_to_a": self.mean_max_cos_b_to_a,
            "mean_matched_cos": float(self.matched_cos.mean()),
            "counts": self.counts(),
            "mean_act_corr": _nanmean(self.act_corr),
            "mean_topk_jaccard": _nanmean(self.topk_jaccard),
            "cross_application": self.cross,
            "config": asdict(self.config),
        }

    def save_csv(self, path: str | os.PathLike) -> None:
        write_rows_csv(self.rows(), path)


def _classify(alive_a, alive_b, ia, ib, cos, act_corr, cfg: OverlapConfig) -> tuple[list[str], list[str]]:
    class_a = ["lost" if a else "dead" for a in alive_a.tolist()]
    class_b = ["new" if b else "dead" for b in alive_b.tolist()]
    for m, (i, j) in enumerate(zip(ia.tolist(), ib.tolist(), strict=True)):
        c = float(cos[m])
        if c >= cfg.persistent_cos:
            label = "persistent"
            if cfg.min_act_corr is not None and act_corr is not None:
                r = float(act_corr[m])
                if not (r >= cfg.min_act_corr):  # nan fails too
                    label = "shifted"
        elif c >= cfg.shifted_cos:
            label = "shifted"
        else:
            continue
        class_a[i] = class_b[j] = label
    return class_a, class_b


@torch.no_grad()
def feature_overlap(
    sae_a,
    sae_b,
    acts_a: Float[Tensor, "n ... d"] | None = None,
    acts_b: Float[Tensor, "n ... d"] | None = None,
    config: OverlapConfig | None = None,
    *,
    alive_a: Tensor | None = None,
    alive_b: Tensor | None = None,
    codes_a: Tensor | SparseCodes | None = None,
    codes_b: Tensor | SparseCodes | None = None,
    cross: dict[str, dict[str, float]] | None = None,
) -> FeatureOverlap:
    """Compare two SAEs of the same hook.

    ``acts_a``/``acts_b``: activations of model a and model b at that hook on the *same* images, shape
    ``[n_images, n_tokens, d_in]`` (or ``[n_images, d_in]``). Without them only the decoder-based measures
    are computed, and every feature counts as alive unless ``alive_a``/``alive_b`` (bool ``[d_sae]``) say
    otherwise; with them, a feature that never fires on its own model's activations is dead.

    For callers that compare each SAE with many others (``overlap_controls``): ``codes_a`` = ``encode(sae_a,
    acts_a)`` and ``codes_b`` = ``encode(sae_b, acts_b)`` (shaped like the activations, ``d_sae`` last) and
    ``cross`` (the four ``sae_fit`` results, keys as in :attr:`FeatureOverlap.cross`) are used instead of
    being recomputed; the results are the same. Given as :class:`SparseCodes` (either of them), the
    per-feature reductions run over the non-zero codes only (~k of d_sae per token for a TopK SAE; the
    default study's pairs ~40x faster): the same matching, classes and top-k Jaccard, and the activation
    correlation equal up to the order of its float64 sums (~1e-15 relative, before the float32 result).
    """
    cfg = config or OverlapConfig()
    if (acts_a is None) != (acts_b is None):
        raise ValueError(
            "pass both acts_a and acts_b (activations of both models on the same images) or neither"
        )
    if acts_a is not None and (acts_a.shape != acts_b.shape or acts_a.ndim not in (2, 3)):
        raise ValueError(
            "acts_a and acts_b must have the same shape [n_images, (n_tokens,) d_in], got "
            f"{tuple(acts_a.shape)} and {tuple(acts_b.shape)}"
        )
    cos_all = decoder_cosine(sae_a, sae_b)
    _check_alive(alive_a, alive_b, cos_all)  # the caller's masks, before they are combined with anything
    if acts_a is not None and (isinstance(codes_a, SparseCodes) or isinstance(codes_b, SparseCodes)):
        return _feature_overlap_sparse(
            sae_a, sae_b, acts_a, acts_b, cfg, cos_all, alive_a, alive_b, codes_a, codes_b, cross
        )
    a3 = b3 = None
    per = 1
    if acts_a is not None:
        a3 = acts_a if acts_a.ndim == 3 else acts_a[:, None]
        b3 = acts_b if acts_b.ndim == 3 else acts_b[:, None]
        per = max(1, cfg.batch_size // a3.shape[1])
        for name, codes, x3 in (("codes_a", codes_a, a3), ("codes_b", codes_b, b3)):
            if codes is not None and codes.shape[:-1] != x3.shape[:-1]:
                raise ValueError(
                    f"{name} must be the codes of the activations, shape {tuple(x3.shape[:-1])} + (d_sae,), "
                    f"got {tuple(codes.shape)}"
                )
        ca = None if codes_a is None else (codes_a if codes_a.ndim == 3 else codes_a[:, None])
        cb = None if codes_b is None else (codes_b if codes_b.ndim == 3 else codes_b[:, None])

        def chunk(sae, x3, codes, s):
            return codes[s : s + per] if codes is not None else encode(sae, x3[s : s + per], cfg.batch_size)

        fired_a = torch.zeros(cos_all.shape[0], dtype=torch.bool)
        fired_b = torch.zeros(cos_all.shape[1], dtype=torch.bool)
        for s in range(0, a3.shape[0], per):
            fired_a |= (chunk(sae_a, a3, ca, s) > 0).flatten(0, -2).any(0).cpu()
            fired_b |= (chunk(sae_b, b3, cb, s) > 0).flatten(0, -2).any(0).cpu()
        alive_a = fired_a if alive_a is None else alive_a.cpu().bool() & fired_a
        alive_b = fired_b if alive_b is None else alive_b.cpu().bool() & fired_b
    alive_a = torch.ones(cos_all.shape[0], dtype=torch.bool) if alive_a is None else alive_a.cpu().bool()
    alive_b = torch.ones(cos_all.shape[1], dtype=torch.bool) if alive_b is None else alive_b.cpu().bool()
    live_a, live_b = alive_a.nonzero().flatten(), alive_b.nonzero().flatten()
    cos = cos_all[live_a][:, live_b]
    mm_ab, mm_ba = mean_max_cosine(cos) if cos.numel() else (float("nan"), float("nan"))
    if cos.numel():
        ia, ib, mcos = match_features(cos)
        ia, ib = live_a[ia], live_b[ib]
    else:
        ia = ib = torch.zeros(0, dtype=torch.long)
        mcos = torch.zeros(0)
    act_corr = jac = None
    if a3 is None:
        cross = None
    else:
        tok_a, tok_b, img_a, img_b = [], [], [], []
        for s in range(0, a3.shape[0], per):
            za = chunk(sae_a, a3, ca, s)[..., ia]
            zb = chunk(sae_b, b3, cb, s)[..., ib]
            tok_a.append(za.flatten(0, -2))  # (reshape(-1, 0) fails when no feature is matched)
            tok_b.append(zb.flatten(0, -2))
            img_a.append(za.amax(1))
            img_b.append(zb.amax(1))
        act_corr = _pearson(torch.cat(tok_a), torch.cat(tok_b)).float()
        jac = _topk_jaccard(torch.cat(img_a), torch.cat(img_b), cfg.top_k).float()
        cross = _cross_fits(sae_a, sae_b, acts_a, acts_b, cfg, cross)
    return _overlap(cos_all, (mm_ab, mm_ba), (ia, ib, mcos), (alive_a, alive_b), act_corr, jac, cross, cfg)


def _cross_fits(sae_a, sae_b, acts_a, acts_b, cfg, cross, codes_a=None, codes_b=None) -> dict:
    """Each SAE on its own and on the other's activations (``cross`` when given: checked), with the codes
    of an SAE's own activations where the caller has them."""
    if cross is None:
        return {
            "a_on_a": sae_fit(sae_a, acts_a, cfg.batch_size, codes=codes_a),
            "a_on_b": sae_fit(sae_a, acts_b, cfg.batch_size),
            "b_on_b": sae_fit(sae_b, acts_b, cfg.batch_size, codes=codes_b),
            "b_on_a": sae_fit(sae_b, acts_a, cfg.batch_size),
        }
    if set(cross) != {"a_on_a", "a_on_b", "b_on_b", "b_on_a"}:
        raise ValueError(f"cross needs the keys a_on_a, a_on_b, b_on_b, b_on_a; got {sorted(cross)}")
    return cross


def _overlap(cos_all, mean_max, matching, alive, act_corr, jac, cross, cfg) -> FeatureOverlap:
    """The :class:`FeatureOverlap` of a matching ``(idx_a, idx_b, matched_cos)``, its classes included."""
    ia, ib, mcos = matching
    class_a, class_b = _classify(*alive, ia, ib, mcos, act_corr, cfg)
    return FeatureOverlap(
        cosine=cos_all,
        mean_max_cos_a_to_b=mean_max[0],
        mean_max_cos_b_to_a=mean_max[1],
        idx_a=ia,
        idx_b=ib,
        matched_cos=mcos,
        class_a=class_a,
        class_b=class_b,
        act_corr=act_corr,
        topk_jaccard=jac,
        cross=cross,
        config=cfg,
    )


def _check_alive(alive_a: Tensor | None, alive_b: Tensor | None, cos_all: Tensor) -> None:
    """The caller's ``alive_a`` / ``alive_b``: None or a tensor of one entry per latent of that SAE."""
    for name, alive, n in (("alive_a", alive_a, cos_all.shape[0]), ("alive_b", alive_b, cos_all.shape[1])):
        if alive is not None and (not isinstance(alive, Tensor) or tuple(alive.shape) != (n,)):
            got = tuple(alive.shape) if isinstance(alive, Tensor) else type(alive).__name__
            raise ValueError(f"{name} must be a bool tensor [{n}] (one entry per SAE latent), got {got}")


def _feature_overlap_sparse(
    sae_a, sae_b, acts_a, acts_b, cfg, cos_all, alive_a, alive_b, codes_a, codes_b, cross
) -> FeatureOverlap:
    """:func:`feature_overlap` with activations, from :class:`SparseCodes`: the same dead features, matching,
    classes and top-k Jaccard (bit for bit), the activation correlation of :func:`_sparse_pearson` (float64
    sums in another order, so equal to float32 rounding but not always bit for bit)."""
    sparse = []
    for name, codes, sae, acts in (("codes_a", codes_a, sae_a, acts_a), ("codes_b", codes_b, sae_b, acts_b)):
        if codes is None:
            codes = SparseCodes.encode(sae, acts, cfg.batch_size)
        elif not isinstance(codes, SparseCodes):  # dense codes of the same numbers
            codes = _to_sparse(codes)
        lead = tuple(acts.shape[:-1])
        if codes.lead != lead or codes.d_sae != int(sae.cfg.d_sae):
            raise ValueError(
                f"{name} must be the codes of the activations, shape {lead} + ({int(sae.cfg.d_sae)},), "
                f"got {codes.lead} + ({codes.d_sae},)"
            )
        sparse.append(codes)
    ca, cb = sparse
    fired_a, fired_b = ca.fired(), cb.fired()
    alive_a = fired_a if alive_a is None else alive_a.cpu().bool() & fired_a
    alive_b = fired_b if alive_b is None else alive_b.cpu().bool() & fired_b
    live_a, live_b = alive_a.nonzero().flatten(), alive_b.nonzero().flatten()
    cos = cos_all[live_a][:, live_b]
    mm_ab, mm_ba = mean_max_cosine(cos) if cos.numel() else (float("nan"), float("nan"))
    if cos.numel():
        ia, ib, mcos = match_features(cos)
        ia, ib = live_a[ia], live_b[ib]
    else:
        ia = ib = torch.zeros(0, dtype=torch.long)
        mcos = torch.zeros(0)
    act_corr = _sparse_pearson(ca, ia, cb, ib).float()
    jac = _topk_jaccard(ca.image_max()[:, ia], cb.image_max()[:, ib], cfg.top_k).float()
    cross = _cross_fits(sae_a, sae_b, acts_a, acts_b, cfg, cross, codes_a=ca, codes_b=cb)
    return _overlap(cos_all, (mm_ab, mm_ba), (ia, ib, mcos), (alive_a, alive_b), act_corr, jac, cross, cfg)


def _to_sparse(codes: Tensor, batch_size: int = 4096) -> SparseCodes:
    flat = codes.reshape(-1, codes.shape[-1])
    r, c = torch.nonzero(flat, as_tuple=True)
    indptr = torch.zeros(flat.shape[0] + 1, dtype=torch.long)
    indptr[1:] = torch.bincount(r, minlength=flat.shape[0]).cumsum(0)
    return SparseCodes(
        tuple(codes.shape[:-1]), int(codes.shape[-1]), indptr, c, flat[r, c].float(), batch_size
    )


def select_tokens(act: Tensor, model_cfg, tokens: str) -> Tensor:
    """Keep a token subset of ``act [B, T, ...]`` (all, patches, prefix or cls), by the same rule as the SAE
    store (:func:`mechvit.sae.activations.token_slice`)."""
    return act[:, token_slice(model_cfg, tokens, act.shape[1])]


def collect_activations(
    model,
    images: Tensor,
    hook_name: str,
    *,
    tokens: str = "patches",
    batch_size: int = 64,
    progress: bool = True,
) -> Tensor:
    """Activations ``[N, T', D]`` of ``model`` at ``hook_name`` (a residual-shaped hook) on ``images``."""
    check_images(images)
    if hook_name not in model.hook_dict:
        raise ValueError(
            f"unknown hook {hook_name!r}; e.g. 'blocks.{model.cfg.n_layers - 1}.hook_resid_post'"
        )
    out = run_hook_batches(
        model,
        images,
        [hook_name],
        batch_size=batch_size,
        progress=progress,
        transform=lambda a: select_tokens(a, model.cfg, tokens),
        desc=f"collect {hook_name}",
    )
    return out[hook_name]


@dataclass
class CodeSimilarity:
    """Cosine similarity between the SAE codes of corresponding clean and corrupted tokens."""

    cosines: Tensor  # [n_tokens_with_defined_cosine]
    counts: Tensor  # histogram counts
    edges: Tensor  # histogram bin edges
    n_undefined: int  # tokens where either code is all zero (cosine undefined, left out)
    label: str = ""

    @property
    def mean(self) -> float:
        return float(self.cosines.mean()) if self.cosines.numel() else float("nan")

    def rows(self) -> list[dict]:
        return [
            {"label": self.label, "bin_lo": float(lo), "bin_hi": float(hi), "count": int(c)}
            for lo, hi, c in zip(self.edges[:-1], self.edges[1:], self.counts, strict=True)
        ]

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "mean": self.mean,
            "median": float(self.cosines.median()) if self.cosines.numel() else float("nan"),
            "n": int(self.cosines.numel()),
            "n_undefined": self.n_undefined,
            "counts": self.counts.tolist(),
            "edges": self.edges.tolist(),
        }

    def save_csv(self, path: str | os.PathLike) -> None:
        write_rows_csv(self.rows(), path)


@torch.no_grad()
def code_similarity(
    sae,
    clean_acts: Tensor,
    corrupted_acts: Tensor,
    *,
    bins: int = 50,
    label: str = "",
    batch_size: int = 4096,
) -> CodeSimilarity:
    """The seed paper's measure: per token, cosine(sae.encode(clean), sae.encode(corrupted)); histogram on [0, 1]
    (codes are non-negative for ReLU/TopK SAEs; negative cosines, if any, fall in an extended first bin)."""
    if clean_acts.shape != corrupted_acts.shape:
        raise ValueError(
            f"clean and corrupted activations must correspond one to one, got shapes "
            f"{tuple(clean_acts.shape)} and {tuple(corrupted_acts.shape)}"
        )
    za = encode(sae, clean_acts, batch_size).reshape(-1, sae.cfg.d_sae).double()
    zb = encode(sae, corrupted_acts, batch_size).reshape(-1, sae.cfg.d_sae).double()
    na, nb = za.norm(dim=1), zb.norm(dim=1)
    ok = (na > 0) & (nb > 0)
    cos = ((za[ok] * zb[ok]).sum(1) / (na[ok] * nb[ok])).clamp(-1, 1).float()
    lo = min(0.0, float(cos.min())) if cos.numel() else 0.0
    counts, edges = np.histogram(cos.numpy(), bins=bins, range=(lo, 1.0))
    return CodeSimilarity(
        cosines=cos,
        counts=torch.as_tensor(counts),
        edges=torch.as_tensor(edges, dtype=torch.float32),
        n_undefined=int((~ok).sum()),
        label=label,
    )


def model_code_similarity(
    model,
    sae,
    hook_name: str,
    clean_images: Tensor,
    corrupted_images: Tensor,
    *,
    tokens: str = "patches",
    bins: int = 50,
    label: str = "",
    batch_size: int = 64,
    progress: bool = True,
) -> CodeSimilarity:
    """:func:`code_similarity` on ``model``'s activations at ``hook_name`` for paired clean/corrupted images."""
    if clean_images.shape != corrupted_images.shape:
        raise ValueError(
            f"clean and corrupted images must be paired, got {tuple(clean_images.shape)} and "
            f"{tuple(corrupted_images.shape)}"
        )
    a = collect_activations(
        model, clean_images, hook_name, tokens=tokens, batch_size=batch_size, progress=progress
    )
    b = collect_activations(
        model, corrupted_images, hook_name, tokens=tokens, batch_size=batch_size, progress=progress
    )
    return code_similarity(sae, a, b, bins=bins, label=label)


__all__ = [
    "CLASSES",
    "CodeSimilarity",
    "FeatureOverlap",
    "OverlapConfig",
    "SparseCodes",
    "code_similarity",
    "collect_activations",
    "decoder_cosine",
    "encode",
    "feature_overlap",
    "match_features",
    "mean_max_cosine",
    "model_code_similarity",
    "sae_fit",
    "select_tokens",
    "sparse_row_cosine",
]
