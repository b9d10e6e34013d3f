"""The study's step graph: named steps, each cached under a hash of its config, inputs and code.

A step's hash covers its name, the config fields it reads (:func:`hashed_config`), the shared settings it
reads (data, seed, conditions), the models (content hash, seen corruptions, control, the card's training
block), the hashes of the steps it reads, for a step that reads the corrupted test images how many are
corrupted at once (:func:`reads_corrupted`), and the source of its module and of every ``mechvit`` module it
uses (transitively; :func:`code_hash`), so editing a step or an analysis it calls reruns it, with no version
number to bump by hand. A step writes into ``<out>/.staging/<step>-<hash>/``; when it finishes, its
``result.json`` is written there, the folder is moved onto ``<out>/<step>/`` and then the done-marker
``<out>/<step>/done.json`` (holding the hash) is written. A rerun skips every step whose marker holds the current
hash; an interrupted step leaves no marker and runs again (the staging folder survives, so a step may keep
finished pieces, e.g. trained SAEs: :func:`clean_staging` keeps it until the step finishes or its hash goes
stale).
The out folder is locked for the run (:class:`mechvit._io.FolderLock`): a second study on the same folder
fails at once.

Under ``torchrun`` (a process group of several ranks, see ``mechvit study``): rank 0 holds the lock, decides
which steps are up to date, writes every file and runs the steps that are not distributed while the other
ranks wait (:func:`mechvit.runtime.rank0_runs`); a step whose module sets ``DISTRIBUTED = True``
(the SAEs: sharded activation caching and data-parallel training) runs on every rank into rank 0's staging
folder. The result is the single-process study's.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mechvit._io import FolderLock, atomic_write_json, replace_dir, sha256_bytes
from mechvit.corruptions import BATCH_DEPENDENT
from mechvit.runtime import forked_map, progress_bars, rank0_runs, rank_and_world
from mechvit.study.config import StudyConfig, check_hooks_against_model
from mechvit.study.context import StudyContext, fork_workers
from mechvit.study.result import StepResult, StepWriter
from mechvit.study.steps import STEPS, Step

DONE = "done.json"
RESULT = "result.json"


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The absolute module name of a ``from ... import`` (relative ones resolved against ``package``)."""
    mod = node.module or ""
    if node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        mod = f"{base}.{mod}" if mod else base
    return mod


def _is_mechvit(name: str) -> bool:
    return name.split(".")[0] == "mechvit"


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _top_level(body: list[ast.stmt]):
    """The statements of a module body, into ``if``/``try``/``with`` blocks but not into functions or classes."""
    for stmt in body:
        yield stmt
        for block in ("body", "orelse", "finalbody"):
            if isinstance(stmt, (ast.If, ast.Try, ast.With)) and hasattr(stmt, block):
                yield from _top_level(getattr(stmt, block))
        for handler in getattr(stmt, "handlers", []) if isinstance(stmt, ast.Try) else []:
            yield from _top_level(handler.body)


def _binds(stmt: ast.stmt, name: str) -> bool:
    """``stmt`` defines ``name`` itself (a def, class or assignment)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return stmt.name == name
    targets = (
        stmt.targets
        if isinstance(stmt, ast.Assign)
        else [stmt.target]
        if isinstance(stmt, (ast.AnnAssign, ast.AugAssign))
        else []
    )
    return any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t))


_NOT_FOUND = "<not found>"


@functools.cache
def _parsed(name: str) -> tuple[Path, ast.Module, str] | None:
    """(source file, syntax tree, package) of the mechvit module ``name``; None when it has no source."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    path = Path(spec.origin)
    package = name if spec.submodule_search_locations else name.rpartition(".")[0]
    return path, ast.parse(path.read_bytes()), package


