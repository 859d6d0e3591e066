"""The throughput benchmark runs end to end at small sizes on a CPU (a smoke test of all three loops)."""

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from PIL import Image

import mura_helpers as mh


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


def test_mask_quality_benchmark_smoke(tiny_phantom, tmp_path):
    spec = importlib.util.spec_from_file_location("mask_bench", REPO / "benchmarks" / "mask_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--data-dir", str(tiny_phantom), "--sizes", "48", "--cache-dir", str(tmp_path / "cache"), "--workers", "1",
            "--json", str(tmp_path / "masks.json"), "--csv", str(tmp_path / "masks.csv")]
    report = bench.main(args)
    (size,) = report["sizes"]
    kinds = {row["kind"]: row for row in size["kinds"]}
    assert set(kinds) == {"all", *mh.PHANTOM_VIEW_KINDS} and kinds["all"]["views"] == len(mh.load_phantom_truth(
        tiny_phantom))
    assert 0 <= kinds["all"]["share_iou_ge_0.85"] <= 1 and size["tags"]["views_with_tags"] == kinds["tags"]["views"]
    assert all(0 <= kinds["all"][f"share_{moved}_ge_0.85"] <= 1 for moved in ("truth_eroded", "truth_dilated",
                                                                             "edge_forgiven"))
    suspects = size["suspects"]
    assert suspects["bad_flagged"] <= suspects["bad_views"] and set(suspects["by_reason"]) == {*mh.MASK_DOUBTS, "share"}
    rows = pd.read_csv(tmp_path / "masks.csv")  # the gross failures: under 0.85 even with the edge forgiven
    assert suspects["gross_views"] == (rows["iou_edge_forgiven"] < 0.85).sum()
    assert suspects["gross_flagged"] == (rows["suspect"] & (rows["iou_edge_forgiven"] < 0.85)).sum()
    assert json.loads((tmp_path / "masks.json").read_text())["sizes"][0]["kinds"] == json.loads(json.dumps(
        size["kinds"]))
    other = bench.main(args[:-4] + ["--pipeline", str(REPO / "mura_helpers.py"), "--json", ""])  # the same code,
    assert other["sizes"][0]["kinds"] == size["kinds"]  # imported as another module: the same tables


def test_mask_iou_rows_move_the_truth_by_one_working_pixel(tmp_path):
    """The reference beside each view's IoU: the truth moved in and out by one of the mask's working pixels (4 px of a
    64-px square found at 16 px), its edge only where it lies inside the view, not where the hand leaves it; and
    the IoU with the mask's disagreements within a working pixel of the true edge forgiven, not those beyond."""
    yy, xx = np.mgrid[:64, :64]
    radius = (yy - 31.5) ** 2 + (xx - 31.5) ** 2
    disk, full = radius <= 20 ** 2, np.ones((64, 32), bool)  # full: hand fills the view
    shrunk, blob = radius <= 17 ** 2, np.zeros((64, 64), bool)  # a mask 3 px inside the disk, and background
    blob[:6, :6] = True  # ... taken in far from the hand's edge
    rows = []
    for name, truth, affine, mask in (("disk", disk, np.eye(2, 3), np.zeros((64, 64), bool)),
                                      ("full", full, np.array([[1.0, 0, 16], [0, 1, 0]]), np.zeros((64, 64), bool)),
                                      ("shrunk", disk, np.eye(2, 3), shrunk), ("blob", disk, np.eye(2, 3),
                                                                               shrunk | blob)):
        Image.fromarray(truth).save(tmp_path / f"{name}.png")
        cache = SimpleNamespace(row_of={name: 0}, masks=[mask], affines=[affine],
                                cfg=SimpleNamespace(size=64, mask_rules=SimpleNamespace(work_size=16)))
        rows += mh._mask_iou_rows((cache, [{"image_path": name, "image_file": name,
                                            "mask_file": str(tmp_path / f"{name}.png"), "tags": []}]))
    assert rows[0]["iou_truth_eroded"] == pytest.approx((16 / 20) ** 2, abs=0.03)  # a disk 4 px smaller ...
    assert rows[0]["iou_truth_dilated"] == pytest.approx((20 / 24) ** 2, abs=0.03)  # ... and 4 px larger
    assert rows[1]["iou_truth_eroded"] == 1.0 and rows[1]["iou"] == 0.0  # no edge of the hand within the view
    assert rows[2]["iou"] < 0.75 and rows[2]["iou_edge_forgiven"] == 1.0  # an edge 3 px off: at its edge only
    assert rows[3]["iou_edge_forgiven"] == pytest.approx(disk.sum() / (disk.sum() + 36))  # the blob is no edge
    assert rows[0]["iou_edge_forgiven"] < 0.5  # an empty mask: a gross failure, its edge band no excuse


