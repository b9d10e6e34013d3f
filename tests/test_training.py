"""Training, fine-tuning, checkpoints and configs (tiny models, tiny data)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from mechvit.training import TrainConfig, load_checkpoint, load_config, read_card, train
from mechvit.training.checkpoint import TRAIN_STATE, sha256_file
from mechvit.training.config import (
    AugmentConfig,
    CorruptionFinetune,
    DataConfig,
    EvalConfig,
    ModelSpec,
    PGDConfig,
    from_dict,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0
)


def toy_data(n: int, seed: int = 0, size: int = 8, channels: int = 1):
    """Three classes: a bright horizontal bar, a vertical bar, or a square, on a dim noisy background."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.2 * torch.rand(n, channels, size, size, generator=g)
    pos = torch.randint(1, size - 3, (n,), generator=g)
    for i in range(n):
        p = int(pos[i])
        if y[i] == 0:
            x[i, :, p, :] += 0.7
        elif y[i] == 1:
            x[i, :, :, p] += 0.7
        else:
            x[i, :, p : p + 3, p : p + 3] += 0.7
    return x.clamp(0, 1), y


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        out=str(tmp_path / "ckpt"), model=ModelSpec(kwargs=dict(TINY)), epochs=2, batch_size=16, lr=3e-3,
        warmup_epochs=0.5, num_threads=None, eval=None, augment=AugmentConfig(crop_padding=0, hflip=False),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def weights(directory) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(directory) / "model.safetensors"))


# --------------------------------------------------------------------------------------------- configs


def test_config_unknown_key_and_wrong_type_name_the_key(tmp_path):
    # one line: the file, the full key path, what was expected and what was given
    p = tmp_path / "c.yaml"
    p.write_text("out: x\nmodel: {name: vit_tiny_patch16_224}\nepochz: 3\n")
    with pytest.raises(ValueError, match=rf"^{p}: epochz: unknown key; expected one of out, model, .*epochs"):
        load_config(p)
    p.write_text("out: x\nmodel: {name: vit_tiny_patch16_224}\naugment: {crop_pad: 3}\n")
    with pytest.raises(
        ValueError, match=r": augment\.crop_pad: unknown key; expected one of crop_padding, hflip$"
    ):
        load_config(p)
    p.write_text("out: x\nmodel: {name: vit_tiny_patch16_224}\nepochs: three\n")
    with pytest.raises(ValueError, match=r": epochs: expected int, got str 'three'$"):
        load_config(p)
    p.write_text(
        "out: x\nmodel: {name: vit_tiny_patch16_224}\ncorruption: {seen: [gaussian_blur], severities: [x]}\n"
    )
    with pytest.raises(ValueError, match=r": corruption\.severities\[0\]: expected int, got str 'x'$"):
        load_config(p)
    p.write_text("out: x\nmodel: vit_tiny_patch16_224\n")
    with pytest.raises(
        ValueError, match=r": model: expected a mapping \(ModelSpec\), got str 'vit_tiny_patch16_224'$"
    ):
        load_config(p)
    p.write_text("model: {name: vit_tiny_patch16_224}\n")
    with pytest.raises(ValueError, match=r": out: missing required key$"):
        load_config(p)
    with pytest.raises(ValueError, match=r"^epochs\.x: cannot set a key inside 'epochs', which is int"):
        load_config(p, overrides={"out": "x", "epochs": 3, "epochs.x": 1})
    p.write_text("out: [unclosed\n")
    with pytest.raises(ValueError, match=r"not valid YAML \(.* at line 2, column 1\)"):
        load_config(p)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_values_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("out: x\nmodel: {name: vit_tiny_patch16_224, kwargs: {depth: 2}}\nlr: 1e-3\nepochs: 4\n")
    cfg = load_config(p, overrides={"epochs": 1, "augment.hflip": False})
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.epochs == 1 and cfg.augment.hflip is False and cfg.model.kwargs == {"depth": 2}
    with pytest.raises(ValueError, match="needs `model`"):
        TrainConfig(out="x")
    with pytest.raises(ValueError, match="corruption.seen"):
        TrainConfig(out="x", init_from="y", corruption=CorruptionFinetune(seen=[]))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(out="x", init_from="y", adversarial=PGDConfig(steps=0))


