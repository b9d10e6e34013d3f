"""The claim verdict rules of mechvit.study.claims on hand-made step metrics (known answers)."""

import math

import pytest

from mechvit.study.claims import overall, verdicts


def ci(e, lo, hi):
    return {"estimate": e, "low": lo, "high": hi}


def robustness(seen_vs_base, seen_vs_ctrl, other_vs_base):
    return {
        "controls": ["clean"],
        "estimates": {
            "base": {"seen": [], "vs": {}},
            "clean": {"seen": [], "vs": {}},
            "blur4": {
                "seen": ["gaussian_blur"],
                "vs": {
                    "base": {"seen": seen_vs_base, "unseen_other": other_vs_base},
                    "clean": {"seen": seen_vs_ctrl, "unseen_other": other_vs_base},
                },
            },
        },
    }


def by(vs, claim):
    return [v.verdict for v in vs if v.claim == claim]


def test_seen_gain_and_transfer_rules():
    vs = verdicts(
        {"robustness": robustness(ci(0.3, 0.25, 0.35), ci(0.28, 0.2, 0.33), ci(0.0, -0.02, 0.02))}, "base"
    )
    assert by(vs, "seen_gain") == ["supported"] and by(vs, "no_unseen_transfer") == ["supported"]
    # no gain over the clean control: not supported
    vs = verdicts(
        {"robustness": robustness(ci(0.3, 0.25, 0.35), ci(0.0, -0.05, 0.05), ci(0.05, 0.03, 0.07))}, "base"
    )
    assert by(vs, "seen_gain") == ["inconclusive"] and by(vs, "no_unseen_transfer") == ["contradicted"]
    vs = verdicts(
        {"robustness": robustness(ci(-0.1, -0.2, -0.05), ci(0.0, -0.05, 0.05), ci(0.0, -0.2, 0.1))}, "base"
    )
    assert by(vs, "seen_gain") == ["contradicted"] and by(vs, "no_unseen_transfer") == ["inconclusive"]
    assert overall(vs)["seen_gain"] == "contradicted"


def test_feature_stability_rule_uses_the_permutation_test_and_the_ratio():
    def sae(p, ratio):
        return {"robustness": {"controls": ["clean"], "estimates": {}},  # clean: a control, not in the family
                "sae_analysis": {"overlap_controls": {"batchtopk": {"summary": {
            "base vs blur4": {"matched_cos": {"ratio": ratio, "test": {"p_value": p}}},
        }}}}}  # fmt: skip

    assert by(verdicts(sae(0.05, ci(0.8, 0.7, 0.9)), "base"), "features_stable") == ["contradicted"]
    assert by(verdicts(sae(0.4, ci(1.0, 0.97, 1.02)), "base"), "features_stable") == ["supported"]
    assert by(verdicts(sae(0.4, ci(0.9, 0.6, 1.1)), "base"), "features_stable") == ["inconclusive"]


def test_feature_stability_is_never_supported_by_a_test_that_could_not_reject():
    """3 + 3 seeds: the exact permutation test's smallest two-sided p is 2 / C(6, 3) = 0.1, so "p > 0.05"
    holds whatever the SAEs are; the rule must not read that as evidence of stability. 4 + 4 (smallest p
    2 / 70 = 0.029) and 5 + 5 (2 / 252) can reject, and then p > 0.05 means something."""
    from mechvit.study.claims import min_permutation_p, powerless

    def sae(n_per_model, p):
        n = 2 * n_per_model
        test = {
            "p_value": p,
            "n": n,
            "n_permutations": math.comb(n, n_per_model),
            "exact": True,
        }
        return {"sae_analysis": {"overlap_controls": {"batchtopk": {"summary": {
            "base vs blur4": {"matched_cos": {"ratio": ci(1.0, 0.97, 1.03), "test": test}},
        }}}}}  # fmt: skip

    assert min_permutation_p({"n": 6, "n_permutations": 20, "exact": True}) == pytest.approx(0.1)
    assert powerless({"n": 6, "n_permutations": 20, "exact": True})
    assert not powerless({"n": 8, "n_permutations": 70, "exact": True})
    assert not powerless({"p_value": 0.3})  # Monte Carlo or unknown design: no claim of powerlessness
    (v,) = verdicts(sae(3, 0.1), "base")
    assert v.verdict == "inconclusive" and "smallest p is 0.1: it could not have found a difference" in v.rule
    assert by(verdicts(sae(4, 0.3), "base"), "features_stable") == ["supported"]
    assert by(verdicts(sae(5, 0.3), "base"), "features_stable") == ["supported"]


