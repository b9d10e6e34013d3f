"""The study report: ``report.html`` (self-contained: every figure embedded as a base64 PNG data URI, opens
offline), ``report.md`` (the same content, figures linked as PNG files) and ``metrics.json`` (every step's
metrics, hashes and timings, the config and the environment; strict JSON).

The report is a list of :class:`Section` s (title, paragraphs, tables as data, figures, links); one renderer
writes each to Markdown and to HTML (:func:`table_markdown`, :func:`table_html`). A later analysis adds a
section (or a link, e.g. to a feature explorer) without touching the renderer.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import platform
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from mechvit._io import atomic_write_json, atomic_write_text
from mechvit._numbers import fmt_fixed, fmt_sig
from mechvit.runtime import machine_fingerprint
from mechvit.study.claims import CLAIMS, RULES, claims_table, overall, overall_text, tally, verdicts
from mechvit.study.config import token_words
from mechvit.study.result import Table

SUMMARY_TITLE = "Key numbers"


@dataclass
class Section:
    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)  # shown as notes
    items: list[str] = field(default_factory=list)  # a bullet list
    tables: list[Table] = field(default_factory=list)
    figures: list[dict[str, str]] = field(default_factory=list)
    links: list[dict[str, str]] = field(default_factory=list)
    footer: str = ""


# ---- tables -------------------------------------------------------------------------------------------
def cell(v: Any, digits: int = 3) -> str:
    """One table value as text: floats with ``digits`` decimals (rounded half up, never "-0.000":
    :mod:`mechvit._numbers`), None/NaN/inf as '–'."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt_fixed(v, digits) if isinstance(v, float) else str(v)


def is_p_column(name: str) -> bool:
    """A column of p-values: ``p``, ``p (...)``, ``p-value``."""
    n = name.strip().lower()
    return n == "p" or n.startswith(("p (", "p-value", "p value"))


def p_cell(v: Any) -> str:
    """A p-value as text: 3 significant digits, ``< 0.0001`` below that (never a bare 0.0000)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return cell(v)
    return "< 0.0001" if v < 1e-4 else fmt_sig(v, 3)


def _cells(t: Table, r: list) -> list[str]:
    ps = [is_p_column(c) for c in t.columns]
    return [p_cell(v) if p else cell(v, t.digits) for v, p in zip(r, ps, strict=True)]


_LONG_FLOAT = re.compile(r"-?\d+\.\d{5,}(?:[eE][-+]?\d+)?")


def tidy_note(text: str) -> str:
    """A step's note with machine-length floats (``5.320852547189091``) cut to 3 significant digits."""
    return _LONG_FLOAT.sub(lambda m: fmt_sig(float(m.group()), 3), text)


def _header(t: Table) -> list[str]:
    units = t.units or [""] * len(t.columns)
    return [f"{c} ({u})" if u else c for c, u in zip(t.columns, units, strict=True)]


