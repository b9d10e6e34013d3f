"""torchrun support: sharded activation caching and data-parallel SAE training give what one process gives.

The fast tests fork 2 processes (gloo, file rendezvous) that inherit the already imported modules; the slow
one runs the real ``torchrun -m mechvit`` commands in subprocesses.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mechvit import HookedViT
from mechvit.sae import (
    ActivationStoreConfig,
    CorruptionMix,
    SAETrainingConfig,
    cache_activations,
    load_sae,
    train_sae,
    train_saes,
)
from mechvit.sae.distributed import DataParallel, cache_activations_distributed

HOOK = "blocks.1.hook_resid_pre"
D_IN = 16


def tiny_model(seed: int = 0, in_chans: int = 1) -> HookedViT:
    torch.manual_seed(seed)
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        in_chans=in_chans,
        num_classes=10,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    return HookedViT.from_timm(m).eval()


def images() -> torch.Tensor:
    return torch.rand(44, 1, 28, 28, generator=torch.Generator().manual_seed(1))


STORE = ActivationStoreConfig(
    hook=HOOK,
    tokens="patches",
    model_batch_size=4,
    mix=CorruptionMix(0.5, (("gaussian_blur", 2), ("gaussian_noise", 3))),
)


def _worker(rank: int, world: int, tmp: str, task) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        task(rank, Path(tmp))
    finally:
        dist.destroy_process_group()


def run_ranks(task, tmp: Path, world: int = 2) -> None:
    """``task(rank, tmp)`` on ``world`` forked processes of one gloo process group."""
    mp.start_processes(_worker, args=(world, str(tmp), task), nprocs=world, start_method="fork")


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard_*.npy"))}


# ---- caching -----------------------------------------------------------------------------------------------


def _cache_task(rank: int, tmp: Path, model, data) -> None:
    cache_activations_distributed(model, data, tmp / "dist", STORE, batches_per_shard=2, progress=False)


def test_two_ranks_write_the_single_process_cache(tmp_path):
    model, x = tiny_model(), images()  # 44 images, 4 per batch, 2 batches per shard: 6 shards, the last short
    run_ranks(functools.partial(_cache_task, model=model, data=x), tmp_path)
    torch.set_num_threads(1)  # as the ranks: bit-identical model outputs
    single = cache_activations(model, x, tmp_path / "single", STORE, batches_per_shard=2)
    dist_manifest = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    assert dist_manifest == single.manifest and dist_manifest["complete"]
    assert len(single.manifest["shards"]) == 6 and single.manifest["shards"][-1]["n_batches"] == 1
    assert shard_bytes(tmp_path / "dist") == shard_bytes(tmp_path / "single")
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["manifest.json"] + [
        f"shard_{i:06d}.npy" for i in range(6)
    ]  # no progress files left


def _mismatch_task(rank: int, tmp: Path, data) -> None:
    cache_activations_distributed(tiny_model(seed=rank), data, tmp / "c", STORE, progress=False)


def test_ranks_with_different_models_are_refused(tmp_path):
    with pytest.raises(Exception, match=r"ranks would cache different activations.*model_sha256"):
        run_ranks(functools.partial(_mismatch_task, data=images()[:8]), tmp_path)


def test_a_killed_two_rank_run_resumes_shard_by_shard(tmp_path):
    """What a 2-rank run killed mid-way leaves: some shards and each rank's progress file, no manifest.
    A rerun (here one process) computes only the missing shards and gives the uninterrupted cache."""
    model, x = tiny_model(), images()
    ref = cache_activations_distributed(
        model, x, tmp_path / "ref", STORE, batches_per_shard=2, progress=False
    )
    out = tmp_path / "killed"
    out.mkdir()
    records = {s["index"]: s for s in ref.manifest["shards"]}
    identity = {
        k: v for k, v in ref.manifest.items() if k not in ("hook_width", "complete", "count", "shards")
    }
    for rank, finished in ((0, [0, 2]), (1, [1])):  # rank 0 was killed in shard 4, rank 1 in shard 3
        for i in finished:
            (out / records[i]["file"]).write_bytes((tmp_path / "ref" / records[i]["file"]).read_bytes())
        part = {
            **identity,
            "hook_width": D_IN * 2,
            "complete": False,
            "shards": [records[i] for i in finished],
        }
        (out / f"manifest.rank{rank:05d}.json").write_text(json.dumps(part))
    (out / "shard_000004.npy.tmp.npy").write_bytes(b"half written")  # never listed, never read
    calls = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda act, hook: calls.append(len(act)))]):
        resumed = cache_activations_distributed(model, x, out, STORE, batches_per_shard=2, progress=False)
    assert sum(calls) == 8 + 8 + 4  # shards 3, 4 and 5 (the short last one): 20 images, nothing else
    assert resumed.manifest == ref.manifest
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")
    assert not list(out.glob("manifest.rank*.json"))


def test_an_iterable_of_batches_and_a_dataset_give_the_tensor_cache(tmp_path):
    model, x = tiny_model(), images()
    ref = cache_activations_distributed(model, x, tmp_path / "t", STORE, dataset="d", progress=False)
    loader = [(x[i : i + 3], torch.zeros(3)) for i in range(0, len(x), 3)]  # re-batched to 4 by the store
    from_loader = cache_activations_distributed(
        model, loader, tmp_path / "l", STORE, dataset="d", progress=False
    )
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(len(x)))
    from_dataset = cache_activations_distributed(
        model, dataset, tmp_path / "s", STORE, dataset="d", progress=False
    )
    assert torch.equal(from_loader.rows(), ref.rows()) and torch.equal(from_dataset.rows(), ref.rows())
    assert from_dataset.manifest == ref.manifest


# ---- training ----------------------------------------------------------------------------------------------


def sparse_batches(batch_size: int = 64, seed: int = 1):
    """Endless rows = sums of 3 of 24 fixed unit directions (the same stream on every rank)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(24, D_IN, generator=g), dim=-1)
    while True:
        idx = torch.rand(batch_size, 24, generator=g).argsort(-1)[:, :3]
        codes = torch.zeros(batch_size, 24).scatter_(1, idx, torch.rand(batch_size, 3, generator=g) + 0.5)
        yield codes @ dictionary


