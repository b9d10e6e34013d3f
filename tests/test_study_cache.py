"""What a study step's hash holds, what the staging folder keeps, which models are clean controls, and the
test-image sizes: the study layer's bookkeeping, on the tiny checkpoints of tests/test_study.py (no step runs
except where a test says so)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_study import make_checkpoints, tiny_config

from mechvit.study import context, run_study
from mechvit.study import runner as runner_mod
from mechvit.study.config import ConfigError, load_study_config, study_config_from_dict
from mechvit.study.context import StudyContext, resolve_model
from mechvit.study.runner import step_hash
from mechvit.study.steps import STEPS
from mechvit.training.checkpoint import read_card, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
STEP_NAMES = [s.name for s in STEPS]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ck"))


def _hashes(cfg: dict, out: Path, overrides: dict | None = None) -> dict[str, str]:
    """Every step's hash under ``cfg`` (+ ``overrides``), as the runner computes it."""
    ctx = StudyContext(study_config_from_dict(cfg, overrides), out)
    by_name, got = {s.name: s for s in STEPS}, {}

    def h(name: str) -> str:
        if name not in got:
            step = by_name[name]
            got[name] = step_hash(step, ctx, {d: h(d) for d in step.deps})
        return got[name]

    return {n: h(n) for n in STEP_NAMES}


def _rerun(ck, tmp_path, overrides: dict, cfg: dict | None = None) -> list[str]:
    """The steps whose hash ``overrides`` changes (the steps a rerun would compute)."""
    cfg = cfg or tiny_config(ck)
    before, after = _hashes(cfg, tmp_path), _hashes(cfg, tmp_path, overrides)
    return [n for n in STEP_NAMES if before[n] != after[n]]


# ---- finding 5: each step hashes the config fields it reads -------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reruns"),
    [
        # read by the SAE analysis only (feature pages, overlap matching, controls): the SAEs are not retrained
        ({"sae.top_features": 2}, ["sae_analysis"]),
        ({"sae.top_images": 3}, ["sae_analysis"]),
        ({"sae.overlap.top_k": 5}, ["sae_analysis"]),
        ({"sae.controls.floor_draws": 2}, ["sae_analysis"]),
        # with n_fidelity_images and n_heldout_images set (tiny_config: 12 and 6), n_eval_images is the
        # analysis' image count alone
        ({"sae.n_eval_images": 10}, ["sae_analysis"]),
        # a way to run, not a result: the docs promise the same numbers (tests/test_study_sae_parallel.py)
        ({"sae.parallel_models": 1}, []),
        ({"robustness.parallel_models": 1}, []),
        # "the same numbers to float rounding": the explorer reruns
        ({"explorer.parallel_models": 1}, ["explorer"]),
        # what the SAEs are trained or evaluated with reruns them and everything that reads them
        ({"sae.epochs": 2}, ["sae", "sae_analysis", "explorer"]),
        ({"sae.n_heldout_images": 8}, ["sae", "sae_analysis", "explorer"]),
        ({"sae.ablation_warn_nats": 0.5}, []),  # the report's note, not a training setting
        # 15: the explorer page carries the study's title
        ({"title": "another title"}, ["explorer"]),
        ({"cka.n_images": 12}, ["cka"]),
    ],
)
def test_a_setting_reruns_the_steps_that_read_it(ck, tmp_path, overrides, reruns):
    assert _rerun(ck, tmp_path, overrides) == reruns


def test_single_models_rerun_the_sae_steps_and_explorer_replicates_the_explorer(ck, tmp_path):
    """``sae.single_models`` decides which SAEs train (SAE_TRAINING_FIELDS is an allow-list: a key missing there
    would reuse stale SAEs); ``explorer.replicates`` only which of them the page shows."""
    cfg = tiny_config(ck)
    cfg["sae"] = {**cfg["sae"], "models": ["base", "ft_blur"]}
    assert _rerun(ck, tmp_path, {"sae.single_models": ["ft_noise"]}, cfg) == [
        "sae",
        "sae_analysis",
        "explorer",
    ]
    assert _rerun(ck, tmp_path, {"explorer.replicates": 1}, cfg) == ["explorer"]