def test_lens_and_attention_rules():
    m = {
        "robustness": robustness(ci(0.3, 0.2, 0.4), ci(0.3, 0.2, 0.4), ci(0, -0.01, 0.01)),
        "logit_lens": {"paired_first_correct": {"blur4|base|gaussian_blur/4": {"n_common": 50, "difference": ci(-0.8, -1.1, -0.5)}}},
        "attention": {"change_from_base": {"blur4|gaussian_blur/4": {"change": ci(0.1, 0.09, 0.11), "minus_clean": ci(0.0, -0.01, 0.01)}}},
    }  # fmt: skip
    vs = verdicts(m, "base")
    # earlier, CI excludes 0, but no lens row for the clean control: as for the seen gain, a control without its
    # comparison leaves the claim open
    assert by(vs, "lens_changes") == ["inconclusive"]
    assert "no paired difference against the clean control" in next(
        v.rule for v in vs if v.claim == "lens_changes"
    )
    assert by(verdicts(m, "base", controls=[]), "lens_changes") == [
        "supported"
    ]  # no control at all: base decides
    assert by(vs, "attention_changes") == ["inconclusive"]  # no more change than the clean control
    # with a clean control: earlier than the control too -> supported; the control moves as much -> inconclusive
    lens = m["logit_lens"]["paired_first_correct"]
    lens["blur4|clean|gaussian_blur/4"] = {"n_common": 50, "difference": ci(-0.5, -0.8, -0.2)}
    assert by(verdicts(m, "base"), "lens_changes") == ["supported"]
    lens["blur4|clean|gaussian_blur/4"] = {"n_common": 50, "difference": ci(-0.1, -0.4, 0.2)}
    (v,) = [x for x in verdicts(m, "base") if x.claim == "lens_changes"]
    assert v.verdict == "inconclusive" and "does not lie on the same side of 0" in v.rule


def test_each_verdict_states_the_condition_that_decided_it():
    vs = verdicts(
        {"robustness": robustness(ci(0.3, 0.25, 0.35), ci(0.0, -0.05, 0.05), ci(0.05, 0.03, 0.07))}, "base"
    )
    seen = next(v for v in vs if v.claim == "seen_gain")
    assert seen.rule == "CI vs clean 0 [-5, 5] pp does not lie above 0"
    other = next(v for v in vs if v.claim == "no_unseen_transfer")
    # +5 pp on other families is 17% of a 30 pp seen gain: contradicted, and said to be a partial transfer
    assert other.verdict == "contradicted" and "5 [3, 7] pp = 17% of the seen gain" in other.rule
    assert "partial transfer" in other.rule
    assert other.row()[-1] == other.rule


def test_overall_text_counts_the_fine_tunes_behind_each_verdict():
    from mechvit.study.claims import Verdict, overall_text

    def v(model, verdict):
        return Verdict("seen_gain", model, "e", 1.0, 0.5, 1.5, "c", verdict)

    vs = [v("a", "supported"), v("b", "inconclusive"), v("c", "supported")]
    assert overall_text(vs) == {"seen_gain": "inconclusive (2 of 3 supported: a, c; 1 of 3 inconclusive: b)"}
    assert overall_text(vs[:1]) == {"seen_gain": "supported (1 of 1 supported)"}


def test_smallest_attainable_permutation_p():
    from mechvit.study.claims import min_permutation_p

    assert (
        min_permutation_p({"n": 8, "n_permutations": 70, "exact": True}) == 2 / 70
    )  # 4 + 4: a split and its swap
    assert min_permutation_p({"n": 7, "n_permutations": 35, "exact": True}) == 1 / 35  # 3 + 4
    assert min_permutation_p({"n": 8, "n_permutations": 9999, "exact": False}) is None