def table_markdown(t: Table) -> str:
    """A GitHub pipe table (``|`` in values escaped)."""

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(_header(t)), "|" + "---|" * len(t.columns)]
    lines += [row(_cells(t, r)) for r in t.rows]
    return "\n".join(lines)


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def table_html(t: Table) -> str:
    """An HTML table; text cells (class ``t``) are left-aligned, numbers right-aligned."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _header(t))
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(c)}</td>" if _is_number(v) else f"<td class='t'>{html.escape(c)}</td>"
            for v, c in zip(r, _cells(t, r), strict=True)
        )
        + "</tr>"
        for r in t.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---- key numbers --------------------------------------------------------------------------------------
def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{fmt_fixed(v, 1, 100)}%" if pct else (fmt_fixed(v, 3) if isinstance(v, float) else str(v))


def _ci(d: dict | None, scale: float = 1.0, unit: str = "") -> str:
    if not d or d.get("estimate") is None:
        return "–"
    e, lo, hi = (d.get(k) for k in ("estimate", "low", "high"))
    if lo is None or hi is None or lo != lo:
        return f"{fmt_sig(e, 3, scale)}{unit}"
    return f"{fmt_sig(e, 3, scale)}{unit} [95% CI {fmt_sig(lo, 3, scale)}, {fmt_sig(hi, 3, scale)}]"


def _ci_or(ci: dict | None, value: float) -> str:
    """The stored CI (``estimate [95% CI low, high]``), else the bare value (metrics from before the CI)."""
    return _ci(ci) if ci and ci.get("estimate") is not None else _fmt(value)


def key_numbers(results: dict, base: str) -> list[str]:
    """One line per headline number of the study (what a reader checks first), each with its 95% CI."""
    out = []
    r = results.get("robustness")
    if r is not None and "estimates" in r.metrics:
        n = r.metrics["n_images"]
        sev = ", ".join(str(s) for s in r.metrics.get("severities") or [])
        label = {"seen_trained": "seen, trained severity", "seen": f"seen, severity {sev}"}  # as the tables
        for m, e in r.metrics["estimates"].items():
            parts = [
                f"{label.get(g, g.replace('_', ' '))} {_ci(v, 100, '%')}" for g, v in e["accuracy"].items()
            ]
            out.append(f"{m} top-1 on {n} images: " + "; ".join(parts))
    r = results.get("logit_lens")
    if r is not None:
        for k, v in r.metrics.get("paired_first_correct", {}).items():
            m, ref, lab = k.split("|")
            out.append(
                f"logit lens, first correct block {m} minus {ref} on {lab} (paired, {v['n_common']} images): "
                f"{_ci(v['difference'])}"
            )
    r = results.get("sae")
    if r is not None and r.metrics:
        g = r.metrics.get("ablation_gap")
        if g:
            kl = _ci(g["kl_ci"]) if g.get("kl_ci") else fmt_fixed(g["kl"], 3)
            out.append(f"mean-ablation gap of the SAE hook's tokens (base model): KL {kl} nats")
        for k, v in r.metrics.items():
            if k.count("|") != 2:
                continue
            h = v["heldout"]
            sp = v["spliced_clean"]
            out.append(
                f"SAE {k.replace('|', ' ')} (seed {v['seed']}): held-out EV "
                f"{_ci_or(h.get('explained_variance_ci'), h['explained_variance'])} (PCA-k "
                f"{_fmt(v['pca_k_explained_variance'])}), L0 {_ci_or(h.get('l0_ci'), h['l0'])}, dead "
                f"{h['dead_features']}/{h['d_sae']}, spliced KL {_ci_or(sp.get('kl_sae_ci'), sp['kl_sae'])} nats"
            )
    r = results.get("sae_analysis")
    if r is not None:
        for arch, oc in r.metrics.get("overlap_controls", {}).items():
            for comp, per in oc["summary"].items():
                mc = per["matched_cos"]
                p = (mc.get("test") or {}).get("p_value")
                out.append(
                    f"SAE overlap {comp} ({arch}): matched decoder cosine between {_ci(mc['between'])}, within "
                    f"base {_ci(mc['within_reference'])}, within other {_ci(mc['within_other'])}, floor "
                    f"{_ci(mc['floor'])}; ratio {_ci(mc['ratio'])}; permutation p = "
                    f"{'–' if p is None else fmt_sig(p, 3)}"
                )
    r = results.get("cka")
    if r is not None:
        for k, v in r.metrics.get("between_models", {}).items():
            out.append(_cka_line(k, v))
    return out


def _cka_line(key: str, v: dict) -> str:
    """One key-numbers line for a CKA pair: the minimum over layers and the last layer, each with its 95% CI
    over images when the step stored one (``cka_linear_ci95``)."""
    what = f"{v.get('token_reduction', '?')} token, {v.get('n_examples', '?')} images"
    lin, ci = v["cka_linear"], v.get("cka_linear_ci95")
    i_min = min(range(len(lin)), key=lin.__getitem__)

    def at(i: int) -> str:
        band = f" [{_fmt(ci['low'][i])}, {_fmt(ci['high'][i])}]" if ci else ""
        return f"{_fmt(lin[i])}{band}"

    scope = "95% CI: bootstrap over images" if ci else "one estimate, no CI"
    layers = v.get("layers") or [str(i) for i in range(len(lin))]
    return (
        f"CKA {key} (linear, {what}; {scope}): min over layers {at(i_min)} (layer {layers[i_min]}), "
        f"last layer {at(len(lin) - 1)}"
    )


# ---- sections -----------------------------------------------------------------------------------------
SAE_GATES = (
    "EV >= max(0.95, PCA-k + 0.01) (ReLU: >= 0.90)",
    "L0 <= k (ReLU: <= 32)",
    "dead <= 10%",
    "dense (>10% of tokens) <= 5%",
    "spliced top-1 within 1 pp",
    "|EV change| last 10% < 0.005",
)
TOP1_BAR = 1.0  # the spliced top-1 bar (pp)
K_ARCHITECTURES = ("batchtopk", "topk")  # judged at L0 <= k against a k-component PCA
RELU_L0, RELU_EV = 32, 0.90  # issue 13's bar for ReLU + L1 (and JumpReLU, which has no k either)


def sae_quality(
    metrics: dict, k: int | None = None, architectures: Sequence[str] = ()
) -> tuple[Table, list[str]] | None:
    """Each SAE of the ``sae`` step against the field-quality bar of issue 13, by architecture: TopK and
    BatchTopK need held-out EV >= max(0.95, PCA-k + 0.01) at L0 <= k (``k`` of the config); ReLU + L1 and
    JumpReLU need EV >= 0.90 at L0 <= 32. Every SAE also needs dead and dense latents, spliced accuracy and
    convergence within their bars. A table of 'yes' / 'no (value)' and notes: how many SAEs meet every
    criterion, and a plain statement when the config trains no ReLU + L1 SAE (``architectures``: the config's
    list). Each bar is judged on the point estimate; a miss whose 95% CI (stored by the step: EV, L0, top-1
    drop) reaches the bar is marked 'within noise', and SAEs whose every miss is within noise are counted
    apart: BatchTopK's inference threshold puts its L0 at k on training rows, so its held-out L0 is k up to
    sampling error, and a 1 pp top-1 bar is within the +-1 pp CI of 1,000 images."""
    rows, passed, within_noise, n_rows = [], 0, 0, set()
    widths, n_images = [], set()  # the top-1 drops' CI half-widths (pp) and image counts
    for key, v in metrics.items():
        if key.count("|") != 2 or not isinstance(v, dict) or "heldout" not in v:
            continue
        n_rows.add(v["heldout"].get("n_rows"))
        arch, model, rep = key.split("|")
        h, sp = v["heldout"], v.get("spliced_clean") or {}
        ev, pca, d, l0 = h["explained_variance"], v.get("pca_k_explained_variance"), h["d_sae"], h.get("l0")
        if arch in K_ARCHITECTURES:
            need = max(0.95, (pca if pca is not None else -1.0) + 0.01)
            l0_max = k
        else:
            need, l0_max = RELU_EV, RELU_L0
        drop = None
        if sp.get("accuracy_clean") is not None and sp.get("accuracy_sae") is not None:
            drop = 100 * (sp["accuracy_clean"] - sp["accuracy_sae"])
        dci = sp.get("accuracy_drop") or {}
        if dci.get("low") is not None and dci.get("high") is not None:
            widths.append(50 * (dci["high"] - dci["low"]))
            n_images.add(sp.get("n_images"))
        change = (v.get("convergence") or {}).get("change")
        ev_ci, l0_ci = h.get("explained_variance_ci") or {}, h.get("l0_ci") or {}
        # (passes, what it measured, whether a miss is within noise: the CI reaches the bar)
        checks = [
            (ev >= need, f"{fmt_fixed(ev, 3)} < {fmt_fixed(need, 3)}{_ci_text(ev_ci, 3)}", _reaches(ev_ci, "high", need)),
            (None if l0 is None or l0_max is None else l0 <= l0_max, f"{fmt_fixed(l0, 3)} > {l0_max}{_ci_text(l0_ci, 3)}"
             if l0 else "", _reaches(l0_ci, "low", l0_max)),
            (h["dead_features"] <= 0.1 * d, f"{fmt_fixed(_ratio(h['dead_features'], d), 0, 100)}%", False),
            (h["dense_features"] <= 0.05 * d, f"{fmt_fixed(_ratio(h['dense_features'], d), 1, 100)}%", False),
            (None if drop is None else drop <= TOP1_BAR + 1e-9, _drop_text(drop, sp),
             _reaches({"low": None if dci.get("low") is None else 100 * dci["low"]}, "low", TOP1_BAR)),
            (None if change is None else abs(change) < 0.005, _signed(change, 4) if change is not None else "", False),
        ]  # fmt: skip
        cells = []
        for ok, why, noisy in checks:
            if ok is None:
                cells.append("–")
            elif ok:
                cells.append("yes")
            else:
                cells.append(f"no ({why}; its CI reaches the bar: within noise)" if noisy else f"no ({why})")
        rows.append([arch, model, rep, *cells])
        passed += all(ok for ok, _, _ in checks)
        within_noise += not all(ok for ok, _, _ in checks) and all(
            ok or (ok is False and n) for ok, _, n in checks
        )
    if not rows:
        return None
    notes = [
        f"SAE quality: {passed} of {len(rows)} SAEs meet every criterion of the field-quality bar (issue 13: "
        + "; ".join(SAE_GATES)
        + f"). Held-out EV, L0, dead and dense are on {_sizes(n_rows)} held-out clean + corrupted tokens (dead: "
        "never active on them); spliced top-1 on clean images. A '–' is a number the step did not store."
    ]
    if within_noise:
        notes.append(
            f"{within_noise} more SAE{'s miss' if within_noise > 1 else ' misses'} the bar only by less than "
            "the measurement can tell: every miss has a 95% CI that reaches the bar (within noise). The "
            "spliced top-1 drop is a difference of two accuracies on the same "
            f"{_sizes(n_images)} images"
            + (f", here with a CI of about +-{fmt_fixed(statistics.median(widths), 1)} pp" if widths else "")
            + ", so a point estimate over 1 pp is common for an SAE whose true drop is well under it, and "
            "BatchTopK's held-out L0 is k up to its sampling error by construction (docs/sae.md, 'Noise in the "
            "bar'); raise sae.n_fidelity_images (the top-1 drop) or sae.n_heldout_images (EV, L0) to decide them."
        )
    if architectures and "standard" not in architectures:
        notes.append(
            "ReLU + L1 (sae-lens's standard SAE, the seed paper's 'vanilla' one) is not trained by this config "
            f"(sae.architectures: {', '.join(architectures)}), so its bar (EV >= {fmt_fixed(RELU_EV, 2)} at L0 <= "
            f"{RELU_L0}) is not tested in this run: add 'standard' to sae.architectures (docs/sae.md, "
            "'ReLU + L1', has its L1 sweep at this kind of hook)."
        )
    table = Table(
        "SAE quality against the field's bar (yes, or no with the measured value)",
        ["SAE", "model", "replicate", *SAE_GATES],
        rows,
    )
    return table, notes


def _reaches(ci: dict, side: str, bar: float | None) -> bool:
    """Whether the CI reaches ``bar`` from the failing side: its ``"high"`` bound >= bar (a minimum missed),
    or its ``"low"`` bound <= bar (a maximum exceeded)."""
    b = ci.get(side)
    return b is not None and bar is not None and (b >= bar if side == "high" else b <= bar + 1e-9)


def _ci_text(ci: dict, decimals: int) -> str:
    """`` [low, high]`` of a stored CI to ``decimals`` decimals, '' when there is none."""
    if ci.get("low") is None or ci.get("high") is None:
        return ""
    return f" [{fmt_fixed(ci['low'], decimals)}, {fmt_fixed(ci['high'], decimals)}]"


def _ratio(k: Any, n: Any) -> Any:
    """``k / n``, exact (a Fraction) for two integer counts."""
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (k, n))
    return Fraction(k, n) if ints else k / n


def _signed(v: float, decimals: int) -> str:
    """``+0.0012`` / ``-0.0012``: ``v`` to ``decimals`` with its sign always shown (``+`` for one that rounds
    to zero)."""
    text = fmt_fixed(v, decimals)
    return text if text.startswith("-") else "+" + text


def _sizes(ns: set) -> str:
    """``147,000`` (one size for every SAE), else ``29,400-147,000``; ``the`` when no SAE stored it."""
    sizes = sorted(n for n in ns if n is not None)
    if not sizes:
        return "the"
    return f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}-{sizes[-1]:,}"


def _drop_text(drop: float | None, sp: dict) -> str:
    """``1.4 pp [0.6, 2.2] of 1000 images``: the spliced top-1 drop with its CI when the step stored one."""
    if drop is None:
        return ""
    ci = sp.get("accuracy_drop") or {}
    band = f" [{_pp(ci['low'], 100)}, {_pp(ci['high'], 100)}]" if ci.get("low") is not None else ""
    return f"{_pp(drop)} pp{band} of {sp.get('n_images', '?')} images"


def _pp(v: float, scale: float = 1) -> str:
    """``1.2`` (``scale * v``); a small negative value keeps its sign and one significant digit (``-0.04``,
    never ``-0.0``)."""
    text = fmt_fixed(v, 1, scale)
    return fmt_sig(v, 1, scale) if text == "0.0" and v < 0 else text


def ablation_warning(gap: dict, sae_cfg) -> str:
    """The note under ``sae.ablation_warn_nats`` (it was the sae step's; here it costs no SAE retraining)."""
    return (
        f"warning: mean-ablating the {token_words(sae_cfg.tokens)} at {sae_cfg.hook} "
        "changes the base model's "
        f"prediction by only {fmt_fixed(gap['kl'], 3)} nats (KL), under {sae_cfg.ablation_warn_nats}: the prediction barely "
        "reads these tokens, so SAE fidelity numbers here say little (choose an earlier hook: "
        "mechvit.sae.ablation_gap_sweep / choose_hook)"
    )


def trained_on(card: dict | None) -> str:
    """What a checkpoint was fine-tuned on, from its card: corruptions, severities and probability."""
    c = ((card or {}).get("config") or {}).get("corruption")
    if not c or not c.get("seen") or c.get("p") == 0:
        return "–" if not card or not card.get("init_from") else "clean images (no corruption)"
    sev = ", ".join(str(x) for x in c.get("severities") or [])
    p = c.get("p")
    return f"{', '.join(c['seen'])} at severity {sev or '?'}" + (
        "" if p is None else f", p = {fmt_sig(p, 6)}"
    )


def severity_note(infos: dict, robustness: dict | None) -> str | None:
    """A note when a fine-tune's 'seen' cells are scored at severities it was not trained on."""
    if not robustness or not robustness.get("severities"):
        return None
    scored = set(robustness["severities"])
    off = []
    for n, i in infos.items():
        c = ((getattr(i, "card", None) or {}).get("config") or {}).get("corruption") or {}
        sev = set(c.get("severities") or [])
        if c.get("seen") and sev and sev != scored:
            off.append(f"{n} (trained at {', '.join(str(x) for x in sorted(sev))})")
    if not off:
        return None
    if set(robustness.get("trained_severities") or {}) >= {o.split(" (")[0] for o in off}:
        return (
            f"'Seen, severity {', '.join(str(x) for x in sorted(scored))}' scores each fine-tune's seen corruption "
            f"at the study's severities. {'; '.join(off)}: for these that measures transfer across severity, so "
            "the 'seen, trained severity' rows and the seen-gain claim use the severity each was trained at."
        )
    return (
        f"'Seen' is scored at severity {', '.join(str(x) for x in sorted(scored))} only (the study's severities). "
        f"{'; '.join(off)}: for these the 'seen' cell is their corruption at a severity they were not trained "
        "on, so their seen gain measures transfer across severity, not the trained condition."
    )


def sae_coverage_note(
    names: list[str], base: str, controls: list[str], with_saes: list[str], single: Sequence[str] = ()
) -> str | None:
    """A note when some fine-tunes are not in the feature claim: those with no SAEs, and those with one SAE each
    (``single``, ``sae.single_models``: judged against the quality bar, compared with nothing)."""
    tuned = [n for n in names if n != base and n not in controls]
    missing = [n for n in tuned if n not in with_saes]
    if not with_saes or not missing:
        return None
    have = [n for n in tuned if n in with_saes]
    one = [n for n in missing if n in single]
    none = [n for n in missing if n not in single]
    text = (
        f"Features claim: tested on {len(have)} of the {len(tuned)} fine-tunes ({', '.join(have) or 'none'}), the "
        f"ones with {'replicated ' if one else ''}SAEs (sae.models: {', '.join(with_saes)}); "
    )
    if one:
        text += (
            f"{', '.join(one)} {'has' if len(one) == 1 else 'have'} one SAE each (sae.single_models): judged against "
            "the quality bar with the others, but a single seed has no within-model control, so the claim says "
            "nothing about them"
        )
    if one and none:
        text += "; "
    if none:
        text += f"{', '.join(none)} {'has' if len(none) == 1 else 'have'} no SAEs in this run, so the claim says nothing about them"
    return text + (
        ". sae.models: null (and no sae.single_models) trains replicated SAEs on every model: for the default study "
        "that is configs/fashion_mnist_all_saes.yaml (make study-all-saes), whose run docs/sae.md quotes ('SAEs on "
        "every fine-tune')."
    )


def sections(ctx, run, steps, numbers: list[str], models: dict, vs: list) -> list[Section]:
    """The report's sections: claims (``vs``: the claims' verdicts), key numbers, models, then one per step in
    order."""
    infos = getattr(ctx, "infos", {}) or {}
    rob = run.results.get("robustness")
    sev_note = severity_note(infos, rob.metrics if rob is not None else None)
    claim_notes = [
        "Each verdict follows its claim's rule (below); the table's last column says which condition decided "
        "it. The CIs are over test images (SAE seed pairs for the features) for ONE fine-tuning run per model: "
        "they leave out the variation between fine-tuning seeds.",
        *[f"Rule, {c.replace('_', ' ')}: {RULES[c]}." for c in CLAIMS if c in tally(vs)],
    ]
    if sev_note:
        claim_notes.append(sev_note)
    if "sae" in run.results:
        cover = sae_coverage_note(
            ctx.model_names, ctx.base_name, ctx.control_names, ctx.sae_model_names, ctx.sae_single_names
        )
        if cover:
            claim_notes.append(cover)
    out = [
        Section(
            "claims",
            "Claims: what the data say",
            paragraphs=claim_notes,
            items=[f"{CLAIMS[c]}: {v}" for c, v in overall_text(vs).items()],
            tables=[claims_table(vs)] if vs else [],
        ),
        Section("summary", SUMMARY_TITLE, items=numbers),
        Section(
            "models",
            "Models",
            tables=[
                Table(
                    "",
                    ["model", "role", "source", "seen corruptions", "fine-tuned on", "sha256"],
                    [
                        [
                            n,
                            "base"
                            if n == ctx.base_name
                            else "clean control"
                            if i.get("control")
                            else "fine-tune",
                            i["source"],
                            ", ".join(i["seen"]) or "–",
                            trained_on(getattr(infos.get(n), "card", None)),
                            i["sha256"][:12],
                        ]
                        for n, i in models.items()
                    ],  # fmt: skip
                )
            ],
        ),
    ]
    for s in steps:
        r = run.results[s.name]
        cached = " (cached)" if s.name in run.cached else ""
        notes, tables = [tidy_note(n) for n in r.notes], list(r.tables)
        if s.name == "robustness" and sev_note:
            notes.append(sev_note)
        if s.name == "sae":
            sae_cfg = getattr(getattr(ctx, "cfg", None), "sae", None)
            q = sae_quality(
                r.metrics,
                sae_cfg.train.k if sae_cfg is not None else None,
                sae_cfg.architectures if sae_cfg is not None else (),
            )
            if q is not None:
                tables.append(q[0])
                notes += q[1]
            gap = r.metrics.get("ablation_gap")
            if sae_cfg is not None and gap and gap["kl"] < sae_cfg.ablation_warn_nats:
                notes.append(ablation_warning(gap, sae_cfg))
        out.append(
            Section(
                s.name,
                s.title,
                paragraphs=notes,
                tables=tables,
                figures=list(r.figures),
                links=list(r.links),
                footer=f"step hash {run.hashes.get(s.name)}, {fmt_fixed(run.timings.get(s.name, 0), 1)} s{cached}",
            )  # fmt: skip
        )
    return out


def render_markdown(title: str, intro: str, secs: list[Section], reproduce: str) -> str:
    md = [f"# {title}", "", intro, ""]
    for s in secs:
        md += [f"## {s.title}", ""]
        for i, p in enumerate(s.paragraphs):  # one quote block, a paragraph per note
            md += ([">"] if i else []) + [f"> {p}"]
        md += [""] if s.paragraphs else []
        md += [f"- {x}" for x in s.items] + ([""] if s.items else [])
        for t in s.tables:
            md += ([f"**{t.title}**", ""] if t.title else []) + [table_markdown(t), ""]
        for f in s.figures:
            md += [f"![{f['caption']}]({f['png']})", "", f"*{f['caption']}* ([SVG]({f['svg']}))", ""]
        md += [f"- [{link['title']}]({link['file']})" for link in s.links]
        if s.footer:
            md += ["", f"<sub>{s.footer}</sub>", ""]
    md += ["## Reproduce", "", "```bash", reproduce, "```", ""]
    return "\n".join(md)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1150px;color:#222;
line-height:1.45;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:2px solid #4477AA;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#eef3f8}td:first-child,th:first-child,td.t{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}
.note{background:#fff6e0;border-left:3px solid #CCBB44;padding:.3em .6em;font-size:.9em}
nav ol{columns:2}code{background:#f4f4f4;padding:0 .2em}"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def render_html(title: str, intro_html: str, secs: list[Section], reproduce: str, out: Path) -> str:
    e = html.escape
    h = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        intro_html,
        "<nav><ol>" + "".join(f"<li><a href='#{s.id}'>{e(s.title)}</a></li>" for s in secs) + "</ol></nav>",
    ]
    for s in secs:
        h.append(f"<section id='{s.id}'><h2>{e(s.title)}</h2>")
        h += [f"<p class='note'>{e(p)}</p>" for p in s.paragraphs]
        if s.items:
            h.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in s.items) + "</ul>")
        for t in s.tables:
            h.append((f"<h3>{e(t.title)}</h3>" if t.title else "") + table_html(t))
        for f in s.figures:
            png = out / f["png"]
            if not png.is_file():
                raise FileNotFoundError(
                    f"figure {png} of section {s.id} is missing; rerun the study with --force"
                )
            h.append(
                f"<figure><img src='{_data_uri(png)}' alt='{e(f['caption'])}'>"
                f"<figcaption>{e(f['caption'])} (<a href='{e(f['svg'])}'>SVG</a>)</figcaption></figure>"
            )
        if s.links:
            h.append(
                "<ul>"
                + "".join(f"<li><a href='{e(x['file'])}'>{e(x['title'])}</a></li>" for x in s.links)
                + "</ul>"
            )
        if s.footer:
            h.append(f"<p><small>{e(s.footer)}</small></p>")
        h.append("</section>")
    h.append(
        f"<h2>Reproduce</h2><pre>{e(reproduce)}</pre><p>metrics.json holds every number of this report.</p>"
        "</body></html>"
    )
    return "\n".join(h)