def test_without_n_fidelity_images_the_eval_count_is_also_the_sae_steps():
    """``sae.n_eval_images`` is the SAE step's splice and held-out count when the other two are null."""
    from mechvit.study.runner import hashed_config

    cfg = load_study_config(None, {"sae.n_fidelity_images": None, "sae.n_heldout_images": None})
    more = load_study_config(
        None, {"sae.n_fidelity_images": None, "sae.n_heldout_images": None, "sae.n_eval_images": 300}
    )
    sae = next(s for s in STEPS if s.name == "sae")
    assert hashed_config(sae, cfg) != hashed_config(sae, more)
    assert (
        hashed_config(sae, cfg)["fidelity_images"] == 200
        and hashed_config(sae, more)["heldout_images"] == 300
    )


def test_only_sae_analysis_with_an_analysis_setting_reuses_the_saes(ck, tmp_path):
    """The audit: ``--only sae_analysis --set sae.top_features=2`` refused ("sae ... out of date")."""
    base = tiny_config(
        ck,
        robustness={"enabled": False},
        logit_lens={"enabled": False},
        attention={"enabled": False},
        patching={"enabled": False},
        cka={"enabled": False},
        explorer={"enabled": False},
    )
    base["sae"] = {**base["sae"], "architectures": ["batchtopk"], "models": ["base", "ft_blur"]}
    first = run_study(study_config_from_dict(base), tmp_path, report=False)
    assert first.computed == ["sae", "sae_analysis"]
    again = run_study(study_config_from_dict(base, {"sae.top_features": 2}), tmp_path, only=["sae_analysis"])
    assert again.computed == ["sae_analysis"]


# ---- finding 2: the corrupted test images depend on how many are corrupted at once ------------------------


def test_the_corrupted_set_size_is_in_the_hash_of_every_step_that_reads_corrupted_images(ck, tmp_path):
    readers = [n for n in STEP_NAMES if runner_mod.reads_corrupted(f"mechvit.study.steps.{n}")]
    assert readers == ["logit_lens", "attention", "sae", "sae_analysis", "explorer", "patching", "cka"]
    # a condition whose draws depend on the batch (fog): cka.n_images above every other size corrupts more
    # images at once, so other corrupted images: every reader reruns, the robustness step (its own images) not
    fog = tiny_config(ck, conditions=[{"corruption": "fog", "severity": 4}])
    assert _rerun(ck, tmp_path, {"cka.n_images": 64}, cfg=fog) == readers
    # a disabled section loads no images: its size plays no part, and the other steps keep their hashes
    off = tiny_config(ck, cka={"enabled": False}, conditions=[{"corruption": "fog", "severity": 4}])
    assert _rerun(ck, tmp_path, {"cka.n_images": 64}, cfg=off) == ["cka"]  # its own section only
    # gaussian blur and noise give the first n images the same output whatever the count: a larger count, or
    # a section switched off, moves no other step's hash (the SAEs are not retrained for it)
    assert _rerun(ck, tmp_path, {"cka.n_images": 64}) == ["cka"]
    assert _rerun(ck, tmp_path, {"robustness.enabled": False}) == []


def test_the_explorer_gets_its_n_images_whatever_the_other_sections_ask(ck, tmp_path):
    """The explorer's images are counted in the study's test images: with the other image-reading sections off
    it is not capped at the SAE step's count (and --validate checks it against the split)."""
    off = {k: {"enabled": False} for k in ("robustness", "logit_lens", "attention", "patching", "cka")}
    cfg = study_config_from_dict(tiny_config(ck, **off), {"explorer.n_images": 30})
    assert context.needed_test_images(cfg)["explorer.n_images"] == 30
    assert max(context.needed_test_images(cfg).values()) == 30