def test_feature_verdict_says_where_between_lies_from_floor_to_ceiling():
    mc = {
        "between": ci(0.38, 0.37, 0.39), "floor": ci(0.30, 0.29, 0.31), "ratio": ci(0.95, 0.93, 0.97),
        "test": {"p_value": 2 / 70, "n": 8, "n_permutations": 70, "exact": True},
    }  # fmt: skip
    m = {"sae_analysis": {"overlap_controls": {"batchtopk": {"summary": {
        "base vs blur4": {"matched_cos": mc, "persistent_fraction": {"within_reference": ci(0.02, 0.01, 0.03)}},
    }}}}}  # fmt: skip
    (v,) = verdicts(m, "base")
    assert v.verdict == "contradicted"
    # within = between / ratio = 0.4; (0.38 - 0.30) / (0.4 - 0.30) = 0.80
    assert "(between - floor) / (within - floor) = 0.80" in v.rule
    assert "p is the smallest 8 SAEs allow (0.0286)" in v.rule
    assert "only 2.0% of live features persist even between two seeds" in v.rule


def _mc(model, ref, cell, a_only, b_only, p_holm):
    return {"model": model, "reference": ref, "cell": cell, "a_only": a_only, "b_only": b_only,
            "p_value": p_holm / 4, "p_holm": p_holm}  # fmt: skip


def test_seen_gain_is_decided_at_the_trained_severity_with_holm_adjusted_mcnemar():
    rob = robustness(ci(0.02, -0.01, 0.05), ci(0.0, -0.05, 0.05), ci(0.0, -0.01, 0.01))
    blur = rob["estimates"]["blur4"]
    blur["groups"] = {"seen_trained": ["gaussian_blur/1"], "seen": ["gaussian_blur/4"]}
    blur["vs"]["base"]["seen_trained"] = ci(0.04, 0.01, 0.07)
    blur["vs"]["clean"]["seen_trained"] = ci(0.03, 0.005, 0.06)
    rob["mcnemar"] = [_mc("blur4", "base", "gaussian_blur/1", 40, 10, 0.001),
                      _mc("blur4", "clean", "gaussian_blur/1", 35, 12, 0.2)]  # fmt: skip
    (v,) = [x for x in verdicts({"robustness": rob}, "base") if x.claim == "seen_gain"]
    # both CIs above 0 at the trained severity, but the test against the control does not survive Holm
    assert v.verdict == "inconclusive" and "McNemar vs clean on gaussian_blur/1: Holm p = 0.2" in v.rule
    assert (
        v.estimate == pytest.approx(4.0)
        and "gaussian_blur/1 (seen corruption at its trained severity)" in v.effect
    )
    assert "at the study's severity (gaussian_blur/4): 2 [-1, 5] pp" in v.rule
    rob["mcnemar"][1]["p_holm"] = 0.01
    (v,) = [x for x in verdicts({"robustness": rob}, "base") if x.claim == "seen_gain"]
    assert v.verdict == "supported" and "every McNemar Holm p < 0.05 (largest 0.01)" in v.rule


def test_feature_contradiction_needs_the_holm_adjusted_permutation_p():
    def two(p, control=None):
        control = control or ci(0.996, 0.991, 1.0)
        comp = lambda: {"matched_cos": {"ratio": ci(0.98, 0.97, 0.99), "test": {"p_value": p}}}  # noqa: E731
        return {"robustness": {"controls": ["clean"], "estimates": {}},  # clean: a control, not in the family
                "sae_analysis": {"overlap_controls": {"batchtopk": {"summary": {
            "base vs blur4": comp(), "base vs noise4": comp(),
            "base vs clean": {"matched_cos": {"ratio": control, "test": {"p_value": p}}}}}}}}  # fmt: skip

    # 4 + 4 SAEs: p = 2/70 for both fine-tunes; Holm over the 2 fine-tunes (not the control) gives 4/70 > 0.05
    vs = verdicts(two(2 / 70), "base")
    assert by(vs, "features_stable") == ["inconclusive", "inconclusive"]
    assert "Holm p = 0.0571, Holm over 2 comparisons" in vs[0].rule
    # raw p 2/70 <= 0.05: never "supported" either, though the ratio's CI lies above 0.95
    assert by(verdicts(two(0.01), "base"), "features_stable") == ["contradicted", "contradicted"]
    # the clean fine-tune moves the dictionary as much (its ratio CI overlaps): not the corruption's doing
    vs = verdicts(two(0.01, control=ci(0.985, 0.975, 0.995)), "base")
    assert by(vs, "features_stable") == ["inconclusive", "inconclusive"]
    assert "overlaps the clean control's ratio CI" in vs[0].rule
    # a study rerunning only its SAE steps has no robustness metrics: the controls it passes decide the same
    only_sae = two(0.01, control=ci(0.985, 0.975, 0.995))
    del only_sae["robustness"]
    assert [(v.model, v.verdict) for v in verdicts(only_sae, "base", controls=["clean"])] == [
        ("blur4 (batchtopk)", "inconclusive"),
        ("noise4 (batchtopk)", "inconclusive"),
    ]
    # without them the control would be judged as a third fine-tune (the bug this guards against)
    assert len(verdicts(only_sae, "base")) == 3
    assert verdicts(only_sae, "base", controls=[])[0].control == "no clean control"


