"""Beyond one process and one study type: sharded batches, torchrun with gloo on the CPU, resume across process
counts, a failing rank, the per-type loss weights and metrics, presets, and data from Kaggle."""

import json
import os
import shutil
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from conftest import REPO, TEST_ARCH

import mura_helpers as mh

# ---------------------------------------------------------------- sharded batches


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("grouped", [False, True])
def test_every_view_is_in_one_ranks_batch_once_and_ranks_take_as_many_steps(world_size, grouped):
    sizes = np.random.default_rng(world_size).integers(1, 4, 23)
    groups = np.split(np.arange(sizes.sum()), np.cumsum(sizes)[:-1]) if grouped else None
    n = int(sizes.sum()) if grouped else 41
    for epoch in (0, 1):
        per_rank = [mh.epoch_batches(n, 4, True, 7, epoch, groups, rank, world_size) for rank in range(world_size)]
        assert len({len(batches) for batches in per_rank}) == 1  # as many steps: no rank waits in a collective
        views = [v for batches in per_rank for batch in batches for v in batch]
        assert sorted(views) == list(range(n))  # the epoch's views, each once, across the ranks
        assert min(len(batch) for batches in per_rank for batch in batches) >= 2  # batch norm needs two
        if grouped:  # a study stays within one rank's batch
            owner = {v: (r, i) for r, batches in enumerate(per_rank) for i, b in enumerate(batches) for v in b}
            assert all(len({owner[int(v)] for v in g}) == 1 for g in groups)
    single = mh.epoch_batches(n, 4 * world_size, True, 7, 0, groups)
    sharded = [mh.epoch_batches(n, 4, True, 7, 0, groups, r, world_size) for r in range(world_size)]
    for step in range(len(sharded[0]) - 1):  # the global batch is one process's batch of batch x ranks (but the
        # last, which joins the one before when a rank's share of it would be one view)
        assert sorted(single[step]) == sorted(v for r in range(world_size) for v in sharded[r][step])


# ---------------------------------------------------------------- torchrun with gloo on the CPU


