"""Activation store: token selection, early stop, shuffle buffer, corruption mix, resumable disk cache, memory."""

import ctypes
import json
import threading
import time
from pathlib import Path

import pytest
import timm
import torch

from mechvit import HookedViT
from mechvit.sae import (
    ActivationStoreConfig,
    CachedActivations,
    CorruptionMix,
    cache_activations,
    hook_width,
    model_fingerprint,
    run_to_hook,
    select_tokens,
    shuffle_batches,
    stream_batches,
)

HOOK = "blocks.1.hook_resid_pre"


def tiny(**kw) -> HookedViT:
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
        **kw,
    )
    return HookedViT.from_timm(m).eval()


@pytest.fixture(scope="module")
def model() -> HookedViT:
    torch.manual_seed(0)
    return tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_run_to_hook_matches_cache_and_stops_early(model, images):
    _, cache = model.run_with_cache(images[:4])
    later_calls = []
    model.hook_dict["blocks.1.hook_resid_post"].add_hook(lambda act, hook: later_calls.append(1))
    try:
        act = run_to_hook(model, images[:4], HOOK)
    finally:
        model.reset_hooks(including_permanent=True)
    torch.testing.assert_close(act, cache[HOOK])
    assert later_calls == []  # block 1 never ran


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_token_selection_counts_and_values(reg_tokens, images):
    m = tiny(reg_tokens=reg_tokens)
    n_prefix, n_tokens = m.cfg.n_prefix_tokens, m.cfg.n_tokens
    assert n_prefix == 1 + reg_tokens
    act = run_to_hook(m, images[:3], HOOK)
    assert select_tokens(act, m.cfg, "all").shape == (3 * n_tokens, 32)
    torch.testing.assert_close(select_tokens(act, m.cfg, "cls"), act[:, 0])
    torch.testing.assert_close(select_tokens(act, m.cfg, "prefix"), act[:, :n_prefix].reshape(-1, 32))
    torch.testing.assert_close(select_tokens(act, m.cfg, "patches"), act[:, n_prefix:].reshape(-1, 32))
    assert select_tokens(act, m.cfg, "patches").shape[0] == 3 * 16


def test_hook_widths_and_errors(model):
    assert hook_width(model, HOOK) == 32
    assert hook_width(model, "blocks.0.attn.hook_z") == 32  # [B, T, H, d_head] flattened
    assert hook_width(model, "blocks.0.mlp.hook_post") == 128
    with pytest.raises(ValueError, match="not a hook of this model"):
        run_to_hook(model, torch.zeros(1, 1, 28, 28), "blocks.7.hook_resid_pre")
    with pytest.raises(ValueError, match="tokens must be one of"):
        ActivationStoreConfig(hook=HOOK, tokens="patch")
    with pytest.raises(ValueError, match="attention maps"):
        hook_width(model, "blocks.0.attn.hook_pattern")
    no_cls = tiny(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        hook_width(no_cls, HOOK, "cls")
    with pytest.raises(ValueError, match="no prefix tokens"):
        hook_width(no_cls, HOOK, "prefix")


def test_corruption_mix_validation():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        CorruptionMix(fraction=1.5, corruptions=(("gaussian_noise", 1),))
    with pytest.raises(ValueError, match="no \\(name, severity\\)"):
        CorruptionMix(fraction=0.5).validate()
    with pytest.raises(
        ValueError, match="unknown corruption 'no_such_thing'; expected one of gaussian_noise"
    ):
        CorruptionMix(fraction=0.5, corruptions=(("no_such_thing", 1),)).validate()
    with pytest.raises(ValueError, match="did you mean 'gaussian_noise'"):  # the configs' wording
        CorruptionMix(fraction=0.5, corruptions=(("gausian_noise", 1),)).validate()
    with pytest.raises(ValueError) as err:  # every bad pair named, with its severity
        CorruptionMix(fraction=0.5, corruptions=(("fog", 2), ("smog", 3), ("gausian_noise", 1))).validate()
    assert str(err.value).startswith("corruption mix: ('smog', 3): unknown corruption 'smog';")
    assert "; ('gausian_noise', 1): unknown corruption 'gausian_noise'" in str(err.value)


def test_shuffle_batches_exact_sizes_keeps_every_row():
    rows = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 3)
    chunks = list(rows.split(37))
    out = list(shuffle_batches(chunks, 64, 256, seed=0))
    assert all(b.shape == (64, 3) for b in out)
    seen = torch.cat(out)[:, 0]
    assert len(out) == 1000 // 64 and len(set(seen.tolist())) == len(seen)  # no row twice, <64 dropped
    assert not torch.equal(seen, torch.arange(len(seen), dtype=torch.float32))  # shuffled
    again = torch.cat(list(shuffle_batches(chunks, 64, 256, seed=0)))
    assert torch.equal(again[:, 0], seen)  # seeded
    ordered = torch.cat(list(shuffle_batches(chunks, 64, 256, shuffle=False)))
    assert torch.equal(ordered[:, 0], torch.arange(960, dtype=torch.float32))
    with pytest.raises(ValueError, match="at least 2 \\* batch_size"):
        next(shuffle_batches(chunks, 64, 100))


