"""SAE training through sae-lens's SAETrainer: dictionary recovery, save/load, traps, end-to-end on a HookedViT."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from sae_lens import SAE, JumpReLUSAE, TopKSAE

from mechvit import HookedViT
from mechvit.sae import ActivationStoreConfig, SAETrainingConfig, load_sae, train_sae, train_sae_for_hook

D_IN, N_FEATURES, K = 16, 24, 3


def dictionary() -> torch.Tensor:
    return F.normalize(torch.randn(N_FEATURES, D_IN, generator=torch.Generator().manual_seed(0)), dim=-1)


def sparse_batches(dictionary: torch.Tensor, batch_size: int, seed: int = 1):
    """Rows = sum of K random dictionary directions with magnitudes in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.rand(batch_size, N_FEATURES, generator=g).argsort(-1)[:, :K]
        codes = torch.zeros(batch_size, N_FEATURES).scatter_(
            1, idx, torch.rand(batch_size, K, generator=g) + 0.5
        )
        yield codes @ dictionary


def test_topk_sae_recovers_a_known_sparse_dictionary():
    true = dictionary()
    cfg = SAETrainingConfig(
        architecture="topk",
        k=K,
        expansion_factor=2,
        batch_size=256,
        total_samples=256 * 800,
        lr=3e-3,
        log_every=200,
    )
    trained = train_sae(sparse_batches(true, 256), D_IN, cfg)
    learned = F.normalize(trained.sae.W_dec.detach(), dim=-1)
    max_cos = (true @ learned.T).max(dim=1).values
    assert max_cos.mean() >= 0.9, max_cos
    assert isinstance(trained.sae, TopKSAE)


