"""``mechvit study``: the seed paper's whole analysis as one cached, resumable pipeline.

``run_study(load_study_config(path), out)`` runs the robustness matrix, logit lens, attention, SAEs (before
and after fine-tuning), SAE code similarity and feature overlap with feature pages, activation patching and
CKA, and writes ``report.html``, ``report.md``, ``metrics.json`` and the figures into ``out``. See
``docs/study.md``.
"""

from mechvit.study.pipeline import StepResult, StudyRun, run_study

__all__ = ["StepResult", "StudyRun", "run_study"]