def _config_error(tmp_path, body: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text("out: x\nmodel: {name: vit_tiny_patch16_224}\n" + body)
    with pytest.raises(ValueError) as e:
        load_config(p)
    return str(e.value)


def test_config_rejects_settings_that_break_optimisation(tmp_path):
    """Each was accepted: grad_clip -1 made clip_grad_norm_ flip the gradients (ascent), min_lr < 0 or > lr
    made the cosine schedule end negative or rise, and the others silently did something else."""
    cases = {
        "grad_clip: -1": r"grad_clip must be a finite number > 0 \(the largest gradient norm\) or null "
        r"\(no clipping\), got -1\.0$",
        "grad_clip: 0": r"grad_clip must be .* or null \(no clipping\), got 0\.0$",
        "min_lr: -1.0e-3": r"min_lr must be in \[0, lr=0\.001\] \(the cosine schedule decays from lr to "
        r"min_lr\), got -0\.001$",
        "lr: 3.0e-4\nmin_lr: 1.0e-2": r"min_lr must be in \[0, lr=0\.0003\] .*got 0\.01$",
        "weight_decay: -0.05": r"weight_decay must be a finite number >= 0, got -0\.05$",
        "lr: .inf": r"lr must be a finite number > 0, got inf$",
        "lr: .nan": r"lr must be > 0, got nan$",
        "augment: {crop_padding: -1}": r"augment\.crop_padding must be >= 0 pixels \(0: no random crop\), got -1$",
    }
    for body, message in cases.items():
        assert re.search(rf"c\.yaml: TrainConfig: {message}", _config_error(tmp_path, body + "\n")), body
    ok = TrainConfig(out="x", init_from="y", grad_clip=None, lr=1e-3, min_lr=1e-3, weight_decay=0.0)
    assert ok.grad_clip is None and TrainConfig(out="x", init_from="y", min_lr=0.0).min_lr == 0.0


def test_config_validates_corruption_and_eval_names_and_severities_on_load(tmp_path):
    """docs/training.md: configs are validated on load. A misspelt corruption or a severity outside 1..5 used to
    fail at the first corrupted batch (never with p = 0), and in ``eval`` only after every epoch."""
    names = "expected one of gaussian_noise, shot_noise, .*, saturate"
    cases = {
        "corruption: {seen: [gaussian_blur, gausian_blur], severities: [3], p: 0.0}": (
            rf"corruption\.seen\[1\]: unknown corruption 'gausian_blur'; {names}; "
            r"did you mean 'gaussian_blur' or 'glass_blur'\?$"
        ),
        "corruption: {seen: [gaussian_blur], severities: [0]}": (
            r"corruption\.severities\[0\]: severity must be an integer in 1\.\.5, got 0$"
        ),
        "corruption: {seen: [gaussian_blur], severities: [3, 7]}": r"corruption\.severities\[1\]: .* got 7$",
        "eval: {corruptions: [fogg]}": (
            rf"eval\.corruptions\[0\]: unknown corruption 'fogg'; {names}; did you mean 'fog'\?$"
        ),
        "eval: {corruptions: [smog]}": rf"eval\.corruptions\[0\]: unknown corruption 'smog'; {names}$",
        "eval: {severities: [1, 9]}": r"eval\.severities\[1\]: severity must be an integer in 1\.\.5, got 9$",
        "eval: {n_test: 0}": r"eval\.n_test must be null \(every test image\) or an integer >= 1, got 0$",
        "eval: {n_test: -5}": r"eval\.n_test must be null .* got -5$",
        "eval: {batch_size: 0}": r"eval\.batch_size must be >= 1, got 0$",
    }
    for body, message in cases.items():
        assert re.search(rf"c\.yaml: TrainConfig: {message}", _config_error(tmp_path, body + "\n")), body
    p = tmp_path / "ok.yaml"
    p.write_text("out: x\nmodel: {name: m}\neval: {corruptions: null, n_test: null, severities: [5]}\n")
    assert load_config(p).eval.n_test is None  # null: every test image
    p.write_text("out: x\nmodel: {name: m}\neval: {corruptions: [], n_test: 1}\n")
    assert load_config(p).eval.corruptions == []


def test_shipped_configs_load_and_express_the_seed_paper_protocol():
    base = load_config(REPO / "configs/train_base.yaml")
    assert base.model.kwargs["img_size"] == 28 and base.model.kwargs["patch_size"] in (4, 7)
    fts = {p.stem: load_config(p) for p in sorted((REPO / "configs").glob("finetune_*.yaml"))}
    grid = {(f.corruption.seen[0], f.corruption.severities[0]) for f in fts.values() if f.corruption}
    assert {(c, s) for c in ("gaussian_blur", "gaussian_noise") for s in (1, 2, 4)} <= grid
    assert base.out == "checkpoints/fmnist_vit_base" and base.init_from is None and base.corruption is None
    for f in fts.values():
        assert f.init_from == base.out and f.model is None


# --------------------------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_learns(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=4)
    out = train(cfg, data=(toy_data(384), toy_data(96, seed=1)), progress=False)
    card = read_card(out)
    losses = [h["train_loss"] for h in card["history"]]
    assert losses[-1] < losses[0] - 0.2, losses
    assert card["clean"]["top1"] > 0.8  # chance is 1/3
    assert not (out / TRAIN_STATE).exists()  # keep_state=False removes the resumable state at the end


def test_empty_split_is_a_clear_error_before_training(tmp_path):
    """An empty training set used to raise ZeroDivisionError after epoch 1, an empty test set AttributeError
    after a full epoch: both now stop before training, naming the split, and leave nothing in ``out``."""
    x, y = toy_data(32)
    for train_data, test_data, split in (((x[:0], y[:0]), (x, y), "train"), ((x, y), (x[:0], y[:0]), "test")):
        cfg = tiny_cfg(tmp_path / split)
        with pytest.raises(ValueError, match=rf"^the {split} split is empty \(0 images\) in the data passed"):
            train(cfg, data=(train_data, test_data), progress=False)
        assert not Path(cfg.out).exists() or not any(Path(cfg.out).iterdir())


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    data = (toy_data(160), toy_data(32, seed=1))
    full = train(tiny_cfg(tmp_path / "a"), data=data, progress=False)

    class Interrupt(Exception):
        pass

    def stop(epoch, record):
        if epoch == 1:
            raise Interrupt

    cfg = tiny_cfg(tmp_path / "b")
    with pytest.raises(Interrupt):
        train(cfg, data=data, progress=False, on_epoch_end=stop)
    assert (Path(cfg.out) / TRAIN_STATE).exists() and not (Path(cfg.out) / "card.json").exists()
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG of the new process
    resumed = train(cfg, data=data, progress=False)
    wa, wb = weights(full), weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ha, hb = read_card(full)["history"], read_card(resumed)["history"]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_resume_refuses_a_state_of_another_config(tmp_path):
    data = (toy_data(64), toy_data(32, seed=1))
    cfg = tiny_cfg(tmp_path, keep_state=True, epochs=1)
    train(cfg, data=data, progress=False)
    with pytest.raises(ValueError, match="different config"):
        train(tiny_cfg(tmp_path, keep_state=True, epochs=1, lr=1e-4), data=data, progress=False)


def test_card_contents_and_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg(
        tmp_path, epochs=1, eval=EvalConfig(corruptions=["gaussian_noise"], severities=[1, 5], n_test=32)
    )
    out = train(cfg, data=(toy_data(64), toy_data(48, seed=1)), progress=False)
    card = json.loads((out / "card.json").read_text())
    assert card["model"] == {"name": "vit_tiny_patch16_224", "kwargs": TINY}
    assert card["weights"]["sha256"] == sha256_file(out / "model.safetensors")
    assert card["seed"] == 0 and card["epochs"] == 1 and len(card["history"]) == 1
    assert card["wall_time_s"] > 0 and card["config"]["lr"] == cfg.lr
    from mechvit.runtime import machine_fingerprint  # the machine the wall time was measured on

    assert card["environment"]["machine"] == json.loads(json.dumps(machine_fingerprint("cpu")))
    assert card["data"]["n_train"] == 64 and card["data"]["n_test"] == 48
    assert set(card["corruption_top1"]) == {"gaussian_noise"}
    assert set(card["corruption_top1"]["gaussian_noise"]) == {"1", "5"}
    assert card["evaluation"]["n_test"] == 32 and card["evaluation"]["n_test_clean"] == 48
    assert 0 <= card["clean"]["top1"] <= 1 and card["clean"]["nll"] > 0
    # rebuild from the card alone: same logits as a timm model given the same weights
    m = load_checkpoint(out)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    ref.load_state_dict(weights(out))
    x = toy_data(8, seed=2)[0]
    assert torch.equal(m(x), ref(x))
    from mechvit import HookedViT

    with torch.no_grad():  # the documented way to hook a checkpoint
        torch.testing.assert_close(HookedViT.from_timm(load_checkpoint(out))(x), m(x), atol=1e-5, rtol=1e-5)
    # the card's clean accuracy is the model's accuracy on the test set
    xt, yt = toy_data(48, seed=1)
    with torch.no_grad():
        assert card["clean"]["top1"] == pytest.approx(
            (m(xt).argmax(-1) == yt).float().mean().item(), abs=1e-4
        )


def test_wrong_architecture_and_damaged_files_give_clear_errors(tmp_path):
    out = train(tiny_cfg(tmp_path, epochs=1), data=(toy_data(32), toy_data(16, seed=1)), progress=False)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, "embed_dim": 48})
    with pytest.raises(ValueError, match=r"model\.safetensors.*shape mismatch.*cls_token"):
        load_checkpoint(out, model=other)
    deeper = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, "depth": 2})
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['blocks\.1\."):
        load_checkpoint(out, model=deeper)
    # a card that claims another architecture
    card = read_card(out)
    card["model"]["kwargs"]["num_classes"] = 10
    (out / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(3, 32\) vs model \(10, 32\)"):
        load_checkpoint(out)
    # a truncated weights file
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(out)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(out, verify=False)


# --------------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def noisy_toy():
    """Fashion-MNIST-free toy: the bars/squares task, where heavy gaussian noise hurts a clean-trained model."""
    return toy_data(480, seed=0, size=16), toy_data(240, seed=1, size=16)


def _top1_under(model, x, y, name, severity):
    from mechvit.corruptions import corrupt

    with torch.no_grad():
        xc = corrupt(x, name, severity, seed=7)
        return (model(xc).argmax(-1) == y).float().mean().item()


def test_corruption_finetuning_raises_accuracy_on_the_seen_corruption(tmp_path, noisy_toy):
    kw = {**TINY, "img_size": 16}
    train_data, test_data = noisy_toy
    base = train(
        tiny_cfg(tmp_path / "base", model=ModelSpec(kwargs=kw), epochs=4),
        data=noisy_toy, progress=False,
    )  # fmt: skip
    ft_cfg = tiny_cfg(
        tmp_path / "ft", model=None, init_from=str(base), epochs=2, lr=2e-3, warmup_epochs=0.0,
        corruption=CorruptionFinetune(seen=["gaussian_noise"], severities=[4], p=1.0),
    )  # fmt: skip
    ft = train(ft_cfg, data=noisy_toy, progress=False)
    card = read_card(ft)
    assert card["init_from"]["sha256"] == read_card(base)["weights"]["sha256"]
    assert all(h["corrupted_batches"] == 30 for h in card["history"])  # p=1: every batch corrupted
    before = _top1_under(load_checkpoint(base), *test_data, "gaussian_noise", 4)
    after = _top1_under(load_checkpoint(ft), *test_data, "gaussian_noise", 4)
    assert after > before + 0.12, (before, after)  # measured: 0.51 -> 0.74


def test_finetune_config_must_keep_the_checkpoint_architecture(tmp_path):
    base = train(
        tiny_cfg(tmp_path / "b", epochs=1), data=(toy_data(32), toy_data(16, seed=1)), progress=False
    )
    cfg = tiny_cfg(tmp_path / "f", model=ModelSpec(kwargs={**TINY, "depth": 3}), init_from=str(base))
    with pytest.raises(ValueError, match="differs from the architecture of init_from"):
        train(cfg, data=(toy_data(32), toy_data(16, seed=1)), progress=False)


def test_pgd_adversarial_training_runs_and_is_recorded(tmp_path):
    data = (toy_data(64), toy_data(32, seed=1))
    base = train(tiny_cfg(tmp_path / "b", epochs=1), data=data, progress=False)
    cfg = tiny_cfg(tmp_path / "adv", model=None, init_from=str(base), epochs=1,
                   adversarial=PGDConfig(eps=0.05, steps=2, step_size=0.03, p=1.0))  # fmt: skip
    out = train(cfg, data=data, progress=False)
    card = read_card(out)
    assert card["history"][0]["adversarial_batches"] == 4
    assert card["config"]["adversarial"]["eps"] == 0.05
    assert not torch.equal(weights(out)["head.weight"], weights(base)["head.weight"])


def test_training_a_hooked_vit(tmp_path):
    from mechvit import HookedViT

    hooked = HookedViT.from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY))
    out = train(
        tiny_cfg(tmp_path, epochs=2), model=hooked, data=(toy_data(96), toy_data(32, seed=1)), progress=False
    )
    card = read_card(out)
    assert card["history"][-1]["train_loss"] < card["history"][0]["train_loss"]
    x = toy_data(4, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(out)(x), hooked.eval()(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- ImageFolder


def write_image_folder(root: Path, n_per_class: int = 6, size: int = 20) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("bars", "columns")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n_per_class):
                a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                if c == 0:
                    a[size // 2 - 2 : size // 2 + 2] = 230
                else:
                    a[:, size // 2 - 2 : size // 2 + 2] = 230
                Image.fromarray(a).save(d / f"{i}.png")


def test_imagefolder_pretrained_style_model_with_normalization(tmp_path):
    write_image_folder(tmp_path / "imgs")
    kw = dict(img_size=16, patch_size=8, in_chans=3, num_classes=2, embed_dim=16, depth=1, num_heads=2)
    data = DataConfig(dataset="imagefolder", root=str(tmp_path / "imgs"), test_split="val", img_size=16,
                      mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])  # fmt: skip
    cfg = tiny_cfg(tmp_path, model=ModelSpec(kwargs=kw), data=data, epochs=2, batch_size=4,
                   eval=EvalConfig(corruptions=["gaussian_blur"], severities=[2]))  # fmt: skip
    out = train(cfg, progress=False)
    card = read_card(out)
    assert card["data"]["n_train"] == 12 and card["data"]["n_test"] == 12
    assert card["data"]["mean"] == [0.485, 0.456, 0.406]
    assert "2" in card["corruption_top1"]["gaussian_blur"]
    ft = tiny_cfg(tmp_path / "ft", model=None, init_from=str(out), data=data, epochs=1, batch_size=4,
                  corruption=CorruptionFinetune(seen=["gaussian_blur"], severities=[2], p=1.0))  # fmt: skip
    assert read_card(train(ft, progress=False))["history"][0]["corrupted_batches"] == 3


def test_imagefolder_eval_n_test_takes_every_class(tmp_path, monkeypatch):
    """eval.n_test of an ImageFolder test set (in class order) takes the stratified subset, as data.limit_test
    does: the first 4 of 2 x 6 images used to be class 0 only, so the card's corruption top-1 saw one class."""
    import importlib

    train_module = importlib.import_module("mechvit.training.train")  # the package's `train` is the function

    write_image_folder(tmp_path / "imgs")
    kw = dict(img_size=16, patch_size=8, in_chans=3, num_classes=2, embed_dim=16, depth=1, num_heads=2)
    data = DataConfig(dataset="imagefolder", root=str(tmp_path / "imgs"), test_split="val", img_size=16)
    seen_labels = []
    real = train_module.robustness_matrix

    def spy(models, x, y, *args, **kwargs):
        if kwargs.get("include_clean", True) is False:
            seen_labels.append(y.tolist())
        return real(models, x, y, *args, **kwargs)

    monkeypatch.setattr(train_module, "robustness_matrix", spy)
    cfg = tiny_cfg(tmp_path, model=ModelSpec(kwargs=kw), data=data, epochs=1, batch_size=4,
                   eval=EvalConfig(corruptions=["gaussian_blur"], severities=[2], n_test=4))  # fmt: skip
    card = read_card(train(cfg, progress=False))
    assert card["evaluation"]["n_test"] == 4 and card["evaluation"]["n_test_clean"] == 12
    assert len(seen_labels) == 1 and sorted(seen_labels[0]) == [0, 0, 1, 1]


def test_config_from_dict_matches_dataclass_defaults():
    cfg = from_dict(TrainConfig, {"out": "x", "model": {"name": "vit_small_patch16_224"}})
    assert cfg == TrainConfig(out="x", model=ModelSpec(name="vit_small_patch16_224"))
