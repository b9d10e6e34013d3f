"""The GPU user's path, run on CPU at toy size: ``configs/imagenet_paper.yaml`` end to end and the fine-tune
command of its header comment, on a tiny ImageFolder in the ImageNet layout and randomly initialised depth-2
``vit_base_patch16_224`` checkpoints (224 px, 16 px patches, width 768, 12 heads, 1000 classes).

Only sizes are overridden (image counts, batch sizes, SAE width and batch, one severity and 7 of the 19
corruptions, no circuitsvis views, three patched token positions, 8 listed latents per SAE and no feature cards
in the explorer, the SAE hook's layer, which must exist in a 2-block model, one thread) plus what a machine
without the hub or a GPU needs (local checkpoints instead of timm's pretrained weights, device cpu). Every step
still runs on all seven models, both SAE architectures and two replicates (28 SAEs)."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mechvit.cli import main
from mechvit.training.checkpoint import load_checkpoint, read_card, save_checkpoint
from mechvit.viz.explorer import read_explorer_data

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "imagenet_paper.yaml"
WNIDS = ("n01440764", "n01443537", "n01484850")  # ImageNet synset folder names
ARCH = {"name": "vit_base_patch16_224", "kwargs": {"depth": 2}}


def write_imagenet(root: Path, per_class: int = 3) -> None:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: small JPEGs of varied sizes (the loader
    resizes and centre-crops them to 224)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = 40 + 8 * i, 56 - 4 * c
                arr = (rng.random((h, w, 3)) * 80 + 60 * c).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{wnid}_{split}_{i}.JPEG", quality=90)


def write_checkpoint(folder: Path, seed: int, seen: list[str]) -> None:
    torch.manual_seed(seed)
    model = timm.create_model(ARCH["name"], pretrained=False, **ARCH["kwargs"])
    card = {"model": ARCH, "config": {"corruption": {"seen": seen}}, "note": "random init (test fixture)"}
    save_checkpoint(folder, model, card)


@pytest.fixture
def imagenet_run(tmp_path, monkeypatch):
    """cwd = tmp_path with ./imagenet and ./checkpoints/imagenet_vitb16_* (the paths the config names)."""
    monkeypatch.chdir(tmp_path)
    write_imagenet(tmp_path / "imagenet")
    write_checkpoint(tmp_path / "checkpoints" / "imagenet_vitb16_base", 0, [])
    for i, (corruption, sev) in enumerate(
        (c, s) for c in ("gaussian_blur", "gaussian_noise") for s in (1, 2, 4)
    ):
        write_checkpoint(
            tmp_path / "checkpoints" / f"imagenet_vitb16_{corruption}_{sev}", i + 1, [corruption]
        )
    return tmp_path


SIZE = [
    "device=cpu",
    "data.root=imagenet",
    "models.base={name: vit_b16, checkpoint: checkpoints/imagenet_vitb16_base}",  # no hub: local weights
    "robustness.n_images=2", "robustness.batch_size=2", "robustness.severities=[4]",
    # 7 of the 19 corruptions, every family: blur and noise (seen by the fine-tunes, with a same-family unseen
    # corruption each), weather and digital (frost scales its bundled photos to 224 px)
    "robustness.corruptions=[gaussian_blur, defocus_blur, gaussian_noise, shot_noise, frost, contrast, "
    "jpeg_compression]",
    "logit_lens.n_images=2", "logit_lens.batch_size=2",
    "attention.n_images=2", "attention.n_views=0", "attention.batch_size=2",
    "sae.n_train_images=2", "sae.epochs=1", "sae.replicates=2", "sae.n_eval_images=2", "sae.top_features=2",
    "sae.top_images=2", "sae.store.hook=blocks.1.hook_resid_post", "sae.store.model_batch_size=2",
    "sae.store.buffer_size=256", "sae.train.expansion_factor=1", "sae.train.batch_size=64",
    "patching.n_images=2", "patching.batch_size=2", "patching.max_rows=64", "patching.positions=[0, 1, 196]",
    "cka.n_images=4", "cka.batch_size=4",
    "explorer.n_images=2", "explorer.top_images=2", "explorer.n_assoc=2", "explorer.max_latents=8",
    "explorer.cards=0",  # ~1.2 s per card, 28 SAEs; test_feature_card draws one with 1,000 classes
    "num_threads=1",
]  # fmt: skip


STEPS = ["robustness", "logit_lens", "attention", "sae", "sae_analysis", "explorer", "patching", "cka"]
MODELS = ["vit_b16", "blur1", "blur2", "blur4", "noise1", "noise2", "noise4"]
INPUTS = ["clean", "gaussian_blur/4", "gaussian_noise/4"]


@pytest.mark.slow  # ~4 min on 2 shared CPU cores, one thread (237 s at load 2.5): 7 ViT-B-wide models, 28 SAEs
def test_imagenet_paper_config_runs_end_to_end(imagenet_run, capsys):
    out = imagenet_run / "runs" / "imagenet_paper"
    code = main(["study", "--config", str(CONFIG), "--out", str(out), "--quiet", "--set", *SIZE])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    steps = {k: v["metrics"] for k, v in metrics["steps"].items()}
    assert list(steps) == STEPS and list(metrics["models"]) == MODELS
    assert all(metrics["steps"][k]["cached"] is False for k in STEPS)
    # report: every step's section, every figure embedded (it opens offline)
    page = (out / "report.html").read_text()
    for sec in ["summary", "models", *STEPS]:
        assert f"id='{sec}'" in page, sec
    assert len(re.findall(r"<img src='data:image/png;base64,", page)) >= 20
    assert (out / "report.md").is_file()

    # robustness: every model x (clean + 7 corruptions at severity 4) on 2 images; what each model saw, read
    # from its checkpoint card (the config names no `seen` for the base)
    rob = steps["robustness"]
    assert len(rob["rows"]) == 7 * 8 and {r["n"] for r in rob["rows"]} == {2}
    assert {r["model"] for r in rob["rows"]} == set(MODELS) and rob["corruptions"][0] == "gaussian_blur"
    seen = {m: ["gaussian_blur"] if m.startswith("blur") else ["gaussian_noise"] for m in MODELS[1:]}
    assert {x["model"]: x["seen"] for x in rob["seen_unseen"]} == {"vit_b16": [], **seen}
    assert {t["model"] for t in rob["mcnemar"]} == set(MODELS[1:])
    # logit lens: the embedding and both blocks of every model, per input
    for m in MODELS:
        for lab in INPUTS:
            lens = steps["logit_lens"][f"{m}|{lab}"]
            assert lens["layers"] == ["embed", "0", "1"] and len(lens["top1_acc"]) == 3
    # attention: per-layer statistics of every model, clean vs corrupted, base vs every fine-tune
    att = steps["attention"]
    assert set(att["stats"]) == set(MODELS) and all(len(v["entropy"]) == 2 for v in att["stats"].values())
    assert set(att["base_vs_finetuned"]) == {f"{m}|{lab}" for m in MODELS[1:] for lab in INPUTS}
    # SAEs: 2 architectures x 7 models x 2 replicates, each its own seed, on the ViT-B width
    keys = {k for k in steps["sae"] if k.count("|") == 2}
    assert keys == {f"{a}|{m}|{r}" for a in ("batchtopk", "standard") for m in MODELS for r in (0, 1)}
    assert len({steps["sae"][k]["seed"] for k in keys}) == 28
    saes = sorted(p.name for p in (out / "sae" / "saes").iterdir())
    assert saes == sorted(k.replace("|", "__").replace("__0", "__r0").replace("__1", "__r1") for k in keys)
    cfg = json.loads((out / "sae" / "saes" / "batchtopk__vit_b16__r0" / "cfg.json").read_text())
    assert cfg["d_in"] == 768 and cfg["d_sae"] == 768
    # SAE analysis: overlap of the base's SAEs with every fine-tune's against the seed controls, code cosine
    oc = steps["sae_analysis"]["overlap_controls"]
    assert set(oc) == {"batchtopk", "standard"}
    assert set(oc["batchtopk"]["summary"]) == {f"vit_b16 vs {m}" for m in MODELS[1:]}
    assert "batchtopk|blur4|vit_b16|gaussian_blur/4" in steps["sae_analysis"]["code_cosine"]
    # explorer: one page over the 28 SAEs, each listing its 8 most often firing live latents
    ex = steps["explorer"]
    assert len(ex["saes"]) == 28 and ex["n_images"] == 2 and ex["n_corrupted"] == 4
    assert all(s["d_sae"] == 768 and s["listed"] == min(8, s["live"]) >= 1 for s in ex["saes"].values())
    assert (out / ex["page"]).stat().st_size == ex["bytes"]
    data = read_explorer_data(out / ex["page"])
    assert len(data["class_names"]) == 1000 and data["images"]["h"] == data["images"]["w"] == 224
    assert all(len(s["live"]) == min(8, s["n_live"]) and s["grid"] == [14, 14] for s in data["saes"])
    # patching: the class token and two patch tokens of the 14 x 14 grid, both layers, every head
    pm = steps["patching"]
    for r in pm["within_by_position"].values():
        assert r["labels"] == {"layer": ["0", "1"], "position": ["CLS", "r0c0", "r13c13"]}
        assert r["grid_size"] == [14, 14] and r["n_images"] == 2
    assert set(pm["within_by_position"]) == set(INPUTS[1:]) == set(pm["within_by_layer"])
    assert all(len(r["labels"]["head"]) == 12 for r in pm["within_by_head"].values())
    assert len(pm["across_models"]) == 6 * 2
    # CKA: base vs every fine-tune on every input, per block, on the class token
    ck = steps["cka"]["between_models"]
    assert set(ck) == {f"vit_b16 vs {m}, {lab}" for m in MODELS[1:] for lab in INPUTS}
    assert all(v["layers"] == ["0", "1"] and v["n_examples"] == 4 for v in ck.values())


def header_finetune_command() -> list[str]:
    """The ``mechvit train ...`` command of imagenet_paper.yaml's header comment, as argv."""
    lines = [line.lstrip("#").strip() for line in CONFIG.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("mechvit train "))
    text = ""
    for line in lines[start:]:
        text += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            break
    return shlex.split(text)[1:]  # without the leading "mechvit"


