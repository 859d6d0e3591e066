"""The throughput benchmark runs end to end at small sizes on a CPU (a smoke test of all three loops)."""

import importlib.util
import json

import pytest
from conftest import REPO


def test_train_throughput_benchmark_smoke(tiny_phantom, tmp_path):
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--data-dir", str(tiny_phantom), "--cache-dir", str(tmp_path / "cache"), "--image-size", "48",
                         "--batch-size", "4,6", "--steps", "2", "--seed-steps", "2", "--warmup", "1",
                         "--seed-workers", "2", "--json", str(tmp_path / "bench.json")])
    assert report["a_seed_style"] > 0
    assert [(s["compile"], s["batch_size"]) for s in report["settings"]] == [("none", 4), ("none", 6)]
    for setting in report["settings"]:
        assert setting["b_project"] > 0 and setting["c_compute_bound"] > 0
        assert setting["b_over_a"] == pytest.approx(setting["b_project"] / report["a_seed_style"], rel=0.02)
        assert setting["b_over_c"] == pytest.approx(setting["b_project"] / setting["c_compute_bound"], rel=0.02)
    assert (tmp_path / "bench.json").is_file()


def test_preprocess_speed_benchmark_smoke(tiny_phantom, tmp_path):
    spec = importlib.util.spec_from_file_location("prep_bench", REPO / "benchmarks" / "preprocess_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--data-dir", str(tiny_phantom), "--size", "64", "--views", "4", "--warmup", "1",
                         "--json", str(tmp_path / "prep.json")])
    assert report["views"] == 4 and report["variant"] == "full+HE" and report["size"] == 64
    assert 0 < report["median_wall_ms"] <= report["p90_wall_ms"] and report["median_cpu_ms"] > 0
    assert json.loads((tmp_path / "prep.json").read_text())["median_wall_ms"] == report["median_wall_ms"]
