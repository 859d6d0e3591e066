"""The supervised engine: cache, augmentation, loss, metrics, study aggregation, training, checkpoints, resume."""

import math
import shutil

import numpy as np
import pytest
import torch
import torchvision
from conftest import TEST_ARCH
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

import mura_helpers as mh

# ---------------------------------------------------------------- cache


def test_cache_holds_the_resized_views_and_is_rebuilt_only_when_needed(phantom_copy, tmp_path):
    images = mh.studies_to_images(mh.load_studies(phantom_copy, "train"))
    paths = list(images["image_path"][:10])
    cache = mh.build_image_cache(paths, 48, tmp_path / "cache", progress=False, workers=2)
    assert cache.array.shape == (10, 48, 48) and cache.array.dtype == np.uint8
    for p in (paths[0], paths[7]):
        expected = np.asarray(mh.resize_view(mh.load_image(p), 48))
        assert np.array_equal(cache.array[cache.row_of[p]], expected)
    again = mh.build_image_cache(paths, 48, tmp_path / "cache", progress=False)
    assert again.path == cache.path  # reused
    assert mh.build_image_cache(paths, 32, tmp_path / "cache", progress=False).path != cache.path
    assert mh.build_image_cache(paths, 48, tmp_path / "cache", "pad", progress=False).path != cache.path
    shutil.copyfile(paths[4], paths[3])  # a changed file gives a new key
    assert mh.build_image_cache(paths, 48, tmp_path / "cache", progress=False).path != cache.path
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def _plain_views(phantom, polarity: str, n: int = 3) -> list[str]:
    """n of the phantom's views of one polarity, one hand, neither a close-up, dim nor on a low-contrast plate."""
    truth = mh.load_phantom_truth(phantom)
    plain = truth[(truth["polarity"] == polarity) & (truth["n_hands"] == 1) & ~truth["narrow"] & ~truth["dim"]
                  & ~truth["low_contrast"]]
    return list(plain["image_file"][:n])


def test_upright_caches_a_negative_copy_of_a_view_as_the_view(tiny_phantom, tmp_path):
    truth = mh.load_phantom_truth(tiny_phantom)
    stored_upright = truth[truth["polarity"] != "inverted"]["image_file"]  # normal and light grey: left as they are
    turned = sum(mh.view_inverted(np.asarray(mh.load_image(p))) for p in stored_upright)
    # (at most 1 of 47: a faint light-grey hand with a dark tag at its centre reads as a negative)
    assert turned <= 1, f"{turned} of {len(stored_upright)} views stored upright read as negatives"
    views, negatives = _plain_views(tiny_phantom, "normal"), []
    for i, p in enumerate(views):
        negatives.append(str(tmp_path / f"negative{i}.png"))
        mh.Image.fromarray(255 - np.asarray(mh.load_image(p))).save(negatives[-1])  # stored inverted, as on film
    upright = mh.build_image_cache(views + negatives, 48, tmp_path / "cache", progress=False, workers=1, upright=True)
    assert upright.upright and "upright" in upright.path.name
    for p, negative in zip(views, negatives):  # the model sees the same input, however the view was stored
        assert np.array_equal(upright.array[upright.row_of[negative]], upright.array[upright.row_of[p]])
        assert np.array_equal(upright.array[upright.row_of[p]], np.asarray(mh.resize_view(mh.load_image(p), 48)))
        assert np.array_equal(np.asarray(mh.model_input_view(mh.load_image(negative), 48, upright=True)),
                              upright.array[upright.row_of[p]])
    as_stored = mh.build_image_cache(views + negatives, 48, tmp_path / "cache", progress=False, workers=1)
    assert as_stored.path != upright.path and not as_stored.upright  # without it: the negatives as they are
    for p, negative in zip(views, negatives):
        assert np.abs(as_stored.array[as_stored.row_of[negative]].astype(int)
                      - as_stored.array[as_stored.row_of[p]]).mean() > 50