@pytest.mark.slow  # ~5 s on 2 shared CPU cores (ViT-B-wide forwards/backwards at 224 px on 4 images)
def test_header_finetune_command_runs_on_the_fixture(imagenet_run, capsys):
    argv = header_finetune_command()
    assert argv[:3] == ["train", "--config", "configs/finetune_gaussian_blur_4.yaml"]
    overrides = argv[argv.index("--set") + 1 :]
    assert "model.pretrained=true" in overrides and "data.root=/data/imagenet" in overrides
    argv[2] = str(CONFIG.parent / "finetune_gaussian_blur_4.yaml")
    # the fixture instead of /data/imagenet; no hub here: the depth-2 architecture, randomly initialised
    overrides = [
        "data.root=imagenet" if o == "data.root=/data/imagenet" else o
        for o in overrides
        if o != "model.pretrained=true"
    ]
    size = [
        "model.pretrained=false", "model.kwargs={depth: 2}", "data.limit_train=4", "batch_size=2",
        "eval.n_test=2", "eval.batch_size=2", "eval.severities=[4]", "device=cpu", "num_threads=null",
    ]  # fmt: skip
    code = main([*argv[: argv.index("--set")], "--quiet", "--set", *overrides, *size])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    out = imagenet_run / "checkpoints" / "imagenet_vitb16_gaussian_blur_4"
    card = read_card(out)
    assert card["model"] == ARCH and card["config"]["corruption"]["p"] == 1.0
    assert card["config"]["data"]["test_split"] == "val" and card["config"]["lr"] == 5.0e-5
    model = load_checkpoint(out)
    assert model.patch_embed.proj.weight.shape == (768, 3, 16, 16) and len(model.blocks) == 2
    assert re.fullmatch(r"[0-9a-f]{64}", card["weights"]["sha256"])