def test_shuffle_batches_detach_and_leave_no_traceback_at_interpreter_exit():
    rows = torch.randn(300, 4, requires_grad=True)
    batch = next(shuffle_batches(iter(rows.split(50)), 32, 128, seed=0))
    assert not batch.requires_grad and batch.grad_fn is None
    # an endless stream left half-used when the interpreter exits (a script that trains, then ends): the
    # generator is finalised during shutdown; a torch.no_grad decorator there raised "Exception ignored in
    # <generator object shuffle_batches>" with a traceback
    import subprocess
    import sys

    code = (
        "import itertools, torch\n"
        "from mechvit.sae.activations import shuffle_batches\n"
        "stream = shuffle_batches(itertools.repeat(torch.randn(64, 4)), 16, 64, seed=0)\n"
        "next(stream)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_cache_round_trip_and_mismatch(model, images, tmp_path):
    cfg = ActivationStoreConfig(hook=HOOK, tokens="patches", model_batch_size=8)
    cached = cache_activations(model, images, tmp_path, cfg, batches_per_shard=2)
    direct = select_tokens(run_to_hook(model, images, HOOK), model.cfg, "patches")
    assert len(cached) == len(direct) == 40 * 16 and cached.d_in == 32
    torch.testing.assert_close(cached.rows(), direct, atol=2e-3, rtol=2e-3)  # float16 on disk
    torch.testing.assert_close(cached.rows(100, 130), direct[100:130], atol=2e-3, rtol=2e-3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["count"] == 640 and manifest["model_sha256"] == model_fingerprint(model)
    assert manifest["hook"] == HOOK and manifest["tokens"] == "patches" and len(manifest["shards"]) == 3
    batches = list(cached.batches(50, buffer_size=200, epochs=1))
    assert len(batches) == 640 // 50 and all(b.shape == (50, 32) for b in batches)
    with pytest.raises(ValueError, match="different activation cache"):
        cache_activations(model, images, tmp_path, ActivationStoreConfig(hook=HOOK, tokens="all"))


def test_cache_sample_is_distinct_rows_from_every_shard(model, images, tmp_path):
    cached = cache_activations(
        model, images, tmp_path, ActivationStoreConfig(hook=HOOK, tokens="patches", model_batch_size=8),
        batches_per_shard=2,
    )  # fmt: skip
    every = cached.rows()
    s = cached.sample(300, seed=4)
    assert s.shape == (300, 32) and s.dtype == torch.float32
    # each sampled row is one row of the cache, no row twice, and the three shards all contribute
    match = (s[:, None, :] == every[None, :, :]).all(-1)
    assert bool((match.sum(1) >= 1).all())
    idx = match.float().argmax(1)
    assert len(set(idx.tolist())) == 300 and {int(i) // 256 for i in idx} == {0, 1, 2}
    assert not torch.equal(idx, idx.sort().values)  # in random order
    assert torch.equal(cached.sample(300, seed=4), s) and not torch.equal(cached.sample(300, seed=5), s)
    assert torch.equal(cached.sample(640, seed=0).sort(0).values, every.sort(0).values)  # the whole cache
    for bad in (0, 641):
        with pytest.raises(ValueError, match=r"sample size must be in \[1, 640\]"):
            cached.sample(bad)


def test_cache_resumes_after_interruption(model, images, tmp_path):
    cfg = ActivationStoreConfig(
        hook=HOOK,
        tokens="all",
        model_batch_size=4,
        mix=CorruptionMix(0.5, (("gaussian_noise", 3), ("gaussian_blur", 2))),
    )
    reference = cache_activations(model, images, tmp_path / "ref", cfg, batches_per_shard=3).rows()
    calls = []

    def crash_after_five(x):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        cache_activations(
            model, images, tmp_path / "run", cfg, batches_per_shard=3, transform=crash_after_five
        )
    with pytest.raises(ValueError, match="incomplete"):
        CachedActivations(tmp_path / "run")
    assert len(json.loads((tmp_path / "run" / "manifest.json").read_text())["shards"]) == 1
    calls.clear()
    resumed = cache_activations(
        model, images, tmp_path / "run", cfg, batches_per_shard=3, transform=lambda x: calls.append(1) or x
    )
    assert len(calls) == 10 - 3  # the finished shard (3 batches) is not recomputed
    assert torch.equal(resumed.rows(), reference)


def test_corruption_mix_changes_the_corrupted_rows_only(model, images, tmp_path):
    clean = cache_activations(model, images, tmp_path / "c", ActivationStoreConfig(hook=HOOK))
    mixed_cfg = ActivationStoreConfig(hook=HOOK, mix=CorruptionMix(0.5, (("gaussian_noise", 5),)))
    mixed = cache_activations(model, images, tmp_path / "m", mixed_cfg)
    diff = (mixed.rows() - clean.rows()).abs().reshape(40, 16 * 32).amax(1)  # per image
    changed = diff > 0.05
    assert 8 <= int(changed.sum()) <= 32  # about half of the 40 images
    assert torch.all(diff[~changed] == 0)  # the clean images give exactly the clean rows
    assert mixed.manifest["mix"] == {"fraction": 0.5, "corruptions": [["gaussian_noise", 5]]}


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise OSError("no RssAnon")


def _peak_rss_growth_mib(fn) -> float:
    """Peak growth of anonymous resident memory (torch and numpy alike) while ``fn`` runs, in MiB.

    glibc keeps memory that earlier tests freed and hands it out again without raising the resident size;
    ``malloc_trim`` returns it to the kernel first, so that what ``fn`` allocates shows up as growth.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the measurement may then under-report, the control assertion says so
        pass
    base, peak, stop = _rss_anon_kib(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon_kib())
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return (max(peak[0], _rss_anon_kib()) - base) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_store_memory_stays_bounded(model, tmp_path):
    # 4,000 images x 16 patches x 128 (mlp) = 8.2M values: 31 MiB in float32, 1000x the 64-row buffer
    many = torch.rand(4000, 1, 28, 28)
    cfg = ActivationStoreConfig(
        hook="blocks.0.mlp.hook_post", tokens="patches", model_batch_size=100, buffer_size=64
    )
    total = 4000 * 16

    def cache_and_read(images, out):
        cached = cache_activations(model, images, out, cfg, batches_per_shard=1)
        assert sum(len(b) for b in cached.batches(32, buffer_size=64, epochs=1)) == len(images) * 16

    def stream():
        assert sum(len(b) for b in stream_batches(model, many, cfg, 32, epochs=1)) == total

    def keep_everything():  # what an unbounded store would do: the probe must see it
        kept.extend(
            select_tokens(run_to_hook(model, x, cfg.hook), model.cfg, "patches") for x in many.split(100)
        )

    kept: list = []
    cache_and_read(many[:200], tmp_path / "warmup")  # first-call allocator and import costs
    growth = {
        "cache": _peak_rss_growth_mib(lambda: cache_and_read(many, tmp_path / "big")),
        "stream": _peak_rss_growth_mib(stream),
        "unbounded": _peak_rss_growth_mib(keep_everything),
    }
    # The data is 31 MiB: a store that kept it would grow by about that (the control does); a bounded store
    # grows only by its fixed working set (model batch, buffer, shard: ~9 MiB measured), whatever the data size.
    assert growth["unbounded"] > 28, growth
    assert growth["cache"] < 16 and growth["stream"] < 16, growth
