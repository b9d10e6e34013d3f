"""The README's study numbers are rendered from the kept metrics.json of the run they describe."""

import json
import re
from pathlib import Path

import pytest

from mechvit.study import summary

ROOT = Path(__file__).resolve().parent.parent


def _est(e, lo, hi):
    return {"estimate": e, "low": lo, "high": hi, "n": 10, "method": "t", "confidence": 0.95}


def test_ci_formats_estimate_and_interval():
    assert summary.ci(_est(0.5, 0.25, 0.75)) == "0.5 [0.25, 0.75]"
    assert summary.ci(_est(0.5, 0.25, 0.75), 100) == "50 [25, 75]"
    assert summary.ci(_est(0.5, float("nan"), 0.75)) == "0.5"
    assert summary.ci(None) == "–"


def test_render_known_metrics():
    metrics = {
        "name": "toy",
        "models": {"base": {}, "ft": {}},
        "environment": {"torch": "x", "threads": 2, "device": "cpu"},
        "claims": {
            "overall": {"seen_gain": "supported"},
            "per_model": [
                {
                    "claim": "seen_gain",
                    "model": "ft",
                    "effect": "top-1",
                    "estimate": 12.0,
                    "low": 10.0,
                    "high": 14.0,
                    "control": "vs clean: 11",
                    "verdict": "supported",
                    "extra": {},
                }
            ],
        },  # fmt: skip
        "steps": {
            "robustness": {
                "seconds": 60.0,
                "metrics": {
                    "n_images": 100,
                    "corruptions": ["gaussian_blur", "gaussian_noise", "saturate"],
                    "severities": [4],
                    "excluded_unchanged": ["saturate"],
                    "controls": [],
                    "estimates": {
                        "base": {
                            "seen": [],
                            "groups": {},
                            "accuracy": {"clean": _est(0.9, 0.85, 0.95)},
                            "vs": {},
                        },
                        "ft": {
                            "seen": ["gaussian_blur"],
                            "groups": {},
                            "accuracy": {"clean": _est(0.8, 0.7, 0.9), "seen": _est(0.6, 0.5, 0.7)},
                            "vs": {"base": {"seen": _est(0.2, 0.1, 0.3)}},
                        },
                    },
                },  # fmt: skip
            },
            "sae": {
                "seconds": 120.0,
                "metrics": {
                    "ablation_gap": {"kl": 0.25},
                    **{
                        f"batchtopk|base|{r}": {
                            "heldout": {
                                "explained_variance": ev,
                                "l0": 8.0,
                                "dead_features": 4,
                                "dense_features": 0,
                                "d_sae": 40,
                            },
                            "pca_k_explained_variance": 0.8,
                            "trained_samples": 1000,
                            "spliced_clean": {"kl_sae": 0.01, "accuracy_clean": 0.9, "accuracy_sae": 0.89},
                            "convergence": {"change": -0.001},
                        }  # fmt: skip
                        for r, ev in enumerate([0.9, 0.96])
                    },
                },
            },
        },
    }
    md = summary.render(metrics)
    assert "steps 3.0 min in all (robustness 60 s, sae 120 s)" in md  # no wall clock recorded (older runs)
    # with the run's wall clock, which side-by-side steps do not add up to
    metrics["wall_seconds"] = 150.0
    metrics["steps"]["sae"]["side_by_side"] = True
    timed = summary.render(metrics)
    assert (
        "2.5 min wall clock (steps: robustness 60 s, sae 120 s; sae side by side, one thread each)" in timed
    )
    metrics["steps"]["robustness"]["cached"] = True  # a rerun's clock leaves out the cached steps: no wall
    assert "steps 3.0 min in all" in summary.render(metrics)
    del metrics["wall_seconds"], metrics["steps"]["robustness"]["cached"]
    assert "| Fine-tuning raises accuracy on the corruptions trained on | ft | top-1 | 12 [10, 14] |" in md
    assert "| ft | gaussian_blur | 80 [70, 90] | 60 [50, 70] |" in md
    # the corruption count comes from the metrics; the model's seen corruptions are not a second "seen" column
    assert "on 100 test images, 3 corruptions at severity 4" in md
    assert "| model | fine-tuned on | clean | seen |" in md
    assert "| base | – | 90 [85, 95] |" in md
    assert "excluded as unchanged on these images: saturate" in md
    assert "| ft | base | – | 20 [10, 30] | – | – |" in md
    # two replicates: mean (min-max); dead fraction 4/40; top-1 drop 1 pp
    assert (
        "| batchtopk | base | 2 | 40 | 1000 | 0.93 (0.9–0.96) | 0.8 (0.8–0.8) | 8 (8–8) | 0.1 (0.1–0.1) |"
        in md
    )
    assert "| 1 (1–1) |" in md
    assert "KL 0.25 nats" in md
    # the report's quality verdict: replicate 0 misses EV (0.9 < max(0.95, PCA 0.8 + 0.01)) and L0 (8 > k 4);
    # replicate 1 only L0. Without a config there is no k: L0 is not judged
    assert "SAE quality: 0 of 2 SAEs meet every criterion" in md
    assert "The misses: batchtopk base r0, EV >= max(0.95, PCA-k + 0.01)" in md
    metrics["config"] = {"sae": {"train": {"k": 8}, "architectures": ["batchtopk"]}}
    md = summary.render(metrics)
    assert "SAE quality: 1 of 2 SAEs meet every criterion" in md
    assert (
        "The misses: batchtopk base r0, EV >= max(0.95, PCA-k + 0.01) (ReLU: >= 0.90): no (0.900 < 0.950)."
        in md
    )
    assert "ReLU + L1 (sae-lens's standard SAE, the seed paper's 'vanilla' one) is not trained" in md


