"""Train one SAE on a checkpoint's activations and evaluate it on held-out images.

    python -m mechvit.sae --checkpoint checkpoints/fmnist_vit_base --hook blocks.2.hook_resid_post \\
        --out runs/sae/base_blocks2 [--architecture batchtopk --k 32 --expansion 16 --samples 300000]
        [--mix 0.5 --corruption gaussian_blur:4 --corruption gaussian_noise:4] [--cache runs/acts/base]

``--checkpoint`` is a mechvit training checkpoint (``card.json`` + ``model.safetensors``) or a
``HookedViT.save_pretrained`` folder; a checkpoint's images are normalised as in its training
(``config.data.mean/std`` of its card). Data: Fashion-MNIST train images for training, test images held out.
The SAE is saved when trained; then the held-out reconstruction and spliced metrics are printed and stored in
its ``mechvit_sae.json`` (``--heldout 0``: none).

Or train on an activation cache written by ``mechvit cache-activations`` (no model, no held-out metrics),
on one process or data-parallel under torchrun (docs/scaling.md); several architectures and seeds train in
one pass over the data (saved as <out>/<architecture>__s<seed>, each SAE seeded by
derive_seed(seed, architecture)):

    torchrun --nproc_per_node=N -m mechvit train-sae --activations runs/acts/b10 --out runs/sae/b10 \\
        --architecture batchtopk standard --seeds 0 1 2 --batch-size 4096 --samples 20000000
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from mechvit._io import atomic_write_json

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
from .train import MANIFEST_NAME


def normaliser(mean: list[float] | None, std: list[float] | None):
    """``mechvit.data.normalize`` with the checkpoint's ``mean`` / ``std`` (None without a mean): the transform
    the model was trained with (as ``mechvit explore`` applies it)."""
    if mean is None:
        return None
    from mechvit.data import normalize

    return functools.partial(normalize, mean=mean, std=std)


def _normalised(name: str, mean: list[float] | None, std: list[float] | None) -> str:
    """A dataset id that says how its images were normalised (a cache written without is not reused)."""
    return name if mean is None else f"{name} normalised mean={mean} std={std}"


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
    ap.add_argument("--checkpoint", default=None, help="model folder (required unless --activations)")
    ap.add_argument("--hook", default=None, help="hook name (required unless --activations)")
    ap.add_argument(
        "--activations",
        default=None,
        help="train on this finished activation cache (mechvit cache-activations); torchrun: data-parallel",
    )
    ap.add_argument("--tokens", default="patches", choices=["all", "cls", "patches", "prefix"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default=None, help="activation cache folder (resumable); default: stream")
    ap.add_argument(
        "--architecture",
        nargs="+",
        default=["batchtopk"],
        choices=["standard", "topk", "batchtopk", "jumprelu"],
        help="several (with --activations): trained in one pass",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="with --activations: one SAE per seed")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--aux", type=float, default=1 / 32, help="TopK/BatchTopK auxiliary (dead-feature) loss")
    ap.add_argument(
        "--threshold-batches",
        type=int,
        default=0,
        help="BatchTopK: re-estimate the inference threshold after training over this many batches (k per row "
        "on average there; with --activations rows drawn from the whole cache); 0: sae-lens's running mean",
    )
    ap.add_argument("--l1", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=300_000)
    ap.add_argument("--images", type=int, default=None, help="training images (default: all 60,000)")
    ap.add_argument("--heldout", type=int, default=2000, help="test images for the metrics")
    ap.add_argument("--mix", type=float, default=0.0, help="fraction of training images corrupted")
    ap.add_argument("--corruption", type=_corruption, action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun, cuda is cuda:LOCAL_RANK)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_threshold_batches(ap, args)
    if args.activations is not None:
        if args.mix or args.corruption:
            ap.error(
                "--mix and --corruption apply when activations come from --checkpoint; a cache's corruption "
                "mix was chosen when it was written (mechvit cache-activations --mix ... --corruption ...)"
            )
        return _train_from_cache(args)
    if args.checkpoint is None or args.hook is None:
        ap.error("--checkpoint and --hook are required (or train on a cache with --activations)")
    if len(args.architecture) > 1 or args.seeds:
        ap.error("several --architecture values and --seeds need --activations (one pass over a cache)")
    if args.images is not None and args.images < 1:
        ap.error(f"--images must be >= 1 (or left out: all 60,000), got {args.images}")
    if args.heldout < 0:
        ap.error(f"--heldout must be >= 0 (0: no held-out metrics), got {args.heldout}")
    _check_mix(ap, args)
    args.architecture = args.architecture[0]
    # every value is checked before the model and the data are loaded, and the SAE is saved before the
    # held-out metrics are computed: nothing trained is lost to a late error
    cfg = _training_config(args, args.architecture, args.seed, args.device)
    store = ActivationStoreConfig(
        hook=args.hook,
        tokens=args.tokens,
        seed=args.seed,
        mix=CorruptionMix(args.mix, tuple(args.corruption)),
    )
    store.mix.validate()
    from mechvit.data import load_fashion_mnist

    from .activations import check_hook, hook_width

    model = load_model(args.checkpoint, args.device)
    check_hook(model, args.hook)
    cfg.check_d_in(hook_width(model, args.hook, args.tokens))
    from mechvit.training.checkpoint import card_normalisation

    mean, std = card_normalisation(args.checkpoint)
    transform = normaliser(mean, std)
    train_x, _ = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_x, test_x, test_y = train_x[: args.images], test_x[: args.heldout], test_y[: args.heldout]
    t0 = time.perf_counter()
    trained = train_sae_for_hook(
        model,
        train_x,
        store,
        cfg,
        cache_dir=args.cache,
        dataset=_normalised(f"fashion_mnist/train[:{len(train_x)}]", mean, std),
        transform=transform,
    )
    seconds = time.perf_counter() - t0
    trained.manifest.update(
        train_seconds=round(seconds, 1),
        checkpoint=str(args.checkpoint),
        input_normalisation=None if mean is None else {"mean": mean, "std": std},
    )
    save_trained(trained, args.out)
    summary = {"out": args.out, "train_seconds": round(seconds, 1)}
    if len(test_x):
        # held-out: clean test images (the store without corruption)
        clean_store = ActivationStoreConfig(hook=args.hook, tokens=args.tokens)
        with tempfile.TemporaryDirectory() as tmp:
            heldout = cache_activations(
                model,
                test_x,
                tmp,
                clean_store,
                dtype="float32",
                dataset=_normalised(f"fashion_mnist/test[:{len(test_x)}]", mean, std),
                transform=transform,
            )
            recon = reconstruction_metrics(trained.sae, heldout.chunks(8192, shuffle=False))
        spliced = spliced_metrics(
            model, trained.sae, test_x, test_y, args.hook, tokens=args.tokens, transform=transform
        )
        trained.manifest.update(heldout_metrics=recon.to_dict(), spliced_metrics=spliced.to_dict())
        atomic_write_json(Path(args.out) / MANIFEST_NAME, trained.manifest)
        summary.update(**recon.to_dict(), **spliced.to_dict())
    print(json.dumps(summary, indent=2))
    return summary


def _check_threshold_batches(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--threshold-batches`` when no SAE of the run is BatchTopK (nothing would use it)."""
    archs = args.architecture if isinstance(args.architecture, list) else [args.architecture]
    if args.threshold_batches and "batchtopk" not in archs:
        ap.error(
            f"--threshold-batches {args.threshold_batches} re-estimates a BatchTopK SAE's inference threshold; "
            f"--architecture {' '.join(archs)} has none: drop it or add batchtopk"
        )