@pytest.mark.parametrize(
    "architecture,inference_cls",
    [("batchtopk", JumpReLUSAE), ("topk", TopKSAE), ("standard", SAE), ("jumprelu", JumpReLUSAE)],
)
def test_save_load_with_sae_lens_gives_identical_encode(architecture, inference_cls, tmp_path):
    cfg = SAETrainingConfig(
        architecture=architecture, k=4, expansion_factor=2, batch_size=64, total_samples=64 * 30, log_every=10
    )
    trained = train_sae(
        sparse_batches(dictionary(), 64),
        D_IN,
        cfg,
        out_dir=tmp_path / "sae",
        manifest={"hook": "blocks.0.hook_resid_post"},
    )
    loaded = SAE.load_from_disk(tmp_path / "sae")  # plain sae-lens, nothing of ours
    assert isinstance(loaded, inference_cls) and type(loaded) is type(trained.sae)
    x = next(sparse_batches(dictionary(), 50, seed=7))
    assert torch.equal(loaded.encode(x), trained.sae.encode(x))
    assert torch.equal(loaded.decode(loaded.encode(x)), trained.sae.decode(trained.sae.encode(x)))
    assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    manifest = json.loads((tmp_path / "sae" / "mechvit_sae.json").read_text())
    assert manifest["architecture"] == architecture and manifest["d_sae"] == 2 * D_IN
    assert manifest["hook"] == "blocks.0.hook_resid_post" and manifest["trained_samples"] == 64 * 30
    log = [json.loads(line) for line in (tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 11, 21, 30]
    again, again_manifest = load_sae(tmp_path / "sae")
    assert torch.equal(again.W_enc, loaded.W_enc) and again_manifest == manifest


def test_cosine_schedule_ends_at_lr_end_and_total_rounds_to_whole_batches():
    cfg = SAETrainingConfig(
        architecture="topk",
        k=2,
        expansion_factor=2,
        batch_size=32,
        total_samples=32 * 20 + 7,
        lr=1e-3,
        lr_end=1e-4,
        log_every=1,
    )
    trained = train_sae(sparse_batches(dictionary(), 32), D_IN, cfg)
    lrs = [e["details/current_learning_rate"] for e in trained.log]
    assert len(lrs) == 20 and trained.manifest["trained_samples"] == 640
    assert lrs[0] == pytest.approx(1e-3, rel=0.02) and lrs[-1] == pytest.approx(1e-4, rel=1e-6)
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


def test_batches_of_the_wrong_size_or_too_few_are_refused():
    cfg = SAETrainingConfig(architecture="topk", k=2, expansion_factor=2, batch_size=32, total_samples=32 * 5)
    with pytest.raises(ValueError, match=r"shape \(32, 16\)"):
        train_sae(sparse_batches(dictionary(), 31), D_IN, cfg)
    with pytest.raises(ValueError, match="ran out"):
        train_sae(iter([torch.zeros(32, D_IN)] * 3), D_IN, cfg)


def test_config_errors():
    with pytest.raises(ValueError, match="architecture must be one of"):
        SAETrainingConfig(architecture="gated")
    with pytest.raises(ValueError, match="at least one batch"):
        SAETrainingConfig(batch_size=1024, total_samples=100)
    with pytest.raises(ValueError, match="must not exceed d_sae"):
        train_sae(
            sparse_batches(dictionary(), 32),
            2,
            SAETrainingConfig(k=8, expansion_factor=2, batch_size=32, total_samples=64),
        )


def test_train_for_hook_end_to_end_cached(tmp_path):
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    model = HookedViT.from_timm(m).eval()
    images = torch.rand(32, 1, 28, 28)
    store = ActivationStoreConfig(
        hook="blocks.1.hook_resid_pre", tokens="patches", model_batch_size=16, buffer_size=512
    )
    cfg = SAETrainingConfig(k=8, expansion_factor=2, batch_size=128, total_samples=128 * 10)
    trained = train_sae_for_hook(
        model,
        images,
        store,
        cfg,
        out_dir=tmp_path / "sae",
        cache_dir=tmp_path / "acts",
        heldout=torch.randn(100, 32),
    )
    loaded, manifest = load_sae(tmp_path / "sae")
    assert loaded.cfg.d_in == 32 and loaded.cfg.d_sae == 64
    assert manifest["hook"] == store.hook and manifest["tokens"] == "patches"
    assert manifest["n_activations"] == 32 * 16 and len(manifest["model_sha256"]) == 64
    assert manifest["heldout_metrics"]["n_rows"] == 100 and trained.path == tmp_path / "sae"


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="needs Fashion-MNIST",
)
def test_command_line_trains_and_reports(tmp_path):
    from mechvit.sae.__main__ import main

    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    HookedViT.from_timm(m).save_pretrained(tmp_path / "vit")
    summary = main(
        [
            "--checkpoint",
            str(tmp_path / "vit"),
            "--hook",
            "blocks.1.hook_resid_pre",
            "--out",
            str(tmp_path / "sae"),
            "--images",
            "64",
            "--heldout",
            "32",
            "--samples",
            "2048",
            "--batch-size",
            "256",
            "--k",
            "8",
            "--expansion",
            "2",
            "--mix",
            "0.5",
            "--corruption",
            "gaussian_blur:4",
            "--threshold-batches",
            "2",
        ]
    )
    assert summary["n_rows"] == 32 * 16 and summary["n_images"] == 32 and summary["d_sae"] == 64
    loaded, manifest = load_sae(tmp_path / "sae")
    assert manifest["corruption_mix"] == {"fraction": 0.5, "corruptions": [["gaussian_blur", 4]]}
    assert manifest["spliced_metrics"]["n_images"] == 32 and manifest["dataset"] == "fashion_mnist/train[:64]"
    assert manifest["training"]["threshold_batches"] == 2 and manifest["inference_threshold"]["batches"] == 2
    assert float(loaded.threshold[0]) == pytest.approx(manifest["inference_threshold"]["estimated"], rel=1e-6)


# ---- seeds, lockstep training (several SAEs from one pass) -----------------------------------------


def test_derive_seed_is_the_documented_hash_and_distinct_over_a_study():
    import hashlib
    import json as _json

    from mechvit.sae import derive_seed

    key = _json.dumps([7, "batchtopk", "base", "mix", "2"], separators=(",", ":"))
    expected = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % (2**31 - 1)
    assert derive_seed(7, "batchtopk", "base", "mix", 2) == expected
    grid = [
        (arch, model, cond, rep)
        for arch in ("batchtopk", "standard")
        for model in ("base", "blur1", "blur2", "blur4", "noise1", "noise2", "noise4", "clean")
        for cond in ("mix",)
        for rep in range(5)
    ]
    seeds = [derive_seed(0, *g) for g in grid]
    assert len(set(seeds)) == len(grid)
    assert derive_seed(1, *grid[0]) != seeds[0]  # the study seed enters