def test_replace_block_round_trip_and_errors():
    text = f"intro\n{summary.BEGIN}\nold\n{summary.END}\noutro\n"
    new = summary.replace_block(text, "new numbers\n")
    assert new == f"intro\n{summary.BEGIN}\nnew numbers\n{summary.END}\noutro\n"
    assert summary.read_block(new) == "new numbers\n"
    with pytest.raises(ValueError, match="markers"):
        summary.replace_block("no markers here", "x")
    b, e = summary.markers("seeds")
    both = f"{summary.BEGIN}\none\n{summary.END}\n{b}\ntwo\n{e}\n"
    assert summary.read_block(both) == "one\n" and summary.read_block(both, "seeds") == "two\n"
    assert summary.read_block(summary.replace_block(both, "2\n", "seeds"), "seeds") == "2\n"
    assert summary.read_block(summary.replace_block(both, "2\n", "seeds")) == "one\n"
    with pytest.raises(ValueError, match="markers"):
        summary.read_block(both, "other")
    with pytest.raises(ValueError, match="block name"):
        summary.markers("a b")
    # a named block another generator writes says where it comes from: matched by its name, its line kept
    own = "<!-- mechvit:study-summary:begin cards (generated by `make docs-cards` from the cards; do not edit) -->"
    prefixed = f"{own}\nold\n{summary.markers('cards')[1]}\n{b}\ntwo\n{e}\n"
    new = summary.replace_block(prefixed, "fresh\n", "cards")
    assert new.startswith(f"{own}\nfresh\n") and summary.read_block(new, "cards") == "fresh\n"
    assert summary.read_block(new, "seeds") == "two\n"
    with pytest.raises(ValueError, match="markers"):  # a name is matched whole, not as a prefix
        summary.read_block(prefixed, "card")


@pytest.mark.parametrize(
    ("kept", "name", "doc", "block"),
    [
        ("default_study", "fashion_mnist", "README.md", None),  # the default run: the README's unnamed block
        ("seeds_study", "fashion_mnist_seeds", "docs/study.md", "seeds"),
        ("all_saes_study", "fashion_mnist_all_saes", "docs/sae.md", "all_saes"),
        ("relu_study", "fashion_mnist_relu", "docs/sae.md", "relu"),
    ],
)
def test_docs_quote_the_kept_runs(kept, name, doc, block):
    """Each generated block is exactly what its kept metrics.json renders (the Makefile's docs-numbers)."""
    metrics = json.loads((ROOT / "docs" / kept / "metrics.json").read_text())
    assert metrics["name"] == name
    text = (ROOT / doc).read_text()
    assert summary.read_block(text, block) == summary.render(metrics), (
        f"{doc}'s {block or 'study'} block is not what docs/{kept}/metrics.json renders: run `make docs-numbers`"
    )
    makefile = (ROOT / "Makefile").read_text()
    assert f"--keep docs/{kept}" in makefile and (block is None or f"--block {block}" in makefile)


