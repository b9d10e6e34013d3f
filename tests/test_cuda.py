"""On a CUDA device: the same answers as on the CPU, or the same known answers. Skipped where there is no GPU
(CI has none); run on a lent GPU with ``python -m pytest tests/test_cuda.py`` (README, "Performance")."""

import json
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

from mechvit import HookedViT
from mechvit.analysis.patching import activation_patching
from mechvit.sae import SAETrainingConfig, train_sae, train_saes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ARCH = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=3, num_heads=4)


def _pair(**kw):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**ARCH, **kw}).eval()
    return ref, HookedViT.from_timm(ref).eval()


@pytest.fixture(autouse=True)
def _no_tf32():
    """Float32 comparisons mean float32: TF32 matmuls (10-bit mantissa) would be another precision."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_hooked_vit_on_cuda_equals_timm_and_the_cpu_in_float32():
    ref, hooked = _pair()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        cpu = hooked(x)
        ref_cuda, hooked_cuda = ref.cuda(), hooked.cuda()
        out = hooked_cuda(x.cuda())
        torch.testing.assert_close(out, ref_cuda(x.cuda()), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.cpu(), cpu, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(hooked_cuda(x.cuda()), out)


def test_hooked_vit_on_cuda_in_bfloat16_stays_near_timm_in_bfloat16():
    ref, hooked = _pair()
    x = torch.rand(16, 3, 32, 32, device="cuda")
    with torch.no_grad():
        exact = hooked.cuda()(x)
        ours = hooked.to(torch.bfloat16)(x.bfloat16()).float()
        theirs = ref.cuda().to(torch.bfloat16)(x.bfloat16()).float()
    scale = float(exact.abs().max())
    # bf16 keeps 8 bits of mantissa: both sides are within a few percent of the float32 answer, and of each other
    assert float((ours - exact).abs().max()) < 0.05 * scale
    assert float((ours - theirs).abs().max()) < 0.05 * scale
    assert hooked.cfg.dtype == torch.bfloat16


def test_run_with_cache_on_cuda_equals_the_cpu_cache_and_hooks_fire():
    _, hooked = _pair()
    x = torch.rand(4, 3, 32, 32)
    _, cpu_cache = hooked.run_with_cache(x)
    model = hooked.cuda()
    _, cache = model.run_with_cache(x.cuda())
    assert set(cache.keys()) == set(cpu_cache.keys())
    for name in cpu_cache.keys():
        assert cache[name].is_cuda, name
        torch.testing.assert_close(cache[name].cpu(), cpu_cache[name], atol=1e-4, rtol=1e-4, msg=name)
    resid = cache.accumulated_resid(apply_ln=True)
    assert resid.is_cuda and resid.shape[0] == model.cfg.n_layers + 1
    seen = []
    model.run_with_hooks(
        x.cuda(), fwd_hooks=[("blocks.1.hook_resid_pre", lambda t, hook: seen.append(t.device))]
    )
    assert seen == [torch.device("cuda", torch.cuda.current_device())]


def test_deepcopy_pickle_and_compile_on_cuda():
    import copy

    _, hooked = _pair()
    model = hooked.cuda()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(copy.deepcopy(model)(x), want, atol=0, rtol=0)
        back = pickle.loads(pickle.dumps(model))
        assert next(back.parameters()).is_cuda
        torch.testing.assert_close(back(x), want, atol=0, rtol=0)
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:patching denominator:RuntimeWarning")  # random weights: a tiny gap
def test_activation_patching_on_cuda_equals_the_cpu_sweep():
    _, hooked = _pair()
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(6, 3, 32, 32, generator=g)
    corrupted = (clean + 0.5 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    labels = hooked(clean).argmax(-1)
    kw = dict(component="resid_pre", by="position", progress=False)
    cpu = activation_patching(hooked, clean, corrupted, labels, **kw)
    cuda = activation_patching(hooked.cuda(), clean.cuda(), corrupted.cuda(), labels.cuda(), **kw)
    assert cpu.dims == cuda.dims and cpu.labels == cuda.labels
    torch.testing.assert_close(cuda.logit_diff.cpu(), cpu.logit_diff, atol=1e-4, rtol=1e-4)
    assert cuda.clean_logit_diff == pytest.approx(cpu.clean_logit_diff, abs=1e-4)
    assert cuda.corrupted_logit_diff == pytest.approx(cpu.corrupted_logit_diff, abs=1e-4)
    att = activation_patching(
        hooked.cuda(), clean.cuda(), corrupted.cuda(), labels.cuda(), method="attribution", **kw
    )
    assert att.values.shape == cuda.values.shape and torch.isfinite(att.values).all()


# the CPU tests' known sparse dictionary and its data (tests/test_sae_train.py)
from test_sae_train import D_IN, K  # noqa: E402
from test_sae_train import dictionary as _dictionary  # noqa: E402
from test_sae_train import sparse_batches as _sparse_batches  # noqa: E402


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sae_trained_on_cuda_recovers_a_known_dictionary(architecture, tmp_path):
    """The CPU test's known answer, on the GPU: sae-lens's own step (the sparse CPU step stands aside)."""
    from mechvit.sae.train import build_training_sae

    cfg = SAETrainingConfig(
        architecture=architecture, k=K, expansion_factor=2, batch_size=256, total_samples=256 * 800,
        lr=3e-3, log_every=200, device="cuda", decoder_init_norm=None,
    )  # fmt: skip
    probe = build_training_sae(D_IN, cfg)
    if architecture == "batchtopk":
        assert not probe._sparse_step_applies(torch.randn(8, D_IN, device="cuda"))
    true = _dictionary()
    trained = train_sae(_sparse_batches(true, 256), D_IN, cfg, out_dir=tmp_path / "sae")
    assert trained.sae.W_dec.is_cuda
    learned = F.normalize(trained.sae.W_dec.detach().cpu(), dim=-1)
    max_cos = (true @ learned.T).max(dim=1).values
    assert max_cos.mean() >= 0.9, max_cos
    manifest = json.loads((tmp_path / "sae" / "mechvit_sae.json").read_text())
    assert manifest["trained_samples"] == 256 * 800


def test_lockstep_saes_on_cuda_have_distinct_initialisations_and_train():
    cfgs = {
        f"r{s}": SAETrainingConfig(
            architecture="batchtopk",
            k=K,
            expansion_factor=2,
            batch_size=128,
            total_samples=128 * 30,
            seed=s,
            device="cuda",
            log_every=10,
        )  # fmt: skip
        for s in (1, 2)
    }
    a, b = train_saes(_sparse_batches(_dictionary(), 128), D_IN, cfgs).values()
    assert a.sae.W_dec.is_cuda and b.sae.W_dec.is_cuda
    assert not torch.equal(a.sae.W_dec, b.sae.W_dec)
    for t in (a, b):
        assert t.log and all(torch.isfinite(torch.tensor(e["metrics/explained_variance"])) for e in t.log)


def test_threshold_reestimate_on_cuda_equals_the_cpu():
    """The pooled-quantile threshold of a CUDA SAE (no CPU prefilter there) equals the same SAE's on the CPU."""
    from mechvit.sae import reestimate_thresholds
    from mechvit.sae.train import build_training_sae

    torch.manual_seed(0)
    cpu = build_training_sae(D_IN, SAETrainingConfig(architecture="batchtopk", expansion_factor=2, k=K))
    gpu = build_training_sae(
        D_IN, SAETrainingConfig(architecture="batchtopk", expansion_factor=2, k=K, device="cuda")
    )
    gpu.load_state_dict(cpu.state_dict())
    xs = [b for b, _ in zip(_sparse_batches(_dictionary(), 128), range(6), strict=False)]
    a = reestimate_thresholds({"s": cpu}, {"s": 6}, iter([{"s": x} for x in xs]))["s"]
    b = reestimate_thresholds({"s": gpu}, {"s": 6}, iter([{"s": x.cuda()} for x in xs]))["s"]
    assert a["exact"] and b["exact"] and gpu.topk_threshold.is_cuda
    assert b["estimated"] == pytest.approx(a["estimated"], rel=1e-5)