def test_mask_quality_benchmark_puts_the_one_level_bound_beside_the_masks(tmp_path):
    """--one-level: each view's best one grey level (mask_one_level_table) beside its mask, per kind, on a phantom
    of 3 patients at 64 px (the bound costs about 0.35 s of CPU a 128-px view)."""
    spec = importlib.util.spec_from_file_location("mask_bench_one_level", REPO / "benchmarks" / "mask_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    phantom = mh.make_phantom_mura(tmp_path / "phantom", n_patients=3, seed=5, image_size=64, progress=False)
    report = bench.main(["--data-dir", str(phantom), "--sizes", "32", "--cache-dir", str(tmp_path / "cache"),
                         "--workers", "1", "--json", "", "--csv", str(tmp_path / "masks.csv"), "--one-level"])
    (size,) = report["sizes"]
    kinds, bound = ({row["kind"]: row for row in size[key]} for key in ("kinds", "one_level"))
    assert bound["all"]["views"] == kinds["all"]["views"] == len(mh.load_phantom_truth(phantom))
    assert bound["all"]["masks"] == kinds["all"]["share_iou_ge_0.85"]
    assert all(max(row["masks"], row["one_level"]) <= row["either"] for row in bound.values() if row["views"])
    rows = pd.read_csv(tmp_path / "masks.csv")
    assert rows["iou_one_level"].between(0, 1).all() and rows["iou_one_level"].median() > 0.85


def test_the_one_level_bound_finds_a_level_where_one_exists_and_none_where_the_background_crosses_the_hand():
    """mask_one_level_table's bound: a disk brighter than a noisy background, or darker (stored inverted), or under
    a heel effect's gradient, is masked by one of its levels (IoU near 1), a lead tag known from the truth left
    out; a disk whose background is darker than it on the left and brighter on the right (a step, no plane) has no
    one level that masks it, whichever side is read."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 <= 18 ** 2
    content, tag = np.ones((64, 64), bool), np.zeros((64, 64), bool)
    tag[4:14, 50:56] = True  # brighter than the disk: a level between them would keep the tag alone
    view = np.where(disk, 100.0, 20.0) + rng.normal(0, 4, (64, 64))
    view[tag] = 200
    assert mh._best_one_level_iou(view, content, disk, tag) > 0.95
    assert mh._best_one_level_iou(255 - view, content, disk, tag) > 0.95  # inverted: the darker side
    heel = view + 160 * xx / 63  # a gradient across the whole view: no one level as stored, one once the
    assert mh._best_one_level_iou(heel, content, disk, tag) > 0.95  # plane through its true background is off
    crossing = np.where(disk, 100.0, np.where(xx < 32, 20.0, 180.0)) + rng.normal(0, 4, (64, 64))
    assert mh._best_one_level_iou(crossing, content, disk, tag) < 0.7
    cut_short = mh._best_one_level_iou(view, content, disk, tag, cut_off=disk.sum())  # half the hand beyond the square
    assert cut_short == pytest.approx(0.5, abs=0.03)


@pytest.mark.slow
def test_learnability_benchmark_smoke(tiny_phantom, tmp_path):
    spec = importlib.util.spec_from_file_location("learn_bench", REPO / "benchmarks" / "learnability.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--data-dir", str(tiny_phantom), "--out", str(tmp_path / "learn"), "--size", "32",
                         "--epochs", "2", "--batch-size", "8", "--plateau-patience", "3", "--arch", "densenet121"])
    assert report["phantom_version"] == json.loads((tiny_phantom / "phantom_manifest.json").read_text())["version"]
    assert len(report["tune_auroc_by_epoch"]) == len(report["test_auroc_by_epoch"]) == 2
    assert report["best_epoch"] in (1, 2) and report["select_metric"] == "tune_loss" and not report["pretrained"]
    assert report["plateau_patience"] == 3 and report["arch"] == "densenet121"  # (the smallest DenseNet: quicker)
    assert report["test_auroc_last"] == report["test_auroc_by_epoch"][-1]
    valid = [p for p in (tiny_phantom / "valid" / "XR_HAND").glob("patient*/study*")]
    assert report["test_studies"] == len(valid) and report["test_abnormal"] == sum("positive" in p.name for p in valid)
    lo, hi = report["test_auroc_ci95_by_patient"]
    assert 0 <= lo <= hi <= 1 and 0 <= report["test_auroc_best"] <= 1
    assert report["test_prob_iqr"] >= 0 and report["test_collapsed"] == (report["test_prob_iqr"] < mh.COLLAPSED_IQR)
    by_kind = report["test_auroc_by_kind"]  # each planted kind's abnormal test studies against every normal one
    assert by_kind and set(by_kind) <= {"fracture", "hardware", "lesion"}
    assert sum(k["abnormal_studies"] for k in by_kind.values()) <= report["test_abnormal"]
    last = report["test_auroc_last_by_kind"]  # the same studies, scored by last.pt
    assert {k: v["abnormal_studies"] for k, v in last.items()} == {k: v["abnormal_studies"] for k, v in by_kind.items()}
    if report["best_epoch"] == 2:  # best.pt is last.pt
        assert last == by_kind
    assert json.loads((tmp_path / "learn" / "learnability.json").read_text()) == report
    permuted = bench.main(["--data-dir", str(tiny_phantom), "--out", str(tmp_path / "permuted"), "--size", "32",
                           "--epochs", "2", "--batch-size", "8", "--arch", "densenet121",
                           "--permute-labels", "1",  # the negative control,
                           "--select-metric", "tune_auroc"])  # best.pt by the tuning AUROC
    assert permuted["labels_permuted_seed"] == 1 and "permuted_s1" in permuted["data_dir"]
    best = max(range(2), key=lambda e: (permuted["tune_auroc_by_epoch"][e], -e))  # (the first of equals)
    assert permuted["select_metric"] == "tune_auroc" and permuted["best_epoch"] == best + 1
    train = mh.load_studies(permuted["data_dir"], "train")
    assert train["label"].tolist() != mh.load_studies(tiny_phantom, "train")["label"].tolist()
    assert permuted["test_studies"] == report["test_studies"] and permuted["test_abnormal"] == report["test_abnormal"]
    assert {k: v["abnormal_studies"] for k, v in permuted["test_auroc_by_kind"].items()} == {  # the phantom's truth
        k: v["abnormal_studies"] for k, v in by_kind.items()}
