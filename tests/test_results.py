"""Results: bootstrap intervals, thresholds, the comparison table, ensembles, CAM heatmaps, prediction on new data."""

import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_png
from PIL import Image

import mura_helpers as mh


def _scores(n=120, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return labels, np.clip(labels * 0.35 + rng.random(n) * 0.65, 0, 1)


# ---------------------------------------------------------------- metrics with confidence intervals


def test_bootstrap_resamples_match_the_reference_metrics_exactly():
    labels, probs = _scores(40)
    for seed in range(5):  # with one resample, the interval is that resample's value
        idx = np.random.default_rng(seed).integers(0, 40, (1, 40))[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = mh.study_metrics(labels[idx], probs[idx], 0.4)
        table = mh.bootstrap_metrics(labels, probs, 0.4, n_boot=1, seed=seed)
        for name in mh.CI_METRICS:
            assert table.loc[name, "ci_low"] == pytest.approx(expected[name]), name


def test_intervals_contain_the_estimate_and_are_reproducible():
    labels, probs = _scores()
    table = mh.bootstrap_metrics(labels, probs, n_boot=500, seed=3)
    assert (table["ci_low"] <= table["estimate"]).all() and (table["estimate"] <= table["ci_high"]).all()
    assert (table["ci_high"] - table["ci_low"] > 0.01).all()
    assert table.equals(mh.bootstrap_metrics(labels, probs, n_boot=500, seed=3))
    perfect = mh.bootstrap_metrics(labels, labels * 0.8 + 0.1, n_boot=200)
    assert (perfect.loc[["accuracy", "kappa", "auroc"], ["ci_low", "ci_high"]] == 1).all().all()


def test_resamples_with_one_class_are_left_out_of_the_auroc_interval():
    labels, probs = np.array([1, 0, 0, 0, 0, 0]), np.array([0.9, 0.2, 0.3, 0.1, 0.4, 0.6])
    table = mh.bootstrap_metrics(labels, probs, n_boot=300)
    assert 0 < table.loc["auroc", "n_boot_used"] < 300 and table.loc["accuracy", "n_boot_used"] == 300


def test_auroc_interval_is_the_bootstrap_metrics_auroc_interval():
    labels, scores = _scores(90, 2)
    table = mh.bootstrap_metrics(labels, scores, n_boot=400, seed=5)
    low, high = mh.auroc_interval(labels, scores, n_boot=400, seed=5)  # the same resamples: the same interval
    assert (low, high) == pytest.approx((table.loc["auroc", "ci_low"], table.loc["auroc", "ci_high"]))
    assert low < table.loc["auroc", "estimate"] < high
    assert all(math.isnan(v) for v in mh.auroc_interval([1, 1, 1], [0.2, 0.5, 0.9]))  # one class: no AUROC


def test_a_patient_bootstrap_draws_whole_patients():
    labels, probs = _scores(45, 4)
    patients = np.repeat([f"p{i}" for i in range(15)], 3)  # 15 patients of 3 studies each
    for seed in range(3):  # with one resample, the interval is that resample: whole patients drawn
        drawn = np.random.default_rng(seed).integers(0, 15, (1, 15))[0]
        rows = np.concatenate([np.arange(3 * d, 3 * d + 3) for d in drawn])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = mh.study_metrics(labels[rows], probs[rows], 0.5)
        table = mh.bootstrap_metrics(labels, probs, n_boot=1, seed=seed, patients=patients)
        for name in mh.CI_METRICS:
            assert table.loc[name, "ci_low"] == pytest.approx(expected[name], nan_ok=True), name


def test_intervals_by_patient_differ_from_by_study_unless_each_patient_has_one_study():
    labels, probs = _scores(90, 6)
    by_study = mh.bootstrap_metrics(labels, probs, n_boot=400, seed=2)
    one_each = mh.bootstrap_metrics(labels, probs, n_boot=400, seed=2, patients=[f"p{i}" for i in range(90)])
    assert one_each.equals(by_study)
    several = mh.bootstrap_metrics(labels, probs, n_boot=400, seed=2, patients=np.arange(90) // 3)
    assert (several["estimate"] == by_study["estimate"]).all()
    assert not np.allclose(several[["ci_low", "ci_high"]], by_study[["ci_low", "ci_high"]])
    assert mh.auroc_interval(labels, probs, 400, 2, patients=np.arange(90) // 3) == pytest.approx(
        tuple(several.loc["auroc", ["ci_low", "ci_high"]]))
    preds = pd.DataFrame({"label": labels, "prob": probs, "patient": np.arange(90) // 3})
    report = mh.evaluation_report(preds, n_boot=400, seed=2)  # by patient unless asked otherwise
    assert report.xs(report.index.get_level_values(0)[0])[["ci_low", "ci_high"]].equals(several[["ci_low", "ci_high"]])
    with pytest.raises(ValueError, match="patient"):
        mh.evaluation_report(preds.drop(columns="patient"), n_boot=10)


def test_metrics_by_planted_finding_type():
    findings = pd.DataFrame({"image_path": ["MURA-v1.1/valid/XR_HAND/p1/study1_positive/image1.png",
                                            "MURA-v1.1/valid/XR_HAND/p1/study1_positive/image2.png",
                                            "MURA-v1.1/valid/XR_HAND/p2/study1_positive/image1.png"],
                             "finding": ["fracture", "fracture", "hardware"]})
    studies = pd.DataFrame({"study_path": [f"MURA-v1.1/valid/XR_HAND/{p}/" for p in
                                           ("p1/study1_positive", "p2/study1_positive", "p3/study1_positive",
                                            "p4/study1_negative", "p5/study1_negative", "p6/study1_negative")],
                            "label": [1, 1, 1, 0, 0, 0], "prob": [0.9, 0.45, 0.6, 0.5, 0.2, 0.7]})
    table = mh.metrics_by_finding(studies, findings, threshold=0.5)
    assert list(table.index) == ["(none listed)", "fracture", "hardware", "all"]
    assert table.loc["fracture", "n_abnormal"] == 1 and table.loc["all", "n_abnormal"] == 3
    assert table.loc["fracture", "auroc_prob"] == 1.0  # 0.9 beats every normal study
    assert table.loc["hardware", "auroc_prob"] == pytest.approx(1 / 3)  # 0.45 beats only 0.2
    from sklearn.metrics import roc_auc_score

    assert table.loc["all", "auroc_prob"] == pytest.approx(roc_auc_score(studies["label"], studies["prob"]))
    assert table.loc["hardware", "sensitivity_prob"] == 0
    assert table.loc["all", "sensitivity_prob"] == pytest.approx(2 / 3)
    studies["patient"] = [f"p{i}" for i in range(1, 7)]
    with_ci = mh.metrics_by_finding(studies, findings, intervals=True)
    assert with_ci["auroc_prob"].equals(table["auroc_prob"])
    lo, hi = mh.auroc_interval(studies["label"], studies["prob"], patients=studies["patient"])
    assert (with_ci.loc["all", "auroc_prob_ci_low"], with_ci.loc["all", "auroc_prob_ci_high"]) == (lo, hi)
    assert with_ci.loc["fracture", "auroc_prob_ci_low"] <= 1.0 <= with_ci.loc["fracture", "auroc_prob_ci_high"]


def test_youden_threshold_reproduces_the_best_roc_point():
    labels, probs = _scores(200, 1)
    t = mh.youden_threshold(labels, probs)
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, probs)
    m = mh.study_metrics(labels, probs, t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx((tpr - fpr).max())
    separable = mh.youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9])
    assert 0.3 < separable < 0.6


def test_report_has_both_thresholds_and_the_cited_references():
    labels, probs = _scores()
    report = mh.evaluation_report(pd.DataFrame({"label": labels, "prob": probs}), n_boot=200, level="study")
    thresholds = report.index.get_level_values(0).unique()
    assert len(thresholds) == 2 and "0.5" in thresholds[0] and "Youden" in thresholds[1]
    table = mh.comparison_table(report)
    cited = dict(zip(table["value"].round(3), table["metric"]))
    assert {0.611: "accuracy", 0.851: "kappa", 0.929: "auroc", 0.607: "auroc"}.items() <= cited.items()


def test_youden_is_chosen_on_the_tuning_set_and_baselines_stand_beside_every_number():
    labels, probs = _scores(120, 3)
    tune_labels, tune_probs = _scores(60, 8)
    preds = pd.DataFrame({"label": labels, "prob": probs, "patient": np.arange(120)})
    tune = pd.DataFrame({"label": tune_labels, "prob": tune_probs, "patient": np.arange(60)})
    report = mh.evaluation_report(preds, n_boot=100, tune_preds=tune)
    youden = report.index.get_level_values(0).unique()[1]
    assert "tuning set" in youden
    assert report.xs(youden)["threshold_value"].iloc[0] == mh.youden_threshold(tune_labels, tune_probs)
    majority = max(labels.mean(), 1 - labels.mean())
    at_half = report.xs(report.index.get_level_values(0)[0])
    assert at_half.loc["accuracy", "baseline"] == pytest.approx(majority)
    assert (at_half.loc["kappa", "baseline"], at_half.loc["auroc", "baseline"]) == (0, 0.5)
    tune_report = mh.evaluation_report(tune, n_boot=100)
    floor = pd.DataFrame({"set": ["tune", "test"], "score": "hand_area", "auroc": [0.6, 0.55], "ci_low": [0.4, 0.45],
                          "ci_high": [0.8, 0.65]})
    table = mh.comparison_table(report, tune_report=tune_report, floor=floor, models="best.pt")
    ours = table[table["source"] == "this model"]
    assert len(ours) == 6 and ours["set"].str.contains("tuning split").sum() == 3
    assert ours["note"].str.contains("resampled by patient").all() and ours["baseline"].notna().all()
    assert table["baseline"].notna().all()  # every number, cited ones included, has its trivial baseline beside it
    cited = table.set_index("value")
    assert cited.loc[0.611, "baseline"] == pytest.approx(101 / 167)  # the report's accuracy vs calling all normal
    assert "strict=False" in cited.loc[0.611, "note"] and "hidden test set" in cited.loc[0.851, "note"]
    assert "5 checkpoints of one run or 5 runs" in cited.loc[0.929, "note"]
    untuned = mh.comparison_table(report)  # tune_fraction=0: every number was chosen on the set it is reported on
    assert untuned[untuned["source"] == "this model"]["note"].str.contains("chosen on the set it is reported on").all()
    wide = mh.headline_table(report, tune_report, floor)
    assert wide.loc["accuracy", "test"] == at_half.loc["accuracy", "estimate"]
    assert wide.loc["accuracy", "tune_baseline"] == pytest.approx(max(tune_labels.mean(), 1 - tune_labels.mean()))
    assert wide.loc["auroc, no model: hand_area", "test"] == 0.55
    plt.close(mh.plot_headline(wide))


# ---------------------------------------------------------------- ensembles and confident cases


class Brightness(torch.nn.Module):
    """A stand-in classifier: logit = scale * mean input."""

    def __init__(self, scale):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x):
        return (x.mean(dim=(1, 2, 3)) * self.scale).unsqueeze(1)


def test_ensemble_averages_its_members(tiny_phantom, tmp_path):
    studies = mh.load_studies(tiny_phantom, "valid")
    a, b = Brightness(2.0), Brightness(-1.0)
    single = [mh.predict_studies(m, studies, 32, cache_dir=tmp_path, device="cpu") for m in (a, b)]
    both = mh.ensemble_predict([a, b], studies, 32, cache_dir=tmp_path, device="cpu")
    np.testing.assert_allclose(both["prob"], (single[0]["prob"] + single[1]["prob"]) / 2, rtol=1e-6)
    assert all(len(v) == n for v, n in zip(both["view_probs"], both["n_views"]))


def test_confident_cases_pick_the_extremes_of_each_kind():
    preds = pd.DataFrame({"label": [1, 1, 0, 0, 1, 0], "prob": [0.95, 0.6, 0.9, 0.05, 0.1, 0.4],
                          "study_path": list("abcdef")})
    cases = mh.confident_cases(preds, k=1)
    assert dict(zip(cases["case"].astype(str), cases["study_path"])) == {
        "true positive": "a", "false positive": "c", "false negative": "e", "true negative": "d"}


# ---------------------------------------------------------------- class activation maps


def test_cam_of_densenet169_is_consistent_with_its_logit_and_forward():
    torch.manual_seed(0)
    model = mh.build_model(pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, logits = mh.class_activation_maps(model, x)
        forward = model(x).squeeze(1)
    assert maps.shape == (2, 2, 2)  # DenseNet downsamples by 32
    torch.testing.assert_close(logits, forward, rtol=1e-4, atol=1e-4)  # spatial mean + bias = the logit
    with torch.no_grad():
        torch.testing.assert_close(model(x).squeeze(1), forward)  # nothing was modified in place
    normalised = mh.normalise_maps(maps)
    assert normalised.min() == 0 and normalised.max() == 1
    flat = mh.normalise_maps(torch.full((1, 4, 4), 0.3) + torch.rand(1, 4, 4) * 1e-8)  # constant up to rounding
    assert flat.abs().max() == 0


class BlobDetector(torch.nn.Module):
    """A DenseNet-shaped model built to respond to bright pixels: features -> (ReLU) -> pool -> linear."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d(3, 1, 1)
        conv.weight.data.fill_(1 / 3)
        conv.bias.data.fill_(-1.0)
        self.features = torch.nn.Sequential(conv, torch.nn.AvgPool2d(4))
        self.classifier = torch.nn.Linear(1, 1)
        self.classifier.weight.data.fill_(1.0)
        self.classifier.bias.data.fill_(0.0)


def test_cam_localises_a_planted_blob(tmp_path):
    image = np.full((96, 128), 30, np.uint8)
    image[60:76, 20:36] = 250  # the blob, in the lower left
    path = tmp_path / "view.png"
    Image.fromarray(image).save(path)
    for resize in ("squash", "pad"):
        heatmap = mh.view_heatmaps(BlobDetector(), [str(path)], 64, resize, "cpu")[0]
        assert heatmap["cam"].shape == image.shape and heatmap["cam"].min() >= 0 and heatmap["cam"].max() <= 1
        boxes = pd.DataFrame([{"image_file": str(path), "finding": "blob", "x0": 20, "y0": 60, "x1": 35, "y1": 75}])
        score = mh.heatmap_localisation([heatmap], boxes).iloc[0]
        assert score["pointing_hit"], resize
        assert score["heat_in_box"] > 5 * score["box_share"], resize


def test_localisation_of_a_uniform_map_equals_the_box_share():
    heatmap = {"image_path": "v.png", "cam": np.ones((50, 100)), "prob": 0.5}
    boxes = pd.DataFrame([{"image_file": "v.png", "finding": "x", "x0": 0, "y0": 0, "x1": 49, "y1": 24}])
    score = mh.heatmap_localisation([heatmap], boxes).iloc[0]
    assert score["heat_in_box"] == pytest.approx(score["box_share"]) == pytest.approx(0.25)
    assert not score["pointing_hit"]  # its "peak" at (0, 0) lies in the box, but a flat map points nowhere


# ---------------------------------------------------------------- prediction on a new study


def test_predict_new_study_from_a_folder(tiny_run, tiny_phantom, tmp_path):
    study = mh.load_studies(tiny_phantom, "valid")["study_dir"].iloc[0]
    folder = tmp_path / "new_study"
    folder.mkdir()
    for i, p in enumerate(sorted(mh.Path(study).glob("*.png"))):
        mh.load_image(p).save(folder / f"view{i + 1}.jpg", quality=95)  # JPEG works too
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="ignored"):
        result = mh.predict_new_study(tiny_run / "checkpoints" / "best.pt", folder, "cpu")
    assert result["study_prob"] == pytest.approx(result["views"]["prob"].mean())
    assert 0 <= result["study_prob"] <= 1 and len(result["views"]) == len(list(folder.glob("*.jpg")))
    for h in result["heatmaps"]:
        assert h["cam"].shape == h["image"].shape
    with pytest.warns(UserWarning, match="ignored"):
        ensemble = mh.predict_new_study(mh.top_k_checkpoints(tiny_run, 2), folder, "cpu")
    assert ensemble["n_models"] == 2 and math.isfinite(ensemble["study_prob"])


def test_an_upright_run_scores_a_study_stored_as_negatives_as_the_study(tiny_run, tiny_phantom, tmp_path):
    best = tiny_run / "checkpoints" / "best.pt"
    assert mh.load_checkpoint(best)[1].upright  # the suite's default
    truth = mh.load_phantom_truth(tiny_phantom)
    normal = truth[(truth["polarity"] == "normal") & ~truth["narrow"] & ~truth["dim"] & ~truth["low_contrast"]]
    views = list(normal["image_file"][:3])
    folder = tmp_path / "negatives"
    folder.mkdir()
    for i, p in enumerate(views):
        mh.Image.fromarray(255 - np.asarray(mh.load_image(p))).save(folder / f"image{i + 1}.png")
    stored = mh.predict_new_study(best, views, "cpu")
    negative = mh.predict_new_study(best, folder, "cpu")
    assert negative["study_prob"] == pytest.approx(stored["study_prob"], abs=1e-5)
    assert np.allclose(negative["views"]["prob"], stored["views"]["prob"], atol=1e-5)
    study = mh.pd.DataFrame([{"study_path": "s/", "label": 1, "image_paths": views, "patient": "p"},
                             {"study_path": "n/", "label": 1, "image_paths": sorted(map(str, folder.glob("*.png"))),
                              "patient": "p"}])
    model, cfg = mh.load_checkpoint(best)
    preds = mh.predict_studies(model, study, cfg.image_size, cache_dir=tmp_path / "cache", device="cpu",
                               upright=cfg.upright)  # the cached path agrees with the heatmaps' path
    assert preds["prob"].iloc[1] == pytest.approx(preds["prob"].iloc[0], abs=1e-5)
    assert preds["prob"].iloc[0] == pytest.approx(stored["study_prob"], abs=1e-4)


def test_predict_new_study_names_unreadable_files(tiny_run, tmp_path):
    good = write_png(tmp_path / "study" / "image1.png")
    bad = tmp_path / "study" / "image2.png"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(mh.MuraDataError, match="image2.png"):
        mh.predict_new_study(tiny_run / "checkpoints" / "best.pt", tmp_path / "study", "cpu")
    with pytest.raises(mh.MuraDataError, match="no .png"):
        mh.predict_new_study(tiny_run / "checkpoints" / "best.pt", tmp_path, "cpu")


def test_heatmaps_in_batches_equal_one_batch(tiny_phantom):
    torch.manual_seed(0)
    model = mh.build_model(pretrained=False).eval()
    paths = list(mh.studies_to_images(mh.load_studies(tiny_phantom, "valid"))["image_path"][:5])
    whole = mh.view_heatmaps(model, paths, 96, device="cpu", batch_size=8)  # 3x3 maps
    chunked = mh.view_heatmaps(model, paths, 96, device="cpu", batch_size=2)
    assert all(h["cam"].max() > 0.9 for h in whole)  # real maps, not constant ones
    assert [h["image_path"] for h in chunked] == paths
    for a, b in zip(whole, chunked):
        assert a["prob"] == pytest.approx(b["prob"], abs=1e-5) and np.allclose(a["cam"], b["cam"], atol=1e-4)


def test_no_views_give_no_heatmaps_and_an_empty_gallery():
    model = mh.build_model(pretrained=False).eval()  # a validation split without abnormal views must not crash 04
    assert mh.view_heatmaps(model, [], 96, device="cpu") == []
    assert mh.heatmap_localisation([], pd.DataFrame(columns=["image_file"])).empty
    fig = mh.plot_heatmaps([], title="none")
    assert "no views to show" in [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)


def test_an_ensemble_refuses_members_of_other_tuning_splits(tmp_path):
    weights = mh.build_model(pretrained=False).state_dict()
    for name, split_seed in (("a", 0), ("b", 1)):
        config = mh._config_dict(mh.TrainConfig(pretrained=False, split_seed=split_seed))
        mh.save_atomic({"model": weights, "config": config}, tmp_path / f"{name}.pt")
    with pytest.raises(ValueError, match="tuning splits"):  # b's tuning patients would be a's training patients
        mh.load_ensemble([tmp_path / "a.pt", tmp_path / "b.pt"], "cpu")
    assert len(mh.load_ensemble([tmp_path / "a.pt", tmp_path / "a.pt"], "cpu")[0]) == 2