def _check_mix(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse corruptions that would not be applied (``--mix 0``) and a mix with nothing to apply."""
    if args.corruption and not args.mix:
        ap.error(
            f"--corruption {' '.join(f'{n}:{s}' for n, s in args.corruption)} needs --mix > 0 (the fraction "
            "of images corrupted); with --mix 0 no image is corrupted"
        )
    if args.mix and not args.corruption:
        ap.error(f"--mix {args.mix} needs at least one --corruption NAME:SEVERITY to corrupt the images with")


def _training_config(
    args: argparse.Namespace, architecture: str, seed: int, device: str
) -> SAETrainingConfig:
    return SAETrainingConfig(
        architecture="batchtopk",  # the options as given; for_architecture keeps what applies to architecture
        k=args.k,
        expansion_factor=args.expansion,
        aux_coefficient=args.aux,
        l1_coefficient=args.l1,
        lr=args.lr,
        threshold_batches=args.threshold_batches,
        batch_size=args.batch_size,
        total_samples=args.samples,
        seed=seed,
        device=device,
    ).for_architecture(architecture)


def _train_from_cache(args: argparse.Namespace) -> dict:
    """SAEs on a finished activation cache; data-parallel when launched by torchrun (rank 0 saves)."""
    from .activations import CachedActivations
    from .distributed import init_from_env, rank_and_world
    from .train import derive_seed, train_sae, train_saes

    device = init_from_env(args.device)
    rank, world = rank_and_world()
    cached = CachedActivations(args.activations)
    m = cached.manifest
    manifest = {
        "hook": m["hook"],
        "tokens": m["tokens"],
        "model_sha256": m["model_sha256"],
        "dataset": m["dataset"],
        "corruption_mix": m["mix"],
        "activations": str(Path(args.activations)),
        "n_activations": len(cached),
        "processes": world,
    }
    if len(cached) < args.batch_size:
        raise ValueError(
            f"{args.activations} holds {len(cached)} activations, fewer than one batch ({args.batch_size})"
        )
    seeds = args.seeds or [args.seed]
    order_seed = derive_seed(args.seed, "order") if len(args.architecture) * len(seeds) > 1 else args.seed
    # every rank reads the same global batches (same seed) and trains on its slice of each
    batches = cached.batches(
        args.batch_size, buffer_size=max(32_768, 2 * args.batch_size), seed=order_seed, device=device
    )
    n_thr = min(len(cached), max(0, args.threshold_batches) * args.batch_size)
    rows = cached.sample(n_thr, seed=derive_seed(args.seed, "threshold")) if n_thr else None
    t0 = time.perf_counter()
    if len(args.architecture) == 1 and len(seeds) == 1:
        cfg = _training_config(args, args.architecture[0], seeds[0], device)
        trained = {
            "": train_sae(batches, cached.d_in, cfg, out_dir=args.out, manifest=manifest, threshold_rows=rows)
        }
    else:
        # one pass, each SAE its own init and draw seed (train_saes), derived from (seed, architecture)
        cfgs = {
            f"{a}__s{s}": _training_config(args, a, derive_seed(s, a), device)
            for a in args.architecture
            for s in seeds
        }
        trained = train_saes(
            batches,
            cached.d_in,
            cfgs,
            manifests={n: manifest for n in cfgs},
            out_dirs={n: Path(args.out) / n for n in cfgs},
            threshold_rows=rows,
        )
    seconds = round(time.perf_counter() - t0, 1)
    summary = {
        "out": args.out,
        "processes": world,
        "train_seconds": seconds,
        "saes": {n or args.architecture[0]: t.manifest["final_train_metrics"] for n, t in trained.items()},
    }
    if rank == 0:
        print(json.dumps(summary, indent=2))
    return summary


# ---- cache-activations ---------------------------------------------------------------------------------


def cache_main(argv: list[str] | None = None, prog: str = "mechvit cache-activations") -> dict:
    """``mechvit cache-activations``: write a model's activations at one hook over a dataset split to a
    float16 disk cache; under torchrun each rank writes its shards (mechvit.sae.distributed)."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Write a model's activations at one hook over a dataset split to a resumable, "
        "memory-mapped float16 cache (shards + manifest.json). Under torchrun --nproc_per_node=N each rank "
        "writes every N-th shard and rank 0 writes the manifest when all are done; the cache is the one a "
        "single process writes. Rerun the same command to resume. See docs/scaling.md.",
    )
    ap.add_argument("--checkpoint", required=True, help="mechvit checkpoint or HookedViT folder")
    ap.add_argument("--hook", required=True)
    ap.add_argument("--tokens", default="patches", choices=["all", "cls", "patches", "prefix"])
    ap.add_argument("--out", required=True, help="cache folder (shared by every rank)")
    ap.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "imagefolder"])
    ap.add_argument(
        "--root", default=None, help="ImageFolder root (<root>/<split>/<class>/*) or Fashion-MNIST folder"
    )
    ap.add_argument("--split", default="train", help="train, test, or the ImageFolder subfolder name")
    ap.add_argument(
        "--images",
        type=int,
        default=None,
        help="N images of the split (default: all): Fashion-MNIST's first N, an ImageFolder's seeded stratified subset",
    )
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation the model expects")
    ap.add_argument("--std", type=float, nargs="+", default=None)
    ap.add_argument("--mix", type=float, default=0.0, help="fraction of images corrupted")
    ap.add_argument("--corruption", type=_corruption, action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-batch-size", type=int, default=64)
    ap.add_argument("--batches-per-shard", type=int, default=16)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank (ImageFolder)")
    ap.add_argument(
        "--device",
        default="auto",
        help="cpu or cuda (under torchrun: cuda:LOCAL_RANK); default: cuda if available",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace a different cache in --out")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.mean is None) != (args.std is None):
        ap.error("give both --mean and --std or neither")
    _check_mix(ap, args)
    if args.images is not None and args.images < 1:
        ap.error(f"--images must be >= 1 (or left out: every image of the split), got {args.images}")
    from mechvit.data.loading import DataConfig, load_split

    from .distributed import cache_activations_distributed, init_from_env, rank_and_world

    device = init_from_env(args.device)
    rank, world = rank_and_world()
    split, common = "train", dict(dataset=args.dataset, root=args.root, img_size=args.img_size)
    if args.dataset == "imagefolder":  # --split names the folder read as the "train" split
        data_cfg = DataConfig(**common, limit_train=args.images, train_split=args.split)
    elif args.split not in ("train", "test"):
        ap.error(f"--split for fashion_mnist is train or test, got {args.split!r}")
    else:
        split = args.split
        data_cfg = DataConfig(**common, limit_train=args.images, limit_test=args.images)
    data = load_split(data_cfg, split)
    model = load_model(args.checkpoint, device)
    if args.mean is None:  # the checkpoint's own (its card's config.data), as train-sae and explore use
        from mechvit.training.checkpoint import card_normalisation

        args.mean, args.std = card_normalisation(args.checkpoint)
    transform = normaliser(args.mean, args.std)
    store = ActivationStoreConfig(
        hook=args.hook,
        tokens=args.tokens,
        model_batch_size=args.model_batch_size,
        seed=args.seed,
        mix=CorruptionMix(args.mix, tuple(args.corruption)),
    )
    name = f"{args.dataset}:{Path(args.root).name if args.root else ''}/{args.split}"
    name += f"[:{args.images}]" if args.images is not None else ""
    name = _normalised(name, args.mean, args.std)
    t0 = time.perf_counter()
    cached = cache_activations_distributed(
        model,
        data,
        args.out,
        store,
        dataset=name,
        batches_per_shard=args.batches_per_shard,
        dtype=args.dtype,
        transform=transform,
        overwrite=args.overwrite,
        num_workers=args.workers,
        progress=not args.quiet,
    )
    summary = {
        "out": args.out,
        "activations": len(cached),
        "width": cached.d_in,
        "shards": len(cached.manifest["shards"]),
        "processes": world,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if rank == 0:
        print(json.dumps(summary, indent=2))
    return summary


def _command(argv: list[str] | None = None, prog: str = "python -m mechvit.sae") -> int:
    """``python -m mechvit.sae``: ``mechvit train-sae`` under its own name (``mechvit.cli.run_delegated``: a
    user error is one line on stderr and exit status 2, a bug keeps its traceback)."""
    from mechvit.cli import run_delegated

    from .distributed import leave_process_group

    code = run_delegated("train-sae", list(sys.argv[1:] if argv is None else argv), prog)
    if code == 0:
        leave_process_group()  # under torchrun: the group the command joined, before the interpreter exits
    return code


if __name__ == "__main__":
    sys.exit(_command())
