"""The study's steps, in the order they run: one module per step, each a short linear ``run(ctx, writer,
prev)``: load inputs from the context, call :mod:`mechvit.analysis`, draw with :mod:`mechvit.viz`, return a
:class:`mechvit.study.result.StepResult`. Adding a step: write a module here (``TITLE``, ``SECTION``,
``DEPS``, ``run``), add a config section in ``study/config.py`` and list it below."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from mechvit.study.config import StudyConfig
from mechvit.study.context import StudyContext
from mechvit.study.result import StepResult, StepWriter


@dataclass
class Step:
    """A step: ``module`` (under ``mechvit.study.steps``) defines ``TITLE``, ``SECTION`` (the config section
    it reads, None for none), ``DEPS`` (steps whose results it reads), optionally ``DISTRIBUTED`` (runs on every rank under torchrun)
    and ``SIDE_BY_SIDE`` (runs beside other such steps), and ``run(ctx, writer, prev)``."""

    name: str
    module: str

    @functools.cached_property
    def _mod(self):
        return importlib.import_module(self.module)

    @property
    def title(self) -> str:
        return self._mod.TITLE

    @property
    def section(self) -> str | None:
        return self._mod.SECTION

    @property
    def deps(self) -> tuple[str, ...]:
        return tuple(getattr(self._mod, "DEPS", ()))

    @property
    def distributed(self) -> bool:
        """Runs on every rank under torchrun (``DISTRIBUTED = True`` in its module); else on rank 0 only."""
        return bool(getattr(self._mod, "DISTRIBUTED", False))

    @property
    def side_by_side(self) -> bool:
        """Gains more from a process of its own than from a second thread (``SIDE_BY_SIDE = True``): held back
        and run after the other steps, ``parallel_steps`` such steps at a time (:mod:`mechvit.study.runner`)."""
        return bool(getattr(self._mod, "SIDE_BY_SIDE", False))

    @property
    def fn(self) -> Callable[[StudyContext, StepWriter, dict[str, StepResult]], StepResult]:
        return self._mod.run

    def enabled(self, cfg: StudyConfig) -> bool:
        """On when its config section is (``enabled``) and so is every step it reads: turning the SAEs off
        turns off the SAE analysis and the explorer too."""
        sec = getattr(cfg, self.section, None) if self.section else None
        if not getattr(sec, "enabled", True):
            return False
        return all(s.enabled(cfg) for s in STEPS if s.name in self.deps)


STEPS: list[Step] = [
    Step(name, f"mechvit.study.steps.{name}")
    for name in (
        "robustness",
        "logit_lens",
        "attention",
        "sae",
        "sae_analysis",
        "explorer",
        "patching",
        "cka",
    )
]

__all__ = ["STEPS", "Step"]
