"""mechvit.study.compare (did a rerun reproduce?) and the machine fingerprint in metrics.json's environment."""

from __future__ import annotations

import copy
import json
import math

import pytest

from mechvit.cli import main as cli_main
from mechvit.runtime import KERNEL_ENV, SIMD_FLAGS, _cpuinfo, machine_fingerprint
from mechvit.study.compare import compare_metrics, load_metrics, main


def metrics() -> dict:
    return {
        "name": "toy",
        "written": "2026-01-01T00:00:00",
        "wall_seconds": 12.5,
        "models": {"base": {"sha256": "aa"}, "ft": {"sha256": "bb"}},
        "environment": {"torch": "2.14.1", "machine": {"cpu": "X", "cpu_capability": "AVX512"}},
        "config": {"seed": 0, "sae": {"k": 12}},
        "steps": {
            "robustness": {
                "seconds": 3.0,
                "hash": "h1",
                "metrics": {
                    "rows": [{"top1": 0.9, "nll": 0.25}, {"top1": 0.5, "nll": float("nan")}],
                    "n": 2000,
                },
            },
            "sae": {"seconds": 9.0, "metrics": {"ev": 0.96, "note": "EV 0.96", "dead": 12, "ok": True}},
        },
        "claims": {
            "per_model": [
                {"claim": "seen_gain", "model": "ft", "estimate": 0.05, "verdict": "supported"},
                {"claim": "features_stable", "model": "ft", "estimate": 0.99, "verdict": "inconclusive"},
            ]
        },
    }


def test_identical_runs_reproduce_and_timings_are_left_out():
    a, b = metrics(), metrics()
    b["wall_seconds"], b["written"] = 99.0, "2027-01-01T00:00:00"
    b["steps"]["robustness"]["seconds"], b["steps"]["robustness"]["hash"] = 7.0, "h2"
    c = compare_metrics(a, b)
    assert c.identical and c.reproduced
    assert [p.name for p in c.parts] == ["robustness", "sae", "claims"]
    rob = c.parts[0]
    assert (rob.numbers, rob.differ) == (5, 0)  # 2 x (top1, nll) + n; the NaN equals the NaN
    assert c.parts[1].numbers == 2  # ev, dead: True is not a number
    assert c.verdicts == [] and c.models == [] and c.config == {} and c.environment == {}
    assert "**reproduced** (bit for bit): every number identical." in c.to_markdown()


def test_known_differences_counted_with_their_size_and_place():
    a, b = metrics(), metrics()
    b["steps"]["robustness"]["metrics"]["rows"][0]["nll"] = 0.25 + 1e-9
    b["steps"]["sae"]["metrics"]["ev"] = 0.95
    c = compare_metrics(a, b)
    rob, sae = c.parts[0], c.parts[1]
    assert (rob.differ, rob.beyond) == (1, 1)
    assert rob.largest_abs.where == "robustness/rows[0]/nll"
    assert rob.largest_abs.value == pytest.approx(1e-9, rel=1e-6)
    assert rob.largest_rel.value == pytest.approx(1e-9 / (0.25 + 1e-9), rel=1e-6)
    assert sae.largest_abs.value == pytest.approx(0.01) and sae.largest_rel.value == pytest.approx(
        0.01 / 0.96
    )
    assert not c.identical and not c.reproduced
    # a tolerance forgives the rounding, not the 0.01
    c = compare_metrics(a, b, rtol=1e-6)
    assert (c.parts[0].differ, c.parts[0].beyond, c.parts[1].beyond) == (1, 0, 1)
    assert not c.reproduced
    c = compare_metrics(a, b, atol=0.02)
    assert c.reproduced and not c.identical


def test_nan_on_one_side_is_a_difference_beyond_any_tolerance():
    a, b = metrics(), metrics()
    b["steps"]["robustness"]["metrics"]["rows"][1]["nll"] = 1.0
    c = compare_metrics(a, b, atol=1e9)
    assert c.parts[0].beyond == 1 and math.isinf(c.parts[0].largest_abs.value)


def test_changed_verdict_models_config_and_environment_are_named():
    a, b = metrics(), metrics()
    b["claims"]["per_model"][1]["verdict"] = "supported"
    b["claims"]["per_model"][1]["estimate"] = 1.0
    b["models"]["ft"]["sha256"] = "cc"
    b["config"]["sae"]["k"] = 16
    b["environment"]["machine"]["cpu_capability"] = "AVX2"
    c = compare_metrics(a, b, atol=1.0)
    assert c.verdicts == [{"claim": "features_stable", "model": "ft", "a": "inconclusive", "b": "supported"}]
    assert c.models == ["ft"]
    assert c.config == {"sae.k": (12, 16)}
    assert c.environment == {"machine.cpu_capability": ("AVX512", "AVX2")}
    assert not c.reproduced  # a verdict and the weights changed, whatever the tolerance
    md = c.to_markdown("A", "B")
    assert "- features_stable / ft: inconclusive -> supported" in md
    assert "`machine.cpu_capability`: AVX512 -> AVX2" in md
    assert c.parts[-1].largest_abs.where == "claims/features_stable / ft/estimate"