# ---- finding 7: claims 3 and 4 on the condition at the trained severity, against every control -------------


def _two_conditions(trained: list[int] | None) -> dict:
    """blur4, trained at ``trained`` (None: the card does not say), on conditions blur/2 and blur/4 (in that order):
    attention and the lens move only on blur/4."""
    rob = robustness(ci(0.3, 0.2, 0.4), ci(0.3, 0.2, 0.4), ci(0, -0.01, 0.01))
    rob["severities"] = [4]
    rob["trained_severities"] = {} if trained is None else {"blur4": trained}
    moved, still = ci(0.05, 0.03, 0.07), ci(0.0, -0.01, 0.01)
    return {
        "robustness": rob,
        "attention": {"change_from_base": {
            "blur4|gaussian_blur/2": {"change": ci(0.1, 0.09, 0.11), "minus_clean": still},
            "blur4|gaussian_blur/4": {"change": ci(0.2, 0.19, 0.21), "minus_clean": moved}}},
        "logit_lens": {"paired_first_correct": {
            f"blur4|{ref}|gaussian_blur/{sev}": {"n_common": 50, "difference": d}
            for ref in ("base", "clean") for sev, d in ((2, ci(0.0, -0.2, 0.2)), (4, ci(-0.8, -1.1, -0.5)))}},
    }  # fmt: skip


def test_attention_and_lens_claims_use_the_condition_at_the_trained_severity():
    """The audit's case: with conditions [gaussian_blur/2, gaussian_blur/4], blur4 was judged on blur/2 (the first
    seen condition in the metrics), while its seen gain uses severity 4."""
    from mechvit.study.claims import seen_conditions

    for trained in ([4], None):  # trained at 4; or unknown, then the study's robustness severity (4)
        vs = verdicts(_two_conditions(trained), "base")
        att = next(v for v in vs if v.claim == "attention_changes")
        lens = next(v for v in vs if v.claim == "lens_changes")
        assert "on gaussian_blur/4" in att.effect and att.verdict == "supported", trained
        assert "on gaussian_blur/4" in lens.effect and lens.verdict == "supported", trained
    vs = verdicts(_two_conditions([2]), "base")  # trained at 2: judged on blur/2, where nothing moved
    assert [(v.claim, v.verdict) for v in vs if "blur/2" in v.effect] == [
        ("attention_changes", "inconclusive"),
        ("lens_changes", "inconclusive"),
    ]
    labels = ["gaussian_blur/2", "gaussian_noise/4", "gaussian_blur/4", "gaussian_blur/5"]
    assert seen_conditions(["gaussian_blur"], labels, [2], [4]) == ["gaussian_blur/2"]
    assert seen_conditions(["gaussian_blur"], labels, [3], [4]) == ["gaussian_blur/4"]  # the study's severity
    assert seen_conditions(["gaussian_blur"], labels, [3], [1]) == ["gaussian_blur/5"]  # else the highest
    # one condition per seen corruption; a corruption with no condition gives none
    assert seen_conditions(["gaussian_noise", "gaussian_blur", "fog"], labels, [4], [4]) == [
        "gaussian_noise/4",
        "gaussian_blur/4",
    ]


