"""SAE splicing: ``spliced_metrics_many`` with the resumed forwards reading out only the class token, against
the same resumed forwards on every token, measured in one run.

    python benchmarks/bench_splicer.py [--images 1000] [--saes 5] [--hook blocks.0.hook_resid_post]
        [--rounds 3] [--threads 1] [--device auto|cpu|cuda] [--dtype float32|bfloat16]

On the shipped model ``checkpoints/fmnist_vit_base`` when it exists, else on a randomly initialised model of
the same shape (configs/train_base.yaml: patch 4, width 96, depth 6, 4 heads; 50 tokens). ``--saes``
randomly initialised ReLU SAEs (x12, as the study's, with a negative encoder bias so the latents fire
sparsely) at ``--hook``, patch tokens, on ``--images`` random Fashion-MNIST-shaped images [N, 1, 28, 28].
``mechvit.sae.Splicer`` computes the stream at the hook once and reruns only the blocks after it for the
clean logits, the zero-ablation and each SAE's splice. Variants:

- full rows (baseline): those resumed forwards compute every token in the last block
  (``mechvit.sae.metrics._forward_parameters`` patched to hide ``readout_only`` from the Splicer);
- readout: the default, ``readout_only=True``: the last block computes only the rows the pooling reads.

Both give the same metrics to float rounding: the max abs difference of the logits is printed (asserted
< 1e-4 in float32, < 0.05 in bfloat16), and of every SplicedMetrics number. Rounds are interleaved; the ratio
is median(full rows) / median(readout). CUDA timings synchronise before and after each call.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
from _common import add_device_args, kept_output, load_shipped_base, machine, resolve, timed
from sae_lens import StandardSAE, StandardSAEConfig

import mechvit.sae.metrics as metrics
from mechvit.sae import Splicer, spliced_metrics_many


def random_sae(hook: str, d_in: int, expansion: int, seed: int, device) -> StandardSAE:
    """A ReLU SAE with random weights and a negative encoder bias, so latents fire sparsely."""
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=expansion * d_in))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.normal_(0, 1 / d_in**0.5)
        sae.b_enc.fill_(-0.6)
        sae.b_dec.normal_(0, 0.1)
    sae.cfg.metadata.hook_name = hook
    return sae.to(device).eval()


@contextlib.contextmanager
def full_rows():
    """The Splicer as if the model's forward did not take ``readout_only``: every token in the last block."""
    params = metrics._forward_parameters
    metrics._forward_parameters = lambda model: params(model) - {"readout_only"}
    try:
        yield
    finally:
        metrics._forward_parameters = params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--saes", type=int, default=5)
    ap.add_argument("--expansion", type=int, default=12)
    ap.add_argument("--hook", default="blocks.0.hook_resid_post")
    ap.add_argument("--batch", type=int, default=128, help="spliced_metrics_many's batch_size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = resolve(args)
    torch.set_num_threads(args.threads)
    model, model_src = load_shipped_base(device, dtype)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 1, 28, 28, generator=g).to(device, dtype)
    labels = torch.randint(0, cfg.num_classes, (args.images,), generator=g)
    saes = [random_sae(args.hook, cfg.d_model, args.expansion, s, device) for s in range(args.saes)]
    print(f"model: {model_src}; {machine(device, dtype)}", flush=True)
    print(
        f"spliced_metrics_many: {args.saes} random SAEs (x{args.expansion}) at {args.hook}, patch tokens, "
        f"{args.images} random images, batch {args.batch}; depth {cfg.n_layers}, {cfg.n_tokens} tokens; "
        f"{args.rounds} interleaved rounds (median)"
    )
    with full_rows():
        assert Splicer(model, images[:1], args.hook)._resume_kwargs == {}
    assert Splicer(model, images[:1], args.hook)._resume_kwargs == {"readout_only": True}

    def run():
        return spliced_metrics_many(model, saes, images, labels, args.hook, batch_size=args.batch)

    def run_full():
        with full_rows():
            return run()

    variants = {"full rows": run_full, "readout": run}

    # the logits of both, clean, zero-ablated and spliced
    def logits(splicer: Splicer) -> torch.Tensor:
        parts = [splicer.clean(), splicer.spliced(None), *(splicer.spliced(s) for s in saes)]
        return torch.cat([torch.cat(p) for p in parts])

    with torch.no_grad():
        with full_rows():
            ref = logits(Splicer(model, images, args.hook, batch_size=args.batch))
        got = logits(Splicer(model, images, args.hook, batch_size=args.batch))
    logit_diff = float((got - ref).abs().max())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert logit_diff < tol, f"readout and full-row logits differ by {logit_diff}"
    results = {k: fn() for k, fn in variants.items()}  # warm-up, and the metrics compared below
    metric_diff = max(
        abs(a - b)
        for ma, mb in zip(results["readout"], results["full rows"], strict=True)
        for a, b in zip(ma.to_dict().values(), mb.to_dict().values(), strict=True)
    )
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, fn in variants.items():
            times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        "\n| measurement | readout (s) | full rows (s) | ratio | logits max abs diff | metrics max abs diff |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| spliced_metrics_many, {args.saes} SAEs: readout_only vs every token in the last block "
        f"| {med['readout']:.3f} | {med['full rows']:.3f} | {med['full rows'] / med['readout']:.2f}x "
        f"| {logit_diff:.1e} | {metric_diff:.1e} |"
    )
    print(f"after the run: {machine(device, dtype)}")


if __name__ == "__main__":
    with kept_output("bench_splicer"):
        main()
