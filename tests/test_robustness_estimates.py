"""robustness_estimates / unchanged_corruptions: known answers on synthetic per-image correctness."""

import json

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


def test_workers_give_the_same_estimates_bit_for_bit():
    """workers=2 (forked one-thread processes, one model each) gives the same nested dict as workers=1: the
    same groups, the same Estimates to the last bit, in the same model order."""
    c = _correct(n=300)
    g = torch.Generator().manual_seed(7)
    # ft2: another fine-tune, on noise (trained at 4); the trained blur/1 cell only for ft, base and ctrl
    for m in ("base", "ft", "ctrl", "ft2"):
        for cell, sev in (("clean", 0), ("gaussian_blur", 4), ("defocus_blur", 4), ("gaussian_noise", 4),
                          ("saturate", 4), ("contrast", 4)):  # fmt: skip
            c.setdefault((m, cell, sev), torch.rand(300, generator=g) < 0.7)
        if m != "ft2":
            c[(m, "gaussian_blur", 1)] = torch.rand(300, generator=g) < 0.8
    seen = {"ft": ["gaussian_blur"], "ft2": ["gaussian_noise"]}
    kw = dict(exclude=["saturate"], severities=[4], trained={"ft": [1], "ft2": [4]}, seed=3)
    one = robustness_estimates(c, seen, "base", **kw)
    two = robustness_estimates(c, seen, "base", workers=2, **kw)

    def plain(e):
        return {m: {**d, "accuracy": {k: v.to_dict() for k, v in d["accuracy"].items()},
                    "vs": {o: {k: v.to_dict() for k, v in x.items()} for o, x in d["vs"].items()}}
                for m, d in e.items()}  # fmt: skip

    assert list(two) == list(one) == ["base", "ft", "ctrl", "ft2"]
    assert plain(two) == plain(one)
    assert json.dumps(plain(two)) == json.dumps(plain(one))  # every key in the same order, floats to the bit
    assert set(one["ft"]["groups"]) == {"clean", "seen_trained", "seen", "unseen_same_family", "unseen_other"}
    assert "seen_trained" in one["ft"]["vs"]["ctrl"] and "seen_trained" not in one["ft"]["vs"]["ft2"]
    assert one["ft2"]["groups"]["seen_trained"] == ["gaussian_noise/4"]


@pytest.mark.parametrize("workers", [0, -1, True, False])
def test_workers_must_be_a_number_of_processes(workers):
    with pytest.raises(ValueError, match="workers must be a number of processes >= 1"):
        robustness_estimates(_correct(n=50), {"ft": ["gaussian_blur"]}, "base", workers=workers)


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


def test_trained_severity_group_is_scored_apart_from_the_study_severities():
    c = _correct()
    g = torch.Generator().manual_seed(5)
    for m, p in (("base", 0.6), ("ft", 0.95), ("ctrl", 0.6)):
        c[(m, "gaussian_blur", 1)] = torch.rand(400, generator=g) < p  # the trained severity, scored apart
    est = robustness_estimates(
        c, {"ft": ["gaussian_blur"]}, "base", exclude=["saturate"], severities=[4], trained={"ft": [1]}
    )
    ft = est["ft"]
    assert ft["groups"]["seen_trained"] == ["gaussian_blur/1"]
    assert ft["groups"]["seen"] == ["gaussian_blur/4"]  # severity 4 only: the trained cell stays out
    assert "gaussian_blur/1" not in est["base"]["groups"]["all_corrupted"]
    assert "seen_trained" not in est["base"]["groups"]
    d = ft["vs"]["base"]["seen_trained"]  # true difference 0.35
    assert d.low < 0.35 < d.high and d.low > 0.2


def _per_image(n, g):
    logits = torch.randn(n, 10, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 10, (n,), generator=g)
    return logits, labels


