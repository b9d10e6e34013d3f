"""HookedViT on bad input and bad files: non-finite and empty batches, hand-edited config.json, changed weights,
an image size the patches do not divide, and the LayerNorm eps of a model converted back to timm."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import timm
import torch
from torch import nn

from mechvit import HookedViT
from mechvit.analysis.logit_lens import logit_lens
from tests.test_tl_compat import close, images, tiny


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_rejected(bad):
    model = HookedViT.from_timm(tiny()).eval()
    x = images(model, 4)
    x[2, 1, 5, 5] = bad
    with pytest.raises(
        ValueError, match=r"finite pixel values, got NaN or inf in 1 of 4 images \(batch indices \[2\]\)"
    ):
        model(x)
    with pytest.raises(ValueError, match="finite pixel values"):
        model.run_with_cache(x)
    model.check_finite = False  # opt out: the NaN then flows to the logits of that image only
    with torch.no_grad():
        out = model(x)
    assert not torch.isfinite(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()


def test_an_empty_batch_gives_empty_outputs_as_timm():
    ref = tiny()
    model = HookedViT.from_timm(ref).eval()
    x = images(model, 0)
    with torch.no_grad():
        out, cache = model.run_with_cache(x)
        assert out.shape == ref(x).shape == (0, 7)
    assert cache["blocks.1.hook_resid_post"].shape == (0, 17, 32)
    with pytest.raises(ValueError, match="at least one image, got an empty batch"):
        model(x, labels=torch.zeros(0, dtype=torch.long), return_type="loss")
    with pytest.raises(ValueError, match="images: expected at least one image, got 0 images"):
        logit_lens(model, x, torch.zeros(0, dtype=torch.long), progress=False)


def test_loss_return_type_checks_labels():
    model = HookedViT.from_timm(tiny()).eval()
    x = images(model)
    with pytest.raises(ValueError, match=r"needs labels: an integer tensor \[3\], got NoneType"):
        model(x, return_type="loss")
    with pytest.raises(ValueError, match=r"an integer tensor \[3\], got torch.float32 \(3,\)"):
        model(x, labels=torch.zeros(3), return_type="loss")
    with pytest.raises(ValueError, match="return_type must be one of"):
        model(x, return_type="probs")
    y = torch.tensor([1, 2, 3])
    logits, loss = model(x, labels=y, return_type="both")
    close(loss, torch.nn.functional.cross_entropy(logits, y), 0)
    assert model(x, return_type=None) is None


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("d_model", "32", "config.d_model: expected int, got str '32'"),
        ("eps", [1e-6], "config.eps: expected float, got list"),
        ("img_size", [32, 32, 3], r"config.img_size: expected a list of 2"),
        ("class_token", "yes", "config.class_token: expected bool, got str 'yes'"),
        ("act_fn", "relu", "config: act_fn must be one of"),
        ("d_modle", 32, "config.d_modle: unknown key"),
    ],
)
def test_a_hand_edited_config_gives_a_one_line_error_naming_the_key(tmp_path, key, value, message):
    HookedViT.from_timm(tiny()).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"][key] = value
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message) as e:
        HookedViT.from_pretrained(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path / "config.json") in str(e.value)


def test_changed_weights_fail_the_hash_recorded_at_save_time(tmp_path):
    from safetensors.torch import load_file, save_file

    model = HookedViT.from_timm(tiny())
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert len(meta["weights_sha256"]) == 64
    sd = load_file(tmp_path / "model.safetensors")
    sd["head.bias"] = sd["head.bias"] + 1  # same names and shapes, other values
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not match the sha256 recorded in config.json at save time"):
        HookedViT.from_pretrained(tmp_path)
    del meta["weights_sha256"]  # a folder written before the hash was recorded still loads
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert torch.equal(HookedViT.from_pretrained(tmp_path).head.bias, sd["head.bias"])


def test_save_pretrained_writes_with_the_users_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        HookedViT.from_timm(tiny()).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o644


def test_an_image_size_the_patches_do_not_divide_warns_how_much_is_ignored():
    ref = timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=2
    )
    with pytest.warns(UserWarning, match=r"img_size 28x28 is not divisible by patch_size 16x16.*67% of each"):
        model = HookedViT.from_timm(ref)
    assert model.cfg.grid_size == (1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # divisible, or padded: no warning
        HookedViT.from_timm(tiny())
        HookedViT.from_timm(tiny(img_size=28, patch_size=8, dynamic_img_size=True, dynamic_img_pad=True))


@pytest.mark.parametrize(
    "make",
    [
        lambda: tiny(norm_layer=functools.partial(nn.LayerNorm, eps=1e-5), qk_norm=True),
        lambda: timm.create_model(
            "vit_base_patch16_clip_quickgelu_224", pretrained=False, depth=1, img_size=32, num_classes=5
        ),
    ],
    ids=["tiny_eps_1e-5", "clip_quickgelu"],
)
def test_to_timm_model_keeps_layer_norm_eps(make):
    ref = make().eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    model = HookedViT.from_timm(ref)
    assert model.cfg.eps == 1e-5
    back = model.to_timm_model().eval()
    eps = {m.eps for m in back.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-5}
    x = torch.rand(2, 3, 32, 32) * 0.01  # small inputs make the eps matter
    with torch.no_grad():
        close(back(x), ref(x), 1e-5)
        close(model(x), ref(x), 1e-5)


def _sae_setup():
    from mechvit.sae.activations import ActivationStoreConfig
    from mechvit.sae.train import SAETrainingConfig

    torch.manual_seed(0)
    model = HookedViT.from_timm(tiny()).eval()
    store = ActivationStoreConfig(hook="blocks.0.hook_resid_post", model_batch_size=4, buffer_size=64)
    cfg = SAETrainingConfig(
        expansion_factor=1, k=4, batch_size=32, total_samples=64, n_batches_for_norm_estimate=1
    )
    return model, store, cfg


class _Deadline:
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def boom(*_):
            raise TimeoutError(f"still running after {self.seconds} s (hangs?)")

        self.old = signal.signal(signal.SIGALRM, boom)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def test_an_sae_trained_on_one_hook_is_refused_at_another_of_the_same_width(tmp_path):
    from mechvit.sae.metrics import splice_hook, spliced_kl_per_image, spliced_metrics
    from mechvit.sae.train import load_sae, train_sae_for_hook

    model, store, cfg = _sae_setup()
    x, y = images(model, 8), torch.arange(8) % 7
    train_sae_for_hook(model, x, store, cfg, out_dir=tmp_path / "sae")
    sae, manifest = load_sae(tmp_path / "sae")  # as a user gets it back from disk
    assert manifest["hook"] == sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    other = "blocks.1.hook_resid_post"  # same width (d_model), another space
    message = "trained on hook 'blocks.0.hook_resid_post' .*, not 'blocks.1.hook_resid_post'"
    with pytest.raises(ValueError, match=message):
        spliced_metrics(model, sae, x, y, other)
    with pytest.raises(ValueError, match=message):
        spliced_kl_per_image(model, sae, x, other)
    with pytest.raises(ValueError, match=message):
        splice_hook(sae, model.cfg, "patches", other)
    # and in every analysis that takes an SAE with a hook name
    from mechvit.analysis import activation_patching, attribution_patching
    from mechvit.analysis.features import feature_stats

    for fn in (activation_patching, attribution_patching):
        with pytest.raises(ValueError, match=message):
            fn(model, x, x.flip(0), y, component="sae", by="feature", sae=sae, sae_hook=other)
    with pytest.raises(ValueError, match=message):
        feature_stats(model, sae, x, y, [str(i) for i in range(10)], hook=other)
    with torch.no_grad():
        assert spliced_kl_per_image(model, sae, x, "blocks.0.hook_resid_post").shape == (8,)
    sae.cfg.metadata.hook_name = other  # applying it elsewhere on purpose
    assert spliced_kl_per_image(model, sae, x, other).shape == (8,)


def test_streaming_sae_training_on_zero_images_raises_instead_of_hanging():
    from mechvit.sae.train import train_sae_for_hook

    model, store, cfg = _sae_setup()
    with _Deadline(120):
        for empty in (images(model, 0), (images(model, 0), torch.zeros(0, dtype=torch.long)), []):
            with pytest.raises(ValueError, match="data has no images"):
                train_sae_for_hook(model, empty, store, cfg)
        # a one-shot generator: enough for one epoch (2 images x 16 patches), not for the 64 samples asked
        one_shot = (b for b in [images(model, 2)])
        with pytest.raises(ValueError, match="no images on pass 2: .* must be re-iterable"):
            train_sae_for_hook(model, one_shot, store, cfg)
        # a list of batches is read again every epoch
        assert train_sae_for_hook(model, [images(model, 2)], store, cfg).manifest["trained_samples"] == 64
        # the store's own stream, called directly, raises too (it looped forever before)
        from mechvit.sae.activations import stream_batches

        with pytest.raises(ValueError, match="epoch 0 of data gave no activations"):
            next(stream_batches(model, images(model, 0), store, 8))
        one_shot = (b for b in [images(model, 2)])
        with pytest.raises(ValueError, match="epoch 1 of data gave no activations.*one-shot iterator"):
            for _ in stream_batches(model, one_shot, store, 8):
                pass


def test_evaluate_and_patching_refuse_an_empty_batch_in_one_line():
    """0 images: a ValueError saying so (no ZeroDivisionError or traceback from deep inside)."""
    from mechvit.analysis.patching import activation_patching
    from mechvit.analysis.robustness import classification_metrics, robustness_matrix

    model = HookedViT.from_timm(tiny()).eval()
    x, y = images(model, 0), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="expected at least one image, got 0"):
        robustness_matrix({"m": model}, x, y, ["gaussian_noise"], [1], progress=False)
    with pytest.raises(ValueError, match="expected at least one image, got 0"):
        classification_metrics(torch.zeros(0, 7), y)
    with pytest.raises(ValueError, match="got 0 images"):
        activation_patching(model, x, x, y, component="resid_pre", by="layer", progress=False)
    with pytest.raises(ValueError, match="got 0"):
        logit_lens(model, x, y, progress=False)