@pytest.mark.parametrize("kept", ["default_study", "seeds_study", "all_saes_study", "relu_study"])
def test_claims_quote_the_paired_tables_numbers(kept):
    """In a rendered block, a robustness claim's estimate and each of its "vs <control>" numbers read exactly as
    the paired-differences table's cell for the same model, reference and group: one rounding for both, also in
    runs kept before the rounding changed (their claim texts are rendered again: summary.claims_of)."""
    metrics = json.loads((ROOT / "docs" / kept / "metrics.json").read_text())
    lines = summary.render(metrics).splitlines()

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    head = "| model | reference | clean | seen, trained severity |"
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    columns = cells(lines[start])
    paired = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        row = dict(zip(columns, cells(line), strict=True))
        paired[row["model"], row["reference"]] = row
    compared = 0
    for line in lines:
        row = cells(line)
        if len(row) != 6 or not row[0].startswith(("Fine-tuning raises", "... but not")):
            continue
        group = "seen, trained severity" if row[0].startswith("Fine-tuning") else "unseen, other families"
        assert paired[row[1], "base"][group] == row[3], row
        for ref, value in re.findall(r"vs (\w+): (\S+ \[[^\]]+\]) pp", row[4]):
            assert paired[row[1], ref][group] == value, (row[1], ref, row[4])
            compared += 1
    assert compared >= 12


def test_claims_of_refuses_verdicts_the_rules_do_not_give():
    metrics = json.loads((ROOT / "docs" / "seeds_study" / "metrics.json").read_text())
    fresh = summary.claims_of(metrics)
    assert [v["verdict"] for v in fresh] == [v["verdict"] for v in metrics["claims"]["per_model"]]
    stored = metrics["claims"]["per_model"][0]
    stored["control"] = "vs clean: 51.9 [49.5, 54.2] pp"  # a stale text (an older rounding): rendered again
    assert summary.claims_of(metrics)[0]["control"] == fresh[0]["control"] != stored["control"]
    stored["verdict"] = "supported" if stored["verdict"] != "supported" else "contradicted"
    with pytest.raises(ValueError, match=r"claims differ from the .* rerun the study to quote its claims"):
        summary.claims_of(metrics)


def test_run_line_names_the_machine_when_recorded():
    base = {"name": "toy", "models": {}, "steps": {}, "wall_seconds": 60}
    env = {"torch": "x", "threads": 2, "device": "cpu"}
    old = summary.timing_md({**base, "environment": env})[0]
    assert old.endswith("torch x, 2 threads, device cpu.")  # runs from before the fingerprint: unchanged
    machine = {"cpu": "Some Xeon", "cpu_capability": "AVX512", "cpu_flags": []}
    new = summary.timing_md({**base, "environment": {**env, "machine": machine}})[0]
    assert new.endswith("torch x, 2 threads, device cpu (CPU Some Xeon, kernels AVX512).")
    gpu = summary.timing_md({**base, "environment": {**env, "machine": {**machine, "gpu": "H200"}}})[0]
    assert gpu.endswith("(CPU Some Xeon, kernels AVX512, GPU H200).")


def test_each_part_is_its_own_paragraph_and_the_ablation_bar_is_the_configs():
    """Finding 14: the overlap line followed the last SAE note with no blank line (in the README it ran into the
    ReLU paragraph), and the ablation bar was a hard-coded 0.1 whatever sae.ablation_warn_nats said."""
    one = {
        "heldout": {"explained_variance": 0.96, "l0": 8.0, "dead_features": 4, "dense_features": 0, "d_sae": 40},
        "pca_k_explained_variance": 0.8, "trained_samples": 1000,
        "spliced_clean": {"kl_sae": 0.01, "accuracy_clean": 0.9, "accuracy_sae": 0.89},
        "convergence": {"change": -0.001},
    }  # fmt: skip
    sae = {"ablation_gap": {"kl": 0.25}, "batchtopk|base|0": one, "batchtopk|base|1": one}
    overlap = {"overlap_controls": {"batchtopk": {"summary": {"base vs ft": {"matched_cos": {
        k: _est(0.5, 0.4, 0.6) for k in ("within_reference", "within_other", "between", "floor", "ratio")}}}}}}  # fmt: skip
    config = {"sae": {"ablation_warn_nats": 0.3, "train": {"k": 8}, "architectures": ["batchtopk"]}}
    metrics = {"name": "toy", "models": {}, "config": config,
               "steps": {"sae": {"metrics": sae}, "sae_analysis": {"metrics": overlap}}}  # fmt: skip
    md = summary.render(metrics)
    assert "when this is >= 0.3, sae.ablation_warn_nats)." in md
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("**Feature overlap against controls**"))
    assert lines[i - 2].startswith("ReLU + L1") and lines[i - 1] == ""  # the SAE part ends with a note
    del metrics["config"]  # older metrics without a config: the default bar
    assert "when this is >= 0.1, sae.ablation_warn_nats)." in summary.render(metrics)
    sae["ablation_gap"]["kl_ci"] = _est(0.25, 0.2, 0.3)  # with the CI over images, where the step stores one
    assert "costs the base model KL 0.25 [0.2, 0.3] nats" in summary.render(metrics)
