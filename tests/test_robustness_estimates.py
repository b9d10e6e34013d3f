"""robustness_estimates / unchanged_corruptions: known answers on synthetic per-image correctness."""

import pytest
import torch

from mechvit.analysis.robustness import robustness_estimates, unchanged_corruptions


def _correct(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    draw = lambda p: torch.rand(n, generator=g) < p  # noqa: E731
    c = {}
    for m, p_seen, p_other in (("base", 0.5, 0.8), ("ft", 0.9, 0.8), ("ctrl", 0.5, 0.8)):
        c[(m, "clean", 0)] = draw(0.9)
        c[(m, "gaussian_blur", 4)] = draw(p_seen)
        c[(m, "defocus_blur", 4)] = draw(0.6)  # same family as blur
        c[(m, "gaussian_noise", 4)] = draw(p_other)
        c[(m, "saturate", 4)] = draw(0.1)  # excluded below
    return c


def test_groups_cis_and_paired_differences():
    c = _correct()
    est = robustness_estimates(c, {"ft": ["gaussian_blur"]}, "base", exclude=["saturate"])
    ft = est["ft"]
    assert ft["groups"] == {
        "clean": ["clean/0"], "seen": ["gaussian_blur/4"], "unseen_same_family": ["defocus_blur/4"],
        "unseen_other": ["gaussian_noise/4"],
    }  # fmt: skip
    assert set(est["base"]["groups"]) == {"clean", "all_corrupted"}
    assert "saturate/4" not in est["base"]["groups"]["all_corrupted"]
    seen = ft["accuracy"]["seen"]
    assert seen.estimate == pytest.approx(float(c[("ft", "gaussian_blur", 4)].double().mean()))
    assert seen.low < seen.estimate < seen.high
    d = ft["vs"]["base"]["seen"]  # true difference 0.4
    assert d.low < 0.4 < d.high and d.low > 0.25
    same = ft["vs"]["ctrl"]["unseen_other"]  # true difference 0
    assert same.low < 0 < same.high
    with pytest.raises(ValueError, match="base model 'nope'"):
        robustness_estimates(c, {}, "nope")


def test_ci_coverage_of_the_seen_accuracy():
    hits = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        c = {
            (m, cell, sev): torch.rand(200, generator=g) < 0.9
            for m in ("base", "ft")
            for cell, sev in (("clean", 0), ("gaussian_blur", 4))
        }
        a = robustness_estimates(c, {"ft": ["gaussian_blur"]}, "base")["ft"]["accuracy"]["seen"]
        hits += a.low <= 0.9 <= a.high
    assert hits >= 34  # 95% nominal: P(<= 33 of 40) < 0.01


def test_unchanged_corruptions_finds_colour_only_ones_on_grayscale():
    x = torch.rand(4, 1, 28, 28)
    assert unchanged_corruptions(x, ["saturate", "gaussian_noise", "contrast"], [1, 4]) == ["saturate"]
    rgb = torch.rand(4, 3, 32, 32)
    assert unchanged_corruptions(rgb, ["saturate"], [4]) == []
