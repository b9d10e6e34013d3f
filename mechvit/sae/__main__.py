"""Train one SAE on a checkpoint's activations and evaluate it on held-out images.

    python -m mechvit.sae --checkpoint checkpoints/fmnist_vit_base --hook blocks.2.hook_resid_post \\
        --out runs/sae/base_blocks2 [--architecture batchtopk --k 32 --expansion 16 --samples 300000]
        [--mix 0.5 --corruption gaussian_blur:4 --corruption gaussian_noise:4] [--cache runs/acts/base]

``--checkpoint`` is a mechvit training checkpoint (``card.json`` + ``model.safetensors``) or a
``HookedViT.save_pretrained`` folder. Data: Fashion-MNIST train images for training, test images held out.
Prints (and stores in the SAE's ``mechvit_sae.json``) the held-out reconstruction and spliced metrics.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from . import (
    ActivationStoreConfig,
    CorruptionMix,
    SAETrainingConfig,
    cache_activations,
    reconstruction_metrics,
    save_trained,
    spliced_metrics,
    train_sae_for_hook,
)


def load_model(path: str, device: str):
    from mechvit import HookedViT

    p = Path(path)
    if (p / "card.json").is_file():
        from mechvit.training.checkpoint import load_checkpoint

        return HookedViT.from_timm(load_checkpoint(p), device=device).eval()
    return HookedViT.from_pretrained(p, device=device).eval()


def _corruption(text: str) -> tuple[str, int]:
    name, _, severity = text.partition(":")
    if not severity.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME:SEVERITY such as gaussian_blur:4, got {text!r}")
    return name, int(severity)


def main(argv: list[str] | None = None, prog: str = "python -m mechvit.sae") -> dict:
    """Parse ``argv``, train and evaluate; ``prog`` is the command name the help and errors show."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.replace("python -m mechvit.sae", prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--hook", required=True)
    ap.add_argument("--tokens", default="patches", choices=["all", "cls", "patches", "prefix"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default=None, help="activation cache folder (resumable); default: stream")
    ap.add_argument(
        "--architecture", default="batchtopk", choices=["standard", "topk", "batchtopk", "jumprelu"]
    )
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--aux", type=float, default=1 / 32, help="TopK/BatchTopK auxiliary (dead-feature) loss")
    ap.add_argument("--l1", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=300_000)
    ap.add_argument("--images", type=int, default=None, help="training images (default: all 60,000)")
    ap.add_argument("--heldout", type=int, default=2000, help="test images for the metrics")
    ap.add_argument("--mix", type=float, default=0.0, help="fraction of training images corrupted")
    ap.add_argument("--corruption", type=_corruption, action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mechvit.data import load_fashion_mnist

    model = load_model(args.checkpoint, args.device)
    train_x, _ = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_x, test_x, test_y = train_x[: args.images], test_x[: args.heldout], test_y[: args.heldout]
    store = ActivationStoreConfig(
        hook=args.hook,
        tokens=args.tokens,
        seed=args.seed,
        mix=CorruptionMix(args.mix, tuple(args.corruption)),
    )
    cfg = SAETrainingConfig(
        architecture=args.architecture,
        k=args.k,
        expansion_factor=args.expansion,
        aux_coefficient=args.aux,
        l1_coefficient=args.l1,
        lr=args.lr,
        batch_size=args.batch_size,
        total_samples=args.samples,
        seed=args.seed,
        device=args.device,
    )
    t0 = time.perf_counter()
    trained = train_sae_for_hook(
        model, train_x, store, cfg, cache_dir=args.cache, dataset=f"fashion_mnist/train[:{len(train_x)}]"
    )
    seconds = time.perf_counter() - t0
    # held-out: clean test images (the store without corruption)
    clean_store = ActivationStoreConfig(hook=args.hook, tokens=args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        heldout = cache_activations(
            model, test_x, tmp, clean_store, dtype="float32", dataset=f"fashion_mnist/test[:{len(test_x)}]"
        )
        recon = reconstruction_metrics(trained.sae, heldout.chunks(8192, shuffle=False))
    spliced = spliced_metrics(model, trained.sae, test_x, test_y, args.hook, tokens=args.tokens)
    trained.manifest.update(
        heldout_metrics=recon.to_dict(),
        spliced_metrics=spliced.to_dict(),
        train_seconds=round(seconds, 1),
        checkpoint=str(args.checkpoint),
    )
    save_trained(trained, args.out)
    summary = {"out": args.out, "train_seconds": round(seconds, 1), **recon.to_dict(), **spliced.to_dict()}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
