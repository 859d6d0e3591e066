"""The throughput benchmark runs end to end at small sizes on a CPU (a smoke test of all three loops)."""

import importlib.util

from conftest import REPO


def test_train_throughput_benchmark_smoke(tiny_phantom, tmp_path):
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--data-dir", str(tiny_phantom), "--cache-dir", str(tmp_path / "cache"), "--image-size", "48",
                         "--batch-size", "4", "--steps", "2", "--seed-steps", "2", "--warmup", "1",
                         "--seed-workers", "2", "--json", str(tmp_path / "bench.json")])
    assert set(report["images_per_s"]) == {"a_seed_style", "b_project", "c_compute_bound"}
    assert all(rate > 0 for rate in report["images_per_s"].values())
    assert report["b_over_a"] > 0 and report["b_over_c"] > 0
    assert (tmp_path / "bench.json").is_file()