def _defined_in(module: str, name: str, depth: int = 0) -> str | None:
    """The mechvit module whose source defines ``name`` as ``module`` exposes it: a package's ``__init__``
    that re-exports ``from .overlap import collect_activations`` gives ``mechvit.analysis.overlap``. None when
    it comes from outside mechvit; :data:`_NOT_FOUND` when ``module`` neither defines nor imports it."""
    parsed = _parsed(module)
    if parsed is None or depth > 20:
        return module
    _, tree, package = parsed
    stars = []
    for stmt in _top_level(tree.body):
        if isinstance(stmt, ast.ImportFrom):
            src = _absolute(stmt, package)
            for a in stmt.names:
                if a.name == "*":
                    stars.append(src)
                elif (a.asname or a.name) == name:
                    if not _is_mechvit(src):
                        return None
                    if _is_module(f"{src}.{a.name}"):
                        return f"{src}.{a.name}"
                    found = _defined_in(src, a.name, depth + 1)
                    return src if found == _NOT_FOUND else found
        elif isinstance(stmt, ast.Import):
            for a in stmt.names:
                if a.asname == name:
                    return a.name if _is_mechvit(a.name) else None
        elif _binds(stmt, name):
            return module
    for src in stars:
        if _is_mechvit(src):
            found = _defined_in(src, name, depth + 1)
            if found != _NOT_FOUND:
                return found
    return _NOT_FOUND


def _submodules(package: str) -> set[str]:
    spec = importlib.util.find_spec(package)
    locations = spec.submodule_search_locations if spec is not None else None
    return {f"{package}.{m.name}" for m in pkgutil.iter_modules(locations or [])}