def test_metric_cis_estimates_equal_the_cell_metrics_and_cover_known_values():
    from mechvit.analysis.robustness import classification_metrics, metric_cis, per_image_metrics

    g = torch.Generator().manual_seed(0)
    logits, labels = _per_image(500, g)
    cis = metric_cis(per_image_metrics(logits, labels))
    ref = classification_metrics(logits, labels)
    for k in ("top1", "top5", "confidence", "correct_prob", "nll", "ece"):
        assert cis[k].estimate == pytest.approx(ref[k], abs=1e-12), k
        assert cis[k].low <= cis[k].estimate <= cis[k].high, k
    # coverage: top-5 hits drawn at a known rate, confidences drawn so that the true ECE is known
    hits_top5 = hits_nll = 0
    for r in range(60):
        gr = torch.Generator().manual_seed(100 + r)
        top5 = (torch.rand(400, generator=gr) < 0.7).double()
        nll = torch.empty(400, dtype=torch.float64).exponential_(2.0, generator=gr)  # true mean 0.5
        pi = {"top1": top5, "top5": top5, "confidence": torch.full((400,), 0.7, dtype=torch.float64),
              "correct_prob": top5, "nll": nll}  # fmt: skip
        c = metric_cis(pi, n_resamples=1000, seed=r)
        hits_top5 += c["top5"].contains(0.7)
        hits_nll += c["nll"].contains(0.5)
    assert hits_top5 >= 52 and hits_nll >= 52  # 95% nominal: P(<= 51 of 60) < 0.01


def test_corruption_error_cis_match_corruption_errors_and_cover_the_true_mce():
    from mechvit.analysis.robustness import corruption_error_cis, corruption_errors

    c = _correct()
    rows = [{"model": m, "corruption": cc, "severity": s, "top1": float(v.double().mean())}
            for (m, cc, s), v in c.items() if cc != "saturate"]  # fmt: skip
    ref = corruption_errors(rows, "base")
    cis = corruption_error_cis(c, "base", exclude=["saturate"])
    for m in ("base", "ft", "ctrl"):
        for k in ("mCE", "relative_mCE"):
            assert cis[m][k].estimate == pytest.approx(ref[m][k]), (m, k)
    assert (cis["base"]["mCE"].low, cis["base"]["mCE"].high) == (1.0, 1.0)
    # error rates known: base 0.5 on both corruptions, model 0.25 -> true mCE 0.5
    hits = 0
    for r in range(40):
        gr = torch.Generator().manual_seed(200 + r)
        cc = {(m, name, 4): torch.rand(300, generator=gr) < p for m, p in (("base", 0.5), ("ft", 0.75))
              for name in ("gaussian_blur", "gaussian_noise")}  # fmt: skip
        hits += corruption_error_cis(cc, "base", n_resamples=1000, seed=r)["ft"]["mCE"].contains(0.5)
    assert hits >= 34  # 95% nominal: P(<= 33 of 40) < 0.01


def test_robustness_matrix_per_image_metrics_average_to_the_rows():
    from torch import nn

    from mechvit.analysis.robustness import robustness_matrix

    torch.manual_seed(0)
    models = {
        "a": nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
        "b": nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
    }
    x, y = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    rows, per = robustness_matrix(models, x, y, ["gaussian_noise"], [1], batch_size=5, device="cpu",
                                  progress=False, return_per_image=True)  # fmt: skip
    assert set(per) == {(m, c, s) for m in "ab" for c, s in (("clean", 0), ("gaussian_noise", 1))}
    for r in rows:
        pi = per[(r["model"], r["corruption"], r["severity"])]
        for k in ("top1", "top5", "confidence", "correct_prob", "nll"):
            assert float(pi[k].mean()) == pytest.approx(r[k]), k