def test_the_default_study_corrupts_as_many_images_as_before():
    """Counting only enabled sections leaves the shipped configs' corrupted images as they were: the default
    study's numbers stay bit-identical (5,000 = sae.n_fidelity_images; the seeds study: robustness.n_images)."""
    cfg = load_study_config(None)
    assert max(context.needed_test_images(cfg).values()) == 5000
    seeds = load_study_config(ROOT / "configs" / "fashion_mnist_seeds.yaml")
    assert max(context.needed_test_images(seeds).values()) == 2000


def test_a_size_beyond_the_test_split_names_its_key(ck, tmp_path):
    cfg = study_config_from_dict(tiny_config(ck), {"robustness.n_images": 20000})
    ctx = StudyContext(cfg, tmp_path)
    with pytest.raises(ConfigError) as e:
        ctx.test_images(16)  # what logit_lens asks for: the error names the key that is too large
    assert str(e.value) == (
        "robustness.n_images: the test split holds 10000 images, the config asks for 20000 (robustness.n_images: "
        "20000)"
    )


# ---- finding 6: a step's code hash covers the modules it uses ----------------------------------------------


def _code_hashes() -> dict[str, str]:
    runner_mod.code_hash.cache_clear()
    return {n: runner_mod.code_hash(f"mechvit.study.steps.{n}") for n in STEP_NAMES}


@pytest.mark.parametrize(
    ("module", "changed"),
    [
        (
            "mechvit.viz.explorer",
            ["explorer"],
        ),  # not robustness, logit lens, ... through mechvit/viz/__init__.py
        ("mechvit.analysis.features", ["explorer"]),
        (
            "mechvit.analysis.logit_lens",
            ["logit_lens", "attention"],
        ),  # attention imports the lens step's band_words
        ("mechvit.viz.figures", STEP_NAMES),  # every step draws
        ("mechvit.corruptions.weather", STEP_NAMES),  # corrupt() imports its families by a computed name
        ("mechvit.training.train", []),  # trains a missing checkpoint: its weights' sha256 is hashed
    ],
)
def test_editing_a_module_changes_the_code_hash_of_the_steps_that_use_it(monkeypatch, module, changed):
    before = _code_hashes()
    original = runner_mod._module_source.__wrapped__

    def edited(name):
        digest, imports = original(name)
        return (digest + "-edited" if name == module else digest), imports

    monkeypatch.setattr(runner_mod, "_module_source", edited)
    after = _code_hashes()
    monkeypatch.undo()
    runner_mod.code_hash.cache_clear()
    assert [n for n in STEP_NAMES if before[n] != after[n]] == changed


def test_a_re_exported_name_resolves_to_its_defining_module():
    from mechvit.study.runner import code_closure

    closure = code_closure("mechvit.study.steps.robustness")
    assert "mechvit.analysis.statistics" in closure and "mechvit.viz.figures" in closure
    assert (
        not {"mechvit.viz", "mechvit.analysis", "mechvit.viz.explorer", "mechvit.analysis.features"} & closure
    )


def test_the_explorer_assets_are_part_of_its_code(monkeypatch):
    """explorer.js and explorer.css are written into features.html: editing them reruns the explorer."""
    before = _code_hashes()
    real = runner_mod._asset_files

    def edited(path, tree):
        files = real(path, tree)
        return files + [Path(__file__)] if any(f.name == "explorer.js" for f in files) else files

    monkeypatch.setattr(runner_mod, "_asset_files", edited)
    runner_mod._module_source.cache_clear()
    after = _code_hashes()
    monkeypatch.undo()
    runner_mod._module_source.cache_clear()
    runner_mod.code_hash.cache_clear()
    assert [n for n in STEP_NAMES if before[n] != after[n]] == ["explorer"]