def _imported_mechvit_modules(tree: ast.AST, package: str) -> set[str]:
    """The mechvit modules whose code a module uses, by name: ``import mechvit.x.y`` gives ``mechvit.x.y``;
    ``from mechvit.viz import figures`` gives ``mechvit.viz.figures`` (not ``mechvit/viz/__init__.py`` and the
    other submodules it imports); ``from mechvit.analysis import mean_ci`` gives the module that defines
    ``mean_ci`` (``mechvit.analysis.statistics``), following the package's re-exports; a star import, or a name
    a package defines itself, gives that module. A module that imports by a computed name
    (``importlib.import_module(f"mechvit.corruptions.{family}")``) uses every module of its package."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if _is_mechvit(a.name)}
        elif isinstance(node, ast.ImportFrom):
            mod = _absolute(node, package)
            if not _is_mechvit(mod):
                continue
            for a in node.names:
                if a.name == "*":
                    out.add(mod)
                elif _is_module(f"{mod}.{a.name}"):
                    out.add(f"{mod}.{a.name}")
                else:
                    found = _defined_in(mod, a.name)
                    if found is not None:
                        out.add(mod if found == _NOT_FOUND else found)
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    out |= {arg.value} if _is_mechvit(arg.value) else set()
                elif _is_mechvit(package):
                    out |= _submodules(package)
    return out


def _asset_files(path: Path, tree: ast.AST) -> list[Path]:
    """Files a module reads from a folder beside it that it names in a string (``explorer_assets``,
    ``assets``): the explorer's script and style, the frost images; they are part of its code."""
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    out = []
    for name in sorted(n for n in names if _ASSET_DIR.fullmatch(n)):
        folder = path.parent / name
        if folder.is_dir() and not (folder / "__init__.py").exists():  # a package is followed by its imports
            out += sorted(f for f in folder.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    return out


_ASSET_DIR = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


@functools.cache
def code_hash(module: str) -> str:
    """sha256 over the source of ``module`` and of every ``mechvit`` module it uses, transitively (imports
    inside functions included; :func:`_imported_mechvit_modules` says which), in a fixed order."""
    sources: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in sources:
            continue
        sources[name], imports = _module_source(name)
        todo += sorted(imports - sources.keys())
    return sha256_bytes(json.dumps(sorted(sources.items())).encode())


def code_closure(module: str) -> set[str]:
    """The modules :func:`code_hash` covers for ``module``."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(_module_source(name)[1] - seen)
    return seen


@functools.cache
def _module_source(name: str) -> tuple[str, frozenset[str]]:
    """(sha256 of ``name``'s source and of the asset files it reads, or "-" when it has none; the mechvit
    modules it uses), once per module and process: the steps share most of their imports, and parsing them
    again for each step took ~3 s of every study run."""
    parsed = _parsed(name)
    if parsed is None:
        return "-", frozenset()
    path, tree, package = parsed
    digest = sha256_bytes(path.read_bytes())
    assets = _asset_files(path, tree)
    if assets:
        parts = [digest] + [
            f"{os.path.relpath(f, path.parent)}:{sha256_bytes(f.read_bytes())}" for f in assets
        ]
        digest = sha256_bytes("\n".join(parts).encode())
    return digest, frozenset(_imported_mechvit_modules(tree, package) - NOT_FOLLOWED.get(name, frozenset()))


# imports whose code cannot change a step's numbers except through an input hashed by its content: the context
# trains a missing checkpoint (``train_config``), whose weights' sha256 every step's hash holds
NOT_FOLLOWED = {"mechvit.study.context": frozenset({"mechvit.training.train", "mechvit.training.config"})}


# ---- what a step's hash holds -----------------------------------------------------------------------------
# Where a step's result depends on less than its whole config section (``enabled`` is never hashed): the
# section fields that change how a step runs, not what it computes (the docs promise the same numbers), and
# the SAE section, which two steps read for different things. ``sae`` hashes what training and evaluating the
# SAEs read (the image counts as the step uses them: sae.fidelity_images / heldout_images); ``sae_analysis``
# what the overlap, code cosine and feature pages read, the SAEs themselves through the sae step's hash.
NOT_HASHED = {
    "robustness.parallel_models": "the same numbers bit for bit (tests/test_study_sae_parallel.py)",
    "sae.parallel_models": "the SAEs of a one-thread sequential run (tests/test_study_sae_parallel.py)",
}
SAE_TRAINING_FIELDS = (
    "architectures", "models", "replicates", "single_models", "epochs", "n_train_images", "store", "train",
)  # fmt: skip
SAE_ANALYSIS_FIELDS = ("n_eval_images", "top_features", "top_images", "overlap", "controls")


def hashed_config(step: Step, cfg: StudyConfig) -> Any:
    """The config fields ``step``'s result depends on, as they go into its hash (see :data:`NOT_HASHED`)."""
    if not step.section:
        return None
    section = getattr(cfg, step.section)
    d = dataclasses.asdict(section)
    if step.name == "sae":
        return {
            **{k: d[k] for k in SAE_TRAINING_FIELDS},
            "fidelity_images": section.fidelity_images,
            "heldout_images": section.heldout_images,
        }
    if step.name == "sae_analysis":
        return {k: d[k] for k in SAE_ANALYSIS_FIELDS}
    d.pop("enabled", None)
    for key in NOT_HASHED:
        sec, _, name = key.partition(".")
        if sec == step.section:
            d.pop(name, None)
    if step.name == "explorer":
        d["title"] = cfg.title  # the page's title
    return d


# a step that calls one of these on the context reads the corrupted test images
_CORRUPTED_READERS = frozenset({"corrupted", "inputs", "_n_test_needed"})


@functools.cache
def reads_corrupted(module: str) -> bool:
    """Whether a step module (or a step module it imports) reads the study's corrupted test images
    (``ctx.corrupted``, ``ctx.inputs``): those depend on how many images are corrupted at once
    (:meth:`StudyContext._n_test_needed`), which then goes into its hash."""
    for name in code_closure(module):
        if name == module or name.startswith("mechvit.study.steps."):
            parsed = _parsed(name)
            if parsed is not None and any(
                isinstance(n, ast.Attribute) and n.attr in _CORRUPTED_READERS for n in ast.walk(parsed[1])
            ):
                return True
    return False


def step_hash(step: Step, ctx: StudyContext, upstream: dict[str, str]) -> str:
    cfg = ctx.cfg
    payload = {
        "step": step.name, "code": code_hash(step.module), "section": hashed_config(step, cfg),
        "data": dataclasses.asdict(cfg.data), "seed": cfg.seed,
        "conditions": [dataclasses.asdict(c) for c in cfg.conditions],
        "models": ctx.model_hashes(), "upstream": {d: upstream[d] for d in step.deps},
    }  # fmt: skip
    if reads_corrupted(step.module) and any(c.corruption in BATCH_DEPENDENT for c in cfg.conditions):
        # these corruptions draw an image's noise for the whole batch: how many are corrupted at once decides
        # the images (the others give the first n images the same output whatever the count)
        payload["corrupted_images"] = ctx._n_test_needed()
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def check_only(cfg: StudyConfig, only: list[str] | None) -> None:
    """``--only``: every name a step, at least one, and each enabled in ``cfg`` (a disabled one would run
    nothing and say so only by "computed nothing")."""
    if only is None:
        return
    known = {s.name: s for s in STEPS}
    if not only:
        raise ValueError(f"--only: name at least one step ({', '.join(known)})")
    for name in only:
        if name not in known:
            raise ValueError(f"unknown step {name!r}; steps: {', '.join(known)}")
        step = known[name]
        if not step.enabled(cfg):
            off = [d for d in step.deps if not known[d].enabled(cfg)]
            sections = [s.section for s in STEPS if s.name in (name, *step.deps) and s.section]
            why = ", ".join(f"{sec}.enabled: false" for sec in dict.fromkeys(sections)
                            if not getattr(cfg, sec).enabled)  # fmt: skip
            reads = f", and so is the {' and '.join(off)} step it reads" if off else ""
            raise ValueError(f"--only {name}: {name} is disabled in this config{reads} ({why})")


def hash_if_enabled(name: str, ctx: StudyContext) -> str:
    """The hash step ``name`` has under ``ctx.cfg`` with its section and its upstream steps' turned on: what it
    would be if the step ran (turning a section off changes the test images the study loads, and so the hashes
    of the steps that read corrupted images: :meth:`StudyContext._n_test_needed`)."""
    by_name = {s.name: s for s in STEPS}
    todo = [name]
    on = ctx.cfg
    while todo:
        step = by_name[todo.pop()]
        sec = getattr(on, step.section, None) if step.section else None
        if sec is not None and not getattr(sec, "enabled", True):
            on = dataclasses.replace(on, **{step.section: dataclasses.replace(sec, enabled=True)})
        todo += step.deps
    shadow = copy.copy(ctx)
    shadow.cfg = on

    @functools.cache
    def h(n: str) -> str:
        return step_hash(by_name[n], shadow, {d: h(d) for d in by_name[n].deps})

    return h(name)


def clean_staging(out: Path, ctx: StudyContext, current_hash, up_to_date) -> None:
    """Remove the staging folders no run will resume from: those of finished steps and those whose hash is not
    the step's hash under this config (stale settings, code or models; a disabled step: the hash it would have
    enabled, :func:`hash_if_enabled`). The staging folder of a step that is not finished under this config
    stays, whether or not this run ran it: the ``sae`` step resumes SAE by SAE from it (``--only robustness``,
    or a run with ``sae.enabled: false``, after an interrupted run must not throw the finished SAEs away)."""
    root = out / ".staging"
    if not root.is_dir():
        return
    steps = {s.name: s for s in STEPS}
    for folder in root.iterdir():
        name, _, h = folder.name.rpartition("-")
        if name in steps and not up_to_date(name):
            now = current_hash(name) if steps[name].enabled(ctx.cfg) else hash_if_enabled(name, ctx)
            if h == now:
                continue
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.rmdir()  # when empty


def read_done(out: Path, step: str) -> dict | None:
    p = out / step / DONE
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_result(out: Path, step: str) -> StepResult:
    return StepResult.from_dict(json.loads((out / step / RESULT).read_text()))


@dataclass
class StudyRun:
    out: Path
    results: dict[str, StepResult]
    hashes: dict[str, str]
    computed: list[str]
    cached: list[str]
    timings: dict[str, float]
    report: Path | None = None
    seconds: float = 0.0  # wall clock of the run, report excluded
    side_by_side: list[str] = dataclasses.field(
        default_factory=list
    )  # steps run side by side (parallel_steps)


def run_study(
    cfg: StudyConfig,
    out: str | Path,
    *,
    force: bool = False,
    only: list[str] | None = None,
    report: bool = True,
) -> StudyRun:
    """Run every enabled step of ``cfg`` into ``out`` (skipping finished ones unless ``force``), then write
    ``report.html``, ``report.md`` and ``metrics.json``. ``only`` restricts to those steps (and needs their
    upstream steps finished or enabled). Raises :class:`mechvit._io.LockError` when another run holds ``out``."""
    out = Path(out)
    check_only(cfg, only)  # before the lock: a wrong --only leaves no folder behind
    rank, _ = rank_and_world()
    if rank != 0:  # one set of progress bars: rank 0's
        cfg = dataclasses.replace(cfg, progress=False)
    lock = FolderLock(out)
    rank0_runs(lambda: lock.acquire() and None, f"locking {out}")
    try:
        with progress_bars(cfg.progress):
            return _run(cfg, out, force=force, only=only, report=report)
    finally:
        lock.release()  # a no-op where the lock was not taken (ranks other than 0)


def _run(cfg: StudyConfig, out: Path, *, force: bool, only: list[str] | None, report: bool) -> StudyRun:
    import torch

    started = time.time()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    main = rank_and_world()[0] == 0
    first: list[StudyContext] = []  # rank 0 resolves the models first (it may train a missing checkpoint)
    rank0_runs(lambda: first.append(StudyContext(cfg, out)), "resolving the models")
    ctx = first[0] if main else StudyContext(cfg, out)
    check_hooks_against_model(cfg, ctx.model(ctx.base_name))
    steps = [s for s in STEPS if s.enabled(cfg) and (only is None or s.name in only)]
    run = StudyRun(out, {}, {}, [], [], {})

    def staging(step: Step, h: str) -> Path:
        return out / ".staging" / f"{step.name}-{h}"

    by_name = {s.name: s for s in STEPS}

    @functools.cache
    def current_hash(name: str) -> str:
        """The hash ``name`` has under this config (its upstream steps' hashes included)."""
        step = by_name[name]
        return step_hash(step, ctx, {d: current_hash(d) for d in step.deps})

    def up_to_date(name: str) -> bool:
        done = read_done(out, name)
        return done is not None and done.get("hash") == current_hash(name) and (out / name / RESULT).is_file()

    def plan(step: Step) -> tuple[str, bool]:
        """(hash, up to date) of ``step``; a step to run gets its staging folder. Rank 0 only."""
        missing = [d for d in step.deps if d not in run.hashes and read_done(out, d) is None]
        if missing:
            raise ValueError(
                f"step {step.name!r} needs {missing}, not run in {out} yet: add {' '.join(missing)} to --only, "
                "or run the study without --only"
            )
        for d in step.deps:  # a dependency outside `only`: its finished result, if this config would make it
            if d not in run.hashes:
                if not up_to_date(d):
                    raise ValueError(
                        f"step {step.name!r} reads step {d!r}, whose finished result in {out} is out of date for "
                        f"this config (its settings, code, data or models changed since it ran): add {d} to "
                        "--only, or run the study without --only"
                    )
                run.hashes[d] = current_hash(d)
                run.results[d] = read_result(out, d)
        h = current_hash(step.name)  # its upstream steps' hashes are theirs under this config (checked above)
        if not force and up_to_date(step.name):
            run.results[step.name] = read_result(out, step.name)
            run.hashes[step.name] = h
            run.timings[step.name] = float(read_done(out, step.name).get("seconds", 0.0))
            run.cached.append(step.name)
            if cfg.progress:
                tqdm.write(f"[{step.name}] up to date ({h}), skipped")
            return h, True
        staging(step, h).mkdir(parents=True, exist_ok=True)
        return h, False

    def finish(step: Step, h: str, result: StepResult, seconds: float) -> None:
        """Write ``result`` and move the staging folder into place, then the done-marker. Rank 0 only."""
        atomic_write_json(staging(step, h) / RESULT, result.to_dict(), indent=1)
        final = replace_dir(staging(step, h), out / step.name)
        seconds = round(seconds, 2)
        finished = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(
            final / DONE, {"step": step.name, "hash": h, "seconds": seconds, "finished": finished}
        )
        run.results[step.name], run.hashes[step.name], run.timings[step.name] = result, h, seconds
        run.computed.append(step.name)
        if cfg.progress:
            tqdm.write(f"[{step.name}] done in {seconds:.1f} s")

    def run_here(step: Step, h: str) -> None:
        t0 = time.time()
        writer = StepWriter(step.name, staging(step, h))
        if step.distributed and not main:  # every rank runs it; rank 0 keeps the result
            step.fn(ctx, writer, {d: read_result(out, d) for d in step.deps})
            rank0_runs(lambda: None, f"saving step {step.name!r}")
        elif step.distributed:
            result = step.fn(ctx, writer, run.results)
            rank0_runs(lambda: finish(step, h, result, time.time() - t0), f"saving step {step.name!r}")
        else:
            rank0_runs(
                lambda: finish(step, h, step.fn(ctx, writer, run.results), time.time() - t0),
                f"running step {step.name!r}",
            )
        bar.update(1)

    # Steps side by side: a step marked SIDE_BY_SIDE (SAE analysis, patching, CKA: small products and Python,
    # which a second thread speeds up little) is held back and run after the others, ``parallel_steps`` at a
    # time, each in a forked one-thread process. Measured on the 2-core machine, back to back, the default
    # study's logit lens, attention, SAE analysis, patching and CKA: 189.8 and 189.2 s one after the other at
    # two threads, 175.5 and 153.5 s with the last three side by side. Logit lens and attention are not
    # marked: at one thread beside another step they took 2.1-2.3x their two-thread time.
    lanes = fork_workers(ctx, len(steps), cfg.parallel_steps)
    held: list[tuple[Step, str]] = []

    def run_held() -> None:
        batch = held[:]
        held.clear()
        n = fork_workers(ctx, len(batch), cfg.parallel_steps)
        if n < 2:
            for step, h in batch:
                run_here(step, h)
            return
        by_name = {step.name: (step, h) for step, h in batch}
        ctx.preload()  # once here: every worker inherits the models and images

        def one(name: str) -> tuple[StepResult, float]:
            step, h = by_name[name]
            ctx.progress = False  # the workers' bars would write over each other
            t0 = time.time()
            with progress_bars(False):
                result = step.fn(ctx, StepWriter(step.name, staging(step, h)), run.results)
            return result, time.time() - t0

        bar.set_postfix_str(", ".join(by_name))
        run.side_by_side += list(by_name)
        for name, (result, seconds) in forked_map(one, list(by_name), n):
            finish(*by_name[name], result, seconds)
            bar.update(1)

    bar = tqdm(total=len(steps), desc="study", unit="step", disable=not cfg.progress)
    for step in steps:
        if any(d == s.name for d in step.deps for s, _ in held):
            run_held()
        h, fresh = rank0_runs(lambda: plan(step), f"preparing step {step.name!r}")  # noqa: B023
        if fresh:
            bar.update(1)
        elif lanes > 1 and step.side_by_side:
            held.append((step, h))
        else:
            bar.set_postfix_str(step.name)
            run_here(step, h)
    run_held()
    bar.close()
    if only is not None:  # the report and metrics.json keep every other step that is finished and up to date
        for step in STEPS:
            if step.name not in run.results and step.enabled(cfg) and main and up_to_date(step.name):
                run.results[step.name] = read_result(out, step.name)
                run.hashes[step.name] = current_hash(step.name)
                run.timings[step.name] = float(read_done(out, step.name).get("seconds", 0.0))
                run.cached.append(step.name)
    order = {s.name: i for i, s in enumerate(STEPS)}  # the report's order, whatever order they finished in
    run.results = dict(sorted(run.results.items(), key=lambda kv: order[kv[0]]))
    run.computed.sort(key=order.__getitem__)
    run.side_by_side.sort(key=order.__getitem__)
    run.seconds = time.time() - started

    def close() -> Path | None:
        clean_staging(out, ctx, current_hash, up_to_date)
        if not report:
            return None
        from mechvit.study.report import write_report

        return write_report(ctx, run, [s for s in STEPS if s.name in run.results])

    run.report = rank0_runs(close, "writing the report")
    return run
