"""The ``mechvit`` command: ``study``, ``convert``, ``train``, ``evaluate``, ``cards``, ``explore``, ``compare``,
``train-sae``, ``cache-activations``.

User errors (a bad config, a missing file, a wrong argument) print one line ``mechvit <cmd>: error: ...``
on stderr and exit with status 2, without a traceback. ``train``/``evaluate``/``cards`` are
``python -m mechvit.training`` and ``train-sae`` is ``python -m mechvit.sae`` under one name;
``python -m mechvit`` (and so ``torchrun -m mechvit``) is the ``mechvit`` command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from mechvit._dataclass_yaml import parse_overrides

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    NotImplementedError,  # an unsupported architecture or feature, named in the message
)


class UserError(Exception):
    pass


def check_device(text: str) -> None:
    """Raise :class:`UserError` unless ``text`` names a torch device that exists here."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device: expected cpu, cuda, cuda:<n> or mps, got {text!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device: expected an available device, got {text!r} (no CUDA here)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"--device: got {text!r}, but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device: expected an available device, got {text!r} (no MPS here)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device: expected cpu, cuda, cuda:<n> or mps, got {text!r}")


def _argv_devices(argv: list[str]) -> list[str]:
    """The values of ``--device X`` / ``--device=X`` in a delegated command's own arguments."""
    out = [a.split("=", 1)[1] for a in argv if a.startswith("--device=")]
    out += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--device"]
    return out


def _is_user_error(err: BaseException) -> bool:
    """Errors caused by what the user asked for, which deserve one line rather than a traceback: the
    usual ones, another run holding the output folder, and a device named in a config that this machine lacks."""
    from mechvit._io import LockError

    if isinstance(err, USER_ERRORS + (UserError, LockError)):
        return True
    if isinstance(err, OSError) and err.filename is not None:  # a path that exists, a full or read-only disk
        return True
    text = str(err)
    device_errors = (
        "device type at start of device string",
        "Invalid device string",
        "Torch not compiled with CUDA enabled",
        "Found no NVIDIA driver",
        "CUDA driver initialization failed",
        "invalid device ordinal",
    )
    return isinstance(err, (RuntimeError, AssertionError)) and any(d in text for d in device_errors)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fail(prog: str, err: BaseException) -> int:
    msg = " ".join(str(err).split()) or type(err).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


# ---- study --------------------------------------------------------------------------------------------
# under torchrun, how long the other ranks may wait for rank 0 (a step that is not distributed, e.g. the
# robustness sweep at ImageNet scale, runs on rank 0 alone): a week
STUDY_WAIT_MINUTES = 7 * 24 * 60


def _add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=None, help="study YAML (default: the embedded configs/fashion_mnist.yaml)"
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set sae.epochs=1 robustness.n_images=200",
    )
    p.add_argument("--force", action="store_true", help="recompute every step, ignoring finished ones")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        metavar="STEP",
        help="run only these steps, each enabled in the config (robustness logit_lens attention sae sae_analysis "
        "explorer patching cka)",
    )
    p.add_argument("--validate", action="store_true", help="only validate the config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_study(args: argparse.Namespace) -> int:
    import time

    from mechvit.study.config import load_study_config

    overrides = parse_overrides(args.set)
    if args.quiet:
        overrides["progress"] = False
    cfg = load_study_config(args.config, overrides)
    if args.validate:
        from mechvit.study.context import validate_models

        skipped = validate_models(cfg)  # the model sources exist, the config fits the base model
        print(
            f"{args.config or 'configs/fashion_mnist.yaml'}: valid ({len(cfg.model_entries())} models, "
            f"{len(cfg.conditions)} conditions; "
            + ("checked against the base model" if skipped is None else f"not checked: {skipped}")
            + ")"
        )
        return 0
    from mechvit.study import run_study

    rank = 0
    if (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):  # torchrun: the SAE step runs on every rank (docs/scaling.md)
        import dataclasses

        from mechvit.runtime import rank_and_world
        from mechvit.sae.distributed import init_from_env

        # the other ranks wait for rank 0 through every step that is not distributed: a long timeout
        device = init_from_env(cfg.device or "auto", timeout_minutes=STUDY_WAIT_MINUTES)
        cfg = dataclasses.replace(cfg, device=device)
        rank = rank_and_world()[0]
    t0 = time.time()
    run = run_study(cfg, args.out or f"runs/{cfg.name}", force=args.force, only=args.only)
    if rank == 0:
        print(
            f"study finished in {time.time() - t0:.1f} s: computed {run.computed or 'nothing'}, "
            f"up to date {run.cached or 'nothing'}"
        )
        print(f"report: {run.report}")
    return 0


# ---- convert ------------------------------------------------------------------------------------------
def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        help="a timm model name (e.g. vit_base_patch16_224) or a mechvit checkpoint folder "
        "(model.safetensors + card.json)",
    )
    p.add_argument("out", help="folder for the HookedViT (config.json + model.safetensors)")
    p.add_argument("--pretrained", action="store_true", help="timm name: download timm's pretrained weights")
    p.add_argument(
        "--checkpoint-path",
        default=None,
        help="timm name: load this local state dict (safetensors, or a torch file read weights-only)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="timm.create_model kwargs, e.g. img_size=28 patch_size=4 in_chans=1 num_classes=10",
    )
    p.add_argument("--fold-ln", action="store_true", help="fold LayerNorm weights into the next linear layer")
    p.add_argument(
        "--center-writing-weights", action="store_true", help="centre weights writing to the residual"
    )


