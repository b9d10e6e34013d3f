"""Edge cases of mechvit.sae found by an audit: the command line's input normalisation, held-out and mix
options and error lines; models in other dtypes; SAETrainingConfig's checks and run length; encode with a
NaN JumpReLU threshold."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from mechvit import HookedViT
from mechvit.sae import SAETrainingConfig, encode, spliced_kl_per_image, spliced_metrics, train_sae
from mechvit.sae.activations import hook_width

ARCH = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
HOOK = "blocks.1.hook_resid_pre"
MEAN, STD = [0.5], [0.01]  # far from the identity: a model fed raw [0, 1] images sees other inputs


def tiny_timm(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH).eval()


def tiny_model(seed: int = 0) -> HookedViT:
    return HookedViT.from_timm(tiny_timm(seed)).eval()


def images(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def checkpoint(path: Path, mean=MEAN, std=STD) -> Path:
    """A mechvit training checkpoint whose card says its images were normalised with ``mean``/``std``."""
    from mechvit.training.checkpoint import save_checkpoint

    card = {
        "model": {"name": "vit_tiny_patch16_224", "kwargs": dict(ARCH)},
        "config": {"data": {"mean": mean, "std": std}},
    }
    save_checkpoint(path, tiny_timm(), card)
    return path


@pytest.fixture
def fake_fmnist(monkeypatch):
    """load_fashion_mnist -> 64 random train / 32 random test images (the command line reads it at call time)."""
    import mechvit.data

    def load(split: str, root=None):
        return images(64 if split == "train" else 32, seed=1 if split == "train" else 2)

    monkeypatch.setattr(mechvit.data, "load_fashion_mnist", load)


def cli_args(ck: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint", str(ck), "--hook", HOOK, "--out", str(out), "--images", "16", "--heldout", "8",
        "--samples", "512", "--batch-size", "128", "--expansion", "2", "--k", "4", "--threads", "1", *extra,
    ]  # fmt: skip


# ---- 1. the checkpoint's normalisation reaches training, the held-out cache and the spliced metrics -------


def test_cli_normalises_like_the_checkpoint_was_trained(tmp_path, fake_fmnist, monkeypatch):
    import mechvit.sae.__main__ as cli

    seen: dict[str, object] = {}

    def spy(name, fn):
        def wrapped(*a, **kw):
            seen[name] = kw.get("transform")
            return fn(*a, **kw)

        monkeypatch.setattr(cli, name, wrapped)

    for name in ("train_sae_for_hook", "cache_activations", "spliced_metrics"):
        spy(name, getattr(cli, name))
    ck = checkpoint(tmp_path / "ck")
    summary = cli.main(cli_args(ck, tmp_path / "sae"))
    x = torch.full((1, 1, 28, 28), 0.25)
    want = (x - MEAN[0]) / STD[0]
    for name in ("train_sae_for_hook", "cache_activations", "spliced_metrics"):
        assert seen[name] is not None, f"{name} got no transform"
        torch.testing.assert_close(seen[name](x), want)
    # the spliced accuracy is the model's on normalised images
    m = cli_model(ck)
    test_x, test_y = images(32, seed=2)
    test_x, test_y = test_x[:8], test_y[:8]
    with torch.no_grad():
        acc = float((m((test_x - MEAN[0]) / STD[0]).argmax(-1) == test_y).float().mean())
    assert summary["accuracy_clean"] == pytest.approx(acc)
    manifest = json.loads((tmp_path / "sae" / "mechvit_sae.json").read_text())
    assert "normalised" in manifest["dataset"] and manifest["input_normalisation"] == {
        "mean": MEAN,
        "std": STD,
    }


def test_cli_does_not_reuse_a_cache_written_without_the_normalisation(tmp_path, fake_fmnist):
    from mechvit.sae.__main__ import main
    from mechvit.training.checkpoint import read_card, update_card

    ck = checkpoint(tmp_path / "ck", mean=None, std=None)
    main(cli_args(ck, tmp_path / "sae", "--cache", str(tmp_path / "acts")))
    # the same weights (same model fingerprint), now with the normalisation it was trained with
    update_card(ck, config={**read_card(ck)["config"], "data": {"mean": MEAN, "std": STD}})
    with pytest.raises(ValueError, match=r"different activation cache \(differs in \['dataset'\]\)"):
        main(cli_args(ck, tmp_path / "sae2", "--cache", str(tmp_path / "acts")))


def test_cache_activations_command_normalises_like_the_checkpoint(tmp_path, monkeypatch):
    import mechvit.data.loading
    from mechvit.sae import ActivationStoreConfig, CachedActivations, cache_activations
    from mechvit.sae.__main__ import cache_main

    monkeypatch.setattr(mechvit.data.loading, "load_split", lambda cfg, split, model=None: images(8))
    ck = checkpoint(tmp_path / "ck")
    argv = ["--checkpoint", str(ck), "--hook", HOOK, "--out", str(tmp_path / "acts"), "--quiet"]
    cache_main([*argv, "--device", "cpu", "--dtype", "float32"])
    got = CachedActivations(tmp_path / "acts")
    assert "normalised mean=[0.5] std=[0.01]" in got.manifest["dataset"]
    want = cache_activations(
        cli_model(ck), images(8)[0], tmp_path / "direct", ActivationStoreConfig(hook=HOOK), dtype="float32",
        transform=lambda x: (x - MEAN[0]) / STD[0],
    )  # fmt: skip
    torch.testing.assert_close(got.rows(), want.rows())
    with pytest.raises(SystemExit):  # corruptions with no mix fraction
        cache_main([*argv, "--corruption", "gaussian_blur:2"])


def cli_model(ck: Path) -> HookedViT:
    from mechvit.sae.__main__ import load_model

    return load_model(str(ck), "cpu")


# ---- 2. a bfloat16 / float64 model ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_hook_width_and_splices_on_a_model_in_another_dtype(dtype):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    model = tiny_model().to(dtype)
    assert hook_width(model, HOOK, "patches") == 32
    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=64))
    x, y = images(6)

    def to(t):
        return t.to(dtype)

    assert spliced_metrics(model, sae, x, y, HOOK, transform=to).n_images == 6
    assert spliced_kl_per_image(model, sae, x, HOOK, transform=to).shape == (6,)


# ---- 3. SAETrainingConfig refuses values that break or silently change training --------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(lr_end=-1e-3), r"lr_end must be a number in \[0, lr\].*got -0.001"),
        (dict(lr=1e-3, lr_end=5e-2), r"lr_end must be a number in \[0, lr\] = \[0, 0.001\].*got 0.05"),
        (dict(dead_feature_window=-3), "dead_feature_window must be an integer >= 1.*got -3"),
        (dict(dead_feature_window=0), "dead_feature_window must be an integer >= 1.*got 0"),
        (dict(topk_threshold_lr=3.0), r"topk_threshold_lr must be a number in \(0, 1\].*got 3.0"),
        (dict(topk_threshold_lr=0.0), r"topk_threshold_lr must be a number in \(0, 1\].*got 0.0"),
        (dict(architecture="standard", l1_coefficient=-5.0), "l1_coefficient must be a finite number >= 0"),
        (dict(aux_coefficient=-1.0), "aux_coefficient must be a finite number >= 0, got -1.0"),
        (dict(l0_coefficient=float("nan")), "l0_coefficient must be a finite number >= 0, got nan"),
        (dict(expansion_factor=1.5), "expansion_factor must be >= 1 and an integer, got 1.5"),
        (dict(architecture="topk", k=2.5), "k must be an integer for architecture 'topk', got 2.5"),
        (dict(k="4"), "k must be a number >= 1, got '4'"),
        (dict(k=0.5), "k must be a number >= 1, got 0.5"),
        (
            dict(architecture="jumprelu", jumprelu_bandwidth=0.0),
            "jumprelu_bandwidth must be a finite number > 0",
        ),
        (dict(jumprelu_init_threshold=-1.0), "jumprelu_init_threshold must be a finite number >= 0"),
        (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
        (dict(lr="1e-3"), "lr must be a finite number > 0, got '1e-3'"),
        (dict(decoder_init_norm=-1.0), "decoder_init_norm must be a finite number > 0 or None, got -1.0"),
        (dict(normalize_activations="expected_avg"), "normalize_activations must be one of"),
        (dict(device="gpu"), "device must name a torch device.*got 'gpu'"),
        (dict(lr_warmup_steps=-1), "lr_warmup_steps must be >= 0 and an integer, got -1"),
        (dict(l1_warmup_steps=2.5), "l1_warmup_steps must be >= 0 and an integer, got 2.5"),
        (dict(threshold_batches=1.5), "threshold_batches must be >= 0 and an integer, got 1.5"),
        (
            dict(architecture="standard", threshold_batches=64),
            "threshold_batches re-estimates a BatchTopK SAE's inference threshold; architecture 'standard' has "
            "none to re-estimate: expected 0, got 64",
        ),
        (dict(architecture="topk", threshold_batches=1), "architecture 'topk' has none to re-estimate"),
        (dict(batch_size=64.0), "batch_size must be >= 1 and an integer, got 64.0"),
        (dict(seed=1.5), "seed must be an integer, got 1.5"),
        (dict(total_samples=100.5), "total_samples must be an integer, got 100.5"),
    ],
)
def test_training_config_refuses_nonsense(kw, match):
    with pytest.raises(ValueError, match=match):
        SAETrainingConfig(**kw)


def test_for_architecture_keeps_threshold_batches_for_batchtopk_alone():
    cfg = SAETrainingConfig(k=4, threshold_batches=8, lr=3e-3)
    assert cfg.for_architecture("batchtopk").threshold_batches == 8
    for arch in ("standard", "topk", "jumprelu"):
        other = cfg.for_architecture(arch, seed=3)
        assert (other.architecture, other.threshold_batches, other.seed, other.lr) == (arch, 0, 3, 3e-3)
    with pytest.raises(ValueError, match="k must be an integer for architecture 'topk'"):
        SAETrainingConfig(k=2.5).for_architecture("topk")  # the architecture's own checks run again


def test_training_config_accepts_what_sae_lens_accepts():
    SAETrainingConfig(architecture="batchtopk", k=2.5)  # a mean k per row: BatchTopK keeps k x rows per batch
    SAETrainingConfig(lr=1e-3, lr_end=0.0)
    SAETrainingConfig(lr=1e-3, lr_end=1e-3)
    SAETrainingConfig(topk_threshold_lr=1.0, dead_feature_window=1, jumprelu_init_threshold=0.0)
    SAETrainingConfig(architecture="standard", l1_coefficient=0.0, aux_coefficient=0.0)
    SAETrainingConfig(k=torch.tensor(4).item(), expansion_factor=__import__("numpy").int64(2))


def test_batchtopk_trains_with_a_fractional_k():
    g = torch.Generator().manual_seed(0)
    batches = (torch.randn(64, 8, generator=g) for _ in range(100))
    cfg = SAETrainingConfig(
        k=2.5, expansion_factor=2, batch_size=64, total_samples=64 * 8, n_batches_for_norm_estimate=2
    )
    trained = train_sae(batches, 8, cfg)
    assert trained.manifest["final_train_metrics"]["metrics/l0"] == pytest.approx(2.5)


# ---- 4. the run-length checks apply to the run length used, not a placeholder -----------------------------


def test_run_length_is_checked_against_the_total_actually_used():
    # the study's default: 980 steps of 1024 (total_samples set later with dataclasses.replace)
    cfg = SAETrainingConfig(batch_size=1024, lr_warmup_steps=500)
    assert cfg.total_samples is None and cfg.resolved_total_samples == 300_000
    run = dataclasses.replace(cfg, total_samples=980 * 1024)
    assert run.total_steps == 980
    with pytest.raises(ValueError, match=r"lr_warmup_steps must be in \[0, 400\).*got 500"):
        dataclasses.replace(cfg, total_samples=400 * 1024)
    with pytest.raises(ValueError, match=r"lr_warmup_steps must be in \[0, 292\)"):
        cfg.check_run_length()  # with the default run length
    cfg.check_run_length(980 * 1024)
    big = SAETrainingConfig(batch_size=400_000)  # fine until a run length is known
    with pytest.raises(ValueError, match=r"total_samples \(300000\) must be at least one batch"):
        big.total_steps  # noqa: B018
    dataclasses.replace(big, total_samples=800_000).check_run_length()
    with pytest.raises(ValueError, match="at least one batch"):
        SAETrainingConfig(batch_size=1024, total_samples=100)  # an explicit total is checked at once


def test_train_sae_checks_the_run_length_before_training():
    consumed = []

    def batches():
        while True:
            consumed.append(1)
            yield torch.randn(64, 8)

    cfg = SAETrainingConfig(batch_size=64, lr_warmup_steps=300_000 // 64, expansion_factor=2, k=4)
    with pytest.raises(ValueError, match="lr_warmup_steps must be in"):
        train_sae(batches(), 8, cfg)
    assert not consumed


def test_check_d_in():
    SAETrainingConfig(k=64, expansion_factor=2).check_d_in(32)
    SAETrainingConfig(architecture="standard", k=100, expansion_factor=2).check_d_in(32)  # k unused
    with pytest.raises(
        ValueError, match=r"k \(65\) must not exceed d_sae \(64 = expansion_factor 2 x d_in 32\)"
    ):
        SAETrainingConfig(k=65, expansion_factor=2).check_d_in(32)


def test_study_config_takes_a_warmup_that_fits_the_real_run():
    from mechvit.study.config import load_study_config

    # the default study: 980 steps per SAE; 500 of warmup used to be refused against a 300,000-sample placeholder
    cfg = load_study_config(None, {"sae.train.lr_warmup_steps": 500})
    assert cfg.sae.train.lr_warmup_steps == 500


# ---- 5, 6. --heldout 0, save before evaluating, --corruption without --mix --------------------------------


def test_cli_heldout_zero_trains_saves_and_skips_the_metrics(tmp_path, fake_fmnist):
    from mechvit.sae.__main__ import main

    args = cli_args(checkpoint(tmp_path / "ck"), tmp_path / "sae")
    args[args.index("--heldout") + 1] = "0"
    summary = main(args)
    assert "explained_variance" not in summary and "accuracy_clean" not in summary
    manifest = json.loads((tmp_path / "sae" / "mechvit_sae.json").read_text())
    assert "heldout_metrics" not in manifest and manifest["hook"] == HOOK
    args[args.index("--heldout") + 1] = "-1"
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2


def test_cli_saves_the_sae_before_evaluating_it(tmp_path, fake_fmnist, monkeypatch):
    import mechvit.sae.__main__ as cli

    def broken(*a, **kw):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(cli, "spliced_metrics", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        cli.main(cli_args(checkpoint(tmp_path / "ck"), tmp_path / "sae"))
    assert (tmp_path / "sae" / "sae_weights.safetensors").is_file()
    assert (tmp_path / "sae" / "mechvit_sae.json").is_file()


def test_cli_refuses_corruptions_that_would_not_be_applied(tmp_path, capsys):
    from mechvit.cli import main as mechvit_main
    from mechvit.sae.__main__ import main

    ck = tmp_path / "missing"  # refused before the model is read
    with pytest.raises(SystemExit) as e:
        main(cli_args(ck, tmp_path / "sae", "--corruption", "gaussian_noise:4"))
    assert e.value.code == 2
    assert "--corruption gaussian_noise:4 needs --mix > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(cli_args(ck, tmp_path / "sae", "--mix", "0.5"))
    assert "needs at least one --corruption" in capsys.readouterr().err
    assert (
        mechvit_main(["train-sae", *cli_args(ck, tmp_path / "sae", "--corruption", "gaussian_noise:4")]) == 2
    )
    assert "needs --mix > 0" in capsys.readouterr().err
    assert not (tmp_path / "sae").exists()


def test_cli_threshold_batches_goes_to_batchtopk_alone(tmp_path, capsys):
    import argparse

    from mechvit.sae.__main__ import _training_config, main

    with pytest.raises(SystemExit) as e:  # refused before the model (missing here) is read
        main(cli_args(tmp_path / "missing", tmp_path / "sae", "--architecture", "standard",
                      "--threshold-batches", "8"))  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--threshold-batches 8 re-estimates a BatchTopK SAE's inference threshold" in err
    assert "--architecture standard has none" in err
    with pytest.raises(SystemExit):  # on a cache too
        main(["--activations", str(tmp_path / "cache"), "--out", str(tmp_path / "o"), "--architecture",
              "standard", "topk", "--threshold-batches", "8"])  # fmt: skip
    assert "--architecture standard topk has none" in capsys.readouterr().err
    # one pass of batchtopk + standard: the BatchTopK SAE gets it, the other 0
    args = argparse.Namespace(k=4, expansion=2, aux=0.5, l1=1.0, lr=1e-3, threshold_batches=8, batch_size=128,
                              samples=512)  # fmt: skip
    assert _training_config(args, "batchtopk", 0, "cpu").threshold_batches == 8
    assert _training_config(args, "standard", 1, "cpu").threshold_batches == 0


# ---- 7. python -m mechvit.sae: one line for a user error --------------------------------------------------


def test_python_m_sae_prints_one_line_for_user_errors(tmp_path, capsys):
    from mechvit.sae.__main__ import _command

    code = _command(cli_args(tmp_path / "missing", tmp_path / "sae"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("python -m mechvit.sae: error:")
    assert _command(cli_args(tmp_path / "missing", tmp_path / "sae", "--device", "cudx")) == 2
    assert "--device: expected" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports torch, timm and sae-lens
def test_python_m_sae_exit_status_in_a_fresh_process(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "mechvit.sae", *cli_args(tmp_path / "missing", tmp_path / "sae")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("python -m mechvit.sae: error:")


# ---- 8. encode with a NaN JumpReLU threshold ---------------------------------------------------------------


def test_encode_matches_sae_lens_with_a_nan_threshold():
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=4, d_sae=3))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
        sae.threshold.copy_(torch.tensor([0.1, float("nan"), 0.1]))
    x = torch.randn(50, 4)
    with torch.no_grad():
        got, want = encode(sae, x), sae.encode(x)
    assert torch.equal(got, want) and not (got < 0).any()


def test_store_config_refuses_what_it_cannot_use():
    from mechvit.sae import ActivationStoreConfig
    from mechvit.sae.activations import CorruptionMix

    with pytest.raises(ValueError, match=r"severity must be an integer in 1\.\.5, got 9"):
        CorruptionMix(0.5, (("gaussian_noise", 9),))
    with pytest.raises(
        ValueError, match=r"'gaussian_noise': severity must be an integer in 1\.\.5, got float 2\.5"
    ):
        CorruptionMix(0.5, (("gaussian_noise", 2.5),))
    assert CorruptionMix(0.5, (("gaussian_noise", np.int64(4)),)).corruptions == (("gaussian_noise", 4),)
    with pytest.raises(ValueError, match="hook must be a hook name"):
        ActivationStoreConfig(hook=None)
    with pytest.raises(ValueError, match="seed must be an integer, got 1.5"):
        ActivationStoreConfig(hook="blocks.0.hook_resid_post", seed=1.5)


def test_cache_activations_cli_checks_images_and_limits_the_test_split(tmp_path, monkeypatch, capsys):
    """``--images`` is checked with its own name, and with ``--split test`` it limits the test split (a config
    field assigned after construction would skip DataConfig's checks)."""
    import mechvit.data.loading as loading
    import mechvit.sae.__main__ as cli

    with pytest.raises(SystemExit):
        cli.cache_main(["--checkpoint", "x", "--hook", HOOK, "--out", str(tmp_path / "c"), "--images", "0"])
    assert "--images must be >= 1" in capsys.readouterr().err

    seen = {}

    def fake_load_split(cfg, split):
        seen["cfg"], seen["split"] = cfg, split
        raise RuntimeError("stop here")

    monkeypatch.setattr(loading, "load_split", fake_load_split)
    args = ["--checkpoint", "x", "--hook", HOOK, "--out", str(tmp_path / "c"), "--device", "cpu"]
    with pytest.raises(RuntimeError, match="stop here"):
        cli.cache_main([*args, "--split", "test", "--images", "5"])
    assert seen["split"] == "test" and seen["cfg"].limit_test == 5
    with pytest.raises(RuntimeError, match="stop here"):
        cli.cache_main(
            [*args, "--dataset", "imagefolder", "--root", str(tmp_path), "--split", "val", "--images", "3"]
        )
    assert seen["split"] == "train" and seen["cfg"].train_split == "val" and seen["cfg"].limit_train == 3
