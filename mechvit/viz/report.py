"""The study report: ``report.html`` (self-contained: every figure embedded as a base64 PNG data URI, opens
offline), ``report.md`` (the same content, figures linked as PNG files) and ``metrics.json`` (every step's
metrics, hashes and timings, the config and the environment)."""

from __future__ import annotations

import base64
import dataclasses
import html
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

SUMMARY_TITLE = "Key numbers"


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown_table_to_html(md: str) -> str:
    """A GitHub pipe table (as the steps write them) to an HTML table."""
    lines = [ln.strip() for ln in md.strip().splitlines() if ln.strip()]
    if len(lines) < 2 or not re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*\|?", lines[1]):
        return f"<pre>{html.escape(md)}</pre>"

    def cells(line: str) -> list[str]:
        return [html.escape(c.strip()) for c in line.strip("|").split("|")]

    head = "".join(f"<th>{c}</th>" for c in cells(lines[0]))
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(ln)) + "</tr>" for ln in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{100 * v:.1f}%" if pct else (f"{v:.3f}" if isinstance(v, float) else str(v))


def key_numbers(results: dict, base: str) -> list[str]:
    """One line per headline number of the study (what a reader checks first)."""
    out = []
    r = results.get("robustness")
    if r is not None:
        for s in r.metrics["seen_unseen"]:
            seen = ", ".join(s["seen"]) or "none"
            out.append(
                f"{s['model']}: clean top-1 {_fmt(s['clean_top1'], True)}, seen ({seen}) "
                f"{_fmt(s['seen_top1'], True)}, unseen {_fmt(s['unseen_top1'], True)}, mCE {_fmt(s['mCE'])}"
            )
        for n, d in r.metrics.get("transfer_top1", {}).items():
            parts = ", ".join(f"{lab} {100 * v:+.1f} pp" for lab, v in d.items())
            out.append(f"{n} vs {base} (top-1 change): {parts}")
    r = results.get("logit_lens")
    if r is not None:
        parts = [
            f"{k.replace('|', ' on ')} {_fmt(v['mean_first_correct_layer'])}" for k, v in r.metrics.items()
        ]
        out.append("logit lens, mean first correct layer: " + "; ".join(parts))
    r = results.get("sae")
    if r is not None and r.metrics:
        parts = [
            f"{k.replace('|', ' ')}: EV {_fmt(v['heldout']['explained_variance'])}, L0 {v['heldout']['l0']:.1f}"
            for k, v in r.metrics.items()
        ]
        out.append("SAEs (held-out): " + "; ".join(parts))
    r = results.get("sae_analysis")
    if r is not None:
        cs = r.metrics.get("code_similarity", {})
        if cs:
            out.append(
                "SAE code cosine clean vs corrupted (mean): "
                + "; ".join(f"{k.replace('|', ' ')} {_fmt(v['mean'])}" for k, v in cs.items())
            )
        for k, v in r.metrics.get("overlap", {}).items():
            c = v["counts"]
            out.append(
                f"feature overlap {k.replace('|', ' ')} vs {base}: persistent {c['persistent']}, shifted "
                f"{c['shifted']}, lost {c['lost']}, new {c['new']} of {v['n_features_a']}; mean matched "
                f"cosine {_fmt(v['mean_matched_cos'])}"
            )
    r = results.get("cka")
    if r is not None:
        for k, v in r.metrics.get("between_models", {}).items():
            out.append(
                f"CKA {k}: min over layers {_fmt(min(v['cka_linear']))}, last layer {_fmt(v['cka_linear'][-1])}"
            )
    return out


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1150px;color:#222;
line-height:1.45;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:2px solid #4477AA;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#eef3f8}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}
.note{background:#fff6e0;border-left:3px solid #CCBB44;padding:.3em .6em;font-size:.9em}
nav ol{columns:2}code{background:#f4f4f4;padding:0 .2em}"""


def write_report(ctx, run, steps) -> Path:
    """Write report.html, report.md and metrics.json into ``run.out``; return the HTML path."""
    out: Path = run.out
    cfg = ctx.cfg
    results = run.results
    numbers = key_numbers(results, ctx.base_name)
    env = {"python": platform.python_version(), "platform": platform.platform(), "device": str(ctx.device)}
    try:
        import sae_lens
        import timm
        import torch

        env.update(
            torch=torch.__version__,
            timm=timm.__version__,
            sae_lens=sae_lens.__version__,
            threads=torch.get_num_threads(),
        )
    except ImportError:  # pragma: no cover
        pass
    models = {n: i.to_dict() for n, i in ctx.infos.items()}
    metrics = {
        "title": cfg.title, "name": cfg.name, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "key_numbers": numbers, "models": models, "environment": env,
        "steps": {s.name: {"hash": run.hashes.get(s.name), "seconds": run.timings.get(s.name),
                           "cached": s.name in run.cached, "metrics": results[s.name].metrics} for s in steps},
        "config": dataclasses.asdict(cfg),
    }  # fmt: skip
    from mechvit.study.pipeline import write_json_atomic

    write_json_atomic(out / "metrics.json", metrics)

    # ---- markdown ----
    models_md = "\n".join(
        [
            "| model | source | seen corruptions | sha256 |",
            "|---|---|---|---|",
            *[
                f"| {n} | {i['source']} | {', '.join(i['seen']) or '–'} | {i['sha256'][:12]} |"
                for n, i in models.items()
            ],
        ]
    )
    md = [
        f"# {cfg.title}",
        "",
        f"Config `{cfg.name}`, written {metrics['written']}; device {env['device']}.",
        "",
        f"## {SUMMARY_TITLE}",
        "",
        *[f"- {x}" for x in numbers],
        "",
        "## Models",
        "",
        models_md,
        "",
    ]
    for s in steps:
        r = results[s.name]
        md += [f"## {s.title}", ""]
        md += [f"> {note}" for note in r.notes] + ([""] if r.notes else [])
        for t in r.tables:
            md += [f"**{t['title']}**", "", t["markdown"], ""]
        for f in r.figures:
            md += [f"![{f['caption']}]({f['png']})", "", f"*{f['caption']}* ([SVG]({f['svg']}))", ""]
        for link in r.links:
            md += [f"- [{link['title']}]({link['file']})"]
        md += [
            "",
            f"<sub>step hash {run.hashes.get(s.name)}, {run.timings.get(s.name, 0):.1f} s"
            f"{' (cached)' if s.name in run.cached else ''}</sub>",
            "",
        ]
    md += ["## Reproduce", "", "```bash", f"mechvit study --config <this config> --out {out}", "```", ""]
    _write_text(out / "report.md", "\n".join(md))

    # ---- html ----
    h = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(cfg.title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(cfg.title)}</h1>",
        f"<p>Config <code>{html.escape(cfg.name)}</code>, written {metrics['written']}; device "
        f"{html.escape(env['device'])}; torch {env.get('torch', '?')}, timm {env.get('timm', '?')}, "
        f"sae-lens {env.get('sae_lens', '?')}.</p>",
    ]
    h.append(
        "<nav><ol>"
        + f"<li><a href='#summary'>{SUMMARY_TITLE}</a></li><li><a href='#models'>Models</a></li>"
        + "".join(f"<li><a href='#{s.name}'>{html.escape(s.title)}</a></li>" for s in steps)
        + "</ol></nav>"
    )
    h.append(
        f"<h2 id='summary'>{SUMMARY_TITLE}</h2><ul>"
        + "".join(f"<li>{html.escape(x)}</li>" for x in numbers)
        + "</ul>"
    )
    h.append("<h2 id='models'>Models</h2>" + markdown_table_to_html(models_md))
    for s in steps:
        r = results[s.name]
        h.append(f"<section id='{s.name}'><h2>{html.escape(s.title)}</h2>")
        h += [f"<p class='note'>{html.escape(n)}</p>" for n in r.notes]
        for t in r.tables:
            h.append(f"<h3>{html.escape(t['title'])}</h3>{markdown_table_to_html(t['markdown'])}")
        for f in r.figures:
            png = out / f["png"]
            if not png.is_file():
                raise FileNotFoundError(
                    f"figure {png} of step {s.name} is missing; rerun the study with --force"
                )
            h.append(
                f"<figure><img src='{_data_uri(png)}' alt='{html.escape(f['caption'])}'>"
                f"<figcaption>{html.escape(f['caption'])} (<a href='{html.escape(f['svg'])}'>SVG</a>)"
                "</figcaption></figure>"
            )
        if r.links:
            h.append(
                "<ul>"
                + "".join(
                    f"<li><a href='{html.escape(x['file'])}'>{html.escape(x['title'])}</a></li>"
                    for x in r.links
                )
                + "</ul>"
            )
        h.append(
            f"<p><small>step hash {run.hashes.get(s.name)}, {run.timings.get(s.name, 0):.1f} s"
            f"{' (cached)' if s.name in run.cached else ''}</small></p></section>"
        )
    h.append(
        "<h2>Reproduce</h2><pre>mechvit study --config &lt;this config&gt; --out "
        f"{html.escape(str(out))}</pre><p>metrics.json holds every number of this report.</p></body></html>"
    )
    path = out / "report.html"
    _write_text(path, "\n".join(h))
    return path