def cfg_for(architecture: str, seed: int = 0) -> SAETrainingConfig:
    return SAETrainingConfig(
        architecture=architecture,
        k=3,
        expansion_factor=2,
        batch_size=64,
        total_samples=64 * 40,
        lr=3e-3,
        seed=seed,
        log_every=10,
        dead_feature_window=5,  # short: dead-feature masks (TopK aux loss) take part
        # BatchTopK's threshold re-estimated after training: the kept minimum over the global batch (all ranks)
        threshold_batches=4 if architecture == "batchtopk" else 0,
    )


MULTI = {"standard": cfg_for("standard", 1), "topk": cfg_for("topk", 2), "jumprelu": cfg_for("jumprelu", 3)}


def _train_task(rank: int, tmp: Path) -> None:
    train_sae(
        sparse_batches(), D_IN, cfg_for("batchtopk"), out_dir=tmp / "batchtopk", manifest={"hook": HOOK}
    )
    train_saes(sparse_batches(), D_IN, MULTI, out_dirs={n: tmp / n for n in MULTI})
    (tmp / f"done{rank}").write_text("ok")


def test_data_parallel_training_equals_one_process_on_the_same_global_batches(tmp_path):
    run_ranks(_train_task, tmp_path)
    assert (tmp_path / "done1").is_file()
    single = {"batchtopk": train_sae(sparse_batches(), D_IN, cfg_for("batchtopk"), manifest={"hook": HOOK})}
    single.update(train_saes(sparse_batches(), D_IN, MULTI))
    for name, one in single.items():
        folder = tmp_path / name
        weights = load_file(folder / "sae_weights.safetensors")  # sae-lens's format, written by rank 0
        sae, manifest = load_sae(folder)
        assert type(sae) is type(one.sae)
        for key, w in weights.items():
            ref = one.sae.state_dict()[key]
            assert torch.allclose(w, ref, rtol=1e-4, atol=1e-6), (name, key, (w - ref).abs().max())
        # statistics over the global batch: firing frequencies, dead features, sample count
        sparsity = load_file(folder / "sparsity.safetensors")["sparsity"]
        assert torch.allclose(sparsity, one.log_feature_sparsity, atol=1e-5), name
        assert manifest["trained_samples"] == one.manifest["trained_samples"] == 64 * 40
        assert sae.cfg.metadata.num_dead_features == one.sae.cfg.metadata.num_dead_features
    # and training really moved the weights away from their initialisation (a vacuous equality is excluded)
    init = train_sae(
        sparse_batches(), D_IN, SAETrainingConfig(**{**cfg_for("batchtopk").__dict__, "total_samples": 64})
    )
    assert not torch.allclose(init.sae.W_dec, single["batchtopk"].sae.W_dec, atol=1e-3)


def test_global_batch_must_split_evenly():
    with pytest.raises(
        ValueError, match=r"batch_size \(63\) must be a multiple of the number of processes \(2\)"
    ):
        DataParallel(0, 2).check(63)


# ---- the study under torchrun -------------------------------------------------------------------------------