def _run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mechvit.model import HookedViT

    kwargs = parse_overrides(args.set)
    flags = {"fold_ln": args.fold_ln, "center_writing_weights": args.center_writing_weights}
    src = Path(args.source)
    if (src / "card.json").is_file():
        if args.pretrained or args.checkpoint_path or kwargs:
            raise UserError(
                "--pretrained, --checkpoint-path and --set apply to a timm name, not a checkpoint folder"
            )
        from mechvit.training.checkpoint import load_checkpoint

        model = HookedViT.from_timm(load_checkpoint(src), **flags)
    elif src.exists():
        raise UserError(
            f"{src} is not a mechvit checkpoint folder (no card.json); give a folder written by "
            "`mechvit train` or a timm model name"
        )
    else:
        import timm

        if args.source not in timm.list_models() and args.source.split(".")[0] not in timm.list_models():
            raise UserError(
                f"{args.source!r} is neither a folder nor a timm model name "
                f"(e.g. {', '.join(timm.list_models('vit_*')[:3])})"
            )
        try:
            model = HookedViT.from_timm(
                args.source,
                pretrained=args.pretrained,
                checkpoint_path=args.checkpoint_path,
                **flags,
                **kwargs,
            )
        except TypeError as e:  # timm.create_model / the model's constructor refusing a --set key or value
            if not kwargs:
                raise
            raise UserError(f"timm.create_model({args.source!r}) refused --set {kwargs}: {e}") from None
    out = model.save_pretrained(args.out)
    c = model.cfg
    print(
        f"HookedViT written to {out}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, "
        f"{c.n_tokens} tokens, {c.num_classes} classes"
    )
    return 0


# ---- train / evaluate / train-sae (the packages' own entry points) -------------------------------------
def _run_train(args: argparse.Namespace) -> int:
    from mechvit.training.cli import run_train

    run_train(args)
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from mechvit.training.cli import run_evaluate

    run_evaluate(args)
    return 0


def _run_cards(args: argparse.Namespace) -> int:
    from mechvit.training.cli import run_cards

    return run_cards(args)  # 1: a card's accuracy block is missing or incomplete (a check, without --write)


def _run_train_sae(argv: list[str], prog: str) -> int:
    from mechvit.sae.__main__ import main as sae_main

    sae_main(argv, prog=prog)
    return 0


def _run_cache_activations(argv: list[str], prog: str) -> int:
    from mechvit.sae.__main__ import cache_main

    cache_main(argv, prog=prog)
    return 0


# commands whose options belong to their package's own parser
_DELEGATED = {"train-sae": _run_train_sae, "cache-activations": _run_cache_activations}