def _cfg(phantom, out, cache, **kwargs):
    settings = dict(data_dir=str(phantom), output_dir=str(out), cache_dir=str(cache), image_size=48, batch_size=4,
                    epochs=2, pretrained=False, num_workers=0, keep_top_k=2, resume=True, arch=TEST_ARCH)
    return mh.TrainConfig(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def distributed_runs(tiny_phantom, tiny_run, tmp_path_factory):
    """A 2-process run straight through 2 epochs; one stopped after epoch 1 and resumed on 2 and on 1 process."""
    root = tmp_path_factory.mktemp("ddp")
    cache = tiny_run.parent / "cache"  # tiny_run's view cache (same views, same size)
    runs = {"straight": mh.launch_training(_cfg(tiny_phantom, root / "straight", cache), devices=2, progress=False)}
    mh.launch_training(_cfg(tiny_phantom, root / "resumed", cache, epochs=1), devices=2, progress=False)
    shutil.copytree(root / "resumed", root / "resumed_on_one")
    runs["resumed"] = mh.launch_training(_cfg(tiny_phantom, root / "resumed", cache), devices=2, progress=False)
    runs["resumed_on_one"] = mh.train(_cfg(tiny_phantom, root / "resumed_on_one", cache), progress=False)
    return root, runs


@pytest.mark.slow
def test_a_two_process_run_finishes_with_one_set_of_files(distributed_runs):
    root, runs = distributed_runs
    history = runs["straight"]
    assert list(history["epoch"]) == [1, 2] and list(history["processes"]) == [2, 2]
    assert np.isfinite(history[["train_loss", "valid_loss"]].to_numpy()).all()
    files = sorted(p.relative_to(root / "straight").as_posix() for p in (root / "straight").rglob("*")
                   if p.is_file())
    assert files == ["checkpoints/best.pt", "checkpoints/epoch_001.pt", "checkpoints/epoch_002.pt",
                     "checkpoints/last.pt", "config.json", "history.csv"]  # the launch's settings file: elsewhere
    model, cfg = mh.load_checkpoint(root / "straight" / "checkpoints" / "last.pt")  # plain weights, no 'module.'
    assert cfg.batch_size == 4 and not any(k.startswith("module.") for k in model.state_dict())


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(distributed_runs, tiny_run):
    # tiny_run: one process, batch 8, 48 px, same phantom and seed; here 2 processes x batch 4. Gradients are
    # averaged over the same 8 views, but batch norm normalises over each process's 4 (no SyncBatchNorm on a CPU),
    # so the first epoch's losses agree within 15%, not exactly (measured with DenseNet-121: 4.4% for training, 0.4%
    # for validation; with DenseNet-169, 0.9% and 1.4%).
    single = mh.pd.read_csv(tiny_run / "history.csv")
    ddp = distributed_runs[1]["straight"]
    assert abs(ddp["train_loss"][0] - single["train_loss"][0]) < 0.15 * single["train_loss"][0]
    assert abs(ddp["valid_loss"][0] - single["valid_loss"][0]) < 0.15 * single["valid_loss"][0]


@pytest.mark.slow
def test_a_resumed_distributed_run_equals_a_straight_one_and_resumes_on_another_process_count(distributed_runs):
    root, runs = distributed_runs
    timing = ["epoch_time_s", "train_images_per_s"]
    np.testing.assert_array_equal(runs["straight"].drop(columns=timing).to_numpy(),
                                  runs["resumed"].drop(columns=timing).to_numpy())
    a = torch.load(root / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(root / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    on_one = runs["resumed_on_one"]
    assert list(on_one["epoch"]) == [1, 2] and list(on_one["processes"]) == [2, 1]
    assert on_one["train_loss"][0] == runs["straight"]["train_loss"][0]


FAILING_RANK = """
import sys
sys.path.insert(0, {repo!r})
import mura_helpers as mh
real = mh.train_one_epoch
def failing(*args, **kwargs):
    if kwargs.get("rank", args[9] if len(args) > 9 else 0) == 1:
        raise RuntimeError("rank 1 lost its disk")
    return real(*args, **kwargs)
mh.train_one_epoch = failing
mh.train(mh.TrainConfig(**{cfg}), progress=False)
"""


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_its_error_instead_of_a_hang(tiny_phantom, tiny_run, tmp_path):
    cfg = mh._config_dict(_cfg(tiny_phantom, tmp_path / "run", tiny_run.parent / "cache", epochs=1))
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK.format(repo=str(REPO), cfg=repr(cfg)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "rank 1 lost its disk" in done.stdout + done.stderr
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_the_command_line_names_a_bad_config(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"image_size": 64, "learning_rate": 0.1}))
    with pytest.raises(SystemExit):
        mh.main(["train", "--config", str(bad)])
    done = subprocess.run([sys.executable, "-m", "mura_helpers", "train", "--config", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "learning_rate" in done.stderr and str(bad) in done.stderr


# ---------------------------------------------------------------- all of MURA: per-type weights and metrics


def test_loss_weights_per_study_type_follow_the_paper():
    images = mh.pd.DataFrame({"body_part": ["XR_HAND"] * 4 + ["XR_WRIST"] * 5,
                              "label": [1, 0, 0, 0, 1, 1, 1, 0, 0]})
    table = mh.class_weights_by_type(images)
    assert table.loc["XR_HAND", ["w0", "w1"]].tolist() == pytest.approx([1 / 4, 3 / 4])  # w_T0 = |A_T| / total
    assert table.loc["XR_WRIST", ["w0", "w1"]].tolist() == pytest.approx([3 / 5, 2 / 5])
    weights = mh.view_loss_weights(images, table)
    assert weights.shape == (9, 2) and weights[5].tolist() == pytest.approx([0.6, 0.4])
    logits, targets = torch.randn(9), torch.tensor(images["label"].to_numpy(), dtype=torch.float32)
    w0, w1 = mh._batch_weights(weights, torch.arange(9))
    expected = -(w1 * targets * torch.log(torch.sigmoid(logits))
                 + w0 * (1 - targets) * torch.log(1 - torch.sigmoid(logits))).mean()
    assert mh.weighted_bce_with_logits(logits, targets, w0, w1).item() == pytest.approx(expected.item(), rel=1e-5)
    study = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    one_type = mh.study_weighted_bce(logits, targets, study, 4, torch.full((9,), 0.3), torch.full((9,), 0.7))
    assert one_type.item() == pytest.approx(mh.study_weighted_bce(logits, targets, study, 4, 0.3, 0.7).item())
    with pytest.raises(mh.MuraDataError, match="XR_ELBOW"):
        mh.view_loss_weights(mh.pd.DataFrame({"body_part": ["XR_ELBOW"], "label": [0]}), table)
    with pytest.raises(mh.MuraDataError, match="XR_HAND"):
        mh.class_weights_by_type(mh.pd.DataFrame({"body_part": ["XR_HAND"] * 2, "label": [0, 0]}))


def test_all_study_types_train_with_their_own_weights(tmp_path):
    phantom = mh.make_phantom_mura(tmp_path / "phantom", n_patients=20, seed=4, image_size=96, positive_rate=0.4,
                                   body_parts=("XR_HAND", "XR_WRIST"), progress=False)
    cfg = _cfg(phantom, tmp_path / "run", tmp_path / "cache", body_part="all", image_size=32, epochs=1,
               batch_size=8, keep_top_k=0)
    history = mh.train(cfg, progress=False)
    assert np.isfinite(history["train_loss"]).all()
    model, _ = mh.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    valid = mh.load_studies(phantom, "valid", "all")
    preds = mh.predict_studies(model, valid, 32, cache_dir=tmp_path / "cache")
    table = mh.metrics_by_body_part(preds, n_boot=200)
    assert list(table.index) == ["XR_HAND", "XR_WRIST", "overall"]
    assert table.loc["overall", "studies"] == len(valid) == table["studies"][:-1].sum()
    hand = preds[preds["study_path"].str.contains("XR_HAND")]
    assert table.loc["XR_HAND", "kappa"] == pytest.approx(mh.study_metrics(hand["label"], hand["prob"])["kappa"])
    assert table.loc["XR_HAND", "paper_model_kappa"] == 0.851


def test_the_mura_paper_preset_has_its_settings_and_takes_overrides():
    cfg = mh.train_preset("mura_paper", epochs=1)
    assert (cfg.body_part, cfg.image_size, cfg.rotation_degrees, cfg.batch_size, cfg.lr, cfg.plateau_factor) == (
        "all", 320, 30.0, 8, 1e-4, 0.1)
    assert cfg.epochs == 1 and mh.train_preset("report").loss_level == "study"
    with pytest.raises(ValueError, match="mura_paper"):
        mh.train_preset("mura")


# ---------------------------------------------------------------- data from Kaggle


def test_kaggle_data_is_downloaded_through_kagglehub_and_found(phantom_copy, monkeypatch):
    asked = []

    def dataset_download(handle):
        asked.append(handle)
        return str(phantom_copy.parent)  # the download folder, MURA-v1.1 inside

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=dataset_download))
    assert mh.resolve_data_dir("kaggle:someone/mura-hand-xray") == phantom_copy
    assert asked == ["someone/mura-hand-xray"]
    cfg = mh.TrainConfig(data_dir="kaggle:someone/mura-hand-xray")
    assert mh.config_data_root(cfg) == phantom_copy


def test_kaggle_without_credentials_or_package_says_how_to_provide_them(monkeypatch):
    def refuse(handle):
        raise RuntimeError("401 Unauthorized")

    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=refuse))
    with pytest.raises(mh.MuraDataError, match="401 Unauthorized.*KAGGLE_USERNAME.*KAGGLE_KEY"):
        mh.resolve_data_dir("kaggle:someone/mura")
    with pytest.raises(mh.MuraDataError, match="OWNER/DATASET"):
        mh.resolve_data_dir("kaggle:not a handle")
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # not installed
    with pytest.raises(mh.MuraDataError, match="pip install kagglehub"):
        mh.resolve_data_dir("kaggle:someone/mura")