def test_upright_is_on_by_default_off_in_the_papers_presets_and_off_for_older_runs(tiny_phantom, tmp_path):
    assert mh.TrainConfig().upright  # the suite's default ...
    assert not mh.train_preset("report").upright and not mh.train_preset("mura_paper").upright  # ... not theirs
    settings = {"image_size": 32, "epochs": 1, "max_steps_per_epoch": 1, "keep_top_k": 0, "upright": False}
    mh.train(_config(tiny_phantom, tmp_path / "run", tmp_path / "cache", **settings), progress=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)  # a run saved before the setting existed: its views as stored
    state["config"] = {k: v for k, v in state["config"].items() if k != "upright"}
    mh.save_atomic(state, last)
    assert not mh.load_checkpoint(last)[1].upright  # loads, and predicts, as it was trained
    with pytest.raises(ValueError, match="upright"):  # resumed with today's default: refused, not silently changed
        mh.train(_config(tiny_phantom, tmp_path / "run", tmp_path / "cache",
                         **{**settings, "epochs": 2, "upright": True}), progress=False)
    mh.train(_config(tiny_phantom, tmp_path / "run", tmp_path / "cache", **{**settings, "epochs": 2}), progress=False)


def test_pad_resize_keeps_the_aspect_ratio():
    image = mh.Image.fromarray(np.full((100, 50), 200, np.uint8))
    padded = np.asarray(mh.resize_view(image, 64, "pad"))
    assert padded.shape == (64, 64)
    assert padded[:, :14].max() == 0 and padded[:, 18:46].min() == 200  # black bars left and right


# ---------------------------------------------------------------- augmentation


def test_gpu_augment_flips_and_rotates_each_sample_independently():
    x = torch.rand(32, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    flipped = mh.gpu_augment(x, g, rotation_degrees=0, hflip=True)
    same = [torch.allclose(flipped[i], x[i], atol=1e-5) for i in range(32)]
    mirrored = [torch.allclose(flipped[i], x[i].flip(-1), atol=1e-5) for i in range(32)]
    assert all(a or b for a, b in zip(same, mirrored)) and 4 < sum(mirrored) < 28
    rotated = mh.gpu_augment(x, torch.Generator().manual_seed(1), rotation_degrees=30, hflip=False)
    again = mh.gpu_augment(x, torch.Generator().manual_seed(1), rotation_degrees=30, hflip=False)
    assert torch.equal(rotated, again)
    changes = (rotated - x).abs().flatten(1).mean(1)
    assert changes.std() > 0.005  # different angles per sample
    dot = torch.zeros(1, 1, 17, 17)
    dot[..., 8, 12] = 1.0
    zoomed = mh.gpu_augment(dot, None, scale_range=(2.0, 2.0))  # a fixed zoom: twice as far from the centre
    assert zoomed[0, 0].argmax().item() == 8 * 17 + 16


def test_prepare_batch_normalises_and_replicates_grey():
    views = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    x = mh.prepare_batch(views, torch.device("cpu"), train=False)
    assert x.shape == (2, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    expected = [(1 - m) / s for m, s in zip(mh.IMAGENET_MEAN, mh.IMAGENET_STD)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))


# ---------------------------------------------------------------- loss and class weights


def test_class_weights_follow_the_mura_paper():
    w0, w1 = mh.class_weights([1, 1, 0, 0, 0, 0, 0, 0])
    assert (w0, w1) == (0.25, 0.75)  # w1 = |N| / (|A| + |N|): the rarer abnormal class weighs more
    with pytest.raises(mh.MuraDataError, match="both classes"):
        mh.class_weights([0, 0, 0])


def test_weighted_bce_matches_a_hand_computation_and_is_stable():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    w0, w1 = 0.3, 0.7
    p = 1 / (1 + np.exp(-logits.numpy()))
    hand = np.mean([-w1 * np.log(p[0]), -w0 * np.log(1 - p[1]), -w0 * np.log(1 - p[2]), -w1 * np.log(p[3])])
    assert mh.weighted_bce_with_logits(logits, y, w0, w1).item() == pytest.approx(hand, rel=1e-6)
    extreme = mh.weighted_bce_with_logits(torch.tensor([200.0, -200.0]), torch.tensor([0.0, 1.0]), w0, w1)
    assert math.isfinite(extreme.item()) and extreme.item() == pytest.approx((w0 * 200 + w1 * 200) / 2)


def test_study_loss_uses_the_mean_view_probability_with_uneven_view_counts():
    logits = torch.tensor([1.0, -0.5, 2.0, -2.0])  # study 0: three views, study 1: one view
    study = torch.tensor([0, 0, 0, 1])
    y = torch.tensor([1.0, 1.0, 1.0, 0.0])
    p = torch.sigmoid(logits)
    p0, p1 = p[:3].mean(), p[3]
    hand = (-0.6 * torch.log(p0) - 0.4 * torch.log(1 - p1)) / 2
    assert mh.study_weighted_bce(logits, y, study, 2, 0.4, 0.6).item() == pytest.approx(hand.item(), rel=1e-6)
    huge = mh.study_weighted_bce(torch.tensor([-300.0, -300.0]), torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), 1,
                                 0.5, 0.5)
    assert math.isfinite(huge.item()) and huge.item() == pytest.approx(150.0, rel=1e-4)