def build_parser() -> argparse.ArgumentParser:
    from mechvit.training.cli import add_cards_args, add_evaluate_args, add_train_args

    parser = _Parser(prog="mechvit", description="Mechanistic interpretability for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    specs: list[tuple[str, str, Callable, Callable]] = [
        (
            "study",
            "run the whole study (robustness, logit lens, attention, SAEs, overlap, patching, CKA) and "
            "write report.html/report.md/metrics.json",
            _add_study,
            _run_study,
        ),
        (
            "convert",
            "convert a timm model or a mechvit checkpoint to a HookedViT folder",
            _add_convert,
            _run_convert,
        ),
        (
            "train",
            "train or fine-tune a ViT from a YAML config (python -m mechvit.training train)",
            add_train_args,
            _run_train,
        ),
        (
            "evaluate",
            "robustness matrix of checkpoint folders (python -m mechvit.training evaluate)",
            add_evaluate_args,
            _run_evaluate,
        ),
        (
            "cards",
            "complete checkpoint cards' accuracy blocks (counts, Wilson 95%% CIs) or print a docs table of them "
            "(python -m mechvit.training cards)",
            add_cards_args,
            _run_cards,
        ),
        (
            "explore",
            "write the offline feature explorer (features.html) for SAE folders on their models",
            lambda p: __import__("mechvit.viz.explorer", fromlist=["run_cli"]).add_cli_arguments(p),
            lambda a: __import__("mechvit.viz.explorer", fromlist=["run_cli"]).run_cli(a),
        ),
        (
            "compare",
            "compare two studies' metrics.json number by number: did a rerun reproduce? (exit 1 when not)",
            lambda p: __import__("mechvit.study.compare", fromlist=["add_arguments"]).add_arguments(p),
            lambda a: __import__("mechvit.study.compare", fromlist=["run"]).run(a),
        ),
    ]
    for name, help_, add, run in specs:
        p = sub.add_parser(name, help=help_, description=help_.replace("%%", "%"))  # help is %-formatted
        add(p)
        p.set_defaults(run=run)
    sub.add_parser(
        "train-sae",
        help="train one SAE on a checkpoint's activations (python -m mechvit.sae); "
        "`mechvit train-sae --help` lists its options",
        add_help=False,
    )
    sub.add_parser(
        "cache-activations",
        help="write a model's activations at one hook to a float16 disk cache; torchrun: one shard set "
        "per rank (docs/scaling.md); `mechvit cache-activations --help` lists its options",
        add_help=False,
    )
    return parser


def run_delegated(command: str, argv: list[str], prog: str | None = None) -> int:
    """Run ``command`` (``train-sae``, ``cache-activations``: their options belong to mechvit.sae's own parser)
    with ``argv`` as the ``mechvit`` command runs it: devices checked first, a user error (a bad value, a missing
    file, an unknown hook or device) one line ``<prog>: error: ...`` on stderr and exit status 2 without a
    traceback, argparse's own exit status kept; a bug keeps its traceback. ``python -m mechvit.sae`` is
    ``train-sae`` under its own ``prog``."""
    prog = prog or f"mechvit {command}"
    try:
        for device in _argv_devices(argv):
            check_device(device)
        code = _DELEGATED[command](argv, prog)
    except Exception as e:
        if not _is_user_error(e):
            raise
        code = _fail(prog, e)
    except SystemExit as e:  # argparse inside mechvit.sae
        code = e.code if isinstance(e.code, int) else 2
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (the ``mechvit`` script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:  # its options belong to mechvit.sae's own parser
        return run_delegated(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mechvit import __version__

        print(f"mechvit {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    prog = f"mechvit {args.command}"
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        code = args.run(args)
        if code == 0:
            from .sae.distributed import leave_process_group

            leave_process_group()  # under torchrun: the group the command joined, before the interpreter exits
    except Exception as e:
        if not _is_user_error(e):
            raise
        code = _fail(prog, e)
    except SystemExit as e:  # e.g. sys.exit("error: ...") inside a delegated entry point
        if isinstance(e.code, str):
            code = _fail(prog, ValueError(e.code.removeprefix("error: ")))
        else:
            code = e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    return code


def console_main() -> int:
    """The ``mechvit`` console script: this process's allocator keeps freed memory (see keep_freed_memory)."""
    from .runtime import keep_freed_memory

    keep_freed_memory()
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