def test_reconstruction_metrics_per_row_on_cuda_equal_the_cpu():
    """A CUDA SAE's held-out metrics and per-row numbers (gathered on the CPU for the CIs) equal the CPU's."""
    from mechvit.sae import reconstruction_metrics
    from mechvit.sae.train import build_training_sae

    torch.manual_seed(0)
    cpu = build_training_sae(D_IN, SAETrainingConfig(architecture="standard", expansion_factor=2))
    gpu = build_training_sae(
        D_IN, SAETrainingConfig(architecture="standard", expansion_factor=2, device="cuda")
    )
    gpu.load_state_dict(cpu.state_dict())
    x = next(iter(_sparse_batches(_dictionary(), 512)))
    a = reconstruction_metrics(cpu, x, per_row=True)
    b = reconstruction_metrics(gpu, x.cuda(), per_row=True)
    assert not b.per_row["active"].is_cuda and not b.per_row["sq_err"].is_cuda
    assert b.explained_variance == pytest.approx(a.explained_variance, rel=1e-5)
    assert torch.allclose(b.per_row["sq_err"], a.per_row["sq_err"], rtol=1e-4, atol=1e-8)
    assert (b.per_row["active"] != a.per_row["active"]).float().mean() < 0.01  # ties at 0 may round apart


def test_tiny_study_on_cuda_runs_every_step_and_agrees_with_the_cpu(tmp_path):
    from test_study import ALL_STEPS, make_checkpoints, tiny_config

    from mechvit.study import run_study
    from mechvit.study.config import study_config_from_dict

    ck = make_checkpoints(tmp_path / "ck")
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = tiny_config(ck)
        cfg["device"] = device
        run = run_study(study_config_from_dict(cfg), tmp_path / device)
        assert run.computed == ALL_STEPS
        runs[device] = json.loads((tmp_path / device / "metrics.json").read_text())
        assert (tmp_path / device / "report.html").is_file()
    assert runs["cuda"]["environment"]["device"].startswith("cuda")
    assert runs["cpu"]["environment"]["device"] == "cpu"
    rows = {
        d: {
            (r["model"], r["corruption"], r["severity"]): r
            for r in runs[d]["steps"]["robustness"]["metrics"]["rows"]
        }
        for d in runs
    }
    assert rows["cpu"].keys() == rows["cuda"].keys()
    for key, r in rows["cpu"].items():
        # the noise family draws from the device's own generator (other noise, same size); clean, blur and
        # contrast are the same images: their accuracies agree to one image in 32 (near-tied logits)
        tol = 0.2 if key[1] == "gaussian_noise" else 1 / 32 + 1e-9
        assert rows["cuda"][key]["top1"] == pytest.approx(r["top1"], abs=tol), key
    sae_cpu, sae_cuda = (runs[d]["steps"]["sae"]["metrics"] for d in ("cpu", "cuda"))
    assert json.dumps(sae_cpu, sort_keys=True).count("explained_variance") == json.dumps(
        sae_cuda, sort_keys=True
    ).count("explained_variance")