def test_structure_differences_are_reported_not_compared():
    a, b = metrics(), metrics()
    b["steps"]["robustness"]["metrics"]["rows"].append({"top1": 0.1})
    del b["steps"]["sae"]
    b["steps"]["cka"] = {"metrics": {"x": 1.0}}
    b["steps"]["robustness"]["metrics"]["n"] = "2000"
    c = compare_metrics(a, b, atol=1.0)
    by = {p.name: p for p in c.parts}
    assert by["robustness"].structure == [
        "robustness/n: int in A, str in B",
        "robustness/rows: 2 items in A, 3 in B",
    ]
    assert by["sae"].structure == ["step only in A"] and by["cka"].structure == ["step only in B"]
    assert not c.reproduced


def test_bad_input_says_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="expected a 'steps' object"):
        compare_metrics({"steps": {}}, {"no": 1})
    with pytest.raises(ValueError, match="tolerances must be >= 0"):
        compare_metrics(metrics(), metrics(), rtol=-1)
    with pytest.raises(FileNotFoundError, match="expected a study's output folder or its metrics.json"):
        load_metrics(tmp_path / "nothing")
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_metrics(tmp_path)


def test_command_line_exit_status_and_markdown(tmp_path, capsys):
    a, b = metrics(), metrics()
    b["steps"]["sae"]["metrics"]["ev"] = 0.96 + 1e-12
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main([str(tmp_path / "a"), str(tmp_path / "b.json")]) == 1
    assert "NOT reproduced" in capsys.readouterr().out
    out = tmp_path / "cmp.md"
    assert (
        cli_main(
            ["compare", str(tmp_path / "a"), str(tmp_path / "b.json"), "--rtol", "1e-9", "--out", str(out)]
        )
        == 0
    )
    assert "**reproduced** (atol 0, rtol 1e-09)" in out.read_text()
    assert main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "found neither" in capsys.readouterr().err


def test_cpuinfo_parsing_known_text():
    text = (
        "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu\n"
    )
    assert _cpuinfo(text) == ("Some CPU @ 2.0GHz", ["sse4_2", "avx", "avx2", "fma", "avx512f", "amx_tile"])
    assert _cpuinfo("") == (None, [])


def test_machine_fingerprint_records_the_kernel_path(monkeypatch):
    import torch

    for k in KERNEL_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    fp = machine_fingerprint("cpu")
    assert fp["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert fp["kernel_env"] == {"MKL_CBWR": "AVX2"}
    assert set(fp["cpu_flags"]) <= set(SIMD_FLAGS)
    assert fp["mkl"] == torch.backends.mkl.is_available()
    assert "gpu" not in fp
    json.dumps(fp)  # strict JSON for metrics.json


def test_study_environment_carries_the_fingerprint():
    from mechvit.study.report import environment

    env = environment("cpu")
    assert env["machine"]["cpu_capability"] and "numpy" in env and "scipy" in env
    e2 = copy.deepcopy(env)
    e2["machine"]["cpu_capability"] = "OTHER"
    a, b = metrics(), metrics()
    a["environment"], b["environment"] = env, e2
    assert list(compare_metrics(a, b).environment) == ["machine.cpu_capability"]


def test_strings_booleans_and_nulls_are_compared_as_values():
    """Finding 13: a changed category (``excluded_unchanged``, the controls) or a flipped boolean failed nothing
    ("reproduced", exit 0), and a flipped boolean or a number that became null read as a change of structure."""
    a = metrics()
    a["steps"]["robustness"]["metrics"].update(excluded_unchanged=["saturate"], controls=["clean"])
    a["steps"]["sae"]["metrics"]["rule"] = "p = 0.3 > 0.05"  # free text quoting a number
    b = copy.deepcopy(a)
    b["steps"]["robustness"]["metrics"]["excluded_unchanged"] = ["gaussian_noise"]
    b["steps"]["sae"]["metrics"]["ok"] = False
    b["steps"]["sae"]["metrics"]["ev"] = None
    c = compare_metrics(a, b, atol=1.0)
    rob, sae = c.parts[0], c.parts[1]
    assert rob.values == ["`robustness/excluded_unchanged[0]`: saturate -> gaussian_noise"]
    assert sae.values == ["`sae/ev`: 0.96 -> null", "`sae/ok`: true -> false"]
    assert rob.structure == [] and sae.structure == []
    assert not c.reproduced and not c.identical  # whatever the tolerance
    md = c.to_markdown()
    assert "**NOT reproduced**" in md
    assert "Values that differ (text, true/false, null; compared exactly):" in md
    assert "- sae: `sae/ok`: true -> false" in md and "Only in one run" not in md
    assert "| robustness | 5 | 0 | 0 | 1 | 0 |" in md  # numbers, differ, beyond, other values, texts
    # free text that quotes numbers is counted apart and does not fail the gate
    d = copy.deepcopy(a)
    d["steps"]["sae"]["metrics"]["rule"] = "p = 0.31 > 0.05"
    c = compare_metrics(a, d)
    assert c.reproduced and not c.identical and c.parts[1].texts_differ == 1 and c.parts[1].values == []


def test_changed_strings_fail_the_command(tmp_path, capsys):
    a = metrics()
    a["steps"]["robustness"]["metrics"]["controls"] = ["clean"]
    b = copy.deepcopy(a)
    b["steps"]["robustness"]["metrics"]["controls"] = ["other_ft"]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert "`robustness/controls[0]`: clean -> other_ft" in capsys.readouterr().out
