"""Controls that can fail: the models learn a finding through the suite's own path, and do not from permuted
labels; no anomaly score runs the wrong way."""

import numpy as np
import pandas as pd
import pytest
import torch

import mura_helpers as mh

# ---------------------------------------------------------------- the anomaly scores' direction

# The autoencoders learn what a normal view looks like from varied views within a few steps (36 steps of batch 8
# at 32 px). The GANs are left out: a discriminator needs about 100 steps before it tells an implant from a normal
# view (measured at 16 px: after 36 steps the suite's three called the implanted view the more normal one in 8 of 8
# views, after 96 the less normal one in 8 of 8), and one step of their networks (11-28 million parameters even
# at 16 px) takes 0.7-1.3 s on a 2-core CPU: 7-13 minutes a GAN, far over CI's budget. test_anomaly_models.py
# and test_anomaly_recipes.py check that each discriminator learns to call noise abnormal
DIRECTION_SETUP = {"size": 32, "views": 48, "epochs": 6}
# (recipe, model, score) -> why it fails: the paper recipe keeps the authors' per-image min-max scaling (their
# MinMaxNormalization, minmax=True): a bright implant becomes the view's maximum and darkens the rest of it, so
# the reconstruction errors fall. Measured after the paper networks of issue 23 (8 views, same steps): with
# minmax=True the CAE's four scores rose in 0 of 8 views and the VAE's in 1 of 8; with minmax=False in 8 of 8
# and 7 of 8. The VAE's KLD scores rise either way (8 of 8, 6 of 8)
_MINMAX = ("the paper recipe's per-image min-max scaling (minmax=True, as the authors did it) darkens the view "
           "around a bright implant, so this reconstruction score falls; it rises with minmax=False")
DIRECTION_XFAIL = {("paper", model, score): _MINMAX for model in ("cae", "vae")
                   for score in ("mse", "l1", "mse_top200", "l1_top200")}