def test_distinct_seeds_give_distinct_initialisations_and_the_seed_reaches_the_init():
    from mechvit.sae.train import build_training_sae

    cfg = SAETrainingConfig(
        architecture="batchtopk", k=4, expansion_factor=2, batch_size=64, total_samples=64
    )

    def init(seed):
        torch.manual_seed(seed)
        return build_training_sae(D_IN, cfg).W_dec.detach().clone()

    assert torch.equal(init(3), init(3))
    assert not torch.allclose(init(3), init(4))


def _lockstep_cfgs(seeds, **kw):
    base = dict(
        architecture="topk", k=K, expansion_factor=2, batch_size=128, total_samples=128 * 6, log_every=1
    )
    return {f"sae{s}": SAETrainingConfig(**{**base, **kw, "seed": s}) for s in seeds}


def test_lockstep_training_gives_every_sae_its_own_init_and_data_order():
    from mechvit.sae import train_saes

    cfgs = _lockstep_cfgs([11, 12, 13])
    first = train_saes(sparse_batches(dictionary(), 128), D_IN, cfgs)
    again = train_saes(sparse_batches(dictionary(), 128), D_IN, cfgs)
    w = {n: t.sae.W_dec.detach() for n, t in first.items()}
    for n in cfgs:  # deterministic given the seeds
        assert torch.equal(w[n], again[n].sae.W_dec.detach())
    names = list(cfgs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(w[a], w[b], atol=1e-3)
    # the data order is per SAE too: same init (seed) but another order gives other weights
    from mechvit.sae.train import _SharedPass

    pool = _SharedPass(sparse_batches(dictionary(), 128), {"x": 1, "y": 2}, 128, D_IN, "cpu", 4)
    draws = [next(pool) for _ in range(6)]
    assert not torch.equal(draws[-1]["x"], draws[-1]["y"])
    assert first["sae11"].manifest["lockstep"]["group"] == names
    assert first["sae11"].manifest["convergence"]["n_points"] >= 3


def test_lockstep_with_one_sae_and_a_one_batch_pool_equals_sae_lens_single_trainer():
    """The coordinator is sae-lens's MultiSAETrainer around sae-lens SAETrainers: with one SAE fed exactly
    the stream's batches it must train the same SAE as the single-SAE path (rows permuted within each
    batch, so equal up to float summation order)."""
    from mechvit.sae import train_saes

    cfg = _lockstep_cfgs([5], architecture="batchtopk")["sae5"]
    single = train_sae(sparse_batches(dictionary(), 128), D_IN, cfg)
    multi = train_saes(sparse_batches(dictionary(), 128), D_IN, {"a": cfg}, pool_batches=1)["a"]
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(
            getattr(multi.sae, name).detach(), getattr(single.sae, name).detach(), atol=2e-4, rtol=1e-3
        )


def test_lockstep_refuses_shared_seeds_and_mismatched_batches():
    from mechvit.sae import train_saes

    cfgs = _lockstep_cfgs([1, 2])
    with pytest.raises(ValueError, match="its own seed"):
        train_saes(sparse_batches(dictionary(), 128), D_IN, {"a": cfgs["sae1"], "b": cfgs["sae1"]})
    other = SAETrainingConfig(k=K, expansion_factor=2, batch_size=64, total_samples=128 * 6, seed=9)
    with pytest.raises(ValueError, match="batch_size"):
        train_saes(sparse_batches(dictionary(), 128), D_IN, {"a": cfgs["sae1"], "b": other})


def test_fast_batchtopk_keeps_sae_lens_output_and_gradient():
    """Our BatchTopK (unsorted top-k, pre-filtered by the previous step's k-th value on CPU) against
    sae-lens's on a run of steps: drifting activations take the filtered path, a sudden shrink falls back to
    the full top-k; output and gradient equal at every step."""
    from sae_lens.saes.batchtopk_sae import BatchTopK

    from mechvit.sae.train import _BatchTopKTrainingSAE, _FastBatchTopK, build_training_sae

    g = torch.Generator().manual_seed(0)
    for shape, k in (((64, 96), 8), ((3, 5, 40), 4.5), ((16, 32), 32)):  # k * rows = every element at the end
        ours = _FastBatchTopK(k)
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        for scale in (1.0, 1.02, 0.99, 1.01, 0.3, 0.31):  # 0.3: the previous step's filter keeps too few
            xs = x * scale + 0.01 * torch.randn(*shape, generator=g, dtype=torch.float64)
            xa, xb = xs.clone().requires_grad_(), xs.clone().requires_grad_()
            filtered = ours.filtered_steps
            ya, yb = BatchTopK(k)(xa), ours(xb)
            assert torch.equal(ya, yb), (shape, scale)
            w = torch.randn(*shape, generator=g, dtype=torch.float64)
            (ya * w).sum().backward()
            (yb * w).sum().backward()
            assert torch.equal(xa.grad, xb.grad), (shape, scale)
            if scale == 0.3:
                assert ours.filtered_steps == filtered  # fell back to the whole batch
        if k * shape[0] < x.numel():
            assert ours.filtered_steps >= 3  # and the filter did its work on the drifting steps
    sae = build_training_sae(16, SAETrainingConfig(architecture="batchtopk", expansion_factor=2, k=3))
    assert isinstance(sae, _BatchTopKTrainingSAE) and isinstance(sae.activation_fn, _FastBatchTopK)


def test_batchtopk_threshold_update_equals_sae_lens():
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE

    from mechvit.sae.train import build_training_sae

    ours = build_training_sae(8, SAETrainingConfig(architecture="batchtopk", expansion_factor=2, k=2))
    ref = BatchTopKTrainingSAE(ours.cfg)
    g = torch.Generator().manual_seed(3)
    for acts in (
        torch.randn(32, 16, generator=g).relu(),
        torch.zeros(32, 16),  # nothing positive: no update
        torch.randn(32, 16, generator=g).relu() * 5,
        torch.tensor([[0.0, float("nan"), 0.25, -1.0]]),  # NaN and negatives are not positive
    ):
        ours.update_topk_threshold(acts)
        ref.update_topk_threshold(acts)
        assert ours.topk_threshold.dtype == ref.topk_threshold.dtype == torch.float64
        assert torch.equal(ours.topk_threshold, ref.topk_threshold)
    assert ours.topk_threshold > 0


def test_threshold_reestimation_is_the_pooled_quantile_with_the_final_weights():
    """Known answer: the (k x rows)-th largest of relu(pre-activation x decoder norm) over every row of the
    batches pooled (brute force); fewer batches than asked when the data end; none: the running mean stays;
    a batch that fires far more than the others breaks the candidate bound: flagged, not silent.
    Architectures without a batch threshold are left alone."""
    from mechvit.sae import reestimate_thresholds
    from mechvit.sae.train import _ExactBatches, build_training_sae

    cfg = SAETrainingConfig(architecture="batchtopk", expansion_factor=2, k=3)
    sae = build_training_sae(D_IN, cfg)
    sae.topk_threshold = torch.tensor(0.123, dtype=sae.topk_threshold.dtype)
    xs = [b for b, _ in zip(sparse_batches(dictionary(), 64), range(5), strict=False)]

    def pooled(batches):
        with torch.no_grad():
            x = torch.cat(batches)
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            acts = (pre * sae.W_dec.norm(dim=-1)).relu().flatten()
            return float(acts.topk(K * len(x)).values[-1])

    want = pooled(xs[:3])
    got = reestimate_thresholds({"a": sae}, {"a": 3}, iter([{"a": x} for x in xs]))["a"]
    assert got["ema"] == pytest.approx(0.123) and (got["batches"], got["rows"], got["exact"]) == (
        3,
        192,
        True,
    )
    assert got["estimated"] == pytest.approx(want, rel=1e-6) and float(sae.topk_threshold) == got["estimated"]
    with torch.no_grad():  # k per row on average over the pooled rows (no ties in float data)
        x = torch.cat(xs[:3])
        pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc) * sae.W_dec.norm(dim=-1)
        assert int((pre >= got["estimated"]).sum()) == K * len(x)
    # the data end after 2 batches (the trainer's iterator raises its "ran out" error): 2 are used
    ended = ({"a": b} for b in _ExactBatches(iter(xs[:2]), 64, D_IN, "cpu"))
    assert reestimate_thresholds({"a": sae}, {"a": 10}, ended)["a"]["batches"] == 2
    assert float(sae.topk_threshold) == pytest.approx(pooled(xs[:2]), rel=1e-6)
    # no batch at all: the threshold is kept
    none = ({"a": b} for b in _ExactBatches(iter([]), 64, D_IN, "cpu"))
    kept = float(sae.topk_threshold)
    rec = reestimate_thresholds({"a": sae}, {"a": 4}, none)["a"]
    assert (rec["estimated"], rec["batches"]) == (pytest.approx(kept), 0)
    # one batch scaled up fires above the others' values everywhere: with margin 1 its candidates cannot hold
    # all k x 2 x rows values over the pooled threshold
    loud = [xs[0] * 50, xs[1]]
    with pytest.warns(UserWarning, match="lower bound"):
        rec = reestimate_thresholds({"a": sae}, {"a": 2}, iter([{"a": x} for x in loud]), margin=1)["a"]
    assert rec["exact"] is False and rec["estimated"] <= pooled(loud)
    rec = reestimate_thresholds({"a": sae}, {"a": 2}, iter([{"a": x} for x in loud]), margin=3)["a"]
    assert rec["exact"] is True and rec["estimated"] == pytest.approx(pooled(loud), rel=1e-6)
    topk = build_training_sae(D_IN, SAETrainingConfig(architecture="topk", expansion_factor=2, k=3))
    assert reestimate_thresholds({"t": topk, "a": sae}, {"t": 3, "a": 0}, iter([])) == {}
    with pytest.raises(ValueError, match="threshold_batches must be >= 0"):
        SAETrainingConfig(threshold_batches=-1)