# ---------------------------------------------------------------- metrics


def test_study_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    m = mh.study_metrics(labels, probs)
    preds = (probs > 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(labels, preds))
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs))
    assert m["tp"] + m["fn"] == labels.sum() and m["tn"] + m["fp"] == (labels == 0).sum()
    assert m["sensitivity"] == pytest.approx(m["tp"] / labels.sum())
    assert m["tn_rate"] + m["fp_rate"] == pytest.approx(1) and m["fn_rate"] + m["tp_rate"] == pytest.approx(1)


def test_study_metrics_with_one_class_warn_and_give_nan_auroc():
    with pytest.warns(UserWarning, match="one class"):
        m = mh.study_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert math.isnan(m["auroc"]) and m["accuracy"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- prediction: study = mean of its views


class MeanIntensity(torch.nn.Module):
    """A stand-in model whose logit is a fixed function of the view's mean intensity."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        return (x.mean(dim=(1, 2, 3)) * self.scale).unsqueeze(1)


def test_predict_studies_averages_uneven_view_counts(tiny_phantom, tmp_path):
    studies = mh.load_all_studies(tiny_phantom)
    assert studies["n_views"].nunique() > 1
    model = MeanIntensity()
    out = mh.predict_studies(model, studies, image_size=32, cache_dir=tmp_path, device="cpu", batch_size=5)
    assert list(out.columns[:4]) == ["study_path", "label", "prob", "n_views"]
    assert len(out) == len(studies) and (out["n_views"].to_numpy() == studies["n_views"].to_numpy()).all()
    for row, (_, study) in zip(out.itertuples(), studies.iterrows()):
        views = [np.asarray(mh.resize_view(mh.load_image(p), 32), np.float32) / 255 for p in study["image_paths"]]
        batch = mh.prepare_batch(torch.from_numpy(np.stack(views))[:, None].mul(255).round().byte(),
                                 torch.device("cpu"), train=False)
        expected = torch.sigmoid(model(batch)).mean().item()
        assert row.prob == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- the model learns, and runs resume exactly


def test_densenet_overfits_one_phantom_batch(tiny_phantom, tmp_path):
    torch.manual_seed(0)
    images = mh.studies_to_images(mh.load_studies(tiny_phantom, "train"))
    batch = images.groupby("label").head(4)
    cache = mh.build_image_cache(batch["image_path"], 64, tmp_path, progress=False)
    x = mh.prepare_batch(torch.from_numpy(cache.array[:, None].copy()), torch.device("cpu"), train=False)
    y = torch.tensor(batch["label"].to_numpy(), dtype=torch.float32)
    model = mh.build_model(pretrained=False)
    assert model.classifier.out_features == 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = mh.weighted_bce_with_logits(model(x).squeeze(1), y, 0.5, 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def _config(root, out, cache, **kw):
    settings = {"image_size": 48, "batch_size": 8, "pretrained": False, "num_workers": 0, "seed": 1, "arch": TEST_ARCH,
                **kw}
    return mh.TrainConfig(data_dir=str(root), output_dir=str(out), cache_dir=str(cache), **settings)


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_a_straight_run(tiny_phantom, tmp_path):
    straight = mh.train(_config(tiny_phantom, tmp_path / "a", tmp_path / "cache", epochs=3, keep_top_k=2),
                        progress=False)
    first = mh.train(_config(tiny_phantom, tmp_path / "b", tmp_path / "cache", epochs=1, keep_top_k=2), progress=False)
    assert len(first) == 1
    resumed = mh.train(_config(tiny_phantom, tmp_path / "b", tmp_path / "cache", epochs=3, keep_top_k=2),
                       progress=False)
    timing = ["epoch_time_s", "train_images_per_s"]
    assert len(resumed) == 3
    np.testing.assert_array_equal(straight.drop(columns=timing).to_numpy(), resumed.drop(columns=timing).to_numpy())
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["epoch"] == b["epoch"] == 2
    for name in ("model", "optimizer", "scheduler", "scaler", "history", "rng", "config"):
        assert name in a
    history_csv = mh.pd.read_csv(tmp_path / "b" / "history.csv")
    assert list(history_csv["epoch"]) == [1, 2, 3]
    best_two = history_csv.sort_values("tune_loss")["epoch"].head(2).tolist()  # the ensemble's members
    for run in ("a", "b"):
        kept = mh.top_k_checkpoints(tmp_path / run, k=5)
        assert [int(p.stem.split("_")[1]) for p in kept] == best_two
        assert len(list((tmp_path / run / "checkpoints").glob("epoch_*.pt"))) == 2
    mh.train(_config(tiny_phantom, tmp_path / "a", tmp_path / "cache", epochs=1, keep_top_k=2, resume=False),
             progress=False)  # a fresh run in the same folder: the earlier run's epochs must not join its ensemble
    assert [p.name for p in mh.top_k_checkpoints(tmp_path / "a", k=5)] == ["epoch_001.pt"]


def test_checkpoints_load_and_a_changed_setup_is_refused(tiny_phantom, tmp_path):
    cfg = _config(tiny_phantom, tmp_path / "run", tmp_path / "cache", epochs=1, loss_level="study")
    history = mh.train(cfg, progress=False)
    assert np.isfinite(history["train_loss"]).all()
    model, loaded = mh.load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert loaded == cfg and not model.training
    with pytest.raises(ValueError, match="image_size"):
        mh.train(_config(tiny_phantom, tmp_path / "run", tmp_path / "cache", epochs=2, loss_level="study",
                         image_size=32), progress=False)
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*"))


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    mh.save_atomic({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mh.torch, "save", broken_save)
    with pytest.raises(OSError):
        mh.save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no partial temporary file left on a full disk


def test_pretrained_download_failure_says_how_to_go_on(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(RuntimeError, match="pretrained=False") as err:
        mh.build_model(pretrained=True)
    assert "TORCH_HOME" in str(err.value)


def test_train_config_refuses_unknown_settings():
    assert mh.TrainConfig(compile="reduce-overhead").compile == "reduce-overhead"
    for bad in ({"compile": "fastest"}, {"amp": "fp8"}, {"loss_level": "patient"}, {"select_metric": "f1"}):
        with pytest.raises(ValueError, match=f"TrainConfig.{next(iter(bad))} must be one of"):
            mh.TrainConfig(**bad)


def test_epoch_batches_cover_every_view_once_and_never_train_on_one_view():
    batches = mh.epoch_batches(17, 8, True, seed=3, epoch=1)
    assert [len(b) for b in batches] == [8, 9]  # the lone 17th view joins the batch before (batch norm needs two)
    assert sorted(v for b in batches for v in b) == list(range(17))
    assert batches != mh.epoch_batches(17, 8, True, seed=3, epoch=2)  # re-shuffled each epoch
    assert [len(b) for b in mh.epoch_batches(17, 8, False, 0, 0)] == [8, 8, 1]  # evaluation keeps its order
    groups = [np.array([0, 1]), np.array([2]), np.array([3, 4, 5]), np.array([6])]
    batches = mh.epoch_batches(7, 3, True, seed=0, epoch=0, groups=groups)
    assert sorted(v for b in batches for v in b) == list(range(7))
    for group in groups:  # a study is never split between batches
        assert sum(set(group.tolist()) <= set(b) for b in batches) == 1


def test_resume_on_another_device_keeps_this_devices_fused_adam():
    model = torch.nn.Linear(3, 1)
    cpu_optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=False)  # as built on a CPU
    model(torch.randn(4, 3)).sum().backward()
    cpu_optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 or CPU: no loss scaling, an empty state
    saved = cpu_optimizer.state_dict()
    saved["state"][0]["step"] = saved["state"][0]["step"].double()  # shows which loading policy was applied
    state = {"model": model.state_dict(), "optimizer": saved, "scaler": scaler.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "cuda": []}, "history": [{"epoch": 1}], "best": 0.5, "epoch": 0}
    gpu_optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as build_optimizer makes on CUDA
    fp16_scaler = torch.amp.GradScaler("cpu", enabled=True)  # a T4 resuming: fp16 with loss scaling
    history, best, start_epoch = mh._restore(state, model, gpu_optimizer, None, fp16_scaler)
    assert gpu_optimizer.param_groups[0]["fused"] is True  # a GradScaler hands fused Adam the unscaling
    # loaded as fused: the step count is cast (and moved to the parameters' device: on a GPU, fused Adam fails
    # with the step left on the CPU)
    assert gpu_optimizer.state[model.weight]["step"].dtype == torch.float32
    assert fp16_scaler.get_scale() == 65536.0  # a fresh scaler, not an error for the empty saved state
    assert torch.equal(gpu_optimizer.state[model.weight]["exp_avg"], cpu_optimizer.state[model.weight]["exp_avg"])
    assert (history, best, start_epoch) == ([{"epoch": 1}], 0.5, 1)


# ---------------------------------------------------------------- the tuning split and selection on it


def _studies(n_patients=60, seed=0):
    """Training studies of n patients with 1-3 studies each, about a third of the studies abnormal."""
    rng = np.random.default_rng(seed)
    rows = [{"split": "train", "patient": f"patient{p:05d}", "study_path": f"train/patient{p:05d}/study{s + 1}/",
             "label": int(rng.random() < 0.3)} for p in range(n_patients) for s in range(rng.integers(1, 4))]
    return mh.pd.DataFrame(rows)


def test_tuning_split_is_patient_disjoint_stratified_and_deterministic():
    studies = _studies()
    positive = studies.groupby("patient")["label"].max()
    train, tune = mh.tuning_split(studies, 0.2, seed=4)
    assert set(train["patient"]).isdisjoint(tune["patient"])  # by patient: no patient on both sides
    assert len(train) + len(tune) == len(studies) and set(train["study_path"]) | set(tune["study_path"]) == set(
        studies["study_path"])
    for label in (0, 1):  # stratified: 20% of the patients with an abnormal study, 20% of the normal-only ones
        assert positive[list(set(tune["patient"]))].eq(label).sum() == round(0.2 * (positive == label).sum())
    again_train, again_tune = mh.tuning_split(studies, 0.2, seed=4)
    assert again_tune.equals(tune) and again_train.equals(train)  # the same seed, the same split
    assert set(mh.tuning_split(studies, 0.2, seed=5)[1]["patient"]) != set(tune["patient"])
    assert mh.tuning_split(studies, 0.0)[0].equals(studies) and mh.tuning_split(studies, 0.0)[1].empty
    with pytest.raises(ValueError, match="train split only"):  # the validation split is never drawn from
        mh.tuning_split(studies.assign(split=["valid"] + ["train"] * (len(studies) - 1)), 0.2)
    one_positive = studies[~studies["patient"].isin(positive.index[positive == 1][1:])]
    with pytest.raises(mh.MuraDataError, match="at least 2 training patients with an abnormal study"):
        mh.tuning_split(one_positive, 0.2)


def test_a_run_tunes_on_training_patients_and_leaves_validation_alone(tiny_phantom, tmp_path):
    cfg = _config(tiny_phantom, tmp_path / "run", tmp_path / "cache")
    sets = mh.run_studies(cfg)
    valid = mh.load_studies(tiny_phantom, "valid")
    assert sets["test"].equals(valid) and set(sets["tune"]["split"]) == {"train"}
    assert set(sets["tune"]["patient"]).isdisjoint(sets["train"]["patient"])
    assert sets["tune"]["label"].nunique() == 2  # both classes, so AUROC and Youden's threshold exist
    assert mh.run_studies(_config(tiny_phantom, tmp_path / "run", tmp_path / "cache", tune_fraction=0))["tune"] is None


def test_selection_and_the_plateau_schedule_read_only_the_tuning_metrics(tiny_phantom, tmp_path, monkeypatch):
    losses = {"tune": [1.0, 0.5, 0.8], "valid": [0.5, 1.0, 0.2]}  # tuning picks epoch 2, validation would pick 3
    evaluate = mh.evaluate_views

    def diverging(*args, desc="valid", **kwargs):
        result = evaluate(*args, desc=desc, **kwargs)
        return {**result, "loss": losses[desc].pop(0)}

    monkeypatch.setattr(mh, "evaluate_views", diverging)
    cfg = _config(tiny_phantom, tmp_path / "run", tmp_path / "cache", image_size=32, epochs=3, keep_top_k=1,
                  plateau_patience=0, max_steps_per_epoch=1)
    history = mh.train(cfg, progress=False)
    assert list(history["tune_loss"]) == [1.0, 0.5, 0.8] and list(history["valid_loss"]) == [0.5, 1.0, 0.2]
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 1  # epoch 2: the tuning loss's best, not the validation loss's (epoch 3)
    assert [p.name for p in mh.top_k_checkpoints(tmp_path / "run", k=5)] == ["epoch_002.pt"]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["scheduler"]["best"] == 0.5  # the plateau schedule followed the tuning loss (validation's: 0.2)
    assert list(history["lr"]) == [cfg.lr] * 3  # validation's losses would have cut it before epoch 3
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr * cfg.plateau_factor)  # 0.8 > 0.5


def test_select_metric_follows_the_tuning_split_and_resume_refuses_another_split(tiny_phantom, tmp_path):
    assert mh.TrainConfig().select_metric == "tune_loss" and mh.TrainConfig().tuning_set == "tune"
    old = mh.TrainConfig(tune_fraction=0, select_metric="tune_accuracy")  # no tuning split: selection on valid
    assert old.select_metric == "valid_accuracy" and old.tuning_set == "valid"
    assert mh.TrainConfig(tune_fraction=0, select_metric="valid_loss").select_metric == "valid_loss"
    with pytest.raises(ValueError, match="held-out test"):
        mh.TrainConfig(select_metric="valid_accuracy")  # selecting on the test set is refused
    with pytest.raises(ValueError, match="tune_fraction"):
        mh.TrainConfig(tune_fraction=1.0)
    settings = {"image_size": 32, "epochs": 1, "max_steps_per_epoch": 1, "keep_top_k": 0}
    mh.train(_config(tiny_phantom, tmp_path / "run", tmp_path / "cache", **settings), progress=False)
    for changed in ({"tune_fraction": 0.2}, {"split_seed": 1}):
        with pytest.raises(ValueError, match=next(iter(changed))):
            mh.train(_config(tiny_phantom, tmp_path / "run", tmp_path / "cache", **{**settings, "epochs": 2},
                             **changed), progress=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)  # a run saved before the tuning split existed: it had none
    state["config"] = {k: v for k, v in state["config"].items() if k not in ("tune_fraction", "split_seed")}
    mh.save_atomic(state, last)
    with pytest.raises(ValueError, match="tune_fraction"):
        mh.train(_config(tiny_phantom, tmp_path / "run", tmp_path / "cache", **{**settings, "epochs": 2}),
                 progress=False)
    assert mh.load_checkpoint(last)[1].tune_fraction == 0  # and loads as what it was


# ---------------------------------------------------------------- one place per setting, one training skeleton


def test_a_new_setting_must_match_on_resume_unless_made_free():
    import dataclasses

    @dataclasses.dataclass
    class Extended(mh.TrainConfig):
        dropout: float = 0.0  # a new knob: protected on resume without any list to edit
        log_every: int = mh._free(10)  # where/how a run runs: may change

    must = mh.must_match_on_resume(Extended)
    assert "dropout" in must and "log_every" not in must
    assert {"lr", "image_size", "seed", "split_seed", "body_part"} <= set(must)  # what the model learns from
    assert not {"epochs", "data_dir", "output_dir", "device", "num_workers", "resume"} & set(must)
    shared = {f.name for f in dataclasses.fields(mh.RunConfig)}  # one base: both paths take its fields
    for config_class in (mh.TrainConfig, mh.AnomalyConfig):
        assert shared <= {f.name for f in dataclasses.fields(config_class)}
    assert {"data_dir", "cache_dir", "phantom_seed", "device", "amp", "seed", "on_bad"} <= shared


def test_config_from_takes_the_notebook_variables_named_like_fields(tmp_path):
    variables = {"image_size": 96, "lr": 3e-4, "epochs": "2", "run_name": "not a field", "REPO": tmp_path,
                 "devices": "auto"}
    cfg = mh.config_from(mh.TrainConfig, variables, output_dir=tmp_path / "run", compile=False)
    assert (cfg.image_size, cfg.lr, cfg.epochs, cfg.output_dir) == (96, 3e-4, 2, str(tmp_path / "run"))
    assert cfg.batch_size == mh.TrainConfig().batch_size  # not given: the field's default
    with pytest.raises(mh.ConfigError, match="torch_compile"):  # a misspelt override is named
        mh.config_from(mh.TrainConfig, variables, torch_compile=True)
    anomaly = mh.config_from(mh.AnomalyConfig, {"model": "vae", "image_size": 64, "epochs": None}, recipe="paper")
    assert anomaly.model == "vae" and anomaly.epochs == mh.recipe_settings("paper", "vae")["epochs"]


@pytest.mark.parametrize(("score", "best", "direction", "expected"), [
    (0.3, None, "min", True), (float("nan"), None, "max", True),  # the first epoch is always the best so far
    (0.3, 0.4, "min", True), (0.5, 0.4, "min", False), (0.5, 0.4, "max", True), (0.4, 0.4, "max", False),
    (float("nan"), 0.4, "max", False), (float("nan"), float("nan"), "min", False),  # NaN (one-class tuning set)
    (0.1, float("nan"), "max", True), (0.9, float("nan"), "min", True),  # never improves; a number beats NaN
])
def test_both_trainers_keep_the_best_epoch_by_one_rule(score, best, direction, expected):
    assert mh._improves(score, best, direction) is expected
