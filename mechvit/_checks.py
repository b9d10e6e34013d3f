"""Checks that layers which may not import each other share (``mechvit.corruptions`` and ``mechvit.data`` are
sibling layers, pyproject's import-linter contract): one rule and one wording for each."""

from __future__ import annotations

import numbers

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)  # ImageNet-C's corruption severities


def severity_problem(severity: object) -> str | None:
    """What is wrong with ``severity``, or ``None`` when it is an integer in 1..5 (bool, 2.0 and '3' are not).

    The one wording of this check (``mechvit.corruptions.corruption_problem`` is its twin for names): what was
    expected and what was given, with its type when it is not an integer: ``severity must be an integer in
    1..5, got 7``, ``... got float 2.5``, ``... got bool True``."""
    integral = isinstance(severity, numbers.Integral) and not isinstance(severity, bool)
    if integral and int(severity) in SEVERITIES:
        return None
    if integral:
        given = str(int(severity))
    elif severity is None:
        given = "None"
    else:
        given = f"{type(severity).__name__} {severity!r}"
    return f"severity must be an integer in 1..5, got {given}"