def test_robustness_matrix_split_forwards_give_the_same_numbers_as_whole_batches():
    """forward_batch only splits a corrupted batch for the model calls: every row and per-image metric is
    the same as with the whole batch per call, to float rounding (matrix products of another height may
    round differently), and every image's top-1 hit the same (a ViT in eval mode; 20 images in parts of 7,
    7, 6 and a last batch of 4)."""
    from mechvit.analysis.robustness import robustness_matrix
    from mechvit.model import HookedViT, HookedViTConfig

    torch.manual_seed(0)
    cfg = HookedViTConfig(img_size=(8, 8), patch_size=(4, 4), in_chans=1, num_classes=3, d_model=16,
                          n_layers=2, n_heads=2, d_head=8, d_mlp=32)  # fmt: skip
    models = {"a": HookedViT(cfg).eval(), "b": HookedViT(cfg).eval()}
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 3, (24,))
    kw = dict(seed=3, batch_size=20, device="cpu", progress=False, return_per_image=True)
    calls = []
    models["a"].register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    whole = robustness_matrix(models, x, y, ["gaussian_noise", "saturate"], [2], forward_batch=None, **kw)
    assert calls == [20, 4, 20, 4]  # clean, noise; saturate reuses the clean logits
    calls.clear()
    split = robustness_matrix(models, x, y, ["gaussian_noise", "saturate"], [2], forward_batch=8, **kw)
    assert calls == [7, 7, 6, 4] * 2
    for a, b in zip(whole[0], split[0], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (b[k] if isinstance(b[k], str) else pytest.approx(b[k], rel=1e-5, abs=1e-6)), k
    assert whole[1].keys() == split[1].keys()
    for k, pi in whole[1].items():
        assert torch.equal(pi["top1"], split[1][k]["top1"]), k
        for m, v in pi.items():
            torch.testing.assert_close(v, split[1][k][m], rtol=1e-5, atol=1e-6, msg=str((k, m)))


def test_robustness_matrix_runs_hooked_vits_readout_only_with_the_full_forwards_numbers():
    """A HookedViT is called with readout_only=True (its last block computes the class token's row only):
    the rows equal those of full forwards to float rounding; a plain module is called as it is."""
    from mechvit.analysis import robustness as R
    from mechvit.model import HookedViT, HookedViTConfig

    torch.manual_seed(0)
    cfg = HookedViTConfig(img_size=(8, 8), patch_size=(4, 4), in_chans=1, num_classes=3, d_model=16,
                          n_layers=2, n_heads=2, d_head=8, d_mlp=32)  # fmt: skip
    vit = HookedViT(cfg).eval()
    seen = []
    vit.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 3, (24,))
    kw = dict(seed=3, batch_size=12, device="cpu", progress=False, return_per_image=True)
    fast = R.robustness_matrix({"a": vit}, x, y, ["gaussian_noise"], [2], **kw)
    assert set(seen) == {1}  # the class token's row only

    class Full(torch.nn.Module):  # a forward without readout_only: called as it is
        def __init__(self):
            super().__init__()
            self.vit = vit

        def forward(self, t):
            return self.vit(t)

    full = R.robustness_matrix({"a": Full()}, x, y, ["gaussian_noise"], [2], **kw)
    assert set(seen) == {1, cfg.n_tokens}
    for a, b in zip(fast[0], full[0], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (b[k] if isinstance(b[k], str) else pytest.approx(b[k], rel=1e-5, abs=1e-6)), k
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()
    assert R._readout_only(linear) is linear


def test_a_tiny_study_scores_each_fine_tunes_seen_corruption_at_its_trained_severity(tmp_path):
    """End to end through the robustness step: the cards say blur at 2, noise at 1 and 4; the study scores
    severity 4 for every corruption, plus blur/2 and noise/1 (only those) for the fine-tune trained there, the base
    and the clean control (the models the seen-gain claim compares)."""
    import json

    import timm

    from mechvit.study import run_study
    from mechvit.study.config import study_config_from_dict
    from mechvit.training.checkpoint import save_checkpoint

    arch = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    models = [("base", None), ("ft_blur", (["gaussian_blur"], [2])), ("ft_noise", (["gaussian_noise"], [1, 4])),
              ("ctrl", None)]  # fmt: skip
    ck = {}
    for i, (name, tuned) in enumerate(models):
        torch.manual_seed(i)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **arch)
        corr = {"seen": tuned[0], "severities": tuned[1], "p": 1.0} if tuned else None
        save_checkpoint(tmp_path / name, m, {"model": {"name": "vit_tiny_patch16_224", "kwargs": arch},
                                             "config": {"corruption": corr}})  # fmt: skip
        ck[name] = str(tmp_path / name)
    cfg = study_config_from_dict({
        "name": "tiny", "progress": False, "num_threads": 1,
        "models": {"base": {"name": "base", "checkpoint": ck["base"]},
                   "finetuned": [{"name": n, "checkpoint": ck[n]} for n in ("ft_blur", "ft_noise", "ctrl")]},
        "conditions": [{"corruption": "gaussian_blur", "severity": 4}],
        "robustness": {"corruptions": ["gaussian_blur", "gaussian_noise", "contrast"], "severities": [4],
                       "n_images": 40, "batch_size": 40},
        "sae": {"store": {"hook": "blocks.1.hook_resid_post"}},  # the default's hook: the tiny model has 2 blocks
    })  # fmt: skip
    run_study(cfg, tmp_path / "out", only=["robustness"])
    rob = json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"]["robustness"]["metrics"]
    assert rob["trained_severities"] == {"ft_blur": [2], "ft_noise": [1, 4]}
    extra = {(r["model"], r["corruption"], r["severity"]) for r in rob["trained_rows"]}
    assert extra == {(m, c, s) for c, s, ft in (("gaussian_blur", 2, "ft_blur"), ("gaussian_noise", 1, "ft_noise"))
                     for m in ("base", ft, "ctrl")}  # fmt: skip
    assert {r["severity"] for r in rob["rows"]} == {0, 4}  # the matrix itself stays at the study's severity
    est = rob["estimates"]
    assert est["ft_blur"]["groups"]["seen_trained"] == ["gaussian_blur/2"]
    assert est["ft_noise"]["groups"]["seen_trained"] == ["gaussian_noise/1", "gaussian_noise/4"]
    assert est["ft_blur"]["groups"]["seen"] == ["gaussian_blur/4"]
    assert len(est["base"]["groups"]["all_corrupted"]) == 3  # no trained-severity cell among the base's
    assert set(est["ft_blur"]["vs"]["ctrl"]) >= {"seen_trained", "seen"}
    # ft_noise was not scored on blur/2: no difference on ft_blur's trained-severity group against it
    assert (
        "seen_trained" not in est["ft_blur"]["vs"]["ft_noise"] and "seen" in est["ft_blur"]["vs"]["ft_noise"]
    )
    cells = {(t["model"], t["reference"], t["cell"]) for t in rob["mcnemar"]}
    assert ("ft_blur", "base", "gaussian_blur/2") in cells and (
        "ft_noise",
        "ctrl",
        "gaussian_noise/1",
    ) in cells
    assert all(t["p_value"] <= t["p_holm"] <= 1 for t in rob["mcnemar"])
    assert set(rob["corruption_error_cis"]["ft_blur"]) == {"mCE", "relative_mCE"}
    assert set(rob["metric_cis"]) == {f"{m}|{i}" for m in ("base", "ft_blur", "ft_noise", "ctrl")
                                      for i in ("clean", "gaussian_blur/4")}  # fmt: skip


