"""What a step leaves for the report: metrics (JSON), tables as data, figures, links and notes.

A :class:`Table` holds values, not Markdown: ``columns`` (names, with ``units`` per column where they have
one) and ``rows``; :mod:`mechvit.study.report` renders it to Markdown and to HTML with one renderer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    """``rows`` of values under ``columns``; floats are shown with ``digits`` decimals, non-finite as '–'."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    units: list[str] | None = None  # one per column ("" for none), shown after the column name
    digits: int = 3

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"table {self.title!r}: row {i} has {len(row)} values, expected {len(self.columns)}"
                )
        if self.units is not None and len(self.units) != len(self.columns):
            raise ValueError(
                f"table {self.title!r}: expected {len(self.columns)} units, got {len(self.units)}"
            )


@dataclass
class StepResult:
    """``figures``: ``{"png": rel, "svg": rel, "caption": str}`` with paths relative to the out dir;
    ``links``: ``{"file": rel, "title": str}``; ``notes``: paragraphs shown before the tables."""

    metrics: dict[str, Any] = field(default_factory=dict)
    figures: list[dict[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    links: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepResult:
        d = {k: d.get(k, f.default_factory()) for k, f in cls.__dataclass_fields__.items()}
        d["tables"] = [Table(**t) for t in d["tables"]]
        return cls(**d)


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

    def figure(self, fig, stem: str, caption: str) -> dict[str, str]:
        """Write a :mod:`mechvit.viz.figures` figure as ``stem.png`` + ``stem.svg``; the report's entry."""
        from mechvit.viz.figures import FORMATS, save_report_figure

        save_report_figure(fig, self.path(stem))
        return {"caption": caption, **{fmt: self.rel(f"{stem}.{fmt}") for fmt in FORMATS}}
