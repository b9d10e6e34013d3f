"""The study report: ``report.html`` (self-contained: every figure embedded as a base64 PNG data URI, opens
offline), ``report.md`` (the same content, figures linked as PNG files) and ``metrics.json`` (every step's
metrics, hashes and timings, the config and the environment; strict JSON).

The report is a list of :class:`Section` s (title, paragraphs, tables as data, figures, links); one renderer
writes each to Markdown and to HTML (:func:`table_markdown`, :func:`table_html`). A later analysis adds a
section (or a link, e.g. to a feature explorer) without touching the renderer.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechvit._io import atomic_write_json, atomic_write_text
from mechvit.study.claims import CLAIMS, claims_table, overall, verdicts
from mechvit.study.result import Table

SUMMARY_TITLE = "Key numbers"


@dataclass
class Section:
    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)  # shown as notes
    items: list[str] = field(default_factory=list)  # a bullet list
    tables: list[Table] = field(default_factory=list)
    figures: list[dict[str, str]] = field(default_factory=list)
    links: list[dict[str, str]] = field(default_factory=list)
    footer: str = ""


# ---- tables -------------------------------------------------------------------------------------------
def cell(v: Any, digits: int = 3) -> str:
    """One table value as text: floats with ``digits`` decimals, None/NaN/inf as '–'."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _header(t: Table) -> list[str]:
    units = t.units or [""] * len(t.columns)
    return [f"{c} ({u})" if u else c for c, u in zip(t.columns, units, strict=True)]


def table_markdown(t: Table) -> str:
    """A GitHub pipe table (``|`` in values escaped)."""

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(_header(t)), "|" + "---|" * len(t.columns)]
    lines += [row([cell(v, t.digits) for v in r]) for r in t.rows]
    return "\n".join(lines)


def table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _header(t))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell(v, t.digits))}</td>" for v in r) + "</tr>" for r in t.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---- key numbers --------------------------------------------------------------------------------------
def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{100 * v:.1f}%" if pct else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _ci(d: dict | None, scale: float = 1.0, unit: str = "") -> str:
    if not d or d.get("estimate") is None:
        return "–"
    e, lo, hi = (None if d.get(k) is None else scale * d[k] for k in ("estimate", "low", "high"))
    if lo is None or hi is None or lo != lo:
        return f"{e:.3g}{unit}"
    return f"{e:.3g}{unit} [95% CI {lo:.3g}, {hi:.3g}]"


def key_numbers(results: dict, base: str) -> list[str]:
    """One line per headline number of the study (what a reader checks first), each with its 95% CI."""
    out = []
    r = results.get("robustness")
    if r is not None and "estimates" in r.metrics:
        n = r.metrics["n_images"]
        for m, e in r.metrics["estimates"].items():
            parts = [f"{g.replace('_', ' ')} {_ci(v, 100, '%')}" for g, v in e["accuracy"].items()]
            out.append(f"{m} top-1 on {n} images: " + "; ".join(parts))
    r = results.get("logit_lens")
    if r is not None:
        for k, v in r.metrics.get("paired_first_correct", {}).items():
            m, ref, lab = k.split("|")
            out.append(
                f"logit lens, first correct block {m} minus {ref} on {lab} (paired, {v['n_common']} images): "
                f"{_ci(v['difference'])}"
            )
    r = results.get("sae")
    if r is not None and r.metrics:
        g = r.metrics.get("ablation_gap")
        if g:
            out.append(f"mean-ablation gap of the SAE hook's tokens (base model): KL {g['kl']:.3f} nats")
        for k, v in r.metrics.items():
            if k.count("|") != 2:
                continue
            h = v["heldout"]
            out.append(
                f"SAE {k.replace('|', ' ')} (seed {v['seed']}): held-out EV {_fmt(h['explained_variance'])} (PCA-k "
                f"{_fmt(v['pca_k_explained_variance'])}), L0 {h['l0']:.1f}, dead {h['dead_features']}/{h['d_sae']}, "
                f"spliced KL {_fmt(v['spliced_clean']['kl_sae'])} nats"
            )
    r = results.get("sae_analysis")
    if r is not None:
        for arch, oc in r.metrics.get("overlap_controls", {}).items():
            for comp, per in oc["summary"].items():
                mc = per["matched_cos"]
                p = (mc.get("test") or {}).get("p_value")
                out.append(
                    f"SAE overlap {comp} ({arch}): matched decoder cosine between {_ci(mc['between'])}, within "
                    f"base {_ci(mc['within_reference'])}, within other {_ci(mc['within_other'])}, floor "
                    f"{_ci(mc['floor'])}; ratio {_ci(mc['ratio'])}; permutation p = "
                    f"{'–' if p is None else f'{p:.3g}'}"
                )
    r = results.get("cka")
    if r is not None:
        for k, v in r.metrics.get("between_models", {}).items():
            out.append(
                f"CKA {k}: min over layers {_fmt(min(v['cka_linear']))}, last layer {_fmt(v['cka_linear'][-1])}"
            )
    return out