def test_severity_note_points_to_the_trained_severity_rows_once_they_are_scored():
    from types import SimpleNamespace

    from mechvit.study.report import severity_note

    card = {"config": {"corruption": {"seen": ["gaussian_blur"], "severities": [1], "p": 1.0}}}
    infos = {"base": SimpleNamespace(card={}), "blur1": SimpleNamespace(card=card)}
    old = severity_note(infos, {"severities": [4]})
    assert "not the trained condition" in old  # scored at severity 4 only: the caveat stays
    new = severity_note(infos, {"severities": [4], "trained_severities": {"blur1": [1]}})
    assert "blur1 (trained at 1)" in new and "'seen, trained severity' rows and the seen-gain claim" in new


def test_summary_labels_both_seen_groups_when_the_trained_severity_is_scored():
    from mechvit.study.summary import robustness_md

    e = {"estimate": 0.5, "low": 0.4, "high": 0.6}
    est = {
        "base": {"seen": [], "accuracy": {"clean": e}, "vs": {}},
        "ft": {"seen": ["gaussian_blur"], "accuracy": {"clean": e, "seen_trained": e, "seen": e},
               "vs": {"base": {"clean": e, "seen_trained": e, "seen": e}}},
    }  # fmt: skip
    md = "\n".join(robustness_md({"robustness": {"estimates": est, "n_images": 10, "severities": [4]}}))
    assert "| model | fine-tuned on | clean | seen, trained severity | seen, severity 4 |" in md
    assert "| model | reference | clean | seen, trained severity | seen, severity 4 |" in md