def _rank0_task(rank: int, tmp: Path) -> None:
    from mechvit.runtime import rank0_runs

    assert rank0_runs(lambda: rank * 10 + 7, "adding") == 7  # rank 0's value on every rank
    calls = tmp / f"calls{rank}"

    def fails() -> None:
        calls.write_text("ran")
        raise OSError("disk full")

    try:
        rank0_runs(fails, "writing the report")
    except Exception as e:  # noqa: BLE001
        (tmp / f"error{rank}").write_text(f"{type(e).__name__}: {e}")


def test_rank0_runs_shares_rank0s_value_and_its_error(tmp_path):
    run_ranks(_rank0_task, tmp_path)
    assert (tmp_path / "calls0").is_file() and not (tmp_path / "calls1").exists()  # rank 0 alone runs it
    assert (tmp_path / "error0").read_text() == "OSError: disk full"
    assert (tmp_path / "error1").read_text() == (
        "RuntimeError: rank 0 failed while writing the report: OSError: disk full"
    )


def _study_cfg(ck: dict, **sections):
    from mechvit.study.config import study_config_from_dict
    from tests.test_study import tiny_config

    off = {"enabled": False}
    return study_config_from_dict(
        tiny_config(
            ck,
            logit_lens=off,
            attention=off,
            explorer=off,
            patching=off,
            cka=off,
            **sections,
        )
    )


def _study_task(rank: int, tmp: Path, cfg, out: Path) -> None:
    from mechvit.study import run_study

    run = run_study(cfg, out, only=["robustness", "sae"])
    (tmp / f"run{rank}.json").write_text(
        json.dumps({"computed": run.computed, "report": str(run.report) if run.report else None})
    )


