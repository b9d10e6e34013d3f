"""The claim verdict rules of mechvit.study.claims on hand-made step metrics (known answers)."""

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
        return {"sae_analysis": {"overlap_controls": {"batchtopk": {"summary": {
            "base vs blur4": {"matched_cos": {"ratio": ratio, "test": {"p_value": p}}},
        }}}}}  # fmt: skip

    assert by(verdicts(sae(0.05, ci(0.8, 0.7, 0.9)), "base"), "features_stable") == ["contradicted"]
    assert by(verdicts(sae(0.4, ci(1.0, 0.97, 1.02)), "base"), "features_stable") == ["supported"]
    assert by(verdicts(sae(0.4, ci(0.9, 0.6, 1.1)), "base"), "features_stable") == ["inconclusive"]


def test_lens_and_attention_rules():
    m = {
        "robustness": robustness(ci(0.3, 0.2, 0.4), ci(0.3, 0.2, 0.4), ci(0, -0.01, 0.01)),
        "logit_lens": {"paired_first_correct": {"blur4|base|gaussian_blur/4": {"n_common": 50, "difference": ci(-0.8, -1.1, -0.5)}}},
        "attention": {"change_from_base": {"blur4|gaussian_blur/4": {"change": ci(0.1, 0.09, 0.11), "minus_clean": ci(0.0, -0.01, 0.01)}}},
    }  # fmt: skip
    vs = verdicts(m, "base")
    assert by(vs, "lens_changes") == ["supported"]  # earlier, CI excludes 0
    assert by(vs, "attention_changes") == ["inconclusive"]  # no more change than the clean control