def _synthetic_hands(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Normal 'hands' (a soft-tissue ellipse with a brighter bone along it, on a dark plate) and their masks."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    views, masks = [], []
    for _ in range(n):
        cx, cy, w = rng.uniform(0.4, 0.6), rng.uniform(0.45, 0.55), rng.uniform(0.16, 0.22)
        hand = ((xx - cx) / w) ** 2 + ((yy - cy) / 0.35) ** 2 < 1
        bone = hand & (np.abs(xx - cx) < 0.35 * w)
        image = 0.05 + 0.35 * hand + 0.25 * bone + rng.normal(0, 0.02, hand.shape)
        views.append(np.clip(image * 255, 0, 255).astype(np.uint8))
        masks.append(hand.astype(np.uint8))
    return np.stack(views), np.stack(masks)


def _with_implant(views: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The same views with a bright metal plate pasted into the soft tissue beside the bone, inside the hand."""
    planted = views.copy()
    size = views.shape[-1]
    half_length, half_width = max(size // 8, 1), max(size // 32, 1)
    for view, mask in zip(planted, masks):
        ys, xs = np.nonzero(mask)
        cy, cx = int(ys.mean()), int(round(xs.mean() + 0.3 * (xs.max() - xs.min())))
        view[cy - half_length:cy + half_length, cx - half_width:cx + half_width] = 250
    return planted


def _implant_cache(folder) -> tuple[mh.AnomalyCache, pd.DataFrame]:
    """An anomaly cache of normal training views, 8 normal test views and the same 8 with an implant."""
    rng = np.random.default_rng(0)
    size = DIRECTION_SETUP["size"]
    train_views, train_masks = _synthetic_hands(DIRECTION_SETUP["views"], size, rng)
    test_views, test_masks = _synthetic_hands(8, size, rng)
    views = np.concatenate([train_views, test_views, _with_implant(test_views, test_masks)])
    masks = np.concatenate([train_masks, test_masks, test_masks])
    np.save(folder / "images.npy", views)
    np.save(folder / "masks.npy", masks)
    np.save(folder / "affines.npy", np.tile(np.eye(2, 3, dtype=np.float32), (len(views), 1, 1)))
    paths = [f"view{i}.png" for i in range(len(views))]
    n_train = len(train_views)
    images = pd.DataFrame({"image_path": paths, "study_path": paths, "patient": paths,
                           "label": [0] * (n_train + 8) + [1] * 8, "subset": ["train"] * n_train + ["test"] * 16})
    return mh.AnomalyCache(folder, paths, mh.PreprocessConfig(size=size)), images


@pytest.fixture(scope="module")
def direction_scores(tmp_path_factory):
    """Per (recipe, model): every score of the plain and the implanted test views, after a few training steps of
    the training loop itself (train_anomaly_one_epoch: the recipe's loss and augmentation) and the scoring itself
    (evaluate_anomaly)."""
    trained = {}

    def scores(recipe: str, model: str) -> pd.DataFrame:
        if (recipe, model) not in trained:
            cache, images = _implant_cache(tmp_path_factory.mktemp(f"{recipe}_{model}"))
            cfg = mh.AnomalyConfig(model=model, recipe=recipe, image_size=DIRECTION_SETUP["size"], batch_size=8,
                                   epochs=DIRECTION_SETUP["epochs"], num_workers=0, device="cpu", amp="off")
            torch.manual_seed(0)
            device = torch.device("cpu")
            net = mh.anomaly_model_for(cfg)
            optimizers = mh.anomaly_optimizers(net, cfg, device)
            scaler = torch.amp.GradScaler("cpu", enabled=False)
            train_views = images[images["subset"] == "train"]
            loader = mh._anomaly_loader(cache, train_views, cfg.batch_size, 0, False)
            for epoch in range(cfg.epochs):
                loader.sampler.batches = mh.epoch_batches(len(train_views), cfg.batch_size, True, cfg.seed, epoch)
                mh._train_anomaly_one_epoch(net, loader, optimizers, scaler, device, cfg, epoch, progress=False)
            trained[recipe, model] = mh.evaluate_anomaly(net, cache, images[images["subset"] == "test"], cfg, device)
        return trained[recipe, model]

    return scores


def _direction_case(recipe: str, model: str, score: str):
    """One parametrized case; those known to fail are strict xfails."""
    marks = []
    if (recipe, model, score) in DIRECTION_XFAIL:
        marks.append(pytest.mark.xfail(strict=True, reason=DIRECTION_XFAIL[recipe, model, score]))
    return pytest.param(recipe, model, score, marks=marks, id=f"{recipe}-{model}-{score}")


# every score of the autoencoders of every recipe (the GANs' reconstruction scores are computed by the same
# reconstruction_scores)
DIRECTION_CASES = [_direction_case(recipe, model, score) for recipe in mh.ANOMALY_RECIPES
                   for model in mh.ANOMALY_MODELS if model not in mh.GAN_MODELS
                   for score in mh.anomaly_score_names(model)]


@pytest.mark.parametrize("recipe, model, score", DIRECTION_CASES)
def test_an_implant_raises_every_anomaly_score(direction_scores, recipe, model, score):
    table = direction_scores(recipe, model)
    plain = table.loc[table["label"] == 0, score].to_numpy()
    planted = table.loc[table["label"] == 1, score].to_numpy()  # the same views, in the same order
    assert (planted > plain).mean() >= 0.75, (planted - plain).round(5)


# ---------------------------------------------------------------- the supervised control


def test_permuted_labels_copy_keeps_each_patients_studies_and_the_abnormal_share(tiny_phantom, tmp_path):
    copy = mh.permuted_labels_copy(tiny_phantom, tmp_path, seed=1)
    before, after = mh.load_studies(tiny_phantom, "train"), mh.load_studies(copy, "train")  # also checks the CSVs
    assert after["label"].sum() == before["label"].sum() and len(after) == len(before)
    assert before.groupby("patient").size().equals(after.groupby("patient").size())
    assert (after["label"].to_numpy() != before["label"].to_numpy()).any()  # permuted
    valid_before, valid_after = mh.load_studies(tiny_phantom, "valid"), mh.load_studies(copy, "valid")
    assert valid_after["study_path"].tolist() == valid_before["study_path"].tolist()  # the test split untouched
    assert mh.permuted_labels_copy(tiny_phantom, tmp_path / "again", seed=1).parent.is_dir()
    again = mh.load_studies(tmp_path / "again", "train")
    assert again["label"].tolist() == after["label"].tolist()  # seeded


@pytest.mark.slow  # about a minute: two training runs
def test_supervised_control_learns_and_permuted_labels_do_not(tmp_path):
    """The suite's own path (make_phantom_mura -> train -> predict_studies -> study_metrics on MURA's validation
    split as the test) must learn a visible finding, and must not from the same views with the training labels
    permuted by patient. Settings (mh.SUPERVISED_CONTROL), measured on a shared 2-core CPU (one torch thread):
    - hardware only, at finding_scale 3: at 32 px a from-scratch DenseNet learns it in 5 epochs (test AUROC
      0.92 at scale 3 against 0.85 at scale 2, 10 epochs); fractures and lesions span a pixel or two there;
    - 100 patients, 30% of them the test, half of every split abnormal: 39 test studies, 20 abnormal, so the test
      AUROC's interval is about +-0.08 and both thresholds mean something;
    - DenseNet-121 (the smallest of ARCHS) at 32 px, batch 16 (more steps per epoch than 32 for the same views),
      lr 1e-3 (from scratch), a quarter of the training patients as the tuning split (with the default tenth,
      best.pt fell on an early epoch: 0.82 where the last epoch scored 0.96): test AUROC 0.955, 0.976, 0.968 for
      training seeds 0, 1, 2 (mean 0.966); with labels permuted by patient 0.318, 0.303, 0.242 (phantom v6, views
      upright, 2026-12-06, one thread; on v5 with views as stored 0.955, 0.958, 0.942 and 0.382, 0.200, 0.605;
      v6 as stored, seed 0: 0.942; with hand-mask pipeline 13, whose heel fit reads the polarity of the upright
      views: 0.950, 0.995, 0.958 and 0.242, 0.579, 0.111). Each seed permutes the labels its own way, and the
      permuted runs land on either side of 0.5 (7 of these 9 below it; why mostly below is not known).
    Broken on purpose, seeds 0, 1, 2 (phantom v7, 2026-12-06, one thread), this test fails: the training studies'
    labels shifted by one study, 0.337, 0.342, 0.258; the views scored without the ImageNet normalisation the model
    was trained with, 0.761, 0.153, 0.545 (the unbroken runs the same hour: 0.950, 0.995, 0.958; permuted 0.242,
    0.579, 0.111)."""
    learnt = mh.supervised_control(tmp_path)
    permuted = mh.supervised_control(tmp_path, permuted=True)
    assert learnt["test_abnormal"] >= 20 and learnt["test_studies"] - learnt["test_abnormal"] >= 15
    assert learnt["test_auroc"] >= mh.SUPERVISED_CONTROL["min_auroc"], learnt
    assert permuted["test_auroc"] <= mh.SUPERVISED_CONTROL["max_permuted_auroc"], permuted


def test_learning_verdict_needs_the_interval_above_chance_and_the_floor():
    def headline(low, floor):
        return pd.DataFrame({"test": [0.8, floor], "test_ci_low": [low, floor - 0.1], "test_ci_high": [0.9, 0.8]},
                            index=["auroc", "auroc, no model: template"])
    assert mh.learning_verdict(headline(0.7, 0.6))[0]
    learned, line = mh.learning_verdict(headline(0.55, 0.6))  # above chance, not above the floor
    assert not learned and line.startswith("NOT SHOWN TO LEARN") and "template: 0.600" in line
    assert not mh.learning_verdict(headline(0.65, 0.3))[0]  # a floor at 0.3 runs the other way: 0.7
    assert not mh.learning_verdict(headline(0.45, 0.5).iloc[:1])[0]  # no floor: chance alone


def test_learning_verdict_says_when_the_model_gives_every_study_one_answer():
    """A model that did not learn and whose test probabilities barely differ (a from-scratch run stuck at a
    constant answer spread them 0.0017 apart) is said to give one answer; one that spreads them is not, and a
    model that learned is never so described."""
    def headline(low):
        return pd.DataFrame({"test": [0.6], "test_ci_low": [low], "test_ci_high": [0.8]}, index=["auroc"])
    rng = np.random.default_rng(0)
    stuck = 0.4849 + rng.uniform(-0.002, 0.002, 400)
    spread = rng.uniform(0.2, 0.8, 400)
    assert mh.probabilities_collapsed(stuck) is not None and mh.probabilities_collapsed(spread) is None
    learned, line = mh.learning_verdict(headline(0.45), probs=stuck)
    assert not learned and "one answer" in line and "interquartile range" in line
    assert "one answer" not in mh.learning_verdict(headline(0.45), probs=spread)[1]
    assert "one answer" not in mh.learning_verdict(headline(0.45))[1]  # no probabilities given: not judged
    learned, line = mh.learning_verdict(headline(0.7), probs=stuck)  # learned (ranks apart, however close)
    assert learned and "one answer" not in line


def test_learning_verdict_needs_the_cams_on_the_caught_hardware():
    """A model above chance and the floor whose CAMs miss the hardware in most views it catches is not called
    learned (it may read a confound); views it does not catch (probability <= 0.5) and other findings do not count."""
    headline = pd.DataFrame({"test": [0.9, 0.6], "test_ci_low": [0.8, 0.5], "test_ci_high": [0.95, 0.7]},
                            index=["auroc", "auroc, no model: template"])

    def localisation(hits, misses, uncaught_misses=0, fracture_misses=0):
        rows = ([("hardware", True, 0.9)] * hits + [("hardware", False, 0.8)] * misses
                + [("hardware", False, 0.2)] * uncaught_misses + [("fracture", False, 0.9)] * fracture_misses)
        return pd.DataFrame(rows, columns=["finding", "pointing_hit", "prob"])

    assert mh.cam_hardware_hits(localisation(3, 2, uncaught_misses=5, fracture_misses=4)) == (3, 5)
    learned, line = mh.learning_verdict(headline, localisation(3, 2, uncaught_misses=5, fracture_misses=4))
    assert learned and "3 of the 5 hardware views it catches" in line
    learned, line = mh.learning_verdict(headline, localisation(1, 4))
    assert not learned and line.startswith("NOT SHOWN TO LEARN") and "1 of the 5" in line
    learned, line = mh.learning_verdict(headline, localisation(0, 0, uncaught_misses=3))
    assert learned and "unchecked" in line  # nothing caught: nothing to check
    assert mh.learning_verdict(headline)[0]  # no maps given (real MURA has no boxes): the AUROC alone


@pytest.mark.slow  # 34 s on a lightly loaded 2-core CPU (88 s shared): a phantom, its cache, one training run
def test_unsupervised_control_scores_hardware_views_above_normal_ones(tmp_path):
    """The suite's CAE (recipe "suite") trained on the normal views of a control phantom (mh.UNSUPERVISED_CONTROL)
    must score the test views that show hardware above the normal studies' views: image AUROC of the control's
    score >= 0.90. Why each setting: see the comment above UNSUPERVISED_CONTROL."""
    result = mh.unsupervised_control(tmp_path)
    assert result["hardware_views"] >= 20 and result["normal_views"] >= 40, result
    score = mh.UNSUPERVISED_CONTROL["score"]
    assert result["image_auroc"][score] >= mh.UNSUPERVISED_CONTROL["min_auroc"], result["image_auroc"]
