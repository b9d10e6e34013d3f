"""The seed paper's five claims, each with the measured effect, its 95% CI, its control and a verdict computed
by a stated rule from the step results (whatever the data say).

The rules below are generated from :data:`EFFECTS` and :data:`RULES`, the text the report prints beside the
verdicts and ``metrics.json`` keeps under ``claims.rules``, so this docstring, the report and the code's rule
text cannot drift apart (tests/test_claims.py checks each rule against the code on known answers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mechvit._numbers import fmt_fixed, fmt_sig
from mechvit.analysis.statistics import holm
from mechvit.study.result import Table

CLAIMS = {
    "seen_gain": "Fine-tuning raises accuracy on the corruptions trained on",
    "no_unseen_transfer": "... but not on unseen corruptions (other families)",
    "attention_changes": "Attention changes with corruption fine-tuning",
    "lens_changes": "Layer-wise knowledge evolution (logit lens) changes",
    "features_stable": "Sparse features stay much the same",
}

# The condition claims 3 and 4 are judged on, as the seen gain picks its cells (the report states it per verdict).
CONDITION_RULE = (
    "on the study condition of each seen corruption at the severity the fine-tune was trained at (its checkpoint "
    "card, the robustness step's trained_severities), else at the study's robustness severity, else the highest "
    "one: one verdict per seen corruption with a condition"
)

# What each claim measures (the docstring's effect paragraphs; details of the estimates in docs/study.md).
EFFECTS = {
    "seen_gain": "paired top-1 difference (fine-tune - base) on its seen corruptions at the severities it was "
    "trained at (group seen_trained; the study's severities, group seen, when the card does not say); control: "
    "the same difference against each clean fine-tune control",
    "no_unseen_transfer": "paired top-1 difference (fine-tune - base) on the unseen corruptions of other families",
    "attention_changes": "per image, 1 - cosine of the fine-tune's and the base's attention maps, minus the same "
    "for each clean control (same images), " + CONDITION_RULE,
    "lens_changes": "paired difference in the first block after which the correct class is top-1 (fine-tune - "
    "base; and fine-tune - each clean control), " + CONDITION_RULE,
    "features_stable": "matched decoder cosine between the base's and the fine-tune's SAEs relative to "
    "within-model seed pairs (ratio between / within, CI) with the exact permutation test over model labels; each "
    "clean control's comparison with the base is reported beside it",
}

# The rule of each claim in one line (the report prints these beside the verdicts; this module's docstring too).
RULES = {
    "seen_gain": "on the seen corruption at the severity the fine-tune was trained at: supported when the paired "
    "CI (fine-tune - base) and the CI against every clean control lie above 0 and every McNemar test of those "
    "cells (vs base, vs each control) has Holm-adjusted p < 0.05 (family: all McNemar tests of the robustness "
    "step); contradicted when the CI against the base lies below 0 with Holm p < 0.05; else inconclusive "
    "(without McNemar tests in the metrics the CIs alone decide)",
    "no_unseen_transfer": "contradicted when the CI (fine-tune - base) on unseen other-family cells lies above 0 "
    "(checked first); supported when its upper end is below half the lower end of the seen gain at the same "
    "(study) severity; else inconclusive",
    "attention_changes": "on the seen condition at the trained severity (else the study's, else the highest): "
    "supported when the CI of (change from base) - (a clean control's change) lies above 0 "
    "for every clean control; contradicted when it lies below 0 for every one; else inconclusive (and without a "
    "control)",
    "lens_changes": "on the same condition as attention: supported when the paired CI of the first-correct-block "
    "difference (fine-tune - base) "
    "excludes 0, either sign, and the CI against every clean control (fine-tune - control) lies on the same side of "
    "0; else inconclusive (never contradicted: no equivalence margin)",
    "features_stable": "contradicted when the Holm-adjusted permutation p <= 0.05 (family: every fine-tune's "
    "comparison with the base, all architectures; the clean controls' are not in it) and the CI of matched cosine "
    "between / within lies below 1 and below every clean control's ratio CI (no overlap); supported when the raw "
    "p > 0.05 and that CI lies above 0.95, and the test could have given p <= 0.05 with this many SAEs (3 + 3 seeds "
    "cannot: smallest p 0.1); else inconclusive",
}

NOTES = """Multiplicity: where a verdict uses a p-value it uses the Holm-adjusted one (claims 1 and 5); the CIs are
per-comparison 95% intervals, not adjusted. The clean controls are the fine-tunes the study marks as controls
(``control: true``, or a checkpoint card that says no corruption); with several, a verdict that needs a control
needs every one of them.