# ---- sections -----------------------------------------------------------------------------------------
def sections(ctx, run, steps, numbers: list[str], models: dict) -> list[Section]:
    """The report's sections: key numbers, models, then one per step in order."""
    vs = verdicts({k: v.metrics for k, v in run.results.items()}, ctx.base_name)
    ov = overall(vs)
    out = [
        Section(
            "claims",
            "Claims: what the data say",
            paragraphs=[
                "Rules: see mechvit/study/claims.py and docs/study.md. Every effect carries its 95% CI "
                "and is set against its control."
            ],
            items=[f"{CLAIMS[c]}: {v}" for c, v in ov.items()],
            tables=[claims_table(vs)] if vs else [],
        ),
        Section("summary", SUMMARY_TITLE, items=numbers),
        Section(
            "models",
            "Models",
            tables=[
                Table(
                    "",
                    ["model", "source", "seen corruptions", "sha256"],
                    [
                        [n, i["source"], ", ".join(i["seen"]) or "–", i["sha256"][:12]]
                        for n, i in models.items()
                    ],
                )
            ],
        ),
    ]
    for s in steps:
        r = run.results[s.name]
        cached = " (cached)" if s.name in run.cached else ""
        out.append(
            Section(
                s.name,
                s.title,
                paragraphs=list(r.notes),
                tables=list(r.tables),
                figures=list(r.figures),
                links=list(r.links),
                footer=f"step hash {run.hashes.get(s.name)}, {run.timings.get(s.name, 0):.1f} s{cached}",
            )  # fmt: skip
        )
    return out


def render_markdown(title: str, intro: str, secs: list[Section], reproduce: str) -> str:
    md = [f"# {title}", "", intro, ""]
    for s in secs:
        md += [f"## {s.title}", ""]
        md += [f"> {p}" for p in s.paragraphs] + ([""] if s.paragraphs else [])
        md += [f"- {x}" for x in s.items] + ([""] if s.items else [])
        for t in s.tables:
            md += ([f"**{t.title}**", ""] if t.title else []) + [table_markdown(t), ""]
        for f in s.figures:
            md += [f"![{f['caption']}]({f['png']})", "", f"*{f['caption']}* ([SVG]({f['svg']}))", ""]
        md += [f"- [{link['title']}]({link['file']})" for link in s.links]
        if s.footer:
            md += ["", f"<sub>{s.footer}</sub>", ""]
    md += ["## Reproduce", "", "```bash", reproduce, "```", ""]
    return "\n".join(md)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1150px;color:#222;