@pytest.mark.parametrize("lockstep", [False, True])
def test_trained_batchtopk_saves_the_reestimated_threshold(lockstep, tmp_path):
    """End to end: the saved JumpReLU threshold is the re-estimate (recorded in the manifest next to the
    EMA it replaced), read back by sae-lens; without threshold_batches the EMA is saved and nothing recorded."""
    from mechvit.sae import train_saes

    cfg = _lockstep_cfgs([5], architecture="batchtopk")["sae5"]
    again = SAETrainingConfig(**{**cfg.__dict__, "threshold_batches": 6})
    if lockstep:
        plain = train_saes(sparse_batches(dictionary(), 128), D_IN, {"a": cfg})["a"]
        new = train_saes(sparse_batches(dictionary(), 128), D_IN, {"a": again}, out_dirs={"a": tmp_path})["a"]
    else:
        plain = train_sae(sparse_batches(dictionary(), 128), D_IN, cfg)
        new = train_sae(sparse_batches(dictionary(), 128), D_IN, again, out_dir=tmp_path)
    assert "inference_threshold" not in plain.manifest
    rec = new.manifest["inference_threshold"]
    assert rec["batches"] == 6 and rec["estimated"] != rec["ema"]
    # the same training (the estimate comes after it): the EMA is the plain run's saved threshold
    assert rec["ema"] == pytest.approx(float(plain.sae.threshold.detach()[0]), rel=1e-6)
    assert torch.equal(new.sae.W_enc, plain.sae.W_enc)
    loaded, manifest = load_sae(tmp_path)
    assert torch.allclose(loaded.threshold, torch.full_like(loaded.threshold, rec["estimated"]))
    assert manifest["inference_threshold"] == rec