# ---- finding 3: staging folders a later run must keep ------------------------------------------------------


def test_a_run_keeps_the_staging_of_an_unfinished_step_and_drops_the_rest(ck, tmp_path):
    """An interrupted SAE step leaves finished SAEs in .staging/sae-<hash>/; a later run on the same folder that
    does not run the SAE step (``--only``, a run that computes nothing) must not delete them: the SAE step resumes
    from them. Staging of finished steps and of stale hashes goes."""
    cfg = tiny_config(
        ck, robustness={"enabled": False}, attention={"enabled": False}, patching={"enabled": False},
        cka={"enabled": False}, logit_lens={"n_images": 4},
    )  # fmt: skip
    hashes = _hashes(cfg, tmp_path)
    sae = tmp_path / ".staging" / f"sae-{hashes['sae']}"
    fake = sae / "saes" / "batchtopk__base__r0"
    fake.mkdir(parents=True)
    (fake / "cfg.json").write_text("{}")  # a finished SAE of the interrupted step
    stale = tmp_path / ".staging" / "sae-0123456789abcdef0123"
    stale.mkdir()
    for _ in range(2):  # the run that computes logit_lens, then one that computes nothing
        run = run_study(study_config_from_dict(cfg), tmp_path, only=["logit_lens"], report=False)
        assert (fake / "cfg.json").is_file() and not stale.exists()
    assert run.computed == [] and run.cached == ["logit_lens"]
    finished = tmp_path / ".staging" / f"logit_lens-{hashes['logit_lens']}"
    finished.mkdir()  # a finished step's leftover staging
    run_study(study_config_from_dict(cfg), tmp_path, only=["logit_lens"], report=False)
    assert not finished.exists() and (fake / "cfg.json").is_file()
    # with the SAEs disabled the folder is still the SAE step's under these settings: kept
    off = {**cfg, "sae": {**cfg["sae"], "enabled": False}}
    run_study(study_config_from_dict(off), tmp_path, only=["logit_lens"], report=False)
    assert (fake / "cfg.json").is_file()


# ---- finding 11: --only with a disabled step -----------------------------------------------------------------


def test_only_refuses_a_disabled_step_and_says_why(ck, tmp_path):
    cfg = study_config_from_dict(tiny_config(ck, cka={"enabled": False}))
    with pytest.raises(ValueError) as e:
        run_study(cfg, tmp_path, only=["cka"])
    assert str(e.value) == "--only cka: cka is disabled in this config (cka.enabled: false)"
    off = study_config_from_dict(tiny_config(ck), {"sae.enabled": False})
    with pytest.raises(ValueError) as e:
        run_study(off, tmp_path, only=["explorer"])
    assert str(e.value) == (
        "--only explorer: explorer is disabled in this config, and so is the sae step it reads (sae.enabled: false)"
    )
    with pytest.raises(ValueError, match=r"^--only: name at least one step \(robustness, logit_lens, "):
        run_study(cfg, tmp_path, only=[])
    assert not (tmp_path / "robustness").exists()


# ---- findings 4, 9, 12: what a model has seen, whether it is a control, and its card in the hash -------------


def _checkpoint(root: Path, name: str, config: dict | None, **card) -> Path:
    import timm
    from test_study import ARCH

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH)
    full = {"model": {"name": "vit_tiny_patch16_224", "kwargs": ARCH}, **card}
    if config is not None:
        full["config"] = config
    save_checkpoint(root / name, model, full)
    return root / name