line-height:1.45;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:2px solid #4477AA;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#eef3f8}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}
.note{background:#fff6e0;border-left:3px solid #CCBB44;padding:.3em .6em;font-size:.9em}
nav ol{columns:2}code{background:#f4f4f4;padding:0 .2em}"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def render_html(title: str, intro_html: str, secs: list[Section], reproduce: str, out: Path) -> str:
    e = html.escape
    h = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        intro_html,
        "<nav><ol>" + "".join(f"<li><a href='#{s.id}'>{e(s.title)}</a></li>" for s in secs) + "</ol></nav>",
    ]
    for s in secs:
        h.append(f"<section id='{s.id}'><h2>{e(s.title)}</h2>")
        h += [f"<p class='note'>{e(p)}</p>" for p in s.paragraphs]
        if s.items:
            h.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in s.items) + "</ul>")
        for t in s.tables:
            h.append((f"<h3>{e(t.title)}</h3>" if t.title else "") + table_html(t))
        for f in s.figures:
            png = out / f["png"]
            if not png.is_file():
                raise FileNotFoundError(
                    f"figure {png} of section {s.id} is missing; rerun the study with --force"
                )
            h.append(
                f"<figure><img src='{_data_uri(png)}' alt='{e(f['caption'])}'>"
                f"<figcaption>{e(f['caption'])} (<a href='{e(f['svg'])}'>SVG</a>)</figcaption></figure>"
            )
        if s.links:
            h.append(
                "<ul>"
                + "".join(f"<li><a href='{e(x['file'])}'>{e(x['title'])}</a></li>" for x in s.links)
                + "</ul>"
            )
        if s.footer:
            h.append(f"<p><small>{e(s.footer)}</small></p>")
        h.append("</section>")
    h.append(
        f"<h2>Reproduce</h2><pre>{e(reproduce)}</pre><p>metrics.json holds every number of this report.</p>"
        "</body></html>"
    )
    return "\n".join(h)


def environment(device: str) -> dict[str, Any]:
    env = {"python": platform.python_version(), "platform": platform.platform(), "device": device}
    try:
        import sae_lens
        import timm
        import torch

        env.update(
            torch=torch.__version__, timm=timm.__version__, sae_lens=sae_lens.__version__,
            threads=torch.get_num_threads(),
        )  # fmt: skip
    except ImportError:  # pragma: no cover
        pass
    return env


def write_report(ctx, run, steps) -> Path:
    """Write report.html, report.md and metrics.json into ``run.out``; return the HTML path."""
    out: Path = run.out
    cfg, results = ctx.cfg, run.results
    numbers = key_numbers(results, ctx.base_name)
    env = environment(str(ctx.device))
    models = {n: i.to_dict() for n, i in ctx.infos.items()}
    written = time.strftime("%Y-%m-%dT%H:%M:%S")
    metrics = {
        "title": cfg.title, "name": cfg.name, "written": written, "key_numbers": numbers, "models": models,
        "environment": env,
        "steps": {s.name: {"hash": run.hashes.get(s.name), "seconds": run.timings.get(s.name),
                           "cached": s.name in run.cached, "metrics": results[s.name].metrics} for s in steps},
        "config": dataclasses.asdict(cfg),
    }  # fmt: skip
    vs = verdicts({k: v.metrics for k, v in results.items()}, ctx.base_name)
    metrics["claims"] = {"overall": overall(vs), "per_model": [dataclasses.asdict(v) for v in vs]}
    atomic_write_json(out / "metrics.json", metrics, indent=1)
    secs = sections(ctx, run, steps, numbers, models)
    reproduce = f"mechvit study --config <this config> --out {out}"
    intro = f"Config `{cfg.name}`, written {written}; device {env['device']}."
    atomic_write_text(out / "report.md", render_markdown(cfg.title, intro, secs, reproduce))
    intro_html = (
        f"<p>Config <code>{html.escape(cfg.name)}</code>, written {written}; device {html.escape(env['device'])}; "
        f"torch {env.get('torch', '?')}, timm {env.get('timm', '?')}, sae-lens {env.get('sae_lens', '?')}.</p>"
    )
    path = out / "report.html"
    atomic_write_text(path, render_html(cfg.title, intro_html, secs, reproduce, out))
    return path