def test_threshold_on_given_rows_fires_k_per_row_there():
    """``threshold_rows``: the saved JumpReLU (sae-lens's inference SAE, read back) fires on exactly k x rows
    of the given rows' activations (the pooled quantile); rows of the wrong width are refused."""
    from mechvit.sae import train_saes

    cfg = SAETrainingConfig(**{**_lockstep_cfgs([5], architecture="batchtopk")["sae5"].__dict__})
    cfg.threshold_batches = 3
    rows = torch.cat([b for b, _ in zip(sparse_batches(dictionary(), 128, seed=7), range(4), strict=False)])
    for trained in (
        train_sae(sparse_batches(dictionary(), 128), D_IN, cfg, threshold_rows=rows),
        train_saes(sparse_batches(dictionary(), 128), D_IN, {"a": cfg}, threshold_rows=rows)["a"],
    ):
        rec = trained.manifest["inference_threshold"]
        assert (rec["batches"], rec["rows"], rec["exact"]) == (3, 384, True)  # whole batches of 128
        sae = trained.sae
        with torch.no_grad():
            pre = sae.process_sae_in(rows[:384]) @ sae.W_enc + sae.b_enc
        # to float rounding (the inference SAE folds the decoder norms into the encoder): k x rows fire
        above, near = (
            int((pre > sae.threshold * (1 + 1e-5)).sum()),
            int((pre >= sae.threshold * (1 - 1e-5)).sum()),
        )
        assert above <= K * 384 <= near and near - above <= 2
    with pytest.raises(ValueError, match=r"threshold_rows must be \[n, 16\]"):
        train_sae(sparse_batches(dictionary(), 128), D_IN, cfg, threshold_rows=rows[:, :8])


