"""``mechvit study``: the seed paper's whole analysis as one cached, resumable pipeline.

``run_study(load_study_config(path), out)`` runs the robustness matrix, logit lens, attention, SAEs (before
and after fine-tuning), SAE code similarity and feature overlap with feature pages, activation patching and
CKA, and writes ``report.html``, ``report.md``, ``metrics.json`` and the figures into ``out``.
Layout: ``config.py`` (the YAML schema), ``runner.py`` (step graph, hashing, staging, resume, lock),
``context.py`` (models, images, device), ``result.py`` (what a step returns: metrics, tables as data,
figures), ``report.py`` (sections rendered to Markdown and HTML) and ``steps/`` (one module per step).
See ``docs/study.md``.
"""

from mechvit.study.config import ConfigError, StudyConfig, load_study_config, study_config_from_dict
from mechvit.study.result import StepResult, Table
from mechvit.study.runner import StudyRun, run_study

__all__ = [
    "ConfigError", "StepResult", "StudyConfig", "StudyRun", "Table", "load_study_config", "run_study",
    "study_config_from_dict",
]  # fmt: skip
