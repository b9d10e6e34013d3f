"""The seed paper's five claims, each with the measured effect, its 95% CI, its control and a verdict computed
by a stated rule from the step results (whatever the data say):

1. **seen gain**: a fine-tune is more accurate than the base on the corruptions it was tuned on.
   Effect: paired top-1 difference (fine-tune - base) on its seen cells; control: the same difference against
   the clean fine-tune. *Supported* when both CIs lie above 0; *contradicted* when the CI against the base lies
   below 0; else *inconclusive*.
2. **no transfer to unseen corruptions**: effect: paired difference (fine-tune - base) on the unseen
   corruptions of other families. *Contradicted* when its CI lies above 0 (accuracy rises there);
   *supported* when the CI's upper end is below half the seen gain's lower end (no gain of the seen size);
   else *inconclusive*.
3. **attention changes**: effect: per image, 1 - cosine of the fine-tune's and the base's attention maps on
   the fine-tune's seen condition, minus the clean control's (same images). *Supported* when the CI lies
   above 0 (attention moved more than fine-tuning alone moves it); *contradicted* when below 0; else
   *inconclusive*.
4. **layer-wise knowledge evolution changes**: effect: paired difference in the first block after which the
   correct class is top-1 (fine-tune - base) on the fine-tune's seen condition. *Supported* when the CI
   excludes 0 (either sign; the sign is reported); else *inconclusive* (never contradicted: an interval around
   0 cannot show that nothing changed without an equivalence margin).
5. **sparse features stay stable**: effect: matched decoder cosine between the base's and the fine-tune's
   SAEs relative to within-model seed pairs (ratio between / within, CI) with the permutation test over model
   labels. *Contradicted* when p <= 0.05 and the ratio's CI lies below 1 (features differ beyond seed noise);
   *supported* when p > 0.05 and the ratio's CI lies above 0.95; else *inconclusive*. The clean control's
   comparison is reported beside it.

A claim's overall verdict: *supported* when every fine-tune supports it, *contradicted* when any contradicts
it, else *inconclusive*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mechvit.study.result import Table

CLAIMS = {
    "seen_gain": "Fine-tuning raises accuracy on the corruptions trained on",
    "no_unseen_transfer": "... but not on unseen corruptions (other families)",
    "attention_changes": "Attention changes with corruption fine-tuning",
    "lens_changes": "Layer-wise knowledge evolution (logit lens) changes",
    "features_stable": "Sparse features stay much the same",
}


@dataclass
class Verdict:
    claim: str
    model: str
    effect: str
    estimate: float | None
    low: float | None
    high: float | None
    control: str
    verdict: str
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> list:
        return [
            CLAIMS[self.claim],
            self.model,
            self.effect,
            self.estimate,
            self.low,
            self.high,
            self.control,
            self.verdict,
        ]


def _get(d: dict | None) -> tuple[float | None, float | None, float | None]:
    if not d:
        return None, None, None
    return d.get("estimate"), d.get("low"), d.get("high")


def _above(d: dict | None, x: float = 0.0) -> bool:
    return bool(d) and d.get("low") is not None and d["low"] > x


def _below(d: dict | None, x: float = 0.0) -> bool:
    return bool(d) and d.get("high") is not None and d["high"] < x


def verdicts(metrics: dict[str, dict], base: str) -> list[Verdict]:
    """The per-model verdicts of the five claims from ``{step: metrics}`` (steps that did not run are skipped)."""
    out: list[Verdict] = []
    rob = metrics.get("robustness")
    tuned: list[tuple[str, list[str]]] = []
    ctrls: list[str] = []
    if rob:
        est, ctrls = rob["estimates"], rob.get("controls", [])
        tuned = [(m, e["seen"]) for m, e in est.items() if e["seen"]]
        for m, _ in tuned:
            vs_b = est[m]["vs"][base].get("seen")
            vs_c = {c: est[m]["vs"][c].get("seen") for c in ctrls}
            ok_c = all(_above(v) for v in vs_c.values())
            v = "supported" if _above(vs_b) and ok_c else "contradicted" if _below(vs_b) else "inconclusive"
            ctl = "; ".join(f"vs {c}: {_fmt_ci(d, 100)} pp" for c, d in vs_c.items()) or "no clean control"
            out.append(Verdict("seen_gain", m, "top-1 on seen, minus base (pp)", *_pp(vs_b), ctl, v))
            other = est[m]["vs"][base].get("unseen_other")
            seen_low = (vs_b or {}).get("low")
            if other is None:
                continue
            if _above(other):
                v = "contradicted"
            elif seen_low is not None and seen_low > 0 and _below(other, 0.5 * seen_low):
                v = "supported"
            else:
                v = "inconclusive"
            vs_c = {c: est[m]["vs"][c].get("unseen_other") for c in ctrls}
            ctl = "; ".join(f"vs {c}: {_fmt_ci(d, 100)} pp" for c, d in vs_c.items()) or "no clean control"
            out.append(Verdict("no_unseen_transfer", m, "top-1 on unseen other families, minus base (pp)",
                               *_pp(other), ctl, v))  # fmt: skip
    att = metrics.get("attention", {}).get("change_from_base", {})
    lens = metrics.get("logit_lens", {}).get("paired_first_correct", {})
    for m, seen in tuned:
        cond = _condition_of(seen, att) or _condition_of(seen, lens)
        if cond is None:
            continue
        a = att.get(f"{m}|{cond}", {})
        diff = next((v for k, v in a.items() if k.startswith("minus_")), None)
        if a:
            v = "supported" if _above(diff) else "contradicted" if _below(diff) else "inconclusive"
            if diff is None:
                v = "inconclusive"
            out.append(Verdict("attention_changes", m, f"attention change on {cond}, minus the control's",
                               *_get(diff), f"change itself {_fmt_ci(a.get('change'))}", v))  # fmt: skip
        d = (lens.get(f"{m}|{base}|{cond}") or {}).get("difference")
        if d:
            v = "supported" if (_above(d) or _below(d)) else "inconclusive"
            c = next(((k, x["difference"]) for k, x in lens.items() if k.startswith(f"{m}|") and k.endswith(f"|{cond}")
                      and k.split("|")[1] in ctrls), None)  # fmt: skip
            ctl = f"vs {c[0].split('|')[1]}: {_fmt_ci(c[1])} blocks" if c else "no clean control"
            out.append(
                Verdict("lens_changes", m, f"first correct block on {cond}, minus base", *_get(d), ctl, v)
            )
    sae = metrics.get("sae_analysis", {}).get("overlap_controls", {})
    for arch, oc in sae.items():
        summ = oc["summary"]
        for comp, per in summ.items():
            m = comp.split(" vs ", 1)[1]
            if m in ctrls:
                continue
            mc = per.get("matched_cos", {})
            ratio, test = mc.get("ratio"), mc.get("test") or {}
            p = test.get("p_value")
            if p is not None and p <= 0.05 and _below(ratio, 1.0):
                v = "contradicted"
            elif p is not None and p > 0.05 and _above(ratio, 0.95):
                v = "supported"
            else:
                v = "inconclusive"
            cc = [summ[f"{base} vs {c}"]["matched_cos"] for c in ctrls if f"{base} vs {c}" in summ]
            ctl = (
                "; ".join(
                    f"clean control ratio {_fmt_ci(x.get('ratio'))}, p {(x.get('test') or {}).get('p_value', float('nan')):.3g}"
                    for x in cc
                )
                or "no clean control"
            )
            out.append(Verdict("features_stable", f"{m} ({arch})",
                               f"matched decoder cosine between / within (p = {p:.3g})" if p is not None else
                               "matched decoder cosine between / within", *_get(ratio), ctl, v))  # fmt: skip
    return out


def _condition_of(seen: list[str], d: dict) -> str | None:
    """The study condition (``corruption/severity``) of a seen corruption present in ``d``'s keys."""
    for k in d:
        lab = k.split("|")[-1]
        if lab.split("/")[0] in seen:
            return lab
    return None