def _step(sae, x, dead):
    from sae_lens.saes.sae import TrainStepInput

    sae.zero_grad(set_to_none=True)
    out = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x, dead_neuron_mask=dead, coefficients={}, n_training_steps=0, is_logging_step=False
        )
    )
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("rescale", [True, False])
def test_sparse_batchtopk_step_equals_sae_lens_dense_step(rescale):
    """Our CPU training step (kept entries only, forward and backward) against sae-lens's
    BatchTopKTrainingSAE on the same weights in float64: losses, output, activations, inference threshold
    and every gradient, with no dead latent, fewer dead latents than d_in // 2 (the aux top-k takes them
    all, scaled down), more (the top d_in // 2 of them), and fewer positive pre-activations than kept
    entries (kept zeros pass no gradient)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE

    from mechvit.sae.train import build_training_sae

    torch.manual_seed(0)
    cfg = SAETrainingConfig(architecture="batchtopk", expansion_factor=6, k=4, decoder_init_norm=None)
    ours = build_training_sae(D_IN, cfg).double()
    ours.cfg.rescale_acts_by_decoder_norm = rescale
    with torch.no_grad():  # decoder rows of unequal norms, so that the rescaling matters
        ours.W_dec.mul_(torch.rand(ours.cfg.d_sae, 1, dtype=torch.float64) + 0.5)
    ref = BatchTopKTrainingSAE(ours.cfg).double()
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, D_IN, generator=g, dtype=torch.float64)
    shut = torch.where(torch.arange(96) < 3, 0.0, -100.0).double()  # 3 latents can fire: kept zeros
    cases = [(None, 0), (torch.arange(96) % 20 == 0, 0), (torch.arange(96) % 3 == 0, 0), (None, shut)]
    for dead, shift in cases:  # 0, 5, 32 dead (d_in // 2 = 8: the aux takes all 5, scaled, or 8 of the 32)
        with torch.no_grad():
            for sae in (ours, ref):
                sae.b_enc += shift
        assert ours._sparse_step_applies(x)
        a, ga = _step(ours, x, dead)
        b, gb = _step(ref, x, dead)
        assert a.feature_acts.is_sparse and torch.equal(a.feature_acts.to_dense(), b.feature_acts)
        torch.testing.assert_close(a.sae_out, b.sae_out, rtol=0, atol=1e-12)
        for name in ("mse_loss", "auxiliary_reconstruction_loss"):
            torch.testing.assert_close(a.losses[name], b.losses[name], rtol=1e-12, atol=0)
        assert (a.losses["auxiliary_reconstruction_loss"] > 0) == (dead is not None)
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=1e-12 * gb[name].abs().max().item())
        assert torch.equal(ours.topk_threshold, ref.topk_threshold)
        with torch.no_grad():
            for sae in (ours, ref):
                sae.b_enc -= shift
    assert (a.feature_acts.to_dense() > 0).sum() < a.feature_acts._nnz()  # the last case kept zeros


def test_sparse_batchtopk_step_defers_to_sae_lens_where_it_does_not_apply():
    from mechvit.sae.train import build_training_sae

    sae = build_training_sae(D_IN, SAETrainingConfig(architecture="batchtopk", expansion_factor=2, k=2))
    x = torch.randn(8, D_IN)
    assert sae._sparse_step_applies(x)
    assert not sae._sparse_step_applies(x.reshape(2, 4, D_IN))  # more than one batch dimension
    sae.hook_sae_acts_post.add_hook(lambda t, hook: t)  # a user's hook sees the dense activations
    assert not sae._sparse_step_applies(x)
    out, _ = _step(sae, x, None)
    assert not out.feature_acts.is_sparse
    sae.hook_sae_acts_post.remove_hooks()
    assert sae._sparse_step_applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not sae._sparse_step_applies(x)


def test_sparse_batchtopk_training_run_matches_sae_lens_dense_run(monkeypatch):
    """A whole run through sae-lens's trainer (aux loss on, dead latents counted from the sparse
    activations) lands where the dense sae-lens step lands: same logged L0, dead count and EV to float
    rounding over the run (float32; the two paths sum in another order)."""
    from mechvit.sae import train as T

    cfg = SAETrainingConfig(
        architecture="batchtopk", k=K, expansion_factor=4, batch_size=128, total_samples=128 * 40,
        log_every=1, seed=3, dead_feature_window=5, decoder_init_norm=None,
    )  # fmt: skip
    sparse = train_sae(sparse_batches(dictionary(), 128), D_IN, cfg)
    monkeypatch.setattr(T._BatchTopKTrainingSAE, "_sparse_step_applies", lambda self, x: False)
    dense = train_sae(sparse_batches(dictionary(), 128), D_IN, cfg)
    assert len(sparse.log) == len(dense.log) == 40
    for a, b in zip(sparse.log, dense.log, strict=True):
        assert a["metrics/l0"] == pytest.approx(b["metrics/l0"], abs=0.05)
        assert a["metrics/explained_variance"] == pytest.approx(b["metrics/explained_variance"], abs=1e-3)
        assert a["sparsity/dead_features"] == pytest.approx(b["sparsity/dead_features"], abs=1)
    assert any(e["losses/auxiliary_reconstruction_loss"] > 0 for e in sparse.log)
    torch.testing.assert_close(sparse.sae.W_dec, dense.sae.W_dec, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(sparse.log_feature_sparsity, dense.log_feature_sparsity)


def test_sparse_step_keeps_torchs_csr_beta_note_out_of_the_users_warnings():
    import warnings

    from mechvit.sae.train import _csr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense = _csr(
            torch.tensor([0, 1, 2]), torch.tensor([1, 0]), torch.tensor([2.0, 3.0]), (2, 2)
        ).to_dense()
    assert torch.equal(dense, torch.tensor([[0.0, 2.0], [3.0, 0.0]]))


def test_fast_batchtopk_select_is_ascending_topk_set_and_at_least_equals_nonzero():
    """``select`` gives torch.topk's kept set, ascending, on the filtered path, the full path and a tie at the
    boundary value (more candidates >= it than kept: torch.topk's pick); ``_at_least`` (numpy) equals torch's
    ``nonzero`` of the comparison, for float32 / float64 and for the torch fallback (bfloat16, strided)."""
    from mechvit.sae.train import _at_least, _FastBatchTopK

    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(300, generator=g).to(dtype)
        for floor in (-10.0, 0.0, 0.5, 10.0):
            torch.testing.assert_close(_at_least(x, floor), (x >= floor).nonzero().squeeze(1), rtol=0, atol=0)
    strided = torch.randn(40, 2, generator=g)[:, 0]
    assert torch.equal(_at_least(strided, 0.1), (strided >= 0.1).nonzero().squeeze(1))
    ours = _FastBatchTopK(5)
    acts = torch.randn(32, 64, generator=g).relu()
    for step in range(4):
        a = acts * (1 + 0.01 * step)
        if step == 3:  # a tie at the boundary value: torch.topk picks some of the tied entries
            kth = torch.topk(a.flatten(), 160).values.min()
            a.view(-1)[torch.randperm(a.numel(), generator=g)[:3]] = kth
        idx = ours.select(a)
        assert torch.equal(idx, idx.sort().values) and len(idx) == 5 * 32 == len(idx.unique())
        ref = torch.topk(a.flatten(), 160).values
        torch.testing.assert_close(a.flatten()[idx].sort().values, ref.sort().values, rtol=0, atol=0)
    assert ours.filtered_steps == 3  # step 0 had no filter yet


def test_sparse_codec_gradients_pass_gradcheck_with_and_without_input_gradient():
    """``_SparseCodec`` against finite differences (float64), including the input's gradient when the input
    requires one (it skips that product when not: then its gradient is None, as for a constant)."""
    from mechvit.sae.train import _SparseCodec

    g = torch.Generator().manual_seed(2)
    n, d_in, d_sae = 5, 3, 7
    sae_in = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    W_enc = torch.randn(d_in, d_sae, generator=g, dtype=torch.float64)
    b_enc = torch.randn(d_sae, generator=g, dtype=torch.float64)
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    kept = torch.randperm(n * d_sae, generator=g)[:12].sort().values
    rows, cols = kept // d_sae, kept % d_sae

    def codec(x, w_enc, b, w_dec):  # the values are the kept pre-activations, given (as in the step) detached
        values = (x @ w_enc + b).view(-1)[kept].detach()
        return _SparseCodec.apply(values, x, w_enc, b, w_dec, rows, cols)

    args = [t.clone().requires_grad_() for t in (sae_in, W_enc, b_enc, W_dec)]
    assert torch.autograd.gradcheck(codec, args)
    values = (sae_in @ W_enc + b_enc).view(-1)[kept]
    x = sae_in.clone()  # no gradient wanted: the codec's input gradient is not computed
    w = W_dec.clone().requires_grad_()
    _SparseCodec.apply(values, x, W_enc, b_enc, w, rows, cols).sum().backward()
    assert x.grad is None and w.grad is not None


@pytest.mark.parametrize("architecture", ["batchtopk", "standard"])
def test_training_step_equals_sae_lens_train_step_bit_for_bit(architecture):
    """Our trainer's ``_train_step`` (firings of a sparse step counted with bincount) against sae-lens's own
    ``SAETrainer._train_step`` on the same SAE, batches and trainer config, step by step: firing counts,
    steps since fired (so the dead-latent mask and the aux loss), weights and optimiser state equal bit for
    bit, with latents dying during the run (a short dead-feature window). BatchTopK takes the sparse step,
    ReLU + L1 the dense one (sae-lens's lines)."""
    from sae_lens.training.sae_trainer import SAETrainer

    from mechvit.sae.train import _LoggingTrainer, _trainer_config, build_training_sae

    cfg = SAETrainingConfig(
        architecture=architecture, k=K, expansion_factor=8, batch_size=64, total_samples=64 * 30, seed=4,
        dead_feature_window=3, decoder_init_norm=None,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    ours_sae = build_training_sae(D_IN, cfg)
    ref_sae = build_training_sae(D_IN, cfg)
    ref_sae.load_state_dict(ours_sae.state_dict())
    ours = _LoggingTrainer(
        cfg=_trainer_config(cfg), sae=ours_sae, data_provider=iter(()), log_every=10**6, log=[]
    )
    ref = SAETrainer(cfg=_trainer_config(cfg), sae=ref_sae, data_provider=iter(()))
    batches = sparse_batches(dictionary(), 64)
    sparse_steps = 0
    for _ in range(30):
        x = next(batches)
        a = ours._train_step(ours.sae, x)
        SAETrainer._train_step(ref, ref.sae, x)
        sparse_steps += a.feature_acts.is_sparse
        assert torch.equal(ours.act_freq_scores, ref.act_freq_scores)
        assert torch.equal(ours.n_forward_passes_since_fired, ref.n_forward_passes_since_fired)
        assert ours.n_frac_active_samples == ref.n_frac_active_samples
        for (name, p), q in zip(ours.sae.named_parameters(), ref.sae.parameters(), strict=True):
            assert torch.equal(p, q), name
    assert sparse_steps == (30 if architecture == "batchtopk" else 0)
    if architecture == "batchtopk":  # (every ReLU latent fires in every batch here)
        assert ours.dead_neurons.any()  # the window saw latents die, so the aux loss was exercised
    for s, t in zip(ours.optimizer.state.values(), ref.optimizer.state.values(), strict=True):
        assert all(torch.equal(s[k], t[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_select_on_pre_activations_equals_select_on_their_relu():
    """``select(pre, relu=True)`` keeps the entries ``select(pre.relu())`` keeps, on the filtered path and
    on the full one, including fewer positive entries than kept (zeros among the kept)."""
    from mechvit.sae.train import _FastBatchTopK

    g = torch.Generator().manual_seed(7)
    a, b = _FastBatchTopK(4), _FastBatchTopK(4)
    for step, shift in enumerate((0.0, 0.0, 0.05, -3.0, 0.0)):  # -3: few positives, the full path
        pre = torch.randn(32, 40, generator=g) + shift
        ia, ib = a.select(pre, relu=True), b.select(pre.relu())
        assert torch.equal(ia, ib), step
        assert a.filtered_steps == b.filtered_steps and a._floor == b._floor
    assert a.filtered_steps >= 2
