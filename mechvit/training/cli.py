"""``python -m mechvit.training train|evaluate|cards ...`` (also what ``mechvit train`` / ``evaluate`` / ``cards``
call)."""

from __future__ import annotations

import argparse
import json
import sys

from mechvit._dataclass_yaml import parse_overrides


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", required=True, help="YAML TrainConfig (configs/train_base.yaml, configs/finetune_*.yaml)"
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, dotted for nested ones (e.g. epochs=1 data.limit_train=512)",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore an existing train_state.pt in `out`")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoints", nargs="+", help="checkpoint folders; the first is the mCE base unless --base"
    )
    p.add_argument("--out", default=None, help="folder for robustness.csv/.json/.png and summary.md")
    p.add_argument("--corruptions", nargs="*", default=None, help="default: all of mechvit.corruptions")
    p.add_argument("--severities", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="N test images (default: all): the first N of Fashion-MNIST, a seeded stratified subset of an "
        "ImageFolder",
    )
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=1234, help="seed of the corruptions")
    p.add_argument("--base", default=None, help="folder name of the mCE reference model")
    p.add_argument("--device", default=None)
    p.add_argument("--update-cards", action="store_true", help="write the measured accuracies into the cards")
    p.add_argument("--quiet", action="store_true")


def add_cards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders (card.json each)")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--write",
        action="store_true",
        help="write the completed accuracy blocks into the cards (default: a check, saying what would change "
        "and exiting with status 1 when a card's block is missing or incomplete)",
    )
    what.add_argument(
        "--table",
        choices=["checkpoints", "checkpoint_robustness", "checkpoint_corruptions"],
        default=None,
        help="print this docs table of the cards (the Markdown `make docs-cards` puts into the docs)",
    )


def run_train(args: argparse.Namespace) -> None:
    from mechvit.training.config import load_config
    from mechvit.training.train import train

    cfg = load_config(args.config, overrides=parse_overrides(args.set))
    out = train(cfg, resume=not args.no_resume, progress=not args.quiet)
    print(f"checkpoint written to {out}")


def run_evaluate(args: argparse.Namespace) -> None:
    from mechvit.training.evaluate import evaluate_checkpoints, summary_markdown

    res = evaluate_checkpoints(
        args.checkpoints, out=args.out, corruptions=args.corruptions, severities=args.severities,
        n_test=args.n_test, batch_size=args.batch_size, seed=args.seed, base=args.base, device=args.device,
        update_cards=args.update_cards, progress=not args.quiet,
    )  # fmt: skip
    print(summary_markdown(res.summary))
    if args.out is None:
        print(json.dumps(res.corruption_errors, indent=1))


def run_cards(args: argparse.Namespace) -> int:
    """Every accuracy of the cards with its count and Wilson 95% CI (``accuracy`` block): the records a card
    lacks are recovered from its stored accuracies and image counts, exactly or not at all
    (:func:`mechvit.training.cards.backfill_cards`), and written with ``--write``; without it this is a check,
    returning 1 (the exit status) when a card's block is missing or incomplete. ``--table`` prints a docs
    table of the cards."""
    from mechvit.training.cards import BLOCKS, backfill_cards, read_cards

    if args.table:
        sys.stdout.write(BLOCKS[args.table](read_cards(args.checkpoints)))
        return 0
    done = backfill_cards(args.checkpoints, write=args.write)
    print("\n".join(map(str, done)))
    pending = sum(d.state == "to write" for d in done)
    if pending:
        print(
            f"cards to write: {pending} of {len(done)}; rerun with --write to complete their accuracy blocks"
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mechvit.training")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train", help="train or fine-tune a ViT from a YAML config"))
    add_evaluate_args(sub.add_parser("evaluate", help="robustness matrix of checkpoint folders"))
    add_cards_args(
        sub.add_parser(
            "cards",
            help="complete the cards' accuracy blocks (counts, Wilson 95%% CIs) from their stored accuracies",
        )
    )
    args = parser.parse_args(argv)
    try:
        code = {"train": run_train, "evaluate": run_evaluate, "cards": run_cards}[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # status 2, as `mechvit`: 1 is `cards`'s "blocks to write"
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