def test_workers_find_the_module_from_any_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "mura_helpers", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout


# ---------------------------------------------------------------- the autoencoders of notebook 06 on several processes


def _anomaly_cfg(phantom, out, cache, **kwargs):
    settings = dict(model="cae", data_dir=str(phantom), output_dir=str(out), cache_dir=str(cache), image_size=32,
                    batch_size=4, epochs=2, num_workers=0, lr=1e-3, resume=True)
    return mh.AnomalyConfig(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def anomaly_runs(normal_heavy_phantom, tmp_path_factory):
    """A CAE on 2 processes x batch 4 for 2 epochs; on 1 process x batch 8; and a copy of the 2-process run
    resumed on 1 process for a third epoch."""
    root = tmp_path_factory.mktemp("ddp_anomaly")
    cache = root / "cache"
    runs = {"single": mh.train_anomaly(_anomaly_cfg(normal_heavy_phantom, root / "single", cache, batch_size=8),
                                       progress=False)}  # also builds the cache the workers read
    runs["two"] = mh.launch_training(_anomaly_cfg(normal_heavy_phantom, root / "two", cache), devices=2,
                                     progress=False)
    shutil.copytree(root / "two", root / "resumed")  # (one torchrun launch fewer: each costs its processes' start)
    runs["resumed"] = mh.train_anomaly(_anomaly_cfg(normal_heavy_phantom, root / "resumed", cache, epochs=3),
                                       progress=False)
    return root, runs


@pytest.mark.slow
def test_an_autoencoder_trains_on_two_processes_with_one_set_of_files(anomaly_runs):
    root, runs = anomaly_runs
    two = runs["two"]
    assert list(two["epoch"]) == [1, 2] and list(two["processes"]) == [2, 2]
    files = sorted(p.relative_to(root / "two").as_posix() for p in (root / "two").rglob("*") if p.is_file())
    assert files == ["checkpoints/best.pt", "checkpoints/last.pt", "config.json", "history.csv"]
    model, cfg = mh.load_anomaly_model(root / "two" / "checkpoints" / "last.pt")
    assert cfg.model == "cae" and not any(k.startswith("module.") for k in model.state_dict())
    # the validation views were sharded over the ranks and gathered: the same AUROC as one process scoring them all
    data = mh.prepare_anomaly_data(cfg, progress=False)
    val = data["images"][data["images"]["subset"] == "val"]
    with warnings.catch_warnings():  # a 32-px view whose hand mask is empty is left out, and counted
        warnings.simplefilter("ignore")
        scores = mh.evaluate_anomaly(model, data["cache"], val, cfg, torch.device("cpu"))
    assert len(scores) + len(scores.attrs["empty_masks"]) == val["image_path"].nunique()
    assert two["val_auroc_mse"].iloc[-1] == pytest.approx(mh.anomaly_metrics(scores, n_boot=0)["roc_auc"]["mse"])


@pytest.mark.slow
def test_an_autoencoder_on_two_processes_learns_like_one_with_the_same_global_batch(anomaly_runs):
    # 2 x 4 views against 1 x 8: the gradient is averaged over the same 8 views, batch norm normalises over each
    # process's 4, and each rank draws its own augmentation, so the losses agree within 15%, not exactly
    _, runs = anomaly_runs
    single, two = runs["single"], runs["two"]
    for epoch in (0, 1):
        assert abs(two["train_loss"][epoch] - single["train_loss"][epoch]) < 0.15 * single["train_loss"][epoch]
    assert two["train_loss"][1] < two["train_loss"][0]  # it learns


@pytest.mark.slow
def test_a_distributed_autoencoder_run_resumes_on_one_process(anomaly_runs):
    _, runs = anomaly_runs
    resumed = runs["resumed"]
    assert list(resumed["epoch"]) == [1, 2, 3] and list(resumed["processes"]) == [2, 2, 1]
    assert list(resumed["train_loss"][:2]) == list(runs["two"]["train_loss"])  # its history kept as written
    assert np.isfinite(resumed["train_loss"][2])


def test_a_gan_is_refused_under_torchrun_and_trained_in_process_by_the_launcher(monkeypatch, tmp_path):
    cfg = mh.AnomalyConfig(model="dcgan", image_size=32, output_dir=str(tmp_path / "run"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(mh.ConfigError, match="one device"):
        mh.train_anomaly(cfg, progress=False)
    monkeypatch.delenv("WORLD_SIZE")
    trained = []
    monkeypatch.setattr(mh, "train_anomaly", lambda c, progress=True: trained.append(c) or "in process")
    assert mh.launch_training(cfg, devices=2, progress=False) == "in process" and trained == [cfg]
    assert not (tmp_path / "run").exists()  # no torchrun was started


def test_the_command_line_trains_an_anomaly_config_and_names_a_bad_one(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"model": "cae", "batch_size": 4, "dropout": 0.5}))
    done = subprocess.run([sys.executable, "-m", "mura_helpers", "train-anomaly", "--config", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "AnomalyConfig" in done.stderr and "dropout" in done.stderr