def test_study_sae_step_on_two_ranks_equals_one_process(tmp_path):
    """The study under a 2-rank process group: the SAE step caches and trains on both ranks (each SAE equals
    the single-process one), the robustness step runs on rank 0 alone, rank 0 writes the report; a rerun on
    two ranks finds every step up to date."""
    from mechvit.study import run_study
    from tests.test_study import make_checkpoints

    ck = make_checkpoints(tmp_path / "ck")
    cfg = _study_cfg(ck)
    run_ranks(functools.partial(_study_task, cfg=cfg, out=tmp_path / "two"), tmp_path)
    ranks = [json.loads((tmp_path / f"run{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["computed"] == ["robustness", "sae"] and ranks[0]["report"].endswith("report.html")
    # rank 1 ran only the SAE step and keeps no record of the steps; it is told where the report is
    assert ranks[1] == {"computed": [], "report": ranks[0]["report"]}
    one = run_study(cfg, tmp_path / "one", only=["robustness", "sae"])
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["steps"]
    ref = json.loads((tmp_path / "one" / "metrics.json").read_text())["steps"]
    assert two["robustness"]["metrics"] == ref["robustness"]["metrics"]
    saes = sorted(k for k in ref["sae"]["metrics"] if "|" in k)
    assert len(saes) == 2 * 3 * 2  # architectures x models x replicates
    for key in saes:
        folder = ref["sae"]["metrics"][key]["dir"]
        a = load_file(tmp_path / "one" / folder / "sae_weights.safetensors")
        b = load_file(tmp_path / "two" / folder / "sae_weights.safetensors")
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), (key, name)
        assert json.loads((tmp_path / "two" / folder / "mechvit_sae.json").read_text())["processes"] == 2
        ev = [s["sae"]["metrics"][key]["heldout"]["explained_variance"] for s in (two, ref)]
        assert ev[0] == pytest.approx(ev[1], abs=1e-4), key
    assert not (tmp_path / "two" / "sae" / "_acts").exists() and not (tmp_path / "two" / ".staging").exists()
    assert one.computed == ["robustness", "sae"]
    rerun = tmp_path / "rerun"  # a rerun on two ranks: nothing left to compute
    rerun.mkdir()
    run_ranks(functools.partial(_study_task, cfg=cfg, out=tmp_path / "two"), rerun)
    assert json.loads((rerun / "run0.json").read_text())["computed"] == []


# ---- the commands ------------------------------------------------------------------------------------------


def test_cache_activations_command_errors(tmp_path, capsys):
    from mechvit.cli import main

    assert (
        main(
            [
                "cache-activations",
                "--checkpoint",
                "x",
                "--hook",
                HOOK,
                "--out",
                str(tmp_path),
                "--mean",
                "0.5",
            ]
        )
        == 2
    )
    assert "give both --mean and --std" in capsys.readouterr().err
    assert main(["cache-activations", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: mechvit cache-activations")
    assert main(["train-sae", "--out", str(tmp_path / "s")]) == 2
    assert (
        "--checkpoint and --hook are required (or train on a cache with --activations)"
        in capsys.readouterr().err
    )
    assert main(["train-sae", "--activations", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "is not an activation cache (no manifest.json)" in capsys.readouterr().err


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return tiny_model(in_chans=3).save_pretrained(tmp_path / "model")


def _torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "mechvit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_torchrun_commands_equal_one_process(tmp_path, model_dir):
    """``torchrun --nproc_per_node=2 -m mechvit cache-activations`` then ``train-sae --activations`` (two
    architectures in one pass) against the same commands on one process."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("n0001", "n0002"):
        (tmp_path / "imgs" / "train" / c).mkdir(parents=True)
        for i in range(9):
            arr = rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / "train" / c / f"{i}.JPEG")
    common = [
        "cache-activations", "--checkpoint", str(model_dir), "--hook", HOOK, "--dataset", "imagefolder",
        "--root", str(tmp_path / "imgs"), "--img-size", "28", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
        "--mix", "0.5", "--corruption", "gaussian_blur:2", "--model-batch-size", "2", "--batches-per-shard", "2",
        "--quiet",
    ]  # fmt: skip
    _torchrun([*common, "--out", str(tmp_path / "c2")], 2)
    _torchrun([*common, "--out", str(tmp_path / "c1")], 1)
    assert (tmp_path / "c1" / "manifest.json").read_bytes() == (
        tmp_path / "c2" / "manifest.json"
    ).read_bytes()
    assert (
        shard_bytes(tmp_path / "c1") == shard_bytes(tmp_path / "c2")
        and len(shard_bytes(tmp_path / "c1")) == 5
    )
    train = ["train-sae", "--architecture", "batchtopk", "topk", "--k", "4", "--expansion", "2", "--batch-size", "32",
             "--samples", "640", "--threshold-batches", "3"]  # fmt: skip
    _torchrun([*train, "--activations", str(tmp_path / "c2"), "--out", str(tmp_path / "s2")], 2)
    _torchrun([*train, "--activations", str(tmp_path / "c1"), "--out", str(tmp_path / "s1")], 1)
    for name in ("batchtopk__s0", "topk__s0"):
        one = load_file(tmp_path / "s1" / name / "sae_weights.safetensors")
        two = load_file(tmp_path / "s2" / name / "sae_weights.safetensors")
        for key in one:
            assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-6), (name, key)
        manifest = json.loads((tmp_path / "s2" / name / "mechvit_sae.json").read_text())
        assert manifest["processes"] == 2 and manifest["trained_samples"] == 640
        if name.startswith("batchtopk"):  # the threshold from rows of the whole cache, pooled over both ranks
            assert manifest["inference_threshold"]["rows"] == 96 and manifest["inference_threshold"]["exact"]


@pytest.mark.slow
def test_torchrun_study_command_trains_the_saes_on_two_ranks(tmp_path):
    """``torchrun --nproc_per_node=2 -m mechvit study --only sae``: the real command (process group from
    torchrun's environment, device per rank) trains every SAE of the study on both ranks; one summary line."""
    import yaml

    from tests.test_study import make_checkpoints, tiny_config

    cfg = tiny_config(make_checkpoints(tmp_path / "ck"))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    done = _torchrun(
        ["study", "--config", str(tmp_path / "study.yaml"), "--out", str(tmp_path / "out"), "--only", "sae"],
        2,
    )
    assert done.stdout.count("study finished") == 1 and "computed ['sae']" in done.stdout
    manifests = sorted((tmp_path / "out" / "sae" / "saes").glob("*/mechvit_sae.json"))
    assert len(manifests) == 2 * 3 * 2
    assert {json.loads(m.read_text())["processes"] for m in manifests} == {2}


def test_leave_process_group_destroys_only_the_group_init_from_env_made(monkeypatch, tmp_path):
    """The CLI leaves, on success, the group ``init_from_env`` joined (an undestroyed gloo group can abort
    the process at exit); a group the caller made is the caller's."""
    import torch.distributed as dist

    from mechvit.sae import distributed as D

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'a'}", rank=0, world_size=1)
    D.leave_process_group()  # not ours: left alone
    assert dist.is_initialized()
    dist.destroy_process_group()

    real_init = dist.init_process_group

    def one_rank(backend, timeout):  # torchrun's environment says 2 ranks; one rank here joins a 1-rank group
        real_init(backend, init_method=f"file://{tmp_path / 'b'}", rank=0, world_size=1, timeout=timeout)

    monkeypatch.setattr(dist, "init_process_group", one_rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert D.init_from_env("cpu") == "cpu" and dist.is_initialized()
    D.leave_process_group()
    assert not dist.is_initialized()
    D.leave_process_group()  # twice: a no-op