A claim's overall verdict: *supported* when every verdict of it supports it, *contradicted* when any contradicts
it, else *inconclusive*; :func:`tally` says how many fine-tunes gave each verdict. Every :class:`Verdict` carries
``rule``: the condition that decided it, with its numbers, so the report states why, not only what. The CIs are
over test images (SAE seed pairs for claim 5) for ONE fine-tuning run per model: they do not include the
variation between fine-tuning seeds (docs/study.md, fine-tune seed variation).
"""


def rules_text() -> str:
    """The rules of the five claims as this module's docstring states them (from :data:`EFFECTS` and
    :data:`RULES`)."""
    items = [
        f"{i}. **{c.replace('_', ' ')}** ({CLAIMS[c]}): effect: {EFFECTS[c]}. *Rule*: {RULES[c]}."
        for i, c in enumerate(CLAIMS, 1)
    ]
    return "\n\n".join(["The rules:", *items, NOTES])


__doc__ = f"{__doc__ or ''}\n{rules_text()}"


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
    rule: str = ""  # the condition that decided the verdict, with its numbers

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
            self.rule,
        ]


def _get(d: dict | None) -> tuple[float | None, float | None, float | None]:
    if not d:
        return None, None, None
    return d.get("estimate"), d.get("low"), d.get("high")


def _above(d: dict | None, x: float = 0.0) -> bool:
    return bool(d) and d.get("low") is not None and d["low"] > x


def _below(d: dict | None, x: float = 0.0) -> bool:
    return bool(d) and d.get("high") is not None and d["high"] < x


def verdicts(metrics: dict[str, dict], base: str, controls: list[str] | None = None) -> list[Verdict]:
    """The per-model verdicts of the five claims from ``{step: metrics}`` (steps that did not run are skipped).
    ``controls``: the clean fine-tune controls (the study knows them from the checkpoint cards); None: the
    robustness step's list, else none. Without them a control's SAE comparison would be judged as a fine-tune's
    (and join the Holm family), so a study that reruns only its SAE steps passes them."""
    out: list[Verdict] = []
    rob = metrics.get("robustness")
    tuned: list[tuple[str, list[str]]] = []
    ctrls: list[str] = list(controls) if controls is not None else list((rob or {}).get("controls", []))
    if rob:
        est = rob["estimates"]
        tuned = [(m, e["seen"]) for m, e in est.items() if e["seen"] and m != base]  # the base: the reference
        tests = rob.get("mcnemar")
        for m, _ in tuned:
            groups = est[m].get("groups") or {}
            g = "seen_trained" if est[m]["vs"][base].get("seen_trained") else "seen"
            what = "at its trained severity" if g == "seen_trained" else "at the study's severity"
            cells = groups.get(g) or []
            vs_b = est[m]["vs"][base].get(g)
            vs_c = {c: (est[m]["vs"].get(c) or {}).get(g) for c in ctrls}
            v, why = _seen_verdict(m, base, vs_b, vs_c, cells, tests)
            sev4 = est[m]["vs"][base].get("seen")
            if g == "seen_trained" and cells != groups.get("seen"):
                why += f"; at the study's severity ({', '.join(groups.get('seen') or [])}): {_fmt_ci(sev4, 100)} pp"
            ctl = "; ".join(f"vs {c}: {_fmt_ci(d, 100)} pp" for c, d in vs_c.items()) or "no clean control"
            out.append(Verdict("seen_gain", m,
                               f"top-1 on {', '.join(cells) or 'the seen cells'} (seen corruption {what}), minus "
                               "base (pp)", *_pp(vs_b), ctl, v, rule=why))  # fmt: skip
            other = est[m]["vs"][base].get("unseen_other")
            seen_low = (sev4 or {}).get("low")
            seen_est = (sev4 or {}).get("estimate")
            if other is None:
                continue
            share = (
                f" = {fmt_fixed(other['estimate'] / seen_est, 0, 100)}% of the seen gain at the same severity"
                if seen_est and seen_est > 0 and other.get("estimate") is not None
                else ""
            )
            partial = seen_low is not None and seen_low > 0 and _below(other, 0.5 * seen_low)
            if _above(other):
                v, why = "contradicted", f"CI above 0: other families gain {_fmt_ci(other, 100)} pp{share}"
                if partial:
                    why += " (its upper end is also below half the seen gain's lower end: a partial transfer)"
            elif partial:
                v = "supported"
                why = f"CI's upper end {fmt_sig(other['high'], 3, 100)} pp < half the seen gain's lower end at the same severity ({fmt_sig(seen_low, 3, 50)} pp)"
            else:
                v, why = (
                    "inconclusive",
                    "neither: CI not above 0 and not below half the seen gain's lower end",
                )
            vs_c = {c: (est[m]["vs"].get(c) or {}).get("unseen_other") for c in ctrls}
            ctl = "; ".join(f"vs {c}: {_fmt_ci(d, 100)} pp" for c, d in vs_c.items()) or "no clean control"
            out.append(Verdict("no_unseen_transfer", m, "top-1 on unseen other families, minus base (pp)",
                               *_pp(other), ctl, v, rule=why))  # fmt: skip
    att = metrics.get("attention", {}).get("change_from_base", {})
    lens = metrics.get("logit_lens", {}).get("paired_first_correct", {})
    labels = list(dict.fromkeys(k.split("|")[-1] for k in [*att, *lens]))
    trained = (rob or {}).get("trained_severities") or {}
    for m, seen in tuned:
        for cond in seen_conditions(seen, labels, trained.get(m) or [], (rob or {}).get("severities") or []):
            a = att.get(f"{m}|{cond}", {})
            if a:
                out.append(_attention_verdict(m, cond, a, ctrls))
            d = (lens.get(f"{m}|{base}|{cond}") or {}).get("difference")
            if d:
                out.append(_lens_verdict(m, cond, d, {c: (lens.get(f"{m}|{c}|{cond}") or {}).get("difference")
                                                      for c in ctrls}))  # fmt: skip
    sae = metrics.get("sae_analysis", {}).get("overlap_controls", {})
    family = [(arch, comp, ((per.get("matched_cos") or {}).get("test") or {}).get("p_value"))
              for arch, oc in sae.items() for comp, per in oc["summary"].items()
              if comp.split(" vs ", 1)[1] not in ctrls]  # fmt: skip
    ps = [(a, c, p) for a, c, p in family if p is not None]
    adjusted = dict(zip([(a, c) for a, c, _ in ps], holm([p for *_, p in ps]) if ps else [], strict=True))
    for arch, oc in sae.items():
        summ = oc["summary"]
        for comp, per in summ.items():
            m = comp.split(" vs ", 1)[1]
            if m in ctrls:
                continue
            mc = per.get("matched_cos", {})
            ratio, test = mc.get("ratio"), mc.get("test") or {}
            p = test.get("p_value")
            q = None if p is None else float(adjusted[(arch, comp)])
            fam = f"Holm over {len(ps)} comparison{'s' if len(ps) > 1 else ''}"
            cc = [summ[f"{base} vs {c}"]["matched_cos"] for c in ctrls if f"{base} vs {c}" in summ]
            # the clean fine-tune moves the dictionary too: the corruption fine-tune must move it further
            ctrl_lows = [(x.get("ratio") or {}).get("low") for x in cc]
            beyond_ctrl = all(lo is not None and ratio and ratio.get("high") is not None and ratio["high"] < lo
                              for lo in ctrl_lows)  # fmt: skip
            if q is not None and q <= 0.05 and _below(ratio, 1.0) and beyond_ctrl:
                v, why = (
                    "contradicted",
                    f"Holm p = {fmt_sig(q)} <= 0.05 ({fam}) and the ratio's CI below 1"
                    + (" and below the clean control's ratio CI" if cc else ""),
                )
            elif q is not None and q <= 0.05 and _below(ratio, 1.0):
                v = "inconclusive"
                why = (f"Holm p = {fmt_sig(q)} <= 0.05 and the ratio's CI below 1, but it overlaps the clean control's "
                       "ratio CI: fine-tuning itself moves the dictionary as much")  # fmt: skip
            elif p is not None and p > 0.05 and _above(ratio, 0.95):
                v, why = "supported", f"p = {fmt_sig(p)} > 0.05 and the ratio's CI above 0.95"
                if powerless(test):
                    v = "inconclusive"
                    why += (f", but with {test.get('n')} SAEs the exact test's smallest p is "
                            f"{fmt_sig(min_permutation_p(test))}: it could not have found a difference, so its p says "
                            "nothing (more seeds per model: sae.replicates)")  # fmt: skip
            else:
                v = "inconclusive"
                why = "neither rule's condition holds" + (
                    "" if q is None else f" (p = {fmt_sig(p)}, Holm p = {fmt_sig(q)}, {fam})"
                )
            why += "".join(f"; {x}" for x in _overlap_caveats(mc, test, per.get("persistent_fraction")))
            ctl = (
                "; ".join(
                    f"clean control ratio {_fmt_ci(x.get('ratio'))}, p {fmt_sig((x.get('test') or {}).get('p_value', float('nan')))}"
                    for x in cc
                )
                or "no clean control"
            )
            out.append(Verdict("features_stable", f"{m} ({arch})",
                               f"matched decoder cosine between / within (p = {fmt_sig(p)}, Holm {fmt_sig(q)})" if p is not None else
                               "matched decoder cosine between / within", *_get(ratio), ctl, v, rule=why))  # fmt: skip
    return out


def seen_conditions(seen: list[str], labels: list[str], trained: list[int], study: list[int]) -> list[str]:
    """The conditions (``corruption/severity`` among ``labels``) claims 3 and 4 judge a fine-tune on, one per seen
    corruption that has one: at a severity it was ``trained`` at, else at a ``study`` (robustness) severity,
    else any; the highest severity of the first of those that has one (:data:`CONDITION_RULE`)."""
    out = []
    for c in seen:
        sev = {lab: int(lab.rsplit("/", 1)[1]) for lab in labels if "/" in lab and lab.rsplit("/", 1)[0] == c}
        for pick in ([x for x in sev if sev[x] in trained], [x for x in sev if sev[x] in study], list(sev)):
            if pick:
                out.append(max(pick, key=sev.__getitem__))
                break
    return out


def _attention_verdict(m: str, cond: str, a: dict, ctrls: list[str]) -> Verdict:
    """Claim 3 on ``cond``: the change from the base minus each clean control's change (``minus_<control>``);
    every control must agree (a control without its difference leaves it inconclusive)."""
    diffs = {c: a.get(f"minus_{c}") for c in ctrls}
    first = next(iter(diffs), "control")
    if not diffs:
        v, why = "inconclusive", "no control to subtract"
    elif len(diffs) == 1 and diffs[first] is not None:  # the one-control wording
        d = diffs[first]
        if _above(d):
            v, why = "supported", f"CI above 0: attention moved more than {first}'s fine-tune moves it"
        elif _below(d):
            v, why = "contradicted", f"CI below 0: attention moved less than {first}'s fine-tune moves it"
        else:
            v, why = "inconclusive", "CI includes 0"
    elif all(_above(d) for d in diffs.values()):
        v = "supported"
        why = f"CI above 0 against every control ({', '.join(diffs)}): attention moved more than their fine-tunes move it"
    elif all(_below(d) for d in diffs.values()):
        v = "contradicted"
        why = f"CI below 0 against every control ({', '.join(diffs)}): attention moved less than their fine-tunes move it"
    else:
        v = "inconclusive"
        why = "; ".join(f"minus {c}: " + ("no difference in these metrics" if d is None else f"CI {_fmt_ci(d)}")
                        for c, d in diffs.items())  # fmt: skip
        why = f"the controls do not all agree ({why})" if len(diffs) > 1 else why
    ctl = "; ".join([f"change itself {_fmt_ci(a.get('change'))}"]
                    + [f"minus {c}: {_fmt_ci(d)}" for c, d in list(diffs.items())[1:]])  # fmt: skip
    return Verdict("attention_changes", m, f"attention change (1 - cosine) on {cond}, minus the {first} control's",
                   *_get(diffs.get(first)), ctl, v, rule=why)  # fmt: skip


def _lens_verdict(m: str, cond: str, d: dict, vs_c: dict) -> Verdict:
    """Claim 4 on ``cond``: the paired first-correct-block difference against the base, and against each clean
    control (``vs_c``), which must all lie on the same side of 0."""
    ctl = "; ".join(f"vs {c}: {_fmt_ci(x)} blocks" for c, x in vs_c.items()) or "no clean control"
    same_side = _below if d["estimate"] < 0 else _above
    off = [c for c, x in vs_c.items() if not same_side(x)]
    if not (_above(d) or _below(d)):
        v, why = "inconclusive", "CI includes 0"
    elif off:
        v = "inconclusive"
        why = "CI vs base excludes 0 but " + "; ".join(
            f"the CI vs the {c} control {_fmt_ci(vs_c[c])} does not lie on the same side of 0" if vs_c[c]
            else f"there is no paired difference against the {c} control" for c in off
        ) + ": fine-tuning itself may move it as much"  # fmt: skip
    else:
        v = "supported"
        why = f"CI excludes 0: the answer forms {fmt_sig(abs(d['estimate']), 2)} blocks " + (
            "earlier" if d["estimate"] < 0 else "later"
        )
        if len(vs_c) == 1:
            why += " (and so it does against the clean control)"
        elif vs_c:
            why += f" (and so it does against every clean control: {', '.join(vs_c)})"
    return Verdict("lens_changes", m, f"first correct block on {cond}, minus base (blocks; negative = earlier)",
                   *_get(d), ctl, v, rule=why)  # fmt: skip


def _seen_verdict(m: str, base: str, vs_b, vs_c: dict, cells: list[str], tests: list[dict] | None):
    """The seen-gain verdict and its reason: the CIs give the direction, the Holm-adjusted McNemar tests of
    ``cells`` (when the metrics have them) the multiplicity-safe significance."""
    refs = [base, *vs_c]
    got = {(t["reference"], t["cell"]): t for t in tests or [] if t["model"] == m and t["cell"] in cells}
    use_p = bool(tests) and all("p_holm" in got.get((r, c), {}) for r in refs for c in cells) and bool(cells)
    ci_up = _above(vs_b) and all(_above(d) for d in vs_c.values())
    if use_p:
        sig = {(r, c): got[(r, c)]["p_holm"] < 0.05 and got[(r, c)]["a_only"] > got[(r, c)]["b_only"]
               for r in refs for c in cells}  # fmt: skip
        worst = max(got[(r, c)]["p_holm"] for r in refs for c in cells)
        if ci_up and all(sig.values()):
            return "supported", (
                "CI vs base above 0"
                + (" and CI vs the clean control above 0" if vs_c else "")
                + f"; every McNemar Holm p < 0.05 (largest {fmt_sig(worst, 2)})"
            )
        neg = [got[(base, c)] for c in cells if got[(base, c)]["p_holm"] < 0.05
               and got[(base, c)]["b_only"] > got[(base, c)]["a_only"]]  # fmt: skip
        if _below(vs_b) and neg:
            return (
                "contradicted",
                f"CI vs base below 0 and McNemar Holm p = {fmt_sig(neg[0]['p_holm'], 2)} < 0.05",
            )
    elif ci_up:
        return "supported", "CI vs base above 0" + (
            " and CI vs the clean control above 0" if vs_c else ""
        ) + (" (no McNemar tests in these metrics: the CIs alone decide)")
    elif _below(vs_b):
        return "contradicted", "CI vs base below 0 (no McNemar tests in these metrics: the CIs alone decide)"
    why = [f"CI vs {c} {_fmt_ci(d, 100)} pp does not lie above 0" for c, d in vs_c.items() if not _above(d)]
    if not _above(vs_b):
        why.append(f"CI vs base {_fmt_ci(vs_b, 100)} pp includes 0")
    if use_p:
        why += [f"McNemar vs {r} on {c}: Holm p = {fmt_sig(got[(r, c)]['p_holm'], 2)}" for r in refs for c in cells
                if not sig[(r, c)]]  # fmt: skip
    return "inconclusive", "; ".join(why)


def min_permutation_p(test: dict) -> float | None:
    """The smallest p an exact two-group permutation test can give: 1 / (number of labelings), or 2 / that
    when both groups are the same size (a labeling and its swap give the same statistic)."""
    n, n_perm = test.get("n"), test.get("n_permutations")
    if not test.get("exact") or not n or not n_perm:
        return None
    return (2.0 if n % 2 == 0 and math.comb(n, n // 2) == n_perm else 1.0) / n_perm


def powerless(test: dict, alpha: float = 0.05) -> bool:
    """True when the exact permutation test cannot give p <= ``alpha`` with this many SAEs (3 + 3 seeds: the
    smallest p is 2 / 20 = 0.1): then "p > alpha" is no evidence of "no difference"."""
    p_min = min_permutation_p(test)
    return p_min is not None and p_min > alpha


def _overlap_caveats(mc: dict, test: dict, persistent: dict | None) -> list[str]:
    """What a reader needs beside the ratio: whether p is the smallest the seed count allows, where between
    lies from the random-row floor to the seed-noise ceiling, and how few features even seed pairs share."""
    out = []
    p, p_min = test.get("p_value"), min_permutation_p(test)
    if p is not None and p_min is not None and p <= p_min * (1 + 1e-9):
        out.append(f"p is the smallest {test['n']} SAEs allow ({fmt_sig(p_min)})")
    between, floor, ratio = (mc.get(k) or {} for k in ("between", "floor", "ratio"))
    b, f, r = between.get("estimate"), floor.get("estimate"), ratio.get("estimate")
    if b is not None and f is not None and r:
        within = b / r  # the ratio's denominator: the pooled within-model pairs
        if within > f:
            out.append(
                f"(between - floor) / (within - floor) = {fmt_fixed((b - f) / (within - f), 2)} (point estimate; within "
                f"{fmt_sig(within)} is only {fmt_sig(within - f, 2)} above the random-row floor {fmt_sig(f)})"
            )
    w = ((persistent or {}).get("within_reference") or {}).get("estimate")
    if w is not None:
        out.append(
            f"only {fmt_fixed(w, 1, 100)}% of live features persist even between two seeds of the base model"
        )
    return out


def _pp(d: dict | None) -> tuple:
    e, lo, hi = _get(d)
    return tuple(None if v is None else 100 * v for v in (e, lo, hi))


def _fmt_ci(d: dict | None, scale: float = 1.0) -> str:
    e, lo, hi = _get(d)
    if e is None:
        return "–"
    if lo is None or hi is None or lo != lo:
        return fmt_sig(e, 3, scale)
    return f"{fmt_sig(e, 3, scale)} [{fmt_sig(lo, 3, scale)}, {fmt_sig(hi, 3, scale)}]"


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


def tally(vs: list[Verdict]) -> dict[str, dict[str, list[str]]]:
    """Per claim: ``{verdict: [models]}``, so an overall verdict can be read with its count."""
    out: dict[str, dict[str, list[str]]] = {}
    for v in vs:
        out.setdefault(v.claim, {}).setdefault(v.verdict, []).append(v.model)
    return out


def overall_text(vs: list[Verdict]) -> dict[str, str]:
    """Per claim: the overall verdict with its tally, e.g. ``inconclusive (5 of 6 supported: blur2, ...; 1 of 6
    inconclusive: blur1)``."""
    t, out = tally(vs), {}
    for c, v in overall(vs).items():
        n = sum(len(ms) for ms in t[c].values())
        parts = [f"{len(ms)} of {n} {k}" + ("" if len(ms) == n else f": {', '.join(ms)}")
                 for k, ms in sorted(t[c].items(), key=lambda kv: (-len(kv[1]), kv[0]))]  # fmt: skip
        out[c] = f"{v} ({'; '.join(parts)})"
    return out


def claims_table(vs: list[Verdict]) -> Table:
    return Table(
        "The seed paper's claims: effect with 95% CI (over test images; over SAE seed pairs for the features), "
        "its control, and the verdict with the condition that decided it",
        ["claim", "model", "effect", "estimate", "low", "high", "control", "verdict", "why"],
        [v.row() for v in vs],
    )
