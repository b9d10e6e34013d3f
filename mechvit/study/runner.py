"""The study's step graph: named steps, each cached under a hash of its config, inputs and code.

A step's hash covers its name, its config section, the shared settings it reads (data, seed, conditions),
the content hashes of the models, the hashes of the steps it reads, and the source of its module and of
every ``mechvit`` module that module imports (transitively; :func:`code_hash`), so editing a step or an
analysis it calls reruns it, with no version number to bump by hand. A step writes into
``<out>/.staging/<step>-<hash>/``; when it finishes, its ``result.json`` is written there, the folder is
moved onto ``<out>/<step>/`` and then the done-marker ``<out>/<step>/done.json`` (holding the hash) is
written. A rerun skips every step whose marker holds the current hash; an interrupted step leaves no marker
and runs again (the staging folder survives, so a step may keep finished pieces, e.g. trained SAEs).
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
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mechvit._io import FolderLock, atomic_write_json, replace_dir, sha256_bytes
from mechvit.runtime import forked_map, progress_bars, rank0_runs, rank_and_world
from mechvit.study.config import StudyConfig, check_hooks_against_model
from mechvit.study.context import StudyContext, fork_workers
from mechvit.study.result import StepResult, StepWriter
from mechvit.study.steps import STEPS, Step

DONE = "done.json"
RESULT = "result.json"


def _imported_mechvit_modules(tree: ast.AST, package: str) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "mechvit"}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{mod}" if mod else base
            if mod.split(".")[0] != "mechvit":
                continue
            out.add(mod)
            for a in node.names:  # `from mechvit.analysis import overlap` imports a module
                if importlib.util.find_spec(mod) is not None and _is_module(f"{mod}.{a.name}"):
                    out.add(f"{mod}.{a.name}")
    return out


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def code_hash(module: str) -> str:
    """sha256 over the source of ``module`` and of every ``mechvit`` module it imports, transitively
    (imports inside functions included), in a fixed order."""
    sources: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in sources:
            continue
        sources[name], imports = _module_source(name)
        todo += sorted(imports - sources.keys())
    return sha256_bytes(json.dumps(sorted(sources.items())).encode())


@functools.cache
def _module_source(name: str) -> tuple[str, frozenset[str]]:
    """(sha256 of ``name``'s source, or "-" when it has none; the mechvit modules it imports), once per module
    and process: the steps share most of their imports, and parsing them again for each step took ~3 s of every
    study run."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return "-", frozenset()
    src = Path(spec.origin).read_bytes()
    package = name if spec.submodule_search_locations else name.rpartition(".")[0]
    return sha256_bytes(src), frozenset(_imported_mechvit_modules(ast.parse(src), package))


def step_hash(step: Step, ctx: StudyContext, upstream: dict[str, str]) -> str:
    cfg = ctx.cfg
    section = dataclasses.asdict(getattr(cfg, step.section)) if step.section else None
    if isinstance(section, dict):
        section.pop("enabled", None)
    payload = {
        "step": step.name, "code": code_hash(step.module), "section": section,
        "data": dataclasses.asdict(cfg.data), "seed": cfg.seed,
        "conditions": [dataclasses.asdict(c) for c in cfg.conditions],
        "models": ctx.model_hashes(), "upstream": {d: upstream[d] for d in step.deps},
    }  # fmt: skip
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


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
    known = [s.name for s in STEPS]
    for name in only or []:
        if name not in known:
            raise ValueError(f"unknown step {name!r}; steps: {', '.join(known)}")
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
        shutil.rmtree(out / ".staging", ignore_errors=True)
        if not report:
            return None
        from mechvit.study.report import write_report

        return write_report(ctx, run, [s for s in STEPS if s.name in run.results])

    run.report = rank0_runs(close, "writing the report")
    return run
