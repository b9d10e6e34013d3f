"""Did a rerun reproduce? Compare two studies' ``metrics.json`` number by number.

    python -m mechvit.study.compare runs/default docs/default_study          (or: mechvit compare A B)
    python -m mechvit.study.compare A B --rtol 1e-5 --atol 1e-6               exit 1 beyond the tolerance

Per step: how many numbers differ and the largest absolute and relative difference (and where); every claim
verdict that changed; the models whose weights differ (checkpoint sha256); the config keys that differ; and the
environment, machine included (:func:`mechvit.runtime.machine_fingerprint`), because that is what explains
differences in the last digits: the same code on another CPU kernel path rounds every matrix product
differently, and SAE training amplifies those roundings into differences the size of its seed noise (README,
"Reproducibility"). Timings and bookkeeping (seconds, dates, cache flags, step hashes) are left out.

Every other value is compared exactly: a string (a label, a corruption name, a list of controls), a true/false
or a null that differs is a difference, listed with both values, whatever the tolerance (a number that became
null too). Only the free text that quotes numbers (:data:`FREE_TEXT`: a claim's rule, effect and control, notes)
is counted apart ("texts differ") without failing.

Exit status: 0 when every number agrees within ``atol + rtol * max(|a|, |b|)`` (default 0: bit for bit), every
other value is equal, no verdict changed and the models are the same weights; 1 otherwise; 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechvit._numbers import fmt_sig

# timings and bookkeeping, not results: left out of the comparison wherever they sit
SKIP_KEYS = frozenset(
    {"seconds", "wall_seconds", "train_seconds_group", "written", "cached", "side_by_side", "hash"}
)


# keys whose strings are prose that quotes numbers (the numbers are compared where they are stored): counted
# under "texts differ", not a difference
FREE_TEXT = frozenset(
    {"rule", "effect", "control", "note", "notes", "denominator_reason", "live_counted_on", "mcnemar_family"}
)


@dataclass
class Largest:
    value: float = 0.0
    where: str | None = None
    a: float | None = None
    b: float | None = None


@dataclass
class PartDiff:
    """The numbers of one part of metrics.json (a step's metrics, or the claims) compared."""

    name: str
    numbers: int = 0  # numeric leaves present on both sides
    differ: int = 0  # of them, how many are not equal (NaN equals NaN)
    beyond: int = 0  # of them, how many differ by more than the tolerance
    texts_differ: int = 0  # free-text leaves (FREE_TEXT) that differ (e.g. a note quoting a number)
    largest_abs: Largest = field(default_factory=Largest)
    largest_rel: Largest = field(default_factory=Largest)
    structure: list[str] = field(default_factory=list)  # keys or lengths on one side only
    values: list[str] = field(default_factory=list)  # other values (strings, booleans, nulls) that differ


@dataclass
class Comparison:
    parts: list[PartDiff]
    verdicts: list[dict[str, str]]  # {"claim", "model", "a", "b"} where the verdict changed
    models: list[str]  # models whose weights (sha256) differ or that only one run has
    config: dict[str, tuple[Any, Any]]  # dotted config key -> (a, b)
    environment: dict[str, tuple[Any, Any]]  # dotted environment key -> (a, b)
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def identical(self) -> bool:
        """Every number, text and verdict equal (environment and config aside)."""
        return not (self.verdicts or self.models) and all(
            p.differ == 0 and p.texts_differ == 0 and not p.structure and not p.values for p in self.parts
        )

    @property
    def reproduced(self) -> bool:
        """Every number within the tolerance, every other value equal, every verdict the same, the same
        weights and the same structure (free texts that quote a number may differ)."""
        return not (self.verdicts or self.models) and all(
            p.beyond == 0 and not p.structure and not p.values for p in self.parts
        )

    def to_markdown(self, a: str = "A", b: str = "B") -> str:
        tol = (
            "bit for bit"
            if self.atol == 0 and self.rtol == 0
            else f"atol {fmt_sig(self.atol, 6)}, rtol {fmt_sig(self.rtol, 6)}"
        )
        lines = [
            f"# {a} against {b}",
            "",
            f"**{'reproduced' if self.reproduced else 'NOT reproduced'}** ({tol}): "
            + ("every number identical." if self.identical else "see below."),
            "",
            "| part | numbers | differ | beyond tolerance | other values differ | texts differ "
            "| largest abs. difference | where | largest rel. difference | where |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in self.parts:
            lines.append(
                f"| {p.name} | {p.numbers} | {p.differ} | {p.beyond} | {len(p.values)} | {p.texts_differ} | "
                f"{_g(p.largest_abs.value)} | {_at(p.largest_abs)} | {_g(p.largest_rel.value)} | "
                f"{_at(p.largest_rel)} |"
            )
        for title, items in (
            ("Values that differ (text, true/false, null; compared exactly):", [
                f"{p.name}: {v}" for p in self.parts for v in p.values]),
            ("Only in one run (keys, lengths, types):", [f"{p.name}: {s}" for p in self.parts for s in p.structure]),
        ):  # fmt: skip
            if items:
                lines += ["", title, *[f"- {s}" for s in items[:20]]]
                if len(items) > 20:
                    lines.append(f"- ... and {len(items) - 20} more")
        lines += ["", "Verdicts that changed:" if self.verdicts else "Every claim verdict is the same."]
        lines += [f"- {v['claim']} / {v['model']}: {v['a']} -> {v['b']}" for v in self.verdicts]
        if self.models:
            lines += ["", "Models whose weights differ (sha256), or in one run only:"]
            lines += [f"- {m}" for m in self.models]
        for title, diff in (("Config", self.config), ("Environment", self.environment)):
            if diff:
                lines += ["", f"{title} differences ({a} -> {b}):"]
                lines += [f"- `{k}`: {_short(u)} -> {_short(v)}" for k, (u, v) in diff.items()]
            else:
                lines += ["", f"{title}: the same."]
        return "\n".join(lines) + "\n"


def _g(x: float) -> str:
    return fmt_sig(x, 3)  # rounded half up, like every number the study prints (0 reads "0")


def _at(big: Largest) -> str:
    return "" if big.where is None else f"`{big.where}` ({big.a!r} vs {big.b!r})"


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _walk(x: Any, y: Any, where: str, part: PartDiff, atol: float, rtol: float, key: str = "") -> None:
    """Compare ``x`` and ``y`` at ``where``; ``key``: the dict key they (or the list holding them) sit under."""
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(x.keys() | y.keys(), key=str):  # a stable order: the same report twice
            if k in SKIP_KEYS:
                continue
            if k not in x or k not in y:
                part.structure.append(f"{where}/{k} only in {'A' if k in x else 'B'}")
            else:
                _walk(x[k], y[k], f"{where}/{k}", part, atol, rtol, str(k))
    elif isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            part.structure.append(f"{where}: {len(x)} items in A, {len(y)} in B")
            return
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _walk(u, v, f"{where}[{i}]", part, atol, rtol, key)
    elif _is_number(x) and _is_number(y):
        part.numbers += 1
        fx, fy = float(x), float(y)
        if fx == fy or (math.isnan(fx) and math.isnan(fy)):
            return
        part.differ += 1
        if math.isnan(fx) or math.isnan(fy) or math.isinf(fx) or math.isinf(fy):
            d = r = math.inf  # a number on one side only
        else:
            d = abs(fx - fy)
            r = d / max(abs(fx), abs(fy))
        if not d <= atol + rtol * max(abs(fx), abs(fy)):
            part.beyond += 1
        if d > part.largest_abs.value:
            part.largest_abs = Largest(d, where, x, y)
        if r > part.largest_rel.value:
            part.largest_rel = Largest(r, where, x, y)
    elif isinstance(x, str) and isinstance(y, str) and key in FREE_TEXT:
        if x != y:
            part.texts_differ += 1
    elif (
        _is_value(x)
        and _is_value(y)
        and not (_is_number(x) and isinstance(y, str))
        and not (isinstance(x, str) and _is_number(y))
    ):  # strings, booleans, nulls (and a number against a bool or null): exactly equal or a difference
        if type(x) is not type(y) or x != y:
            part.values.append(f"`{where}`: {_short(x)} -> {_short(y)}")
    else:
        part.structure.append(f"{where}: {type(x).__name__} in A, {type(y).__name__} in B")


def _is_value(x: Any) -> bool:
    return x is None or isinstance(x, (str, bool, int, float))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _flat_diff(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    fa, fb = _flat(a or {}), _flat(b or {})
    return {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)}


def _claims(m: dict) -> dict[str, dict]:
    return {f"{c.get('claim')} / {c.get('model')}": c for c in (m.get("claims") or {}).get("per_model") or []}


def compare_metrics(a: dict, b: dict, *, atol: float = 0.0, rtol: float = 0.0) -> Comparison:
    """Compare two ``metrics.json`` dicts (see the module docstring)."""
    for name, m in (("A", a), ("B", b)):
        if not isinstance(m, dict) or not isinstance(m.get("steps"), dict):
            raise ValueError(f"{name} is not a study's metrics.json: expected a 'steps' object")
    if atol < 0 or rtol < 0:
        raise ValueError(f"tolerances must be >= 0, got atol={atol}, rtol={rtol}")
    parts = []
    for step in list(a["steps"]) + [s for s in b["steps"] if s not in a["steps"]]:
        part = PartDiff(step)
        if step not in a["steps"] or step not in b["steps"]:
            part.structure.append(f"step only in {'A' if step in a['steps'] else 'B'}")
        else:
            _walk(a["steps"][step].get("metrics"), b["steps"][step].get("metrics"), step, part, atol, rtol)
        parts.append(part)
    ca, cb = _claims(a), _claims(b)  # keyed by "claim / model": paths that say which claim moved
    claims = PartDiff("claims")
    _walk(ca, cb, "claims", claims, atol, rtol)
    parts.append(claims)
    verdicts = [
        {"claim": c.get("claim"), "model": c.get("model"), "a": c.get("verdict"), "b": cb[k].get("verdict")}
        for k, c in ca.items()
        if k in cb and cb[k].get("verdict") != c.get("verdict")
    ]
    ma, mb = a.get("models") or {}, b.get("models") or {}
    models = sorted(
        n
        for n in ma.keys() | mb.keys()
        if n not in ma or n not in mb or ma[n].get("sha256") != mb[n].get("sha256")
    )
    return Comparison(
        parts=parts,
        verdicts=verdicts,
        models=models,
        config=_flat_diff(a.get("config"), b.get("config")),
        environment=_flat_diff(a.get("environment"), b.get("environment")),
        atol=atol,
        rtol=rtol,
    )


def load_metrics(path: str | Path) -> dict:
    """A run folder (its metrics.json) or a metrics.json file."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{path}: expected a study's output folder or its metrics.json, found neither"
        )
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="a study's output folder or its metrics.json")
    p.add_argument("b", help="another one")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0: bit for bit)")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance, of max(|a|, |b|)")
    p.add_argument("--out", help="also write the markdown here")


def run(args: argparse.Namespace) -> int:
    cmp = compare_metrics(load_metrics(args.a), load_metrics(args.b), atol=args.atol, rtol=args.rtol)
    text = cmp.to_markdown(str(args.a), str(args.b))
    sys.stdout.write(text)
    if args.out:
        from mechvit._io import atomic_write_text

        atomic_write_text(Path(args.out), text)
    return 0 if cmp.reproduced else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mechvit.study.compare", description=__doc__.split("\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        return run(a)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