def test_attention_and_lens_claims_need_every_control():
    """Three clean controls, as in the seeds study: a verdict needs each of them (as the seen gain does)."""
    m = _two_conditions([4])
    m["robustness"]["controls"] = ["clean", "clean_s1", "clean_s2"]
    att = m["attention"]["change_from_base"]["blur4|gaussian_blur/4"]
    lens = m["logit_lens"]["paired_first_correct"]
    for c in ("clean_s1", "clean_s2"):
        att[f"minus_{c}"] = ci(0.04, 0.02, 0.06)
        lens[f"blur4|{c}|gaussian_blur/4"] = {"n_common": 50, "difference": ci(-0.3, -0.5, -0.1)}
    vs = {v.claim: v for v in verdicts(m, "base") if "blur/4" in v.effect}
    assert vs["attention_changes"].verdict == "supported" and vs["lens_changes"].verdict == "supported"
    assert "against every clean control: clean, clean_s1, clean_s2" in vs["lens_changes"].rule
    assert "minus clean_s1: 0.04 [0.02, 0.06]" in vs["attention_changes"].control
    # one control (the audit's clean_s2 of blur4_s1: [-0.223, +0.015]) includes 0: no longer supported
    lens["blur4|clean_s2|gaussian_blur/4"]["difference"] = ci(-0.1, -0.223, 0.015)
    att["minus_clean_s2"] = ci(0.01, -0.01, 0.03)
    vs = {v.claim: v for v in verdicts(m, "base") if "blur/4" in v.effect}
    assert vs["lens_changes"].verdict == "inconclusive"
    assert (
        "the CI vs the clean_s2 control -0.1 [-0.223, 0.015] does not lie on the same side"
        in vs["lens_changes"].rule
    )
    assert vs["attention_changes"].verdict == "inconclusive"
    assert "the controls do not all agree" in vs["attention_changes"].rule
    for c in ("clean", "clean_s1", "clean_s2"):  # below 0 against every control: contradicted
        att[f"minus_{c}"] = ci(-0.04, -0.06, -0.02)
    (v,) = [v for v in verdicts(m, "base") if v.claim == "attention_changes" and "blur/4" in v.effect]
    assert v.verdict == "contradicted" and "CI below 0 against every control" in v.rule


def test_a_base_with_seen_corruptions_is_never_judged_against_itself():
    """Old metrics (or a base whose card lists corruptions) must not crash the claims with KeyError 'base'."""
    rob = robustness(ci(0.3, 0.2, 0.4), ci(0.3, 0.2, 0.4), ci(0, -0.01, 0.01))
    rob["estimates"]["base"]["seen"] = ["gaussian_blur"]
    assert {v.model for v in verdicts({"robustness": rob}, "base")} == {"blur4"}


def test_the_docstring_states_the_rules_the_report_prints():
    """Finding 8: the module docstring is generated from RULES (which the report and metrics.json carry), so the
    two cannot disagree; the rules that decided the audit's blur4 verdict are in it."""
    import mechvit.study.claims as claims

    for c, rule in claims.RULES.items():
        assert rule in claims.__doc__, c
    assert "below every clean control's ratio CI (no overlap)" in claims.RULES["features_stable"]
    assert "lies on the same side of 0" in claims.RULES["lens_changes"]
    # the report's "blur4: inconclusive" (Holm p 0.0159, ratio CI [0.983, 0.997] overlapping the control's
    # [0.996, 1.01]) follows from the rule as written
    comp = {"matched_cos": {"ratio": ci(0.99, 0.983, 0.997), "test": {"p_value": 0.0079}}}
    ctrl = {"matched_cos": {"ratio": ci(1.0, 0.996, 1.01), "test": {"p_value": 0.7}}}
    m = {"robustness": {"controls": ["clean"], "estimates": {}}, "sae_analysis": {"overlap_controls": {
        "batchtopk": {"summary": {"base vs blur4": comp, "base vs noise4": comp, "base vs clean": ctrl}}}}}  # fmt: skip
    assert by(verdicts(m, "base"), "features_stable") == ["inconclusive", "inconclusive"]