def test_a_control_is_what_the_card_or_the_config_says_it_is(ck, tmp_path):
    from mechvit.study.config import ModelEntry

    def info(entry: dict, key: str = "models.finetuned[0]"):
        return resolve_model(ModelEntry(**entry), key, progress=False)

    p0 = _checkpoint(tmp_path, "p0", {"corruption": {"seen": ["gaussian_blur"], "severities": [4], "p": 0.0}})
    clean = _checkpoint(tmp_path, "clean", {"corruption": None}, init_from={"path": "base"})
    adv = _checkpoint(tmp_path, "adv", {"corruption": None, "adversarial": {"eps": 0.03}})
    silent = _checkpoint(tmp_path, "silent", None)  # a card that does not say how it was trained
    assert (info({"name": "c", "checkpoint": str(clean)}).control, info({"name": "c", "checkpoint": str(p0)}).seen) == (
        True,
        [],
    )  # fmt: skip
    assert info({"name": "p0", "checkpoint": str(p0)}).control  # corruption probability 0: no corruption seen
    assert not info({"name": "b", "checkpoint": str(ck["ft_blur"])}).control
    assert not info(
        {"name": "a", "checkpoint": str(adv)}
    ).control  # adversarially trained: not a clean control
    assert info({"name": "a", "checkpoint": str(adv), "control": True}).control  # the config may say it is
    assert not info({"name": "c", "checkpoint": str(clean), "control": False}).control
    with pytest.raises(ConfigError) as e:
        info({"name": "s", "checkpoint": str(silent)})
    assert str(e.value) == (
        f"models.finetuned[0]: the checkpoint card of {silent} does not say what it was fine-tuned on (no "
        "config.corruption); give `seen: [<corruptions>]` ([] for none) or `control: true`"
    )
    assert info({"name": "s", "checkpoint": str(silent), "seen": []}).control is False
    with pytest.raises(
        ConfigError, match=r"^models.finetuned\[0\].control: a clean control has seen no corruption, but"
    ):
        info({"name": "b", "checkpoint": str(ck["ft_blur"]), "control": True})
    # a timm fine-tune is a control only when the config says so (the audit's other_ft joined every claim)
    assert not info(
        {"name": "t", "timm": "vit_tiny_patch16_224", "timm_kwargs": {"img_size": 28}, "seen": []}
    ).control
    assert info({"name": "t", "timm": "vit_tiny_patch16_224", "control": True}).control
    # 9: a base whose card lists corruptions fails here, not with KeyError 'base' after every step
    with pytest.raises(ConfigError) as e:
        info({"name": "base", "checkpoint": str(ck["ft_blur"])}, "models.base")
    assert str(e.value).startswith(
        "models.base: the checkpoint card says the base was fine-tuned on ['gaussian_blur']; the base is the "
        "reference of every comparison"
    )
    assert info({"name": "base", "checkpoint": str(ck["ft_blur"]), "seen": []}, "models.base").seen == []


def test_the_default_studys_clean_fine_tune_stays_its_only_control():
    cfg = load_study_config(None)
    infos = [
        resolve_model(e, f"models.finetuned[{i}]", progress=False) for i, e in enumerate(cfg.models.finetuned)
    ]
    assert [i.name for i in infos if i.control] == ["clean"]
    assert read_card(ROOT / "checkpoints" / "fmnist_vit_clean_ft")["config"]["corruption"] is None


def test_the_cards_training_block_is_in_every_steps_hash(ck, tmp_path):
    """Finding 12: adding ``severities: [2]`` to a card changes the seen-trained cells; it must rerun."""
    import shutil

    root = Path(shutil.copytree(ck["base"].parent, tmp_path / "ck"))
    cfg = tiny_config({n: root / n for n in ("base", "ft_blur", "ft_noise")})
    before = _hashes(cfg, tmp_path)
    card_path = root / "ft_blur" / "card.json"
    card = json.loads(card_path.read_text())
    card["config"]["corruption"]["severities"] = [2]
    card_path.write_text(json.dumps(card))
    after = _hashes(cfg, tmp_path)
    assert [n for n in STEP_NAMES if before[n] != after[n]] == STEP_NAMES
    card["clean"] = {"top1": 0.5}  # the rest of the card (evaluation numbers) plays no part
    card_path.write_text(json.dumps(card))
    assert _hashes(cfg, tmp_path) == after