def _pp(d: dict | None) -> tuple:
    e, lo, hi = _get(d)
    return tuple(None if v is None else 100 * v for v in (e, lo, hi))


def _fmt_ci(d: dict | None, scale: float = 1.0) -> str:
    e, lo, hi = _get(d)
    if e is None:
        return "–"
    if lo is None or hi is None or lo != lo:
        return f"{scale * e:.3g}"
    return f"{scale * e:.3g} [{scale * lo:.3g}, {scale * hi:.3g}]"


def overall(vs: list[Verdict]) -> dict[str, str]:
    """Per claim: supported when every model supports it, contradicted when any contradicts, else inconclusive."""
    out = {}
    for c in CLAIMS:
        got = [v.verdict for v in vs if v.claim == c]
        if not got:
            continue
        out[c] = (
            "contradicted"
            if "contradicted" in got
            else "supported"
            if all(g == "supported" for g in got)
            else "inconclusive"
        )
    return out


def claims_table(vs: list[Verdict]) -> Table:
    return Table(
        "The seed paper's claims: effect with 95% CI, its control, and the verdict by the rule of "
        "mechvit/study/claims.py (supported / contradicted / inconclusive)",
        ["claim", "model", "effect", "estimate", "low", "high", "control", "verdict"],
        [v.row() for v in vs],
    )
