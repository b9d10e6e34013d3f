"""The study pipeline: named steps, each cached under a hash of its config and inputs.

A step's hash covers its name and version, its config section, the shared settings it reads (data, seed,
conditions), the content hashes of the models and the hashes of the steps it reads. A step writes into
``<out>/.staging/<step>-<hash>/``; when it finishes, its ``result.json`` is written there, the folder is
moved onto ``<out>/<step>/`` and then the done-marker ``<out>/<step>/done.json`` (holding the hash) is
written. A rerun skips every step whose marker holds the current hash; an interrupted step leaves no marker
and runs again (the staging folder survives, so a step may keep finished pieces, e.g. trained SAEs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mechvit.config import StudyConfig, check_hooks_against_model
from mechvit.study.context import StudyContext

DONE = "done.json"
RESULT = "result.json"


@dataclass
class StepResult:
    """What a step leaves for the report: metrics (JSON), figures, tables, links, notes.

    ``figures``: ``{"png": rel, "svg": rel, "caption": str}`` with paths relative to the out dir;
    ``tables``: ``{"title": str, "markdown": str}``; ``links``: ``{"file": rel, "title": str}``."""

    metrics: dict[str, Any] = field(default_factory=dict)
    figures: list[dict[str, str]] = field(default_factory=list)
    tables: list[dict[str, str]] = field(default_factory=list)
    links: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepResult:
        return cls(**{k: d.get(k, v.default_factory()) for k, v in cls.__dataclass_fields__.items()})


class StepWriter:
    """Where a running step writes: ``path(name)`` in its staging folder, ``rel(name)`` as the report sees it."""

    def __init__(self, step: str, staging: Path):
        self.step, self.dir = step, staging

    def path(self, name: str) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def rel(self, name: str) -> str:
        return f"{self.step}/{name}"


@dataclass
class Step:
    name: str
    title: str
    section: str | None  # the config section it reads (None: none)
    fn: Callable[[StudyContext, StepWriter, dict[str, StepResult]], StepResult]
    deps: tuple[str, ...] = ()
    version: int = 1

    def enabled(self, cfg: StudyConfig) -> bool:
        sec = getattr(cfg, self.section, None) if self.section else None
        return bool(getattr(sec, "enabled", True))


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def step_hash(step: Step, ctx: StudyContext, upstream: dict[str, str]) -> str:
    cfg = ctx.cfg
    section = dataclasses.asdict(getattr(cfg, step.section)) if step.section else None
    if isinstance(section, dict):
        section.pop("enabled", None)
    payload = {
        "step": step.name, "version": step.version, "section": section,
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


@dataclass
class StudyRun:
    out: Path
    results: dict[str, StepResult]
    hashes: dict[str, str]
    computed: list[str]
    cached: list[str]
    timings: dict[str, float]
    report: Path | None = None


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
    upstream steps finished or enabled)."""
    import torch

    from mechvit.study.steps import STEPS

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    known = [s.name for s in STEPS]
    for name in only or []:
        if name not in known:
            raise ValueError(f"unknown step {name!r}; steps: {', '.join(known)}")
    ctx = StudyContext(cfg, out)
    check_hooks_against_model(cfg, ctx.model(ctx.base_name))
    steps = [s for s in STEPS if s.enabled(cfg) and (only is None or s.name in only)]
    run = StudyRun(out, {}, {}, [], [], {})
    bar = tqdm(steps, desc="study", unit="step", disable=not cfg.progress)
    for step in bar:
        bar.set_postfix_str(step.name)
        missing = [d for d in step.deps if d not in run.hashes and read_done(out, d) is None]
        if missing:
            raise ValueError(f"step {step.name!r} needs {missing} (enable them in the config)")
        for d in step.deps:  # a dependency outside `only`: use its finished result
            if d not in run.hashes:
                run.hashes[d] = read_done(out, d)["hash"]
                run.results[d] = StepResult.from_dict(json.loads((out / d / RESULT).read_text()))
        h = step_hash(step, ctx, run.hashes)
        done = read_done(out, step.name)
        if not force and done is not None and done.get("hash") == h and (out / step.name / RESULT).is_file():
            run.results[step.name] = StepResult.from_dict(json.loads((out / step.name / RESULT).read_text()))
            run.hashes[step.name], run.timings[step.name] = h, float(done.get("seconds", 0.0))
            run.cached.append(step.name)
            tqdm.write(f"[{step.name}] up to date ({h}), skipped")
            continue
        t0 = time.time()
        staging = out / ".staging" / f"{step.name}-{h}"
        staging.mkdir(parents=True, exist_ok=True)
        result = step.fn(ctx, StepWriter(step.name, staging), run.results)
        write_json_atomic(staging / RESULT, result.to_dict())
        final = out / step.name
        if final.exists():
            old = out / ".staging" / f"{step.name}.old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, final)
        seconds = round(time.time() - t0, 2)
        write_json_atomic(
            final / DONE,
            {
                "step": step.name,
                "hash": h,
                "seconds": seconds,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        run.results[step.name], run.hashes[step.name], run.timings[step.name] = result, h, seconds
        run.computed.append(step.name)
        tqdm.write(f"[{step.name}] done in {seconds:.1f} s")
    bar.close()
    shutil.rmtree(out / ".staging", ignore_errors=True)
    if report:
        from mechvit.viz.report import write_report

        run.report = write_report(ctx, run, [s for s in STEPS if s.name in run.results])
    return run