def environment(device: str) -> dict[str, Any]:
    env = {"python": platform.python_version(), "platform": platform.platform(), "device": device}
    try:
        import numpy as np
        import sae_lens
        import scipy
        import timm
        import torch

        env.update(
            torch=torch.__version__, timm=timm.__version__, sae_lens=sae_lens.__version__,
            threads=torch.get_num_threads(), numpy=np.__version__, scipy=scipy.__version__,
        )  # fmt: skip
    except ImportError:  # pragma: no cover
        pass
    # the CPU and kernel path: runs on two machines differ in float rounding when these differ (README,
    # "Reproducibility"); mechvit.study.compare names them next to the numbers that moved
    env["machine"] = machine_fingerprint(device)
    return env


def write_report(ctx, run, steps) -> Path:
    """Write report.html, report.md and metrics.json into ``run.out``; return the HTML path."""
    out: Path = run.out
    cfg, results = ctx.cfg, run.results
    numbers = key_numbers(results, ctx.base_name)
    env = environment(str(ctx.device))
    models = {n: i.to_dict() for n, i in ctx.infos.items()}
    written = time.strftime("%Y-%m-%dT%H:%M:%S")
    metrics = {
        "title": cfg.title, "name": cfg.name, "written": written, "key_numbers": numbers, "models": models,
        "environment": env, "wall_seconds": round(run.seconds, 2),
        "steps": {s.name: {"hash": run.hashes.get(s.name), "seconds": run.timings.get(s.name),
                           "cached": s.name in run.cached, "side_by_side": s.name in run.side_by_side,
                           "metrics": results[s.name].metrics} for s in steps},
        "config": dataclasses.asdict(cfg),
    }  # fmt: skip
    # the controls from the checkpoint cards: a rerun of only some steps has no robustness metrics to list them
    vs = verdicts({k: v.metrics for k, v in results.items()}, ctx.base_name, ctx.control_names)
    metrics["claims"] = {
        "overall": overall(vs), "overall_text": overall_text(vs), "rules": {c: RULES[c] for c in CLAIMS},
        "per_model": [dataclasses.asdict(v) for v in vs],
    }  # fmt: skip
    atomic_write_json(out / "metrics.json", metrics, indent=1)
    secs = sections(ctx, run, steps, numbers, models, vs)
    reproduce = f"mechvit study --config <this config> --out {out}"
    intro = f"Config `{cfg.name}`, written {written}; device {env['device']}."
    atomic_write_text(out / "report.md", render_markdown(cfg.title, intro, secs, reproduce))
    intro_html = (
        f"<p>Config <code>{html.escape(cfg.name)}</code>, written {written}; device {html.escape(env['device'])}; "
        f"torch {env.get('torch', '?')}, timm {env.get('timm', '?')}, sae-lens {env.get('sae_lens', '?')}.</p>"
    )
    path = out / "report.html"
    atomic_write_text(path, render_html(cfg.title, intro_html, secs, reproduce, out))
    return path
