"""The unsupervised path's scores: masked losses, reference scores, the grid, heatmaps, metrics and intervals."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mura_helpers as mh

# ---------------------------------------------------------------- the masked loss and the scores


def test_masked_loss_matches_a_hand_computation():
    x = torch.tensor([[[[0.2, 0.8], [0.5, 0.0]]]])
    recon = torch.tensor([[[[0.1, 0.4], [0.5, 0.9]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])
    hand = ((0.2 - 0.1) ** 2 + (0.8 - 0.4) ** 2 + (0.0 - 0.9) ** 2) / 3  # ||m (x - x_hat)||^2 / ||m||_1
    assert mh.masked_mse(x, recon, mask).item() == pytest.approx(hand)
    unmasked = mh.masked_mse(x, recon, torch.ones_like(mask)).item()
    assert unmasked == pytest.approx(torch.mean((x - recon) ** 2).item())  # an all-ones mask gives the plain MSE
    assert mh.masked_l1(x, recon, mask).item() == pytest.approx((0.1 + 0.4 + 0.9) / 3)  # alpha-GAN's loss


def test_scores_top_k_and_kld():
    x = torch.zeros(1, 1, 10, 10)
    recon = torch.zeros_like(x)
    recon[0, 0, 0, :5] = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1])
    mask = torch.ones_like(x)
    out = {"recon": recon, "mu": torch.zeros(1, 8), "logvar": torch.zeros(1, 8)}
    s = mh.reconstruction_scores(x, out, mask, top_k=2)
    assert s["mse_top2"].item() == pytest.approx((0.25 + 0.16) / 2)
    assert s["l1_top2"].item() == pytest.approx(0.45)
    assert s["kld"].item() == pytest.approx(0.0)  # the posterior equals the prior
    shifted = mh.kl_divergence(torch.ones(1, 4), torch.zeros(1, 4))
    assert shifted.item() == pytest.approx(2.0)  # 0.5 * sum(mu^2)
    out["mu"] = torch.ones(1, 8)  # KLD 4: per pixel (the suite) or raw (theirs, vaetorch.py:260-261) in the sums
    per_pixel = mh.reconstruction_scores(x, out, mask, top_k=2)
    raw = mh.reconstruction_scores(x, out, mask, top_k=2, kld_scale=1.0)
    assert per_pixel["l1+kld"].item() == pytest.approx(s["l1"].item() + 4 / 100)
    assert raw["l1+kld"].item() == pytest.approx(s["l1"].item() + 4)
    assert raw["mse+kld"].item() == pytest.approx(s["mse"].item() + 4)


def test_grid_scores_every_model_variant_by_variant(normal_heavy_phantom, tmp_path):
    base = mh.AnomalyConfig(data_dir=str(normal_heavy_phantom), output_dir=str(tmp_path / "grid"),
                            cache_dir=str(tmp_path / "cache"), image_size=64, batch_size=8, epochs=1, num_workers=0,
                            max_steps_per_epoch=2)
    results = mh.run_anomaly_grid(base, ["cae", "vae"], ["raw", "crop+HE"], progress=False)
    runs = results[["variant", "model"]].drop_duplicates().apply(tuple, axis=1).tolist()
    assert runs == [("raw", "CAE"), ("raw", "VAE"), ("raw", "no model"),  # cut short: both models and the floor
                    ("crop+HE", "CAE"), ("crop+HE", "VAE"), ("crop+HE", "no model")]
    assert results["roc_auc"].between(0, 1).all()
    assert (results["roc_auc_ci_low"] <= results["roc_auc"]).all()
    assert (results["roc_auc"] <= results["roc_auc_ci_high"]).all()
    table = mh.anomaly_results_table(results)
    assert list(table.columns) == ["raw", "crop+HE"] and ("VAE", "kld") in table.index and ("CAE", "mse") in table.index
    assert ("no model", "hand_area") in table.index
    labels = mh.anomaly_results_table(results, "roc_auc_ci")
    row = results[(results["model"] == "CAE") & (results["score"] == "mse") & (results["variant"] == "raw")].iloc[0]
    interval = f"{row.roc_auc:.3f} [{row.roc_auc_ci_low:.2f}, {row.roc_auc_ci_high:.2f}]"
    assert labels.loc[("CAE", "mse"), "raw"] == interval
    mh.plot_anomaly_table(table, labels=labels)
    for run_dir in results["run_dir"].unique():
        assert (Path(run_dir) / "test_scores.csv").is_file()
    by_finding = mh.anomaly_findings_table(results, mh.load_phantom_findings(normal_heavy_phantom))
    assert ("CAE", "mse") in by_finding.index and ("no model", "template_mse") in by_finding.index
    n_abnormal = results.loc[results["variant"] == "raw", "n_abnormal"].iloc[0]
    assert by_finding.columns[-1] == "all" and by_finding.attrs["n_abnormal"]["all"] == n_abnormal
    assert sum(n for kind, n in by_finding.attrs["n_abnormal"].items() if kind != "all") == n_abnormal
    assert by_finding.iloc[:, -1].to_numpy() == pytest.approx(table["raw"].loc[by_finding.index].to_numpy())


def test_reference_scores_against_a_hand_computation(tmp_path):
    images = np.zeros((4, 8, 8), np.uint8)
    masks = np.zeros_like(images)
    images[0], images[1] = 100, 200  # training views: the template is their mean, 150, where both are masked
    masks[:2, :4] = 1
    images[2], masks[2, :2] = 150, 1  # a test view that matches the template: error 0
    images[3, :4], masks[3, :4] = 255, 1  # a bright test view: error (255 - 150)^2 over its mask
    images[3, 0, 0] = 0
    for name, array in (("images", images), ("masks", masks), ("affines", np.zeros((4, 2, 3), np.float32))):
        np.save(tmp_path / f"{name}.npy", array)
    paths = [f"v{i}.png" for i in range(4)]
    cache = mh.AnomalyCache(tmp_path, paths, mh.PreprocessConfig(size=8))
    table = pd.DataFrame({"image_path": paths, "study_path": paths, "label": [0, 0, 0, 1]})
    scores = mh.reference_anomaly_scores(cache, table.iloc[[3, 2]], table.iloc[:2], top_k=4, chunk=1)
    assert list(scores["image_path"]) == ["v3.png", "v2.png"]  # in the order asked for
    bright = np.full(32, 105 / 255) ** 2
    bright[0] = (150 / 255) ** 2
    assert scores["template_mse"].tolist() == pytest.approx([bright.mean(), 0], abs=1e-6)
    assert scores["template_mse_top4"].tolist() == pytest.approx([np.sort(bright)[-4:].mean(), 0], abs=1e-6)
    assert scores["intensity"].tolist() == pytest.approx([255 * 31 / 32 / 255, 150 / 255], abs=1e-6)
    assert scores["hand_area"].tolist() == pytest.approx([0.5, 0.25])


def test_error_heatmaps_and_boxes_in_the_preprocessed_frame(normal_heavy_phantom, tmp_path):
    cfg = mh.AnomalyConfig(data_dir=str(normal_heavy_phantom), cache_dir=str(tmp_path), image_size=64)
    data = mh.prepare_anomaly_data(cfg, progress=False)
    findings = mh.load_phantom_findings(normal_heavy_phantom)
    boxes = mh.transform_boxes(findings, data["cache"])
    assert len(boxes) > 0 and (boxes["x1"] > boxes["x0"]).all() and (boxes[["x0", "y0", "x1", "y1"]] < 64).all().all()
    maps = mh.anomaly_heatmaps(mh.build_anomaly_model("cae", 64), data["cache"], list(boxes["image_file"][:3]), "cpu")
    for m in maps:
        assert m["cam"].shape == (64, 64) and m["cam"].max() == pytest.approx(1.0) and m["cam"].min() >= 0
        mask = data["cache"].masks[data["cache"].row_of[m["image_path"]]]
        far = mh.ndimage.distance_transform_edt(mask == 0) > 8  # beyond the smoothing's reach of the hand mask
        assert m["cam"][far].max() < 0.02  # the error is scored inside the mask only
    scored = mh.heatmap_localisation(maps, boxes)
    assert len(scored) >= 3 and scored["heat_in_box"].between(0, 1).all()
    none = mh.transform_boxes(findings.iloc[:0], data["cache"])  # no ground truth in this cache: same columns
    assert none.empty and list(none.columns) == list(boxes.columns)


def test_metrics_per_study_and_per_image():
    scores = pd.DataFrame({"study_path": ["a", "a", "b", "c"], "label": [1, 1, 0, 0], "image_path": list("wxyz"),
                           "patient": ["p", "p", "q", "r"], "mse": [0.9, 0.1, 0.3, 0.2]})
    study = mh.anomaly_metrics(scores)
    assert study.loc["mse", "roc_auc"] == 1.0 and study.loc["mse", "n"] == 3  # study a: mean 0.5 beats 0.3, 0.2
    image = mh.anomaly_metrics(scores, level="image")
    assert image.loc["mse", "roc_auc"] == 0.5 and image.loc["mse", "n"] == 4 and image.loc["mse", "n_patients"] == 3
    with pytest.raises(ValueError, match="by patient needs a 'patient' column"):
        mh.anomaly_metrics(scores.drop(columns="patient"))


def test_intervals_resample_patients_at_both_levels():
    rng = np.random.default_rng(0)
    rows = []
    for p in range(30):  # 30 patients, 2 studies of 2 views each; a patient's views share most of their score
        label, shift = p % 3 == 0, rng.normal()
        for st in range(2):
            for v in range(2):
                rows.append({"patient": f"p{p}", "study_path": f"p{p}/s{st}", "image_path": f"p{p}/s{st}/v{v}",
                             "label": int(label), "mse": shift + 0.6 * label + 0.1 * rng.normal()})
    scores = pd.DataFrame(rows)
    for level in ("image", "study"):
        table = mh.anomaly_metrics(scores, level, n_boot=500, seed=1)
        data = scores if level == "image" else mh.study_scores(scores)
        by_patient = mh.auroc_interval(data["label"], data["mse"], 500, 1, patients=data["patient"])
        by_row = mh.auroc_interval(data["label"], data["mse"], 500, 1)
        assert (table.loc["mse", "roc_auc_ci_low"], table.loc["mse", "roc_auc_ci_high"]) == pytest.approx(by_patient)
        assert table.loc["mse", "resampled"] == "patient" and table.loc["mse", "n_patients"] == 30
        rows_table = mh.anomaly_metrics(scores, level, n_boot=500, seed=1, resample="rows")
        assert (rows_table.loc["mse", "roc_auc_ci_low"], rows_table.loc["mse", "roc_auc_ci_high"]) == \
            pytest.approx(by_row)
        # views and studies of a patient move together: the honest interval is the wider one
        assert by_patient[1] - by_patient[0] > by_row[1] - by_row[0]
