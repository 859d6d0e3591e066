"""The embedded phantom: MURA's layout and statistics, its ground truth, determinism and caching."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY
from PIL import Image

import mura_helpers as mh


def _digest(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = mh.make_phantom_mura(tmp_path / "a", n_patients=4, seed=7, image_size=96, progress=False)
    b = mh.make_phantom_mura(tmp_path / "b", n_patients=4, seed=7, image_size=96, progress=False, workers=1)
    c = mh.make_phantom_mura(tmp_path / "c", n_patients=4, seed=8, image_size=96, progress=False)
    assert _digest(a) == _digest(b)  # also across worker counts
    assert _digest(a) != _digest(c)


def test_images_mimic_mura(tiny_phantom):
    images = mh.studies_to_images(mh.load_all_studies(tiny_phantom))
    modes, shapes = set(), set()
    for path in images["image_path"]:
        with Image.open(path) as im:
            modes.add(im.mode)
            shapes.add(im.size)
            assert max(im.size) == TINY["image_size"]
    assert modes == {"L", "RGB"}  # a mix, as in MURA
    assert len({min(s) for s in shapes}) > 3  # a varying short side
    means = [np.asarray(mh.load_image(p)).mean() for p in images["image_path"]]
    assert np.std(means) > 5  # varying exposure


def test_study_plan_statistics_follow_mura_hand():
    studies, tasks = mh._plan_phantom(600, 0, 0.15, 0.26, ("XR_HAND",), 512)
    labels = np.array([s["label"] for s in studies])
    assert 0.2 < labels.mean() < 0.32  # about a quarter of the studies positive
    views = pd.Series([t["key"] for t in tasks]).value_counts()
    assert set(views.unique()) <= {1, 2, 3, 4, 5} and views.mode()[0] == 3
    per_patient = pd.Series([s["key"][2] for s in studies]).value_counts()
    assert set(per_patient.unique()) == {1, 2, 3}
    splits = {s["key"][0]: set() for s in studies}
    for s in studies:
        splits[s["key"][0]].add(s["key"][2])
    assert not splits["train"] & splits["valid"]
    shown = {t["key"] for t in tasks if t["finding"] is not None}
    positives = {s["key"] for s in studies if s["label"]}
    assert shown == positives  # every positive study shows its finding in at least one view, negatives in none


def test_every_split_of_two_or_more_studies_holds_both_classes():
    # tiny demo phantoms must give a defined AUROC: the last study of a one-class split takes the other class
    for n_patients in (2, 5, 14, 40):
        for seed in range(10):
            for rate in (0.05, 0.26, 0.95):
                studies, tasks = mh._plan_phantom(n_patients, seed, 0.15, rate, ("XR_HAND",), 128)
                for split in ("train", "valid"):
                    labels = [s["label"] for s in studies if s["key"][0] == split]
                    assert len(labels) < 2 or set(labels) == {0, 1}, (n_patients, seed, rate, split)
                positives = {s["key"] for s in studies if s["label"]}
                assert all(s["key"][3].endswith("_positive") == bool(s["label"]) for s in studies)
                assert {t["key"] for t in tasks if t["finding"] is not None} == positives


def test_ground_truth_boxes(tiny_phantom):
    findings = mh.load_phantom_findings(tiny_phantom)
    studies = mh.load_all_studies(tiny_phantom)
    positive = set(studies.loc[studies["label"] == 1, "study_path"])
    assert len(findings) > 0 and set(findings["finding"]) <= {"fracture", "hardware", "lesion"}
    study_of = findings["image_path"].str.rsplit("/", n=1).str[0] + "/"
    assert set(study_of) <= positive
    assert len(set(study_of)) >= 0.8 * len(positive)
    for row in findings.itertuples():
        with Image.open(row.image_file) as im:
            assert (row.width, row.height) == im.size
        assert 0 <= row.x0 < row.x1 < row.width and 0 <= row.y0 < row.y1 < row.height


def test_planted_finding_changes_the_pixels_inside_its_box():
    studies, tasks = mh._plan_phantom(30, 1, 0.15, 0.8, ("XR_HAND",), 256)
    task = next(t for t in tasks if t["finding"] is not None and t["finding"]["kind"] == "hardware")
    args = (task["seed"], task["view"], task["anatomy"])
    with_finding, box = mh._render_view(*args, task["finding"], task["ring"], 256)
    without, none = mh._render_view(*args, None, task["ring"], 256)
    assert box is not None and none is None
    x0, y0, x1, y1 = box
    diff = np.abs(with_finding.astype(int) - without.astype(int))
    inside = diff[y0:y1, x0:x1].mean()
    outside = (diff.sum() - diff[y0:y1, x0:x1].sum()) / (diff.size - diff[y0:y1, x0:x1].size)
    assert inside > 10 * max(outside, 0.01)


def test_ensure_phantom_reuses_or_rebuilds(tmp_path, monkeypatch):
    root = mh.ensure_phantom(tmp_path, n_patients=3, image_size=64, progress=False)
    stamp = (root / mh.PHANTOM_MANIFEST).stat().st_mtime_ns
    assert mh.ensure_phantom(tmp_path, n_patients=3, image_size=64, progress=False) == root
    assert (root / mh.PHANTOM_MANIFEST).stat().st_mtime_ns == stamp
    mh.ensure_phantom(tmp_path, n_patients=4, image_size=64, progress=False)
    assert len(mh.load_all_studies(root)["patient"].unique()) == 4
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mh, "_run_tasks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mh.ensure_phantom(tmp_path, n_patients=5, image_size=64, progress=False)
    monkeypatch.undo()
    assert not json.loads((root / mh.PHANTOM_MANIFEST).read_text())["complete"]
    mh.ensure_phantom(tmp_path, n_patients=5, image_size=64, progress=False)  # an interrupted generation is redone
    assert json.loads((root / mh.PHANTOM_MANIFEST).read_text())["complete"]
    assert len(mh.load_all_studies(root)["patient"].unique()) == 5


def test_the_training_seed_does_not_pick_the_phantom(tmp_path):
    settings = {"phantom_dir": str(tmp_path), "phantom_patients": 3, "phantom_image_size": 64}
    root = mh.config_data_root(mh.TrainConfig(seed=0, **settings))
    stamp = (root / mh.PHANTOM_MANIFEST).stat().st_mtime_ns
    for cfg in (mh.TrainConfig(seed=7, **settings), mh.AnomalyConfig(seed=7, **settings)):  # other seeds, same data
        assert mh.config_data_root(cfg) == root and (root / mh.PHANTOM_MANIFEST).stat().st_mtime_ns == stamp
    assert json.loads((root / mh.PHANTOM_MANIFEST).read_text())["seed"] == 0
