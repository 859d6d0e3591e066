"""Shared helpers for the MURA hand-radiograph notebook suite: every notebook imports this one module.

Reads top to bottom as the pipeline does; each section opens with a `# ----- name` line (search for it):

  data                      MURA's layout and CSVs, checks with named errors, where data comes from (a folder,
                            "kaggle:OWNER/DATASET", the phantom; a zip, or in Colab Drive, through a local copy):
                            find_mura_root, load_studies, prepare_local_copy, resolve_data_dir
  images & cache            decode and resize once into a uint8 cache on disk: build_image_cache, epoch_batches
  augmentation              on the device, per sample: gpu_augment and prepare_batch (supervised views),
                            _augment_views_and_masks (the unsupervised path's views and masks alike)
  model & loss              build_model (torchvision DenseNet), the paper's weighted BCE, per study type
  training: settings        RunConfig (what both paths share) -> TrainConfig; _TRAIN_PRESETS; config_from (notebooks)
  training: devices         resolve_device, amp_dtype, _setup_distributed (torchrun: NCCL or gloo)
  training: checkpoints     save_atomic/_load_state (digests), resume, run folders, run_lock
  training: one epoch ...   train_one_epoch, evaluate_views, tuning_split, train, launch_training, ensembles
  evaluation & metrics      study_metrics, bootstrap intervals by patient, baselines, comparison tables
  heatmaps                  class activation maps and their localisation on the phantom's truth
  prediction                predict_new_study (a folder of views)
  plots                     data, pipeline, training and results figures; save_figure
  anomaly detection         Davletshina et al. 2020: preprocessing (crop, hand mask, HE) -> models (CAE, VAE) ->
                            GANs -> their networks ("paper" recipe) -> recipes and AnomalyConfig -> training,
                            scores, heatmaps, the grid -> plots
  phantom                   a synthetic MURA in MURA's exact layout, with per-view truth (a data source: last)
  learning controls         checks that can fail: supervised_control (learns; permuted labels do not),
                            unsupervised_control (a CAE scores hardware views above normal ones)
  command line              python -m mura_helpers train | train-anomaly --config run.json (torchrun-ready);
                            colab-url (maintainers: the repository URL into the notebooks' setup cells)

Where to change what:
  a setting        a field of RunConfig (both paths), TrainConfig or AnomalyConfig, and the notebook's
                   parameters cell under the same name (config_from picks it up); a field that may change when a
                   run resumes is made with _free(...), every other one must match (must_match_on_resume)
  a preset         _TRAIN_PRESETS (supervised); ANOMALY_RECIPES and RECIPE_REASONS (unsupervised)
  the loss         weighted_bce_with_logits / study_weighted_bce (supervised); masked_mse, autoencoder_loss,
                   gan_step, paper_gan_step (unsupervised); the views' range and mask: anomaly_inputs
  the augmentation gpu_augment (both paths), prepare_batch (supervised), _augment_views_and_masks (unsupervised)
  the model        build_model (ARCHS); build_anomaly_model and ARCHITECTURES
  a metric         study_metrics and bootstrap_metrics (CI_METRICS); anomaly_metrics, reconstruction_scores
  a figure         its plot_* function (plots, or anomaly detection: plots); save_figure names the file
  the phantom      make_phantom_mura and the _render_view family (bump PHANTOM_VERSION when the pixels change)
  preprocessing    _without_marker_strips (strips along the edges), find_carrier (the plate), _collimated_field
                   (the field in it), _hand_mask (mask), preprocess_view; a threshold of theirs is a field of
                   CropRules or MaskRules (the cache's key holds them); bump ANOMALY_PIPELINE_VERSION when the
                   code's output changes; re-set MASK_DOUBT_LIMITS when the masks change
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import io
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from scipy.spatial import ConvexHull
from skimage import exposure
from skimage.filters import threshold_multiotsu, threshold_otsu
from sklearn.metrics import average_precision_score, cohen_kappa_score, confusion_matrix, roc_auc_score, roc_curve
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = [  # the public API, in the module's section order (tests/test_notebooks.py keeps it complete)
    # data: MURA layout, CSVs, validation; data sources
    "BODY_PARTS", "SPLITS", "MURA_DIRNAME", "PHANTOM_PATIENTS", "MuraDataError",
    "find_mura_root", "load_studies", "data_problems", "load_all_studies", "studies_to_images", "load_image",
    "DRIVE_DIR", "LOCAL_DATA_DIR", "LOCAL_COPY_MARK", "prepare_local_copy", "resolve_data_dir", "config_data_root",
    # images & cache: decode and resize once, uint8 on disk
    "resize_view", "upright_view", "model_input_view", "build_image_cache", "epoch_batches",
    # augmentation: on the device, per sample, both paths
    "IMAGENET_MEAN", "IMAGENET_STD", "gpu_augment", "prepare_batch",
    # model & loss
    "build_model", "class_weights", "class_weights_by_type", "view_loss_weights", "weighted_bce_with_logits",
    "study_weighted_bce",
    # training: settings (validated configs, presets)
    "SELECT_METRICS", "ARCHS", "ConfigError", "RunConfig", "config_from", "must_match_on_resume", "TrainConfig",
    "train_preset",
    # training: devices & processes (AMP, distributed)
    "resolve_device", "amp_dtype",
    # training: checkpoints & run folders (atomic, locked)
    "DIGEST_KEY", "save_atomic", "CheckpointError", "RUN_LOCK", "RunLockedError", "run_lock",
    # training: one epoch, evaluation, the run, ensembles
    "make_view_loader", "loader_throughput", "amp_step", "build_optimizer", "compile_model", "train_one_epoch",
    "evaluate_views", "tuning_split", "train", "launch_training", "top_k_checkpoints", "ensemble_checkpoints",
    "load_checkpoint",
    # evaluation & metrics
    "study_metrics", "predict_studies", "youden_threshold", "CI_METRICS", "auroc_interval", "bootstrap_metrics",
    "trivial_baselines", "evaluation_report", "run_studies", "model_free_floor", "comparison_table",
    "headline_table", "metrics_by_finding", "metrics_by_body_part", "load_ensemble", "ensemble_predict",
    "confident_cases",
    # heatmaps: class activation maps (the MURA paper)
    "class_activation_maps", "normalise_maps", "view_heatmaps", "heatmap_localisation", "cam_localisation",
    # prediction on a new study
    "predict_new_study",
    # plots: data, pipeline, training, results, heatmaps
    "save_figure", "dataset_overview", "patients_in_both_splits", "plot_xray_grid", "plot_patients_per_split",
    "plot_studies_per_patient", "plot_views_per_study", "plot_label_balance", "image_properties",
    "plot_image_properties", "plot_intensity_histograms", "epoch_table", "plot_training_curves",
    "plot_pipeline_views", "plot_roc", "plot_confusion", "plot_headline", "plot_cases", "plot_heatmaps",
    # anomaly detection (Davletshina 2020): preprocessing
    "CropRules", "MaskRules", "PreprocessConfig", "preprocess_variants", "min_area_rect", "rect_mask",
    "find_carrier", "find_field", "hand_mask", "MASK_DOUBTS", "POLARITY_CENTRE", "view_inverted", "preprocess_view",
    "AnomalyCache", "ANOMALY_PIPELINE_VERSION", "build_anomaly_cache", "MASK_DOUBT_LIMITS", "suspect_masks", "mask_iou",
    "mask_iou_table", "mask_iou_summary", "mask_iou_by_kind", "mask_one_level_table", "anomaly_split",
    # anomaly detection: models and masked losses
    "ConvAutoencoder", "VariationalAutoencoder", "masked_mse", "masked_l1", "kl_divergence",
    "reconstruction_scores",
    # anomaly detection: GANs (DCGAN, BiGAN, alpha-GAN)
    "GAN_MODELS", "ANOMALY_MODELS", "ANOMALY_MODEL_NAMES", "AdversarialAnomalyModel", "gan_step",
    # anomaly detection: their networks (recipe "paper")
    "SelfAttention", "PaperGAN", "paper_gan_step", "build_anomaly_model", "anomaly_score_names",
    # anomaly detection: recipes (suite, paper), config
    "ANOMALY_RECIPES", "PAPER_SOURCES", "RECIPE_REASONS", "ARCHITECTURES", "PIPELINE_DIFFERENCES",
    "RECIPE_SETTINGS", "recipe_settings", "paper_source", "recipe_deviations", "AnomalyConfig",
    # anomaly detection: training, scores, heatmaps, grid
    "hand_boxes", "build_hand_crops", "prepare_anomaly_data", "anomaly_inputs", "to_unit_range",
    "evaluate_anomaly", "study_scores", "anomaly_metrics", "reference_anomaly_scores", "anomaly_model_for",
    "anomaly_optimizers", "autoencoder_loss", "train_anomaly", "load_anomaly_model", "anomaly_heatmaps",
    "transform_boxes", "PUBLISHED_ANOMALY_AUROC", "anomaly_grid_names", "anomaly_grid_recipes",
    "anomaly_grid_seeds", "run_anomaly_grid", "anomaly_results_table", "seed_summary", "published_comparison",
    "anomaly_findings_table", "best_run", "best_run_heatmaps",
    # anomaly detection: plots
    "plot_mask_iou", "plot_anomaly_table", "plot_gan_samples", "plot_reconstructions", "plot_preprocessing",
    # phantom: a synthetic MURA, with its truth
    "PHANTOM_FINDINGS_CSV", "PHANTOM_TRUTH_CSV", "PHANTOM_MANIFEST", "PHANTOM_VERSION", "PHANTOM_WIDE_MARGIN_SHARE",
    "PHANTOM_MOTTLE_SHARE",
    "PHANTOM_POSES", "PHANTOM_POLARITIES", "PHANTOM_FINDING_MIX", "PHANTOM_FINDINGS", "PHANTOM_MADE_BY",
    "make_phantom_mura", "ensure_phantom",
    "load_phantom_findings", "load_phantom_truth", "PHANTOM_VIEW_KINDS", "phantom_hand_mask",
    "phantom_boxes",
    # learning controls
    "permuted_labels_copy", "CAM_MIN_HARDWARE_HITS", "cam_hardware_hits", "COLLAPSED_IQR",
    "probability_spread", "probabilities_collapsed", "learning_verdict", "SUPERVISED_CONTROL",
    "supervised_control", "UNSUPERVISED_CONTROL", "unsupervised_control",
    # command line: python -m mura_helpers
    "main",
]

# ---------------------------------------------------------------- data: MURA layout, CSVs, validation; data sources

BODY_PARTS = (
    "XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST",
)
SPLITS = ("train", "valid")
MURA_DIRNAME = "MURA-v1.1"
# The embedded phantom's patients by default (v7; 240 before): its test split (15%, 150 patients) is about real
# XR_HAND's validation split (159 patients, 167 studies), its training split about two thirds of real XR_HAND's
# 5,543 training views. 240 patients left 14 abnormal test studies, too few for an AUROC's interval to say much.
# Measured on CPU (docs/data-and-phantom.md, learnability; DenseNet-121 from scratch, 64 px, 30 epochs): lesions
# were learned from about 2,000 training views on a phantom without the hard views, not from 200; on this
# default, hard views in, hardware is learned and fractures and lesions are not
PHANTOM_PATIENTS = 1000
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# folder names, matched whole (fullmatch: "$" would let a trailing newline through, and a copy of a patient named
# "patient00003\n" would become a second patient) and in ASCII digits
_STUDY_DIR_RE = re.compile(r"study([0-9]+)_(positive|negative)")
_PATIENT_DIR_RE = re.compile(r"patient[0-9]+")
_LABEL_OF_SUFFIX = {"positive": 1, "negative": 0}
_MIN_VIEW_SIDE = 32  # px: a view's shorter side; a smaller "view" holds no radiograph (MURA's are hundreds of px)
_MAX_VIEW_ASPECT = 10  # a view's longer side over its shorter: MURA's hand views stay under 3:1; at 1x5000 or
# 100x20000 the preprocessing's square holds a line of pixels
_VIEW_PERCENTILES = (0.5, 99.5)  # a view's robust grey range: 16-bit views are windowed on it (a hot pixel stays out)
_MIN_VIEW_CONTRAST = 16  # grey levels an 8-bit view's robust range must span; below: blank or washed out (the
# phantom's views span 40 or more, a 16-bit view squeezed by one hot pixel 5)
_GET_MURA_HELP = (
    "Get MURA v1.1 from https://stanfordmlgroup.github.io/competitions/mura/ (free registration), "
    "or the hand subset used by the reference report from Kaggle "
    "(kagglehub.dataset_download('bogomililiev2308/mura-hand-xray')), and point data_dir at the "
    "MURA-v1.1 folder or any folder above it. Without the data, use the phantom: "
    "make_phantom_mura('data/phantom')."
)


class MuraDataError(ValueError):
    """Every data problem this module detects: a bad path, layout, CSV row or image file."""


@dataclass(frozen=True)
class _DataProblem:
    """One problem found while reading the dataset: the file, what is wrong, and what was done."""
    path: str
    problem: str
    detail: str = ""


def _subfolders(folder: Path, unreadable: list[str] | None = None) -> list[Path]:
    """The visible subfolders of `folder`, sorted; [] for a folder that cannot be read (noted in `unreadable`)."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:  # no permission, a broken mount: skip it rather than fail beside a readable dataset
        if unreadable is not None:
            unreadable.append(f"{folder} ({e.strerror or type(e).__name__})")
        return []


def _looks_like_mura_root(path: Path, unreadable: list[str] | None = None) -> bool:
    """True when `path` holds MURA's split folders with body-part folders, or its official CSVs."""
    try:
        if any((path / f"{split}_labeled_studies.csv").is_file() for split in SPLITS):
            return True
        splits = [path / split for split in SPLITS if (path / split).is_dir()]
    except OSError as e:
        if unreadable is not None:
            unreadable.append(f"{path} ({e.strerror or type(e).__name__})")
        return False
    return any(p.name.startswith("XR_") for split in splits for p in _subfolders(split, unreadable))


def find_mura_root(path: str | os.PathLike, max_depth: int = 6) -> Path:
    """Return the MURA-v1.1 folder given it, its parent, or a download folder holding it below (folders that
    cannot be read are skipped, and named if nothing is found)."""
    if not str(path).strip():
        raise MuraDataError(f"data_dir is an empty path ({str(path)!r}): give the MURA-v1.1 folder or a folder "
                            f"above it, or None for the phantom")
    path = Path(path).expanduser()
    if not path.exists():
        raise MuraDataError(f"{path}: no such folder. {_GET_MURA_HELP}")
    if not path.is_dir():
        raise MuraDataError(f"{path}: is a file, not a dataset folder. {_GET_MURA_HELP}")
    unreadable: list[str] = []
    if _looks_like_mura_root(path, unreadable):
        return path
    queue = [(path, 0)]
    while queue:  # breadth first, so the shallowest match wins; MURA-v1.1 by name before other matches
        folder, depth = queue.pop(0)
        children = _subfolders(folder, unreadable)
        for child in sorted(children, key=lambda p: p.name != MURA_DIRNAME):
            if _looks_like_mura_root(child, unreadable):
                return child
        if depth + 1 < max_depth:
            queue.extend((child, depth + 1) for child in children)
    skipped = f" Skipped {len(unreadable)} unreadable folder(s): {', '.join(unreadable[:5])}." if unreadable else ""
    raise MuraDataError(
        f"{path}: no MURA dataset found here or up to {max_depth} folders below (looked for a folder holding "
        f"train/ or valid/ with XR_* body-part folders, or train_labeled_studies.csv).{skipped} {_GET_MURA_HELP}"
    )


def _body_parts(root: Path, body_part: str | Sequence[str] | None) -> list[str]:
    """Normalise the body_part argument: one name, several, or None/'all' for every part present."""
    if body_part is None or (isinstance(body_part, str) and body_part.lower() == "all"):
        present = {p.name for s in SPLITS if (root / s).is_dir() for p in (root / s).iterdir() if p.is_dir()}
        return sorted(present & set(BODY_PARTS)) or list(BODY_PARTS)
    parts = [body_part] if isinstance(body_part, str) else list(body_part)
    unknown = [p for p in parts if p not in BODY_PARTS]
    if unknown:
        raise MuraDataError(f"unknown body part(s) {unknown}: choose from {list(BODY_PARTS)} or 'all'")
    return parts


def _relative_key(path: str) -> tuple[str, ...]:
    """Key a CSV path by its components from the split folder on (tolerates a renamed top folder)."""
    parts = Path(path.strip().rstrip("/")).parts
    for i, part in enumerate(parts):
        if part in SPLITS:
            return tuple(parts[i:])
    return tuple(parts)


def _read_official_csvs(root: Path, split: str) -> tuple[pd.DataFrame, list[str]] | None:
    """Read `{split}_labeled_studies.csv` and `{split}_image_paths.csv`, checking their format."""
    studies_csv = root / f"{split}_labeled_studies.csv"
    images_csv = root / f"{split}_image_paths.csv"
    if not studies_csv.is_file() and not images_csv.is_file():
        return None
    for f in (studies_csv, images_csv):
        if not f.is_file():
            raise MuraDataError(f"{f}: missing, while its companion CSV exists; restore it or remove both")
    rows = []
    for n, line in enumerate(_csv_lines(studies_csv), 1):
        if not line.strip():
            continue
        fields = line.rsplit(",", 1)
        if len(fields) != 2 or fields[1].strip() not in ("0", "1"):
            raise MuraDataError(f"{studies_csv}, line {n}: expected 'study_path/,label' (label 0 or 1), got {line!r}")
        rows.append((fields[0].strip(), int(fields[1])))
    images = [ln.strip() for ln in _csv_lines(images_csv) if ln.strip()]
    return pd.DataFrame(rows, columns=["csv_study_path", "csv_label"]), images


def _csv_lines(path: Path) -> list[str]:
    """The lines of an official CSV, which must be UTF-8 text; else one error naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise MuraDataError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                            f"the official CSVs are UTF-8: re-save it as UTF-8 or restore the original") from None


def _natural_image_order(path: Path) -> tuple:
    """Sort image1, image2, ..., image10 by number rather than as text."""
    m = re.search(r"(\d+)", path.stem)
    return (int(m.group(1)) if m else math.inf, path.name)


def _shape_problem(width: int, height: int) -> str | None:
    """What is wrong with a view's shape (a line of pixels, a sliver, a dot), or None."""
    if min(width, height) >= _MIN_VIEW_SIDE and max(width, height) <= _MAX_VIEW_ASPECT * min(width, height):
        return None
    return (f"degenerate shape {width} x {height} px (width x height): a view needs sides of {_MIN_VIEW_SIDE} px or "
            f"more, at most {_MAX_VIEW_ASPECT}:1")


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    """The _VIEW_PERCENTILES of an array of grey values (8- and 16-bit ones from their histogram: fast on big views)."""
    if values.dtype.kind in "ui" and values.size and values.min() >= 0 and values.max() < 2**16:
        cdf = np.cumsum(np.bincount(values.ravel())) / values.size
        return tuple(float(np.searchsorted(cdf, q / 100)) for q in _VIEW_PERCENTILES)
    return tuple(float(v) for v in np.percentile(values, _VIEW_PERCENTILES))


def _contrast_problem(gray: np.ndarray) -> str | None:
    """What is wrong with an 8-bit view that shows nothing (blank, constant, washed out), or None."""
    if gray.min() == gray.max():
        return f"no contrast: every pixel is {gray.flat[0]} (a blank view)"
    lo, hi = _robust_range(gray)
    if hi - lo >= _MIN_VIEW_CONTRAST:
        return None
    share = _VIEW_PERCENTILES[1] - _VIEW_PERCENTILES[0]
    return (f"no contrast: {share:g}% of its pixels lie within {hi - lo:.0f} grey "
            f"level(s) (a blank or washed-out view; {_MIN_VIEW_CONTRAST} or more expected)")


def _to_grey(im: Image.Image) -> Image.Image:
    """An opened image as 8-bit grey (mode L): luma for colour, and 16/32-bit windowed on _VIEW_PERCENTILES."""
    if im.mode == "L":
        return im.copy()
    if im.mode == "LA":
        return im.getchannel("L")
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        lo, hi = _robust_range(a)
        if hi <= lo:  # most pixels share one value: min..max, which _contrast_problem then reports
            lo, hi = float(a.min()), float(a.max())
        scaled = np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255) if hi > lo else np.zeros(a.shape)
        return Image.fromarray(np.round(scaled).astype(np.uint8))
    if im.mode in ("RGBA", "PA"):
        return im.convert("RGB").convert("L")
    return im.convert("L")


def _decode_view(path: Path) -> tuple[Image.Image | None, str | None]:
    """(the view decoded in full, as 8-bit grey, None), or (None, what is wrong with the file or its shape)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None, _check_image_file(path)
    im = None
    try:
        im = Image.open(path)
        im.load()
    except Exception as e:  # PIL raises several types for corrupt data
        if im is not None:
            im.close()
        return None, f"unreadable or truncated image ({type(e).__name__}: {e})"
    with im:
        problem = _shape_problem(*im.size)
        return (None, problem) if problem else (_to_grey(im), None)


def _check_image_file(path: str | os.PathLike, full_decode: bool = False) -> str | None:
    """Return None for a readable image of a view's shape, else a short description of what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        return "missing file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    if full_decode:
        return _decode_view(path)[1]
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # checks the structure and PNG chunk CRCs without a full decode
    except Exception as e:  # PIL raises several types for corrupt data
        return f"unreadable or truncated image ({type(e).__name__}: {e})"
    return _shape_problem(*size)


def _decodes(path: Path) -> str | None:
    """_check_image_file with a full decode, done once per file version (path, size, mtime) in a process."""
    try:
        st = path.stat()
    except OSError:
        return _check_image_file(path)
    return _decode_check(str(path), st.st_size, st.st_mtime_ns)


@functools.cache
def _decode_check(path: str, size: int, mtime_ns: int) -> str | None:
    """The memoised full-decode check of one file version: readable, of a view's shape, with contrast."""
    image, problem = _decode_view(Path(path))
    return problem or _contrast_problem(np.asarray(image))


def load_studies(
    data_dir: str | os.PathLike,
    split: str,
    body_part: str | Sequence[str] | None = "XR_HAND",
    on_bad: str = "raise",
    verify_images: bool = True,
) -> pd.DataFrame:
    """Return one row per study of `split`, from the official CSVs when present, checked against the folders.

    Columns: split, body_part, patient, study, study_path (the official relative path, with a trailing
    slash), study_dir (absolute), label (0/1), n_views, image_paths (list of absolute paths).
    Problems (bad folder names, stray/empty/truncated files, views of a degenerate shape or without contrast, CSV
    vs folder disagreements) raise one MuraDataError listing each file, or with on_bad="skip" the affected
    images/studies are dropped, counted, warned about and listed by `data_problems(df)`.
    """
    if split not in SPLITS:
        raise MuraDataError(f"split must be one of {SPLITS}, got {split!r}")
    if on_bad not in ("raise", "skip"):
        raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
    root = find_mura_root(data_dir)
    parts = _body_parts(root, body_part)
    problems: list[_DataProblem] = []

    found = _walk_studies(root, split, parts, problems)  # 1. the folders: what exists on disk
    _reconcile_with_csvs(root, split, parts, found, problems)  # 2. the official CSVs, when present
    _check_study_images(found, verify_images, problems)  # 3. every image file
    _report_problems(problems, on_bad, f"{root} ({split}, {', '.join(parts)})")
    rows = [
        {
            "split": key[0], "body_part": key[1], "patient": key[2], "study": key[3],
            "study_path": "/".join((root.name, *key)) + "/", "study_dir": str(info["study_dir"]),
            "label": info["label"], "n_views": len(info["images"]),
            "image_paths": [str(p) for p in info["images"]],
        }
        for key, info in sorted(found.items())
        if info["images"]
    ]
    columns = ["split", "body_part", "patient", "study", "study_path", "study_dir", "label", "n_views", "image_paths"]
    df = pd.DataFrame(rows, columns=columns)
    df.attrs["root"] = str(root)
    df.attrs["problems"] = tuple(problems)
    return df


def _walk_studies(root: Path, split: str, parts: Sequence[str], problems: list[_DataProblem]) -> dict:
    """The study folders of `split` on disk (the ground truth of what exists), keyed (split, part, patient, study),
    each {study_dir, label, images}; bad folder names and stray files are added to `problems`."""
    found: dict[tuple[str, ...], dict] = {}
    for part in parts:
        part_dir = root / split / part
        if not part_dir.is_dir():
            continue
        for patient_dir in sorted(part_dir.iterdir()):
            if not patient_dir.is_dir():
                problems.append(_DataProblem(str(patient_dir), "stray file", "a file where patient folders belong"))
                continue
            if not _PATIENT_DIR_RE.fullmatch(patient_dir.name):
                problems.append(_DataProblem(str(patient_dir), "bad folder name", "expected patientNNNNN"))
                continue
            for study_dir in sorted(patient_dir.iterdir()):
                if not study_dir.is_dir():
                    problems.append(_DataProblem(str(study_dir), "stray file", "a file where study folders belong"))
                    continue
                m = _STUDY_DIR_RE.fullmatch(study_dir.name)
                if not m:
                    problems.append(_DataProblem(
                        str(study_dir), "bad folder name", "expected studyN_positive or studyN_negative"))
                    continue
                images = []
                for f in sorted(study_dir.iterdir(), key=_natural_image_order):
                    if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES and not f.name.startswith("."):
                        images.append(f)
                    else:
                        hidden = f.name.startswith(".")
                        problems.append(_DataProblem(str(f), "stray file", "a hidden file (macOS's ._*, .DS_Store)"
                                                    if hidden else "not a .png/.jpg image"))
                found[(split, part, patient_dir.name, study_dir.name)] = {
                    "study_dir": study_dir, "label": _LABEL_OF_SUFFIX[m.group(2)], "images": images,
                }
    if not found and not any((root / split / p).is_dir() for p in parts):
        raise MuraDataError(f"{root / split}: no {', '.join(parts)} folder for split {split!r}. {_GET_MURA_HELP}")
    return found


def _reconcile_with_csvs(root: Path, split: str, parts: Sequence[str], found: dict,
                         problems: list[_DataProblem]) -> None:
    """Check the walked studies against the official CSVs, when present: a study or file on one side only, or a
    label that disagrees with its folder's name, is a problem; `found` keeps only what both agree on."""
    csvs = _read_official_csvs(root, split)
    if csvs is None:
        return
    csv_studies, csv_images = csvs
    csv_images_by_study: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for p in csv_images:
        key = _relative_key(p)
        if len(key) >= 5 and key[1] in parts:
            csv_images_by_study.setdefault(key[:4], []).append(key)
    listed = set()
    for row in csv_studies.itertuples(index=False):
        key = _relative_key(row.csv_study_path)
        if len(key) != 4 or key[1] not in parts:
            continue
        listed.add(key)
        where = str(root.joinpath(*key))
        m = _STUDY_DIR_RE.fullmatch(key[3])
        if m and _LABEL_OF_SUFFIX[m.group(2)] != row.csv_label:
            problems.append(_DataProblem(
                where, "label mismatch", f"CSV label {row.csv_label} but folder suffix '{m.group(2)}'"))
            found.pop(key, None)
            continue
        if key not in found:
            problems.append(_DataProblem(where, "missing study", "listed in the CSV but not on disk"))
            continue
        on_disk = {img.name for img in found[key]["images"]}
        in_csv = {k[4] for k in csv_images_by_study.get(key, [])}
        for name in sorted(in_csv - on_disk):
            problems.append(_DataProblem(str(root.joinpath(*key, name)), "missing file", "listed in the CSV"))
        for name in sorted(on_disk - in_csv):
            problems.append(_DataProblem(str(root.joinpath(*key, name)), "unlisted image", "on disk, in no CSV"))
        found[key]["images"] = [img for img in found[key]["images"] if img.name in in_csv]
    for key in sorted(set(found) - listed):
        problems.append(_DataProblem(str(found[key]["study_dir"]), "unlisted study", "on disk, in no CSV"))
        found.pop(key)


def _check_study_images(found: dict, verify_images: bool, problems: list[_DataProblem]) -> None:
    """Decode every image file in full (a corrupt data stream can carry valid checksums) and drop the unusable ones
    from `found`, adding each, and each study left empty, to `problems`."""
    for info in found.values():
        good = []
        for img in info["images"]:
            issue = _decodes(img) if verify_images else None
            if issue:
                problems.append(_DataProblem(str(img), "bad image", issue))
            else:
                good.append(img)
        info["images"] = good
        if not good:
            problems.append(_DataProblem(str(info["study_dir"]), "empty study", "no readable image in the folder"))


def data_problems(studies: pd.DataFrame) -> pd.DataFrame:
    """Return the problems found (and skipped) while loading `studies`, one row per file."""
    return pd.DataFrame([p.__dict__ for p in studies.attrs.get("problems", ())], columns=["path", "problem", "detail"])


def _report_problems(problems: list[_DataProblem], on_bad: str, where: str, shown: int = 20) -> None:
    """Raise one MuraDataError naming every bad file, or warn with counts when skipping."""
    if not problems:
        return
    counts = pd.Series([p.problem for p in problems]).value_counts()
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    lines = [f"  {p.path}: {p.problem} ({p.detail})" for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    if on_bad == "raise":
        raise MuraDataError(
            f"{where}: {len(problems)} data problem(s): {summary}\n" + "\n".join(lines)
            + "\nFix these files, or pass on_bad='skip' to leave them out (they are then counted and listed)."
        )
    warnings.warn(f"{where}: skipped {len(problems)} problem(s): {summary}\n" + "\n".join(lines), stacklevel=3)


def load_all_studies(data_dir, body_part="XR_HAND", on_bad="raise", verify_images=True) -> pd.DataFrame:
    """Return the train and valid study tables stacked into one DataFrame."""
    tables = [load_studies(data_dir, s, body_part, on_bad, verify_images) for s in SPLITS]
    problems = sum((t.attrs["problems"] for t in tables), ())
    for t in tables:
        t.attrs.clear()
    df = pd.concat(tables, ignore_index=True)
    df.attrs.update(root=str(find_mura_root(data_dir)), problems=problems)
    return df


def studies_to_images(studies: pd.DataFrame) -> pd.DataFrame:
    """Return one row per image (view) of the given studies, with the study's columns alongside."""
    images = studies.explode("image_paths", ignore_index=True).rename(columns={"image_paths": "image_path"})
    images["view"] = images.groupby("study_path").cumcount() + 1
    return images


def load_image(path: str | os.PathLike) -> Image.Image:
    """Return the image at `path` as an 8-bit single-channel (mode L) PIL image, whatever its PNG mode.

    RGB/RGBA/P/CMYK are converted with the ITU-R 601 luma weights, LA keeps its luminance, and 16-bit or
    32-bit images (I;16, I, F) are windowed linearly from their 0.5th to their 99.5th percentile (_VIEW_PERCENTILES)
    onto 0..255, so that a few hot or dead pixels do not squeeze the view into a few grey levels. A view of a
    degenerate shape (a side under _MIN_VIEW_SIDE, over _MAX_VIEW_ASPECT:1) is an error naming the file.
    """
    image, problem = _decode_view(Path(path))  # decoded once: the check is the load itself
    if problem:
        raise MuraDataError(f"{path}: {problem}")
    return image


_KAGGLE_PREFIX = "kaggle:"  # data_dir="kaggle:OWNER/DATASET" downloads through kagglehub
_KAGGLE_HELP = (
    "On Kaggle: attach the dataset to the notebook (Add Input), and kagglehub reads it from /kaggle/input without a "
    "download. In Colab: add the secrets KAGGLE_USERNAME and KAGGLE_KEY (the key icon in the left bar; the values are "
    "in the kaggle.json of kaggle.com > Settings > API > Create New Token) and give this notebook access to them. "
    "Elsewhere: set the environment variables KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json in ~/.kaggle/."
)


def _kaggle_credentials_from_colab() -> None:
    """In Colab, copy the KAGGLE_USERNAME/KAGGLE_KEY secrets into the environment (where kagglehub looks)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return
    try:
        from google.colab import userdata
    except ImportError:  # not in Colab
        return
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        try:
            value = userdata.get(name)
        except Exception:  # secret missing, or this notebook not granted access to it
            value = None
        if value:
            os.environ[name] = value


def _download_kaggle_dataset(handle: str) -> Path:
    """Download a Kaggle dataset ('OWNER/DATASET') through kagglehub (cached; read in place when attached on Kaggle)
    and return its local folder."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+(/versions/\d+)?", handle):
        raise MuraDataError(f"{_KAGGLE_PREFIX}{handle}: not a Kaggle dataset handle; write it as "
                            f"'{_KAGGLE_PREFIX}OWNER/DATASET', e.g. '{_KAGGLE_PREFIX}bogomililiev2308/mura-hand-xray'")
    try:
        import kagglehub
    except ImportError as e:
        raise MuraDataError(f"{_KAGGLE_PREFIX}{handle}: needs the kagglehub package (preinstalled in Colab and on "
                            f"Kaggle; elsewhere: pip install kagglehub)") from e
    _kaggle_credentials_from_colab()
    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as e:  # no credentials, no network, no such dataset, terms not accepted
        raise MuraDataError(f"{_KAGGLE_PREFIX}{handle}: the download failed ({type(e).__name__}: {e}). "
                            f"{_KAGGLE_HELP}") from e


DRIVE_DIR = Path("/content/drive")  # where Colab mounts Google Drive (the setup cell's USE_DRIVE)
LOCAL_DATA_DIR = Path(__file__).absolute().parent / "data"  # local copies go here (in Colab: on the VM's disk)
LOCAL_COPY_MARK = ".mura_local_copy.json"  # in a local copy: what it was copied from, written when complete


def _in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def _copy_source(source: str | os.PathLike) -> tuple[Path, bool]:
    """What prepare_local_copy copies, checked: MURA's zip, or the MURA-v1.1 in a folder; and whether it is a zip."""
    source = Path(source).expanduser().absolute()
    if not source.exists():
        mount = " Drive is not mounted: tick USE_DRIVE in the setup cell." if (
            source.is_relative_to(DRIVE_DIR) and not (DRIVE_DIR / "MyDrive").is_dir()) else ""
        raise MuraDataError(f"{source}: no such file or folder.{mount} {_GET_MURA_HELP}")
    is_zip = source.is_file()
    if is_zip and not zipfile.is_zipfile(source):
        raise MuraDataError(f"{source}: not a zip archive; give MURA's zip, its folder, or a folder above it")
    return (source if is_zip else find_mura_root(source)), is_zip  # a folder above MURA: only MURA is copied


def _copy_files(source: Path, is_zip: bool, tmp: Path, dest: Path, progress: bool) -> None:
    """Extract the zip, or copy the folder, into `tmp` with a progress bar of bytes, keeping the files' times;
    refused before any copying when the disk under `dest` lacks the room."""
    with contextlib.ExitStack() as stack:
        archive = stack.enter_context(zipfile.ZipFile(source)) if is_zip else None
        items = ([(m, m.file_size) for m in archive.infolist() if not m.is_dir()] if is_zip else
                 [(p, p.stat().st_size) for p in sorted(source.rglob("*")) if p.is_file()])
        need, free = sum(n for _, n in items), shutil.disk_usage(_existing_parent(dest)).free
        if need > free:
            raise MuraDataError(f"{source}: {need / 1e9:.1f} GB to copy but {free / 1e9:.1f} GB free under "
                                f"{_existing_parent(dest)}; free some space or give another dest")
        bar = stack.enter_context(tqdm(total=need, unit="B", unit_scale=True, desc=f"local copy of {source.name}",
                                       disable=not progress))
        for item, size in items:
            if is_zip:
                when = time.mktime((*item.date_time, 0, 0, -1))  # the zip's local time, as unzip sets it
                os.utime(archive.extract(item, tmp), (when, when))
            else:
                target = tmp / item.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, target)  # keeps the modification time
            bar.update(size)


def prepare_local_copy(source: str | os.PathLike, dest: str | os.PathLike | None = None,
                       progress: bool = True) -> Path:
    """Copy a MURA folder, or extract a MURA zip, to local disk once and return the MURA root in the copy.

    What Colab users do with data on Drive: reading 40,000 small files through Drive's mount is slow, and is done
    again by every pass over them, so the data is copied to the VM's own disk once per runtime (a progress bar of
    bytes) and read there. Of a folder, only the MURA-v1.1 found in it is copied. `dest`: LOCAL_DATA_DIR/<that
    folder's or the zip's name>. A copy is reused while its source is the same (a zip's also by size and
    modification time); extracted files keep the zip's times, so the caches' stamps stay the same across runtimes.
    resolve_data_dir calls this for a zip, and in Colab for a folder on Drive.
    """
    source, is_zip = _copy_source(source)
    st = source.stat()
    origin = {"source": str(source), **({"size": st.st_size, "mtime_ns": st.st_mtime_ns} if is_zip else {})}
    dest = Path(dest) if dest is not None else LOCAL_DATA_DIR / (source.stem if is_zip else source.name)
    mark = dest / LOCAL_COPY_MARK
    with contextlib.suppress(OSError, ValueError):
        if json.loads(mark.read_text()) == origin:
            return find_mura_root(dest)
    if dest.exists() and not mark.is_file():
        raise MuraDataError(f"{dest}: exists and is not a copy made by prepare_local_copy; give another dest or "
                            f"remove it")
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    for stale in dest.parent.glob(f".{dest.name}.tmp*"):  # left by an interrupted copy (or our own last try)
        pid = re.fullmatch(rf"\.{re.escape(dest.name)}\.tmp(\d+)", stale.name)
        if pid and (stale == tmp or not _pid_alive(int(pid.group(1)))):
            shutil.rmtree(stale, ignore_errors=True)
    _copy_files(source, is_zip, tmp, dest, progress)
    _write_json_atomic(origin, tmp / LOCAL_COPY_MARK)
    if dest.exists():  # an older copy of ours (its mark said so)
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return find_mura_root(dest)


def _existing_parent(path: Path) -> Path:
    """The path itself or its nearest parent that exists (where a disk's free space can be read)."""
    return next(p for p in (path, *path.parents) if p.exists())


def resolve_data_dir(data_dir: str | os.PathLike | None, phantom_root: str | os.PathLike = "data/phantom",
                     **phantom_kwargs) -> Path:
    """Return the MURA root to use: `data_dir` when given (a folder, a MURA zip, or 'kaggle:OWNER/DATASET'; an
    empty one is an error), else the embedded phantom (made if needed). A zip, and in Colab a folder on Drive, is
    read from a local copy (prepare_local_copy)."""
    if data_dir is not None and str(data_dir).startswith(_KAGGLE_PREFIX):
        return find_mura_root(_download_kaggle_dataset(str(data_dir)[len(_KAGGLE_PREFIX):]))
    if data_dir is not None and str(data_dir).strip() and (
            str(data_dir).lower().endswith(".zip")
            or _in_colab() and Path(data_dir).expanduser().absolute().is_relative_to(DRIVE_DIR)):
        return prepare_local_copy(data_dir)
    if data_dir is not None:
        return find_mura_root(data_dir)
    return ensure_phantom(phantom_root, **phantom_kwargs)


def config_data_root(cfg, data_dir: str | os.PathLike | None = None) -> Path:
    """The MURA root a TrainConfig or AnomalyConfig reads: `data_dir`, else its own, else its phantom (made if
    needed)."""
    return resolve_data_dir(cfg.data_dir if data_dir is None else data_dir, cfg.phantom_dir,
                            n_patients=cfg.phantom_patients, image_size=cfg.phantom_image_size, seed=cfg.phantom_seed)


# ---------------------------------------------------------------- images & cache: decode and resize once, uint8 on disk

_CACHE_VERSION = 2  # in every cache's key (both paths): bump when decoding changes (2: 16-bit views windowed)
_RESIZE_MODES = ("squash", "pad")


def _files_stamp(paths: Sequence[str], *settings, content: bool = False) -> str:
    """A key for a cache: the settings and every file's path, size and modification time (one stat a file: ~0.2 s
    for 40,000 files on a local disk), or with content=True its path and the sha256 of its bytes (every file read:
    ~6 s for 40,000 MURA-sized files already in memory, far longer through Drive)."""
    stamp = hashlib.sha1(json.dumps([_CACHE_VERSION, *settings]).encode())
    for p in paths:
        if content:
            key = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        else:
            st = os.stat(p)
            key = f"{st.st_size}|{st.st_mtime_ns}"
        stamp.update(f"{p}|{key}\n".encode())
    return stamp.hexdigest()[:16]


def _cache_path(cache_dir: str | os.PathLike, prefix: str, paths: Sequence[str], *settings, suffix: str = "") -> Path:
    """Where the cache of these files and settings lives. Found on every call by the files' names, sizes and
    modification times (no file is read); when those are new, by their content (read once, as a build would), so
    files copied or extracted again with new times find the cache their bytes already have. A small
    <prefix>_<stamp>.key file holds the cache's name for the next call. A file changed in place keeping its size
    and time (rare: tools that change content also change the time) keeps its old cache: delete the cache then."""
    folder = Path(cache_dir)
    key = folder / f"{prefix}_{_files_stamp(paths, *settings)}.key"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        name = key.read_text()
        if name and (folder / name).exists():
            return folder / name
    target = folder / f"{prefix}_{_files_stamp(paths, *settings, content=True)}{suffix}"
    with contextlib.suppress(OSError):  # a read-only cache folder: found by content each time
        folder.mkdir(parents=True, exist_ok=True)
        key.write_text(target.name)
    return target


def _worker_context():
    """How worker processes start (_run_tasks' pools, DataLoader workers): forked by a clean server process
    ("forkserver", Python 3.14's default on Linux), not by fork from this process, which may deadlock when this
    process runs threads, as a Jupyter kernel does (Python 3.12+ warns); "spawn" where there is no forkserver
    (Windows). The server imports this module once, so its workers start with it loaded."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([Path(__file__).stem])
    return context


def _run_tasks(func, tasks: list, desc: str, progress: bool = True, workers: int | None = None,
               sizes: Sequence[int] | None = None) -> list:
    """Run func over tasks in a process pool (inline for one worker or one task), with a progress bar of items."""
    sizes = sizes or [1] * len(tasks)
    workers = workers or min(os.cpu_count() or 1, 8)
    results = []
    with tqdm(total=sum(sizes), desc=desc, disable=not progress) as bar:
        if workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(workers, mp_context=_worker_context()) as pool:
                for result, n in zip(pool.map(func, tasks), sizes):
                    results.append(result)
                    bar.update(n)
        else:
            for task, n in zip(tasks, sizes):
                results.append(func(task))
                bar.update(n)
    return results


_NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a full quota, a file-size limit


def _megabytes(n: float, up: bool = True) -> str:
    """A byte count in MB with one decimal, rounded up (space needed) or down (space free)."""
    return f"{(math.ceil if up else math.floor)(n / 1e5) / 10:,.1f} MB"


def _free_bytes(where: Path) -> int:
    """The free space of the disk that holds `where` (or would: its nearest existing folder)."""
    folder = Path(where)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _no_room(where: Path, need: int, then: str, cause: OSError | None = None) -> OSError:
    """The one error a write that finds no room raises (OSError ENOSPC): what it needs where, what is free there."""
    what = ("file too large for this process's file-size limit (ulimit -f)" if cause is not None
            and cause.errno == errno.EFBIG else "disk full")
    free = _megabytes(_free_bytes(where), up=False)
    return OSError(errno.ENOSPC, f"{what}: need {_megabytes(need)} at {where} ({free} free there): {then}")


@contextlib.contextmanager
def _room_for(where: Path, need: int, then: str):
    """Check that `need` bytes fit on the disk at `where` before writing them there, and turn a write that finds no
    room anyway (another writer filled the disk, a quota, a file-size limit) into the same OSError; the caller
    removes what it wrote."""
    if _free_bytes(where) < need:
        raise _no_room(where, need, then)
    try:
        yield
    except OSError as e:
        if e.errno in _NO_ROOM_ERRNOS:
            raise _no_room(where, need, then, e) from e
        raise


def _symlink_loop(path: str | os.PathLike) -> bool:
    """Whether `path`, or a folder on the way to it, is a symbolic link that leads back to itself."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _make_folder(path: str | os.PathLike) -> Path:
    """mkdir -p, with a symlink loop named as one (mkdir itself says only "File exists")."""
    path = Path(path)
    if _symlink_loop(path):
        raise ConfigError(f"{path}: a symlink loop (a link that leads back to itself): remove the link or choose "
                          f"another folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_file_atomic(data: bytes | memoryview, path: Path, then: str = "free some space and run again") -> None:
    """Write `data` to `path` through a temporary file, flushed to disk, and a rename: a crash never leaves a
    half-written file, and a full disk is said (the space needed and the path), leaving `path` as it was and no
    temporary file."""
    path = Path(path)
    _make_folder(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with _room_for(path, len(data), f"the partial file was removed and {path} keeps its previous content; {then}"):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_CACHE_NO_ROOM = "free some space, or set cache_dir to a disk with room (the partial cache was removed)"


def _new_arrays(arrays: Sequence[tuple[Path, tuple[int, ...], type]], where: Path) -> None:
    """Create .npy files of these (path, shape, dtype) for memory-mapped writing, their disk space reserved first: a
    memory-mapped write that finds the disk full kills the process (SIGBUS, no traceback), so a full disk is said
    here, before any work, naming `where` and the space needed."""
    need = sum(128 + math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in arrays)  # 128: the header
    with _room_for(where, need, _CACHE_NO_ROOM):
        for path, shape, dtype in arrays:
            array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            size = array.offset + array.nbytes
            del array
            if size and hasattr(os, "posix_fallocate"):  # the blocks themselves, not a sparse file
                with open(path, "r+b") as f:
                    try:
                        os.posix_fallocate(f.fileno(), 0, size)
                    except OSError as e:  # a file system without it keeps the free-space check
                        if e.errno in _NO_ROOM_ERRNOS:
                            raise


def _array_file_problem(path: Path, shape: tuple[int, ...], dtype) -> str | None:
    """What is wrong with a cache's .npy file (missing, truncated, grown, not an array of this shape and type)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            found_shape, fortran, found_dtype = readers[version](f)
            offset = f.tell()
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # numpy raises ValueError, KeyError (a version it does not write), EOFError, ...
        return f"not a NumPy array file ({type(e).__name__}: {e})"
    if tuple(found_shape) != tuple(shape) or found_dtype != np.dtype(dtype) or fortran:
        return f"a {found_dtype} array of shape {tuple(found_shape)}, not {np.dtype(dtype)} {tuple(shape)}"
    expected, actual = offset + math.prod(shape) * np.dtype(dtype).itemsize, path.stat().st_size
    return None if actual == expected else f"{actual} bytes where {expected} were written (truncated or appended to)"


def _damaged_cache(arrays: Sequence[tuple[Path, tuple[int, ...], type]]) -> bool:
    """Whether a cache's arrays are damaged, each one found so named in a warning ("cache damaged, rebuilding")."""
    damaged = [(path, problem) for path, shape, dtype in arrays if (problem := _array_file_problem(path, shape, dtype))]
    for path, problem in damaged:
        warnings.warn(f"{path}: cache damaged ({problem}), rebuilding", stacklevel=3)
    return bool(damaged)


def resize_view(image: Image.Image, size: int, mode: str = "squash") -> Image.Image:
    """Resize a grey view to size x size: stretched ('squash', as the report and paper) or letterboxed ('pad')."""
    if mode == "squash":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    if mode != "pad":
        raise ValueError(f"resize mode must be one of {_RESIZE_MODES}, got {mode!r}")
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(image.resize((w, h), Image.Resampling.BILINEAR), ((size - w) // 2, (size - h) // 2))
    return canvas


def upright_view(image: Image.Image) -> Image.Image:
    """The view as a positive (bone brighter than soft tissue and background): a view stored inverted, as some
    radiographs are (8% of the phantom's, white or mid-grey backgrounds), is inverted back (view_inverted)."""
    return Image.fromarray(255 - np.asarray(image)) if view_inverted(np.asarray(image)) else image  # (8-bit negative)


def model_input_view(image: Image.Image, size: int, resize: str = "squash", upright: bool = False) -> Image.Image:
    """A grey view (load_image) as the classifier takes it: made upright (upright_view) when asked, then resized."""
    return resize_view(upright_view(image) if upright else image, size, resize)


@dataclass
class _ImageCache:
    """Views decoded and resized once into a memory-mapped uint8 array (N, size, size) on disk."""
    path: Path
    image_paths: list[str]
    size: int
    resize: str
    upright: bool = False  # views stored inverted were inverted back (upright_view)

    def __post_init__(self):
        self.row_of = {p: i for i, p in enumerate(self.image_paths)}
        self._array = None

    @property
    def array(self) -> np.ndarray:
        """The memory-mapped array, opened on first use (also inside data-loader workers)."""
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """Row numbers of the given image paths."""
        return np.array([self.row_of[p] for p in paths], dtype=np.int64)

    def __getstate__(self):
        return {**self.__dict__, "_array": None}  # workers re-open the memory map


def _cache_chunk(task: tuple) -> int:
    """Decode, convert, make upright (when asked) and resize a chunk of views into the cache file (runs in a worker
    process)."""
    npy, start, paths, size, resize, upright = task
    out = np.load(npy, mmap_mode="r+")
    for i, p in enumerate(paths):
        out[start + i] = np.asarray(model_input_view(load_image(p), size, resize, upright))
    out.flush()
    return len(paths)


def _remove_dead_cache_builds(cache_dir: str | os.PathLike, min_age_s: float = 600) -> None:
    """Remove what a killed cache build left (views_*.tmpPID.npy, .anomaly_*.tmpPID/): its process is gone from this
    machine and it was not written to for `min_age_s` (a build on another machine sharing the folder goes on)."""
    folder = Path(cache_dir)
    for tmp in folder.glob("*.tmp*") if folder.is_dir() else ():
        m = re.fullmatch(r"(views_.+\.tmp(\d+)\.npy|\.anomaly_.+\.tmp(\d+))", tmp.name)
        if not m or _pid_alive(int(m.group(2) or m.group(3))) or time.time() - tmp.stat().st_mtime < min_age_s:
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"removed {tmp}, left by an interrupted cache build", stacklevel=3)


def build_image_cache(image_paths: Sequence[str], size: int = 224, cache_dir: str | os.PathLike = "data/cache",
                      resize: str = "squash", workers: int | None = None, progress: bool = True,
                      upright: bool = False) -> _ImageCache:
    """Return the cache of these views at this size, building it once (keyed by paths, file stamps, size, mode and
    `upright`: views stored inverted inverted back, model_input_view); its disk space is reserved first (a full disk
    is said before any work), and a damaged file is rebuilt."""
    if resize not in _RESIZE_MODES:
        raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {resize!r}")
    paths = [str(p) for p in image_paths]
    _remove_dead_cache_builds(cache_dir)
    # (a cache made before the setting existed keeps its key; an upright one is keyed by its polarity test too)
    kept = ("upright", ANOMALY_PIPELINE_VERSION, POLARITY_CENTRE) if upright else ()
    npy = _cache_path(cache_dir, f"views_{size}px_{resize}{'_upright' * upright}", paths, size, resize, *kept,
                      suffix=".npy")
    cache = _ImageCache(npy, paths, size, resize, upright)
    shape = (len(paths), size, size)
    if npy.is_file() and not _damaged_cache([(npy, shape, np.uint8)]):
        return cache
    _make_folder(npy.parent)
    tmp = npy.with_suffix(f".tmp{os.getpid()}.npy")
    tasks = [(str(tmp), i, paths[i:i + 64], size, resize, upright) for i in range(0, len(paths), 64)]
    try:
        _new_arrays([(tmp, shape, np.uint8)], npy)
        _run_tasks(_cache_chunk, tasks, f"caching views at {size}px", progress, workers, [len(t[2]) for t in tasks])
    except BaseException:  # a full disk, an undecodable image (named in the error), an interrupt: no partial file
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, npy)  # complete caches only ever appear under their final name
    return cache


class _CachedViewBatches:
    """A dataset whose items are whole batches: view indices -> (uint8 views, labels, indices, study of each view).

    The study ids are renumbered 0..k-1 within the batch, so the device never has to find them (no sync).
    """

    def __init__(self, cache: _ImageCache, rows: np.ndarray, labels: np.ndarray, studies: np.ndarray):
        self.cache, self.rows = cache, np.asarray(rows)
        self.labels, self.studies = np.asarray(labels, dtype=np.float32), np.asarray(studies)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, batch: list[int]):
        import torch

        batch = np.asarray(batch)
        order = np.argsort(self.rows[batch])  # read the memory map in file order
        views = np.empty((len(batch), 1, self.cache.size, self.cache.size), np.uint8)
        views[order, 0] = self.cache.array[self.rows[batch][order]]
        study_in_batch = np.unique(self.studies[batch], return_inverse=True)[1].reshape(-1)
        return (torch.from_numpy(views), torch.from_numpy(self.labels[batch]), torch.from_numpy(batch),
                torch.from_numpy(study_in_batch))


class _EpochBatches:
    """Batch sampler whose batches are set per epoch (seeded shuffles), so persistent workers can be reused."""
    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def epoch_batches(n: int, batch_size: int, shuffle: bool, seed: int, epoch: int,
                  groups: Sequence[np.ndarray] | None = None, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Split n views (or whole groups of views, e.g. studies) into batches, shuffled by (seed, epoch).

    With world_size processes, every process draws the same order; each global batch of batch_size x world_size
    items is split into world_size near-equal parts and process `rank` gets part `rank`, so every view is in one
    process's batch exactly once an epoch and every process takes as many steps. In a shuffled (training) epoch a
    last batch with a part of one view joins the batch before it (batch norm needs two values a channel); in an
    unshuffled one a part may be empty.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    units = [[i] for i in range(n)] if groups is None else [[int(v) for v in g] for g in groups]
    order = torch.randperm(len(units), generator=generator).tolist() if shuffle else list(range(len(units)))
    step = batch_size * world_size
    chunks = [order[i:i + step] for i in range(0, len(order), step)]

    def parts(chunk: list[int]) -> list[list[int]]:
        return [[v for u in part for v in units[u]] for part in np.array_split(np.asarray(chunk, int), world_size)]

    if shuffle and len(chunks) > 1 and min(len(p) for p in parts(chunks[-1])) < 2:
        last = chunks.pop()
        chunks[-1] = chunks[-1] + last
    return [parts(chunk)[rank] for chunk in chunks]


# ---------------------------------------------------------------- augmentation: on the device, per sample, both paths

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def gpu_augment(views, generator=None, rotation_degrees: float = 0.0, hflip: bool = False,
                scale_range: tuple[float, float] = (1.0, 1.0), vflip: bool = False, p: float = 1.0):
    """Flip, rotate (and zoom) each image of a float batch (B, C, H, W) by its own random draw, in one grid_sample;
    `p`: the probability that a view is rotated, and (separately) zoomed."""
    if not hflip and not vflip and not rotation_degrees and scale_range[0] == scale_range[1] == 1.0:
        return views
    b = views.shape[0]

    def draw():
        return torch.rand(b, generator=generator, device=views.device)
    angle = (draw() * 2 - 1) * math.radians(rotation_degrees)
    if p < 1:
        angle = torch.where(draw() < p, angle, 0.0)
    flip = torch.where(draw() < 0.5, -1.0, 1.0) if hflip else torch.ones(b, device=views.device)
    flip_v = torch.where(draw() < 0.5, -1.0, 1.0) if vflip else torch.ones(b, device=views.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    if tuple(scale_range) != (1.0, 1.0):  # equal ends: a fixed zoom
        zoom = scale_range[0] + (scale_range[1] - scale_range[0]) * draw()
        if p < 1:
            zoom = torch.where(draw() < p, zoom, 1.0)
        cos, sin = cos / zoom, sin / zoom
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos * flip, -sin * flip_v, zero], 1),
                         torch.stack([sin * flip, cos * flip_v, zero], 1)], 1)
    grid = F.affine_grid(theta.to(views.dtype), list(views.shape), align_corners=False)
    return F.grid_sample(views, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.cache
def _imagenet_stats(device: str):
    """ImageNet mean and std as (1, 3, 1, 1) tensors on `device`, made once (no copy per step)."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def prepare_batch(views_uint8, device, train: bool, generator=None, rotation_degrees: float = 10.0,
                  hflip: bool = True, channels_last: bool = True):
    """uint8 (B, 1, H, W) -> augmented, ImageNet-normalised float (B, 3, H, W) on `device`, grey replicated."""
    x = views_uint8.to(device, non_blocking=True).float().div_(255)
    if train:
        x = gpu_augment(x, generator, rotation_degrees, hflip)
    mean, std = _imagenet_stats(str(device))
    x = (x - mean) / std  # broadcasting replicates the grey channel to three
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _augment_views_and_masks(x, m, generator, cfg: AnomalyConfig):
    """The online augmentation, per sample: flips, rotation and scale applied alike to view and mask; intensity;
    rotation, scale and intensity each with probability cfg.augment_p."""
    both = gpu_augment(torch.cat([x, m], 1), generator, cfg.rotation_degrees, cfg.hflip, cfg.scale_range, cfg.vflip,
                       cfg.augment_p)
    x, m = both[:, :1], (both[:, 1:] > 0.5).float()
    lo, hi = cfg.intensity_range
    gain = lo + (hi - lo) * torch.rand(len(x), 1, 1, 1, generator=generator, device=x.device)
    if cfg.augment_p < 1:
        keep = torch.rand(len(x), 1, 1, 1, generator=generator, device=x.device) >= cfg.augment_p
        gain = torch.where(keep, 1.0, gain)
    return (x * gain).clamp(0, 1), m


# ---------------------------------------------------------------- model & loss

def build_model(pretrained: bool = True, arch: str = "densenet169"):
    """torchvision DenseNet (169 by default) with its classifier replaced by one abnormality logit."""
    import torchvision  # here, not at the top: it imports torch._dynamo (2.6 of the 9 s `import mura_helpers` took on
    # a 2-core CPU), as torch's optimizers do when the first is built; processes that build neither skip it: the
    # process pools' servers and workers that cache views, the command line checking a config

    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1 if pretrained else None
    try:
        model = torchvision.models.get_model(arch, weights=weights)
    except Exception as e:  # no network, a proxy, a corrupt download
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"could not load the ImageNet weights of {arch} ({type(e).__name__}: {e}). Either train from scratch "
            f"with pretrained=False, or download {weights.url} and put the file in {hub} "
            f"(set TORCH_HOME to choose another folder)."
        ) from e
    model.classifier = torch.nn.Linear(model.classifier.in_features, 1)
    return model


def class_weights(labels) -> tuple[float, float]:
    """The MURA paper's loss weights (w0, w1) = (|A|, |N|) / (|A| + |N|) from the training views' labels."""
    labels = np.asarray(labels)
    n_abnormal, n_normal = int((labels == 1).sum()), int((labels == 0).sum())
    if n_abnormal == 0 or n_normal == 0:
        raise MuraDataError(f"the training set needs both classes for the weighted loss: {n_abnormal} abnormal, "
                            f"{n_normal} normal views")
    total = n_abnormal + n_normal
    return n_abnormal / total, n_normal / total


def class_weights_by_type(images: pd.DataFrame) -> pd.DataFrame:
    """The paper's weights per study type T, (w_T0, w_T1) = (|A_T|, |N_T|) / (|A_T| + |N_T|), from that type's
    training views; one row per body part (with one body part, the same as class_weights)."""
    rows = []
    for part, labels in images.groupby("body_part", sort=True)["label"]:
        try:
            w0, w1 = class_weights(labels)
        except MuraDataError as e:
            raise MuraDataError(f"{part}: {e}") from e
        rows.append({"body_part": part, "w0": w0, "w1": w1, "abnormal_views": int((labels == 1).sum()),
                     "normal_views": int((labels == 0).sum())})
    return pd.DataFrame(rows).set_index("body_part")


def view_loss_weights(images: pd.DataFrame, table: pd.DataFrame) -> torch.Tensor:
    """Each view's (w0, w1), from its study type's row of `table` (class_weights_by_type): a float tensor (n, 2)."""
    unknown = sorted(set(images["body_part"]) - set(table.index))
    if unknown:
        raise MuraDataError(f"no training views of {unknown}, so no loss weights for them: train on those study "
                            f"types too, or leave them out of body_part")
    return torch.tensor(table.loc[images["body_part"], ["w0", "w1"]].to_numpy(), dtype=torch.float32)


def _batch_weights(weights, index: torch.Tensor):
    """A batch's (w0, w1): the pair itself, or each view's row of a per-view (n, 2) table (view_loss_weights)."""
    if isinstance(weights, torch.Tensor):
        rows = weights[index.to(weights.device, non_blocking=True)]
        return rows[:, 0], rows[:, 1]
    return weights


def weighted_bce_with_logits(logits, targets, w0, w1):
    """Mean of -w1*y*log(p) - w0*(1-y)*log(1-p) with p = sigmoid(logits), computed stably from logits; w0 and w1
    are numbers or each view's weights."""
    weight = w1 * targets + w0 * (1 - targets)
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), weight=weight)


def _study_log_probs(logits, study: torch.Tensor, n_studies: int):
    """Per study (ids 0..n-1), log of the mean view probability and of its complement, stably from view logits."""
    logits = logits.float()
    counts = torch.zeros(n_studies, device=logits.device).index_add_(0, study, torch.ones_like(logits))
    out = []
    for sign in (1.0, -1.0):
        lp = F.logsigmoid(sign * logits)
        peak = torch.full((n_studies,), -math.inf, device=logits.device).scatter_reduce(0, study, lp, "amax")
        sums = torch.zeros(n_studies, device=logits.device).index_add_(0, study, (lp - peak[study]).exp())
        out.append(peak + sums.log() - counts.log())
    return out[0], out[1]


def study_weighted_bce(logits, targets, study: torch.Tensor, n_studies: int, w0, w1):
    """The report's variant: weighted BCE on each study's mean view probability (one term per study); w0 and w1
    are numbers, or each view's weights (a study takes its views')."""
    log_p, log_q = _study_log_probs(logits, study, n_studies)
    def per_study(values):  # a study's label (or weight: one study type a study) from its views'
        return torch.zeros(n_studies, device=logits.device).scatter_reduce(0, study, values.float(), "amax")
    y = per_study(targets)
    if isinstance(w0, torch.Tensor):  # per-view weights (several study types)
        w0, w1 = per_study(w0), per_study(w1)
    return -(w1 * y * log_p + w0 * (1 - y) * log_q).mean()


# ---------------------------------------------------------------- training: settings (validated configs, presets)

SELECT_METRICS = {f"{split}_{metric}": direction for split in ("tune", "valid")
                  for metric, direction in (("loss", "min"), ("auroc", "max"), ("kappa", "max"), ("accuracy", "max"))}
_COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ARCHS = ("densenet121", "densenet161", "densenet169", "densenet201")  # build_model replaces a DenseNet's classifier
_AMP_MODES = ("auto", "fp16", "bf16", "off")
_ON_BAD = ("raise", "skip")
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class ConfigError(ValueError):
    """A setting of the wrong type or out of range, named with its value and what is allowed."""


def _bad_setting(owner: str, name: str, value, allowed: str):
    """Raise the ConfigError naming the setting, its value and what is allowed."""
    raise ConfigError(f"{owner}.{name} = {value!r}: must be {allowed}")


def _bool_setting(owner: str, name: str, value) -> bool:
    """A boolean setting; papermill's strings ('False', 'false', '0', 'true', ...) are read as what they say."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    return _bad_setting(owner, name, value, "True or False (or the strings 'true'/'false', 'yes'/'no', '1'/'0')")


def _number_setting(owner: str, name: str, value, kind: type, lo: float, hi: float, lo_open: bool = False,
                    optional: bool = False):
    """An int or float setting within [lo, hi] (or (lo, hi]); numeric strings (papermill's -r) are converted."""
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    allowed = (f"{'an integer' if kind is int else 'a finite number'} in {'(' if lo_open else '['}{lo}, {hi}]"
               + (" or None" if optional else ""))
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            _bad_setting(owner, name, value, allowed)
    if isinstance(number, (bool, np.bool_)) or not isinstance(number, (int, float, np.integer, np.floating)):
        _bad_setting(owner, name, value, allowed)
    try:
        as_float = float(number)
    except OverflowError:
        as_float = math.inf
    if not math.isfinite(as_float) or (kind is int and not as_float.is_integer()):
        _bad_setting(owner, name, value, allowed)
    number = int(number) if kind is int else as_float
    if number < lo or (lo_open and number == lo) or number > hi:
        _bad_setting(owner, name, value, allowed)
    return number


def _choice_setting(owner: str, name: str, value, allowed: Sequence):
    """A setting that must be one of `allowed`."""
    if isinstance(value, str) and value not in allowed and value.strip() in allowed:
        value = value.strip()
    if value not in allowed:
        raise ConfigError(f"{owner}.{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def _path_setting(owner: str, name: str, value, optional: bool = False) -> str | None:
    """A folder setting as a string; an empty string is refused (it would silently mean the current folder), and so
    is a symlink loop (mkdir would only say "File exists")."""
    if optional and value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        _bad_setting(owner, name, value, "a folder path" + (" or None (the embedded phantom)" if optional else "")
                     + "; an empty string would mean the current folder")
    if _symlink_loop(value):
        _bad_setting(owner, name, value, "a folder, not a symlink loop (a link that leads back to itself)")
    return value


def _names_setting(owner: str, name: str, value, allowed: Sequence[str]) -> tuple[str, ...]:
    """A list of distinct names; one name given as a string ('train', or 'train,valid') is read as a list of them."""
    names = [n for n in re.split(r"[,\s]+", value) if n] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        _bad_setting(owner, name, value, f"a non-empty list of names from {list(allowed)}")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        _bad_setting(owner, name, value, f"names from {list(allowed)} (unknown: {unknown})")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        _bad_setting(owner, name, value, f"names each given once (given more than once: {repeated})")
    return tuple(names)


def _body_part_setting(owner: str, value):
    """body_part: one of BODY_PARTS, a list of them, 'all' or None."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return value
    if isinstance(value, str):
        return _choice_setting(owner, "body_part", value.strip(), (*BODY_PARTS, "all"))
    return _names_setting(owner, "body_part", value, BODY_PARTS)


def _device_setting(owner: str, value) -> str:
    """device: 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'."""
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value.strip()):
        _bad_setting(owner, "device", value, "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'")
    return value.strip()


def _range_pair_setting(owner: str, name: str, value, lo: float, hi: float) -> tuple[float, float]:
    """A (low, high) pair of numbers within [lo, hi], low <= high."""
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s()\[\]]+", value) if v]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        _bad_setting(owner, name, value, f"two numbers (low, high) in [{lo:g}, {hi:g}]")
    pair = tuple(_number_setting(owner, name, v, float, lo, hi) for v in value)
    if pair[0] > pair[1]:
        _bad_setting(owner, name, value, "(low, high) with low <= high")
    return pair


def _validate_common(cfg, owner: str, integers: dict[str, tuple[int, int]], floats: dict[str, tuple]) -> None:
    """Check and convert the settings TrainConfig and AnomalyConfig share, then the given ranges."""
    cfg.data_dir = _path_setting(owner, "data_dir", cfg.data_dir, optional=True)
    for name in ("output_dir", "cache_dir", "phantom_dir"):
        setattr(cfg, name, _path_setting(owner, name, getattr(cfg, name)))
    cfg.body_part = _body_part_setting(owner, cfg.body_part)
    common = {"phantom_patients": (2, 1_000_000), "phantom_image_size": (64, 8192), "phantom_seed": (0, 2**32 - 1),
              "num_workers": (0, 1024), "seed": (0, 2**32 - 1)}
    for name, (lo, hi) in {**common, **integers}.items():
        setattr(cfg, name, _number_setting(owner, name, getattr(cfg, name), int, lo, hi))
    for name, (lo, hi, lo_open) in floats.items():
        setattr(cfg, name, _number_setting(owner, name, getattr(cfg, name), float, lo, hi, lo_open))
    cfg.max_steps_per_epoch = _number_setting(owner, "max_steps_per_epoch", cfg.max_steps_per_epoch, int, 1, 2**40,
                                              optional=True)
    for name in ("hflip", "resume"):
        setattr(cfg, name, _bool_setting(owner, name, getattr(cfg, name)))
    cfg.amp = _choice_setting(owner, "amp", cfg.amp, _AMP_MODES)
    cfg.on_bad = _choice_setting(owner, "on_bad", cfg.on_bad, _ON_BAD)
    cfg.device = _device_setting(owner, cfg.device)


def _validate_train_config(cfg) -> None:
    """Every TrainConfig setting checked (types, ranges, names) before any data is read."""
    owner = "TrainConfig"
    _validate_common(cfg, owner, {
        "image_size": (32, 4096),  # a DenseNet halves the input five times: 32 px leaves one feature pixel
        "batch_size": (2, 1_000_000),  # batch norm needs two values a channel in training
        "valid_batch_size": (1, 1_000_000), "epochs": (1, 1_000_000), "plateau_patience": (0, 1_000_000),
        "keep_top_k": (0, 1_000_000), "split_seed": (0, 2**32 - 1),
    }, {"lr": (0.0, 1.0, True), "weight_decay": (0.0, 1.0, False), "plateau_factor": (0.0, 1.0, True),
        "rotation_degrees": (0.0, 180.0, False), "tune_fraction": (0.0, 0.95, False)})
    for name in ("pretrained", "channels_last", "sync_batchnorm"):
        setattr(cfg, name, _bool_setting(owner, name, getattr(cfg, name)))
    cfg.arch = _choice_setting(owner, "arch", cfg.arch, ARCHS)
    if isinstance(cfg.betas, str):
        cfg.betas = [v for v in re.split(r"[,\s()\[\]]+", cfg.betas) if v]
    if not isinstance(cfg.betas, (list, tuple)) or len(cfg.betas) != 2:
        _bad_setting(owner, "betas", cfg.betas, "two numbers in [0, 1), e.g. (0.9, 0.999)")
    cfg.betas = tuple(_number_setting(owner, "betas", b, float, 0.0, 0.999999) for b in cfg.betas)
    if isinstance(cfg.compile, str) and cfg.compile.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        cfg.compile = _bool_setting(owner, "compile", cfg.compile)


_FREE_ON_RESUME = {"resume": "free"}  # a config field's metadata: it may change when a run resumes


def _free(default):
    """A config field that may change when a run resumes: where and how the run runs, not what it learns."""
    return field(default=default, metadata=_FREE_ON_RESUME)


@dataclass
class RunConfig:
    """The settings both training paths share: data, phantom, cache, device, precision, seeds, bad files, resume.

    Every field of a config must match when a run resumes, but those made with _free (where and how it runs):
    must_match_on_resume(config_class) lists them, so a new setting is protected without a list to keep.
    """

    data_dir: str | None = _free(None)  # None: the embedded phantom; a MURA-v1.1 folder (or above); "kaggle:O/D"
    body_part: str = "XR_HAND"  # a study type, a list of them, or "all"
    output_dir: str = _free("outputs/run")
    cache_dir: str = _free("data/cache")
    phantom_dir: str = _free("data/phantom")  # where the phantom is made when data_dir is None ...
    phantom_patients: int = _free(PHANTOM_PATIENTS)  # ... with this many patients
    phantom_image_size: int = _free(512)
    phantom_seed: int = _free(0)  # the phantom's own seed (not the training seed: runs of several seeds share the data)
    amp: str = _free("auto")  # "auto": fp16 + GradScaler on GPUs without fast bf16 (T4), bf16 on Ampere+; off on CPU
    num_workers: int = _free(2)
    device: str = _free("auto")
    seed: int = 0
    split_seed: int = 0  # the split's seed (the tuning split; the unsupervised path's split by patient), not the
    # training seed: runs of several seeds share it
    on_bad: str = _free("raise")  # "skip": leave bad files out, counted in a warning (mh.data_problems lists them)
    resume: bool = _free(True)
    max_steps_per_epoch: int | None = _free(None)  # for smoke tests
    sync_batchnorm: bool = _free(False)  # several GPUs: batch norm over the global batch (off: each GPU's own, as
    # one GPU sees batches of batch_size; on CPU processes always off)


def config_from(config_class, variables: dict, **overrides):
    """A config from a notebook's variables (globals() after its parameters cell): every variable named like a
    field of `config_class`, then `overrides` (fields whose knob has another name or a default to resolve), so a
    new setting is added in one place: the dataclass, and the parameters cell under the field's name."""
    names = {f.name for f in fields(config_class)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{config_class.__name__} has no field(s) {unknown}; its fields: {sorted(names)}")
    values = {**{k: v for k, v in variables.items() if k in names}, **overrides}
    return config_class(**{k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


def must_match_on_resume(config_class) -> tuple[str, ...]:
    """The fields of a config class that a resumed run must share with its checkpoint (all but the _free ones)."""
    return tuple(f.name for f in fields(config_class) if f.metadata.get("resume") != "free")


@dataclass
class TrainConfig(RunConfig):
    """Every knob of a training run; the reference report's run is image_size=224, batch_size=8, epochs=5,
    rotation_degrees=10, select_metric='tune_accuracy' (its 'valid_accuracy' with tune_fraction=0), loss_level='study'.

    Selection (best.pt, the plateau schedule, the top-k ensemble, any threshold) reads the tuning split: a
    patient-disjoint, label-stratified `tune_fraction` of the training patients; MURA's validation split is then
    a held-out test. tune_fraction=0 selects on the validation split, as the MURA paper and the report did.
    """

    output_dir: str = _free("outputs/run")
    image_size: int = 224  # the report; the MURA paper used 320
    resize: str = "squash"  # "squash" (report, paper) or "pad" (keeps the aspect ratio)
    upright: bool = True  # views stored inverted (a white or mid-grey background, dark bones) are inverted back
    # before the model sees them (upright_view): polarity says nothing of the label, yet make demo's model ranked
    # the inverted test views below nearly all others (docs/supervised.md); the paper and the report did not (their
    # presets: False)
    arch: str = "densenet169"
    pretrained: bool = _free(True)  # ImageNet weights (the paper and the report)
    batch_size: int = 32  # views per step (the report: 8); with loss_level="study": studies per step
    valid_batch_size: int = _free(64)
    epochs: int = _free(5)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    plateau_factor: float = 0.1  # the learning rate is divided by 10 ...
    plateau_patience: int = 1  # ... when the tuning loss has not improved for this many epochs
    rotation_degrees: float = 10.0  # the report; the MURA paper used 30
    hflip: bool = True
    loss_level: str = "image"  # "image": per-view weighted BCE (the paper); "study": on the study mean (report)
    select_metric: str = "tune_loss"  # best.pt is kept by this (the paper: validation loss); tune_* reads valid_*
    # when tune_fraction=0, and valid_* is refused when there is a tuning split (it would select on the test set)
    keep_top_k: int = _free(5)  # also keep the weights of the k best epochs, for an ensemble (the paper averaged 5)
    channels_last: bool = _free(True)
    compile: bool | str = _free(False)  # torch.compile: True or a mode ("reduce-overhead": CUDA graphs, for
    # launch-bound GPUs)
    tune_fraction: float = 0.1  # share of the training patients held out for selection; 0: select on validation

    def __post_init__(self):
        _validate_train_config(self)
        checks = {"resize": (self.resize, _RESIZE_MODES), "loss_level": (self.loss_level, ("image", "study")),
                  "select_metric": (self.select_metric, tuple(SELECT_METRICS)),
                  "amp": (self.amp, ("auto", "fp16", "bf16", "off"))}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {value!r}")
        if self.compile not in _COMPILE_MODES:
            raise ValueError(f"TrainConfig.compile must be one of {_COMPILE_MODES}, got {self.compile!r}")
        if not 0 <= self.tune_fraction < 1:
            raise ValueError(f"TrainConfig.tune_fraction must be in [0, 1), got {self.tune_fraction!r}")
        if self.tune_fraction == 0:  # no tuning split: selection reads MURA's validation split (the old behaviour)
            self.select_metric = self.select_metric.replace("tune_", "valid_", 1)
        elif self.select_metric.startswith("valid_"):
            raise ValueError(f"TrainConfig.select_metric={self.select_metric!r} would select on MURA's validation "
                             f"split, the held-out test when tune_fraction > 0: use "
                             f"{self.select_metric.replace('valid_', 'tune_', 1)!r}, or tune_fraction=0")

    @property
    def tuning_set(self) -> str:
        """The history's prefix of the set that selects: 'tune', or 'valid' when tune_fraction is 0."""
        return self.select_metric.split("_", 1)[0]


# Presets: named sets of TrainConfig fields (train_preset), each field's source said where it is set.
_TRAIN_PRESETS = {
    # the reference report's run (its section on training; pyaf/DenseNet-MURA-PyTorch); the report chose its epoch
    # by accuracy on MURA's validation split, the set it reported on: here the tuning split chooses (tune_fraction
    # is not set, so TrainConfig's 0.1 holds); train_preset("report", tune_fraction=0) repeats its choice on the test
    "report": {"image_size": 224, "batch_size": 8, "epochs": 5, "rotation_degrees": 10.0, "loss_level": "study",
               "select_metric": "tune_accuracy", "lr": 1e-4, "upright": False},
    # the MURA paper (Rajpurkar et al. 2017): all seven study types with per-type loss weights, 320 px, flips and
    # rotations up to 30 degrees, batch 8 (per GPU here), Adam 1e-4, the rate divided by 10 when the validation loss
    # plateaus, the model of lowest validation loss (and an ensemble of the 5 best); its validation set is here the
    # tuning split (tune_fraction is not set, so TrainConfig's 0.1 holds), because MURA's validation split is our
    # test (its test set is hidden)
    "mura_paper": {"body_part": "all", "image_size": 320, "rotation_degrees": 30.0, "hflip": True, "batch_size": 8,
                   "lr": 1e-4, "betas": (0.9, 0.999), "plateau_factor": 0.1, "loss_level": "image",
                   "select_metric": "tune_loss", "keep_top_k": 5, "pretrained": True, "upright": False},
}


def train_preset(name: str, **overrides) -> TrainConfig:
    """A TrainConfig with a named preset's settings (_TRAIN_PRESETS), any field overridden by keyword."""
    if name not in _TRAIN_PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose from {sorted(_TRAIN_PRESETS)}")
    return TrainConfig(**{**_TRAIN_PRESETS[name], **overrides})


def _config_dict(cfg: TrainConfig) -> dict:
    """The config as plain types (loadable with weights_only=True)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
_LEGACY_CONFIG = {"tune_fraction": 0.0, "upright": False}  # what a run saved before a field existed did (no
# tuning split; its views as stored)


def _stored_config(config_class, state: dict, path: str | os.PathLike):
    """The config a checkpoint was saved with, validated like a new one (an edited image_size is refused)."""
    try:
        legacy = _LEGACY_CONFIG if config_class is TrainConfig else {}  # what a run saved before a field existed did
        return config_class(**{**legacy, **state["config"]})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its stored settings are not valid ({e})") from None


# ---------------------------------------------------------------- training: devices & processes (AMP, distributed)

def resolve_device(device: str = "auto"):
    """The torch device to use: CUDA when available (or as asked), else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(device)


def amp_dtype(amp: str, device):
    """The autocast dtype for this device: fp16 (with a GradScaler) on T4-class GPUs, bf16 where fast; or None."""
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def _seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and CUDA); the suite's NumPy code takes explicit seeds."""
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class _Distributed:
    """Where this process stands in a torch.distributed run (one process: rank 0 of 1)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, history and figures."""
        return self.rank == 0


def _setup_distributed(device: str = "auto") -> tuple[_Distributed, torch.device]:
    """Join the process group that torchrun describes in the environment (NCCL on GPUs, gloo on CPU) and return
    this process's place and device; without torchrun, one process on resolve_device(device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Distributed(), resolve_device(device)
    ctx = _Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and str(device).split(":")[0] in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return ctx, torch.device("cuda", ctx.local_rank) if use_cuda else torch.device("cpu")


def _gather_result(result: dict, ctx: _Distributed) -> dict:
    """One epoch's results of every process joined on rank 0 (the loss averaged over all items); None elsewhere."""
    if ctx.world_size == 1:
        return result
    parts = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object({k: result[k] for k in ("loss", "n", "probs", "index")}, parts, dst=0)
    if not ctx.is_main:
        return None
    n = sum(p["n"] for p in parts)
    return {"loss": sum(p["loss"] * p["n"] for p in parts) / max(n, 1), "n": n,
            "probs": np.concatenate([p["probs"] for p in parts]), "index": np.concatenate([p["index"] for p in parts])}


def _from_main(obj, ctx: _Distributed):
    """Rank 0's `obj` on every process (one process: `obj`)."""
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _unwrap(model):
    """The underlying module of a torch.compile'd and/or DistributedDataParallel model."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------- training: checkpoints & run folders (atomic, locked)

DIGEST_KEY = "sha256"  # a checkpoint's digest of its own content, checked on every load


def _state_digest(obj) -> str:
    """sha256 over a checkpoint's content: every tensor's dtype, shape and bytes, every other value's type and repr,
    in order (independent of how torch.save lays the file out)."""
    digest = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(x.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy())
        elif isinstance(x, dict):
            digest.update(f"D{len(x)};".encode())
            for key, value in x.items():
                feed(key)
                feed(value)
        elif isinstance(x, (list, tuple)):
            digest.update(f"L{len(x)};".encode())
            for value in x:
                feed(value)
        else:
            digest.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return digest.hexdigest()


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save into memory, then written atomically (_write_file_atomic): a crash never leaves a half-written
    checkpoint, and a full disk says so with the space needed and the path, leaving the previous file and no
    temporary one (torch's own file writer would turn it into a RuntimeError). A dict gets its sha256 digest
    (DIGEST_KEY), which every load checks."""
    if isinstance(obj, dict):
        obj = {**{k: v for k, v in obj.items() if k != DIGEST_KEY}, DIGEST_KEY: _state_digest(
            {k: v for k, v in obj.items() if k != DIGEST_KEY})}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_file_atomic(buffer.getbuffer(), Path(path), "free some space and run again to resume")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (empty, truncated, corrupt, not a checkpoint, of the other kind), named."""


_CHECKPOINT_KINDS = {"supervised": "a supervised (DenseNet) checkpoint: load it with load_checkpoint",
                    "anomaly": "an anomaly-detection checkpoint: load it with load_anomaly_model"}


def _checkpoint_kind(state: dict) -> str | None:
    """'supervised' or 'anomaly' (stored, or told by the config of a checkpoint saved before it was stored)."""
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    return state.get("kind") or ("anomaly" if "variant" in config else "supervised" if "arch" in config else None)


_CHECKPOINT_FIELDS = {  # what each field of a checkpoint holds, checked on every load (a crafted one fails here)
    "model": ("a dict of tensors", lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor)
                                                                         for t in v.values())),
    "config": ("a dict of settings", lambda v: isinstance(v, dict)),
    "epoch": ("a whole number >= 0", lambda v: type(v) is int and v >= 0),
    "history": ("a list of per-epoch rows (dicts)", lambda v: isinstance(v, list) and all(isinstance(r, dict)
                                                                                          for r in v)),
    "best": ("a number or None", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))),
    "optimizer": ("an optimiser's state (a dict)", lambda v: isinstance(v, dict)),
    "scheduler": ("a scheduler's state (a dict) or None", lambda v: v is None or isinstance(v, dict)),
    "scaler": ("a gradient scaler's state (a dict)", lambda v: isinstance(v, dict)),
    "rng": ("random states ({'torch': a tensor, 'cuda': a list})",
            lambda v: isinstance(v, dict) and isinstance(v.get("torch"), torch.Tensor)
            and isinstance(v.get("cuda"), list)),
    "data": ("a record of the data (root, n_studies, fingerprint) or None",
             lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("fingerprint"), str))),
}


def _field_problem(state: dict) -> str | None:
    """The first field of a checkpoint that does not hold what it should (_CHECKPOINT_FIELDS), said; else None."""
    for name, (what, holds) in _CHECKPOINT_FIELDS.items():
        if name in state and not holds(state[name]):
            return (f"field '{name}' holds {repr(state[name])[:60]} ({type(state[name]).__name__}), not {what}: the "
                    f"file was edited or damaged")
    return None


def _read_checkpoint(path: Path, kind: str | None) -> tuple[dict | None, str | None]:
    """(state, None) for a verified checkpoint of this kind, else (None, what is wrong with the file)."""
    if not path.is_file():
        return None, "no such file"
    if path.stat().st_size == 0:
        return None, "an empty file (0 bytes): its write never finished"
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return None, f"not a PyTorch checkpoint (torch.save writes a zip archive; this file starts with {head!r})"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never do that with such a file
        return None, ("not a checkpoint of this suite: it holds Python objects that a safe load refuses "
                      "(nothing in it was run)")
    except Exception as e:  # a truncated or damaged archive
        reason = str(e).split(". ")[0] if str(e) and "weights_only" not in str(e) else type(e).__name__
        return None, f"truncated or damaged: not a readable PyTorch archive ({reason})"
    if not isinstance(state, dict) or not {"model", "config"} <= set(state):
        return None, "not a checkpoint of this suite (a PyTorch file without its 'model' and 'config')"
    saved = state.pop(DIGEST_KEY, None)
    if saved is None:
        warnings.warn(f"{path}: saved before checkpoints carried a digest, so it is loaded unverified", stacklevel=3)
    elif saved != _state_digest(state):
        return None, ("corrupt: its content does not match the sha256 digest stored when it was written (changed "
                      "on disk: a bad copy, a sync conflict, a disk error, an edit)")
    problem = _field_problem(state)
    if problem:
        return None, problem
    found = _checkpoint_kind(state)
    if kind is not None and found != kind:
        return None, f"{_CHECKPOINT_KINDS.get(found, 'a checkpoint of an unknown kind')}, not {kind}"
    return state, None


def _load_state(path: str | os.PathLike, kind: str | None = None) -> dict:
    """A checkpoint's state, loaded with weights_only=True and checked against its sha256 digest and its kind
    ('supervised' or 'anomaly'); else one CheckpointError naming the file, what is wrong, and a good checkpoint
    beside it when there is one."""
    path = Path(path)
    state, problem = _read_checkpoint(path, kind)
    if problem is None:
        return state
    if problem == "no such file":
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    raise CheckpointError(f"{path}: {problem}.{_good_checkpoint_beside(path, kind)}")


def _good_checkpoint_beside(path: Path, kind: str | None) -> str:
    """A sentence offering the newest other checkpoint in the same folder that verifies (or saying there is none)."""
    others = sorted((p for p in path.parent.glob("*.pt") if p.name != path.name),
                    key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    for other in others:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state, problem = _read_checkpoint(other, kind)
        if problem is None:
            resumable = "optimizer" in state
            return (f" The newest good checkpoint beside it is {other} (epoch {state.get('epoch', -1) + 1}"
                    + ("" if resumable else ", weights only") + "): use it instead"
                    + (f", or copy it over {path} to resume from it." if resumable else "."))
    return " No other checkpoint beside it verifies."


def _checkpoint(model, optimizer, scheduler, scaler, epoch, history, cfg, best, data: dict | None = None) -> dict:
    """The resumable state: model, optimiser (or a dict of them), scheduler (or None), scaler, epoch, history, RNG
    states, config, its kind and the data's fingerprint."""
    return {
        "kind": "anomaly" if isinstance(cfg, AnomalyConfig) else "supervised", "data": data,
        "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        "optimizer": {k: o.state_dict() for k, o in optimizer.items()} if isinstance(optimizer, dict)
        else optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": scaler.state_dict(), "epoch": epoch, "history": history, "best": best, "config": _config_dict(cfg),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


def _resumable_state(cfg) -> dict | None:
    """The state in cfg.output_dir/checkpoints/last.pt to resume from (None: start afresh); refuses a run that was
    saved with other settings (those of must_match_on_resume)."""
    must_match = must_match_on_resume(type(cfg))
    last_path = Path(cfg.output_dir) / "checkpoints" / "last.pt"
    if not cfg.resume or not last_path.is_file():
        return None
    state = _load_state(last_path, "anomaly" if isinstance(cfg, AnomalyConfig) else "supervised")
    saved = {**_LEGACY_CONFIG, **state["config"]}  # a run saved before a field existed did what _LEGACY_CONFIG says
    changed = {k: (saved[k], v) for k, v in _config_dict(cfg).items()  # a field newer than the run
               if k in must_match and k in saved and saved[k] != v}  # had none to differ
    if changed:
        raise ValueError(f"{last_path}: holds a run with other settings {changed} (saved, now); use another "
                         f"output_dir, or resume=False to start again")
    return state


def _restore(state: dict, model, optimizer, scheduler, scaler) -> tuple[list[dict], float | None, int]:
    """Load a resumable state into the training objects; return (history, best score, first epoch to run)."""
    model.load_state_dict(state["model"])
    pairs = optimizer.items() if isinstance(optimizer, dict) else [(None, optimizer)]
    for name, opt in pairs:
        saved = state["optimizer"] if name is None else state["optimizer"][name]
        # saved on another device: keep this device's (fused) Adam, set before loading, so that load_state_dict
        # puts the step counts where that implementation wants them (fused: on the parameters' device)
        flags = {k: opt.defaults[k] for k in ("fused", "foreach") if k in opt.defaults}
        opt.load_state_dict({**saved, "param_groups": [{**g, **flags} for g in saved["param_groups"]]})
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved without fp16 (CPU, bf16): this scaler starts afresh
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return list(state["history"]), state["best"], state["epoch"] + 1


def _save_epoch(state: dict, improved: bool, out: Path) -> None:
    """Write best.pt (when improved), last.pt and history.csv, each atomically."""
    if improved:
        save_atomic(state, out / "checkpoints" / "best.pt")
    save_atomic(state, out / "checkpoints" / "last.pt")
    _write_csv_atomic(pd.DataFrame(state["history"]), out / "history.csv")


RUN_LOCK = "run.lock"
_LOCK_HEARTBEAT_S = 60  # a running run touches its lock this often ...
_LOCK_STALE_AFTER_S = 900  # ... so a lock from another machine untouched this long is a dead run's


class RunLockedError(RuntimeError):
    """Another training run holds the run folder's lock."""


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _lock_holder(path: Path) -> dict | None:
    """The run a lock file names, as it wrote itself ({"pid": a process id, "host": ..., ...}); None for a file that
    cannot be read or holds something else (a process killed while writing it, an edit, a file no run wrote)."""
    try:
        holder = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    pid = holder.get("pid") if isinstance(holder, dict) else None
    if type(pid) is not int or not 0 < pid < 2**31 or not isinstance(holder.get("host"), str):
        return None
    return holder


def _lock_is_stale(path: Path, holder: dict | None) -> bool:
    """A lock whose process is gone: dead on this machine, or (another machine's) not touched for a long time."""
    age = time.time() - path.stat().st_mtime
    if holder is None:  # unreadable or not a lock record: a process killed between creating and writing it
        return age > 10
    if holder["host"] == socket.gethostname():
        return holder["pid"] != os.getpid() and not _pid_alive(holder["pid"])
    return age > _LOCK_STALE_AFTER_S


def _lock_heartbeat(path: Path, stop: threading.Event) -> None:
    """Touch the lock every _LOCK_HEARTBEAT_S seconds until `stop` is set (others see the run is alive)."""
    while not stop.wait(_LOCK_HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold run_dir/run.lock (pid, host, start time, command; created atomically) while a run writes there; a
    second run raises RunLockedError naming the holder; a dead run's lock is taken over with a warning."""
    path = _make_folder(run_dir) / RUN_LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if attempt == 0 and _lock_is_stale(path, holder):
                warnings.warn(f"{path}: taking over the lock of a run that is no longer running ("
                              + (f"{holder})" if holder else "a lock that is unreadable or not a lock record, "
                                 "untouched for over 10 s)"), stacklevel=3)
                path.unlink(missing_ok=True)
                continue
            if holder is None:
                held = b""
                with contextlib.suppress(OSError):
                    held = path.read_bytes()[:80]
                raise RunLockedError(
                    f"{path}: not a lock record this suite can read (it holds {held!r}), written under 10 s ago: a "
                    f"run may be starting in {path.parent}. Wait and try again; if no run is writing there, delete "
                    f"{path}.") from None
            raise RunLockedError(
                f"{path.parent}: another run is writing here (lock {path}: pid {(holder or {}).get('pid')} on "
                f"{(holder or {}).get('host')}, started {(holder or {}).get('started')}, command "
                f"{(holder or {}).get('command')!r}). Two runs in one folder would mix their checkpoints: wait for "
                f"it, or use another output_dir; if that process is gone, delete {path}.") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    stop = threading.Event()
    threading.Thread(target=_lock_heartbeat, args=(path, stop), daemon=True).start()
    try:
        yield path
    finally:
        stop.set()
        if (_lock_holder(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


# every name a run writes in its folder (besides its lock): whatever a fresh run finds there is moved aside first
_RUN_FILES = ("checkpoints", "history.csv", "config.json", "test_scores.csv", "val_scores.csv")


def _set_aside_previous_run(out: Path) -> Path | None:
    """Before a fresh run in `out`: move whatever is at the names a run writes (_RUN_FILES: an earlier run's files, or
    the user's own under those names) to a sibling <name>.previous-<UTC time>/, so that nothing is deleted or
    overwritten, with a warning naming them and both folders; None when there was nothing (an empty folder is
    left)."""
    found = [name for name in _RUN_FILES if (out / name).is_symlink() or (out / name).is_file()
             or ((out / name).is_dir() and any((out / name).iterdir()))]
    if not found:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = out.parent / f"{out.name}.previous-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = out.parent / f"{out.name}.previous-{stamp}-{n}"
    aside.mkdir(parents=True)
    for name in found:
        shutil.move(out / name, aside / name)
    warnings.warn(f"{out}: starting a new run here; what was at the names a run writes ({', '.join(found)}: an "
                  f"earlier run's files, or your own) was moved to {aside} (nothing was deleted or overwritten)",
                  stacklevel=3)
    return aside


def _remove_temporaries(folders: Sequence[Path]) -> list[Path]:
    """Remove the temporary files (.NAME.tmpPID) a killed write left in a run's folders (the caller holds its lock)."""
    removed = []
    for folder in folders:
        for tmp in folder.glob(".*.tmp*") if folder.is_dir() else ():
            if tmp.is_file() and re.fullmatch(r"\..+\.tmp\d+", tmp.name):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary file(s) left by an interrupted write: "
                      f"{[str(p) for p in removed[:5]]}", stacklevel=3)
    return removed


def _data_fingerprint(studies: pd.DataFrame) -> str:
    """sha256 of a study table: each study's split, path below the MURA root, label, view count and file names."""
    digest = hashlib.sha256()
    for row in studies.sort_values(["split", "study_path"]).itertuples():
        digest.update(json.dumps([row.split, row.study_path.split("/", 1)[-1], int(row.label), int(row.n_views),
                                  [Path(p).name for p in row.image_paths]]).encode())
    return digest.hexdigest()


def _data_record(root: Path, studies: pd.DataFrame) -> dict:
    """What a checkpoint keeps of the data it was trained on: the folder, the study count and the fingerprint."""
    return {"root": str(root), "n_studies": len(studies), "fingerprint": _data_fingerprint(studies)}


def _check_same_data(state: dict | None, data: dict, where: Path) -> None:
    """Refuse to resume a run (state) on data other than it was trained on."""
    if state is None:
        return
    saved = state.get("data")
    if saved is None:
        warnings.warn(f"{where}: saved before checkpoints recorded their data, so this resume cannot check that it "
                      f"reads the same data", stacklevel=3)
    elif saved["fingerprint"] != data["fingerprint"]:
        raise MuraDataError(
            f"{where}: this run was trained on {saved['root']} ({saved['n_studies']} studies) but now reads "
            f"{data['root']} ({data['n_studies']} studies), whose study table differs (studies, labels, views or "
            f"files). Resuming would mix two datasets: point data_dir back at {saved['root']}, or use another "
            f"output_dir (resume=False keeps the old run aside).")


def _write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically (_write_file_atomic)."""
    _write_file_atomic(df.to_csv(index=False).encode(), path)


def _write_json_atomic(obj, path: Path) -> None:
    """Write JSON atomically (_write_file_atomic)."""
    _write_file_atomic(json.dumps(obj, indent=2).encode(), path)


# ---------------------------------------------------------------- training: one epoch, evaluation, the run, ensembles

def make_view_loader(cache: _ImageCache, images: pd.DataFrame, batch_size: int, shuffle: bool = False, seed: int = 0,
                     num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader of whole batches of cached views; set `loader.sampler.batches` to re-shuffle per epoch."""
    dataset = _CachedViewBatches(cache, cache.rows(images["image_path"]), images["label"].to_numpy(),
                                pd.factorize(images["study_path"])[0])
    sampler = _EpochBatches()
    sampler.batches = epoch_batches(len(images), batch_size, shuffle, seed, 0)
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                      multiprocessing_context=_worker_context() if num_workers > 0 else None,
                      generator=torch.Generator())  # its own: starting workers leaves the global generator alone


def loader_throughput(loader, device, max_batches: int = 50, **augment) -> float:
    """Views per second that `loader` delivers to `device`, augmented and normalised as for training."""
    generator = torch.Generator(device=device).manual_seed(0)
    n, started = 0, time.perf_counter()
    for step, (views, *_rest) in enumerate(loader):
        if step >= max_batches:
            break
        prepare_batch(views, device, True, generator, **augment)
        n += len(views)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - started)


def amp_step(loss, optimizer, scaler) -> None:
    """One optimiser step under mixed precision: scaled backward, unscale-and-skip on inf/NaN, scale update."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def build_optimizer(params, lr: float, device, betas=(0.9, 0.999), weight_decay: float = 0.0):
    """Adam; fused into a few kernels on CUDA (fewer launches a step than the default multi-tensor Adam)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=device.type == "cuda")


def compile_model(model, mode: bool | str):
    """torch.compile the model (mode True or a torch.compile mode name); the model itself when mode is False."""
    if mode is False:
        return model
    return torch.compile(model, mode=None if mode is True else mode)


def train_one_epoch(model, loader, optimizer, scaler, device, weights, cfg: TrainConfig, epoch: int,
                    progress: bool = True, rank: int = 0) -> dict:
    """One pass over the training views (this process's share of them); returns the mean loss and every view's
    probability. `weights`: (w0, w1), or each view's (view_loss_weights)."""
    model.train()
    dtype = amp_dtype(cfg.amp, device)
    generator = _epoch_generator(cfg, epoch, rank, device)
    loss_sum = torch.zeros((), device=device)
    n_seen, probs, indices = 0, [], []
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1} train", leave=False, disable=not progress)
    for step, (views, labels, index, study) in enumerate(loader):
        if step >= steps:
            break
        torch.compiler.cudagraph_mark_step_begin()  # a new step for compile's CUDA graphs (a no-op otherwise)
        x = prepare_batch(views, device, True, generator, cfg.rotation_degrees, cfg.hflip, cfg.channels_last)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x).squeeze(1)
        if cfg.loss_level == "study":
            n_items = int(study.max()) + 1  # studies in the batch (a CPU tensor: no device sync)
            loss = study_weighted_bce(logits, y, study.to(device, non_blocking=True), n_items,
                                      *_batch_weights(weights, index))
        else:
            n_items = len(y)
            loss = weighted_bce_with_logits(logits, y, *_batch_weights(weights, index))
        amp_step(loss, optimizer, scaler)
        loss_sum += loss.detach() * n_items  # the epoch's loss: a mean over its views (or studies)
        n_seen += n_items
        probs.append(torch.sigmoid(logits.detach().float()))
        indices.append(index)
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return {"loss": float(loss_sum) / max(n_seen, 1), "n": n_seen, "probs": torch.cat(probs).cpu().numpy(),
            "index": torch.cat(indices).numpy()}


def evaluate_views(model, loader, device, weights, amp: str = "auto", channels_last: bool = True,
                   desc: str = "valid", progress: bool = True) -> dict:
    """Predict every view of `loader` without augmentation; returns the weighted loss and the view probabilities.
    `weights`: (w0, w1), or each view's (view_loss_weights)."""
    model.eval()
    dtype = amp_dtype(amp, device)
    loss_sum, n_seen, probs, indices = torch.zeros((), device=device), 0, [], []
    with torch.inference_mode():
        for views, labels, index, _ in tqdm(loader, desc=desc, leave=False, disable=not progress):
            torch.compiler.cudagraph_mark_step_begin()
            x = prepare_batch(views, device, False, channels_last=channels_last)
            y = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(x).squeeze(1)
            loss_sum += weighted_bce_with_logits(logits, y, *_batch_weights(weights, index)) * len(y)
            n_seen += len(y)
            probs.append(torch.sigmoid(logits.float()))
            indices.append(index)
    if not probs:  # this process's share of a small set was empty
        return {"loss": 0.0, "n": 0, "probs": np.zeros(0, np.float32), "index": np.zeros(0, np.int64)}
    return {"loss": float(loss_sum) / max(n_seen, 1), "n": n_seen, "probs": torch.cat(probs).cpu().numpy(),
            "index": torch.cat(indices).numpy()}


def tuning_split(studies: pd.DataFrame, fraction: float = 0.1, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split MURA's training studies into (train, tune) by patient: `fraction` of the patients with an abnormal
    study and of the normal-only patients (at least one of each, never all), drawn with `seed`; `fraction` in
    [0, 0.95] (0: no tuning split), as TrainConfig.tune_fraction."""
    fraction = _number_setting("tuning_split", "fraction", fraction, float, 0.0, 0.95)
    seed = _number_setting("tuning_split", "seed", seed, int, 0, 2**32 - 1)
    if fraction == 0:
        return studies, studies.iloc[:0]
    if "split" in studies and set(studies["split"]) - {"train"}:
        raise ValueError(f"the tuning split is drawn from MURA's train split only, got {sorted(set(studies['split']))}"
                         f": the validation split stays the held-out test")
    positive = studies.groupby("patient")["label"].max()
    rng = np.random.default_rng(seed)
    tune = []
    for label, name in ((1, "with an abnormal study"), (0, "with normal studies only")):
        patients = np.array(sorted(positive.index[positive == label]))
        if len(patients) < 2:
            raise MuraDataError(f"tune_fraction={fraction} needs at least 2 training patients {name} (one tunes, one "
                                f"trains), found {len(patients)}: use tune_fraction=0 to select on validation")
        n_tune = min(max(1, round(fraction * len(patients))), len(patients) - 1)
        tune += list(rng.permutation(patients)[:n_tune])
    held = studies["patient"].isin(tune)
    return studies[~held], studies[held]


def _prepare_run(cfg: TrainConfig, progress: bool = True, state: dict | None = None) -> dict:
    """Load the studies (for a resume: the same data as its checkpoint `state`, else an error), build the view
    cache and the per-view tables that training and evaluation use (run["tune"]: the tuning split's views, None
    when tune_fraction is 0)."""
    root = config_data_root(cfg)
    run = {"root": root}
    tables = []
    for split in SPLITS:
        studies = load_studies(root, split, cfg.body_part, on_bad=cfg.on_bad)
        if studies.empty:
            raise MuraDataError(f"{root}: no {cfg.body_part} studies in the {split} split")
        run[split] = studies_to_images(studies)
        tables.append(studies)
        if split == "train":
            train, tune = tuning_split(studies, cfg.tune_fraction, cfg.split_seed)
    run["data"] = _data_record(root, pd.concat(tables, ignore_index=True))
    _check_same_data(state, run["data"], Path(cfg.output_dir) / "checkpoints" / "last.pt")
    all_paths = list(run["train"]["image_path"]) + list(run["valid"]["image_path"])
    run["cache"] = build_image_cache(all_paths, cfg.image_size, cfg.cache_dir, cfg.resize, progress=progress,
                                     upright=cfg.upright)
    run["train"], run["tune"] = studies_to_images(train), studies_to_images(tune) if len(tune) else None
    return run


def _epoch_metrics(prefix: str, images: pd.DataFrame, result: dict) -> dict:
    """Study-level metrics of one epoch's view probabilities, with the loss, prefixed train_/tune_/valid_."""
    views = images.iloc[result["index"]].assign(prob=result["probs"])
    studies = views.groupby("study_path", sort=False).agg(label=("label", "first"), prob=("prob", "mean"))
    metrics = study_metrics(studies["label"], studies["prob"])
    return {f"{prefix}_loss": result["loss"], **{f"{prefix}_{k}": v for k, v in metrics.items()}}




def _start_run(cfg: RunConfig, ctx: _Distributed, device, prepare, progress: bool) -> tuple[dict | None, dict]:
    """The start-up both trainers share: leftover temporaries removed; the checkpoint to resume (or an earlier run
    moved aside); the data prepared by `prepare(cfg, progress, state)` on the first process of each machine while
    the others wait, then read; config.json written; cuDNN's autotuner and the seeds set. Returns (state, data)."""
    out = Path(cfg.output_dir)
    if ctx.is_main:
        _remove_temporaries([out, out / "checkpoints"])
    state = _resumable_state(cfg)
    if state is None and ctx.is_main:
        _set_aside_previous_run(out)
    if ctx.local_rank != 0:  # the first process of each machine makes the phantom and the cache ...
        dist.barrier()
    data = prepare(cfg, progress and ctx.is_main, state)
    if ctx.local_rank == 0 and ctx.world_size > 1:  # ... while the others wait, then read them
        dist.barrier()
    if ctx.is_main:
        _write_json_atomic(_config_dict(cfg), out / "config.json")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: let cuDNN pick the fastest kernels
    _seed_everything(cfg.seed)
    return state, data


def _grad_scaler(cfg: RunConfig, device) -> torch.amp.GradScaler:
    """The gradient scaler of a run: enabled when it autocasts to fp16 (a T4), a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(cfg.amp, device) == torch.float16)


def _resume_into(state: dict | None, model, optimizer, scheduler, scaler, cfg: RunConfig,
                 ctx: _Distributed) -> tuple[list[dict], float | None, int]:
    """Restore a checkpoint's state (when resuming) and say so: (history, best score, first epoch to run)."""
    if state is None:
        return [], None, 0
    history, best, start_epoch = _restore(state, model, optimizer, scheduler, scaler)
    if ctx.is_main:
        print(f"resuming {Path(cfg.output_dir) / 'checkpoints' / 'last.pt'} after epoch {start_epoch} of "
              f"{cfg.epochs}", flush=True)
    return history, best, start_epoch


def _for_processes(model, cfg: RunConfig, ctx: _Distributed, device):
    """The model wrapped for several processes (DistributedDataParallel; SyncBatchNorm when asked, on GPUs)."""
    if ctx.world_size == 1:
        return model
    if cfg.sync_batchnorm and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None)


def _epoch_generator(cfg: RunConfig, epoch: int, rank: int, device) -> torch.Generator:
    """The augmentation's random generator of one epoch on one process (seeded: a resumed run draws the same)."""
    return torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch + 1_000_003 * rank)


def _improves(score: float, best: float | None, direction: str = "max") -> bool:
    """Whether an epoch's selection score beats the best so far: the first epoch always does, a NaN score
    (a one-class tuning set) never does, and any number beats a NaN best."""
    if best is None:
        return True
    if math.isnan(score):
        return False
    return math.isnan(best) or (score < best if direction == "min" else score > best)


def train(cfg: TrainConfig, progress: bool = True) -> pd.DataFrame:
    """Train (or resume) a run in cfg.output_dir: checkpoints/last.pt every epoch, best.pt, history.csv; the folder
    is locked meanwhile, and an earlier run there is moved aside, not overwritten, when this one starts afresh.

    Under torchrun (several processes, one a GPU, or gloo processes on a CPU) the same call trains with
    DistributedDataParallel: each process takes its share of every global batch of batch_size x processes views,
    validation is sharded and gathered, rank 0 alone computes the metrics, holds the lock and writes the files.
    """
    ctx, device = _setup_distributed(cfg.device)
    with run_lock(cfg.output_dir) if ctx.is_main else contextlib.nullcontext():
        return _train_locked(cfg, progress, ctx, device)


def _train_locked(cfg: TrainConfig, progress: bool, ctx: _Distributed, device) -> pd.DataFrame:
    """train() while rank 0 holds the run folder's lock."""
    out = Path(cfg.output_dir)
    state, run = _start_run(cfg, ctx, device, _prepare_run, progress)
    model = build_model(cfg.pretrained and state is None, cfg.arch).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg.lr, device, cfg.betas, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    scaler = _grad_scaler(cfg, device)
    history, best, start_epoch = _resume_into(state, model, optimizer, scheduler, scaler, cfg, ctx)
    model = compile_model(_for_processes(model, cfg, ctx, device), cfg.compile)
    loaders, weights = _training_loaders(cfg, run, ctx, device)
    direction = SELECT_METRICS[cfg.select_metric]
    for epoch in range(start_epoch, cfg.epochs):
        row = _train_epoch(model, loaders, weights, optimizer, scaler, cfg, run, epoch, ctx, device, progress)
        scheduler.step(row[f"{cfg.tuning_set}_loss"])  # the plateau schedule reads the tuning set, never the test
        history.append(row)
        score = row[cfg.select_metric]
        improved = _improves(score, best, direction)
        if improved:
            best = score
        if ctx.is_main:
            if cfg.keep_top_k > 0:
                _keep_top_k_weights(model, cfg, history, epoch, out / "checkpoints")
            _save_epoch(_checkpoint(model, optimizer, scheduler, scaler, epoch, history, cfg, best, run["data"]),
                        improved, out)
        if progress and ctx.is_main:
            _print_epoch(row, cfg, epoch, improved)
    if ctx.world_size > 1:
        dist.barrier()  # every process returns after rank 0 has written the last epoch
    return pd.DataFrame(history)


def _training_loaders(cfg: TrainConfig, run: dict, ctx: _Distributed, device) -> tuple[dict, dict]:
    """The loaders of the train, tune (None without a tuning split) and valid views, each process its share of the
    evaluated ones, and each set's view loss weights (training's, so that the losses compare)."""
    weight_table = class_weights_by_type(run["train"])  # the paper's w_T per study type (one row for XR_HAND)
    weights = {name: None if run[name] is None else view_loss_weights(run[name], weight_table).to(device)
               for name in ("train", "valid", "tune")}
    pin = device.type == "cuda"
    loaders = {"train": make_view_loader(run["cache"], run["train"], cfg.batch_size, True, cfg.seed, cfg.num_workers,
                                         pin)}
    for name in ("valid", "tune"):
        images = run[name]
        loaders[name] = None if images is None else make_view_loader(run["cache"], images, cfg.valid_batch_size,
                                                                     False, cfg.seed, cfg.num_workers, pin)
        if images is not None:  # each process its share
            loaders[name].sampler.batches = [b for b in epoch_batches(len(images), cfg.valid_batch_size, False,
                                                                      cfg.seed, 0, None, ctx.rank, ctx.world_size)
                                             if b]
    return loaders, weights


def _train_epoch(model, loaders: dict, weights: dict, optimizer, scaler, cfg: TrainConfig, run: dict, epoch: int,
                 ctx: _Distributed, device, progress: bool) -> dict:
    """One epoch: train on this process's share of the batches, evaluate the tune and valid views, gather every
    process's predictions; return the history row (rank 0 computes it, every process receives it)."""
    train_images = run["train"]
    groups = list(train_images.groupby("study_path", sort=False).indices.values())
    loaders["train"].sampler.batches = epoch_batches(len(train_images), cfg.batch_size, True, cfg.seed, epoch,
                                                     groups if cfg.loss_level == "study" else None,
                                                     ctx.rank, ctx.world_size)
    eval_model = model if ctx.world_size == 1 else _unwrap(model)  # no collectives in evaluation
    started = time.perf_counter()
    trained = train_one_epoch(model, loaders["train"], optimizer, scaler, device, weights["train"], cfg, epoch,
                              progress and ctx.is_main, ctx.rank)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.perf_counter() - started  # rank 0's; its images/s counts every process's views
    tuned = None if loaders["tune"] is None else evaluate_views(eval_model, loaders["tune"], device, weights["tune"],
                                                                cfg.amp, cfg.channels_last, desc="tune",
                                                                progress=progress and ctx.is_main)
    validated = evaluate_views(eval_model, loaders["valid"], device, weights["valid"], cfg.amp, cfg.channels_last,
                               progress=progress and ctx.is_main)
    trained, validated = _gather_result(trained, ctx), _gather_result(validated, ctx)
    tuned = None if tuned is None else _gather_result(tuned, ctx)
    row = None
    if ctx.is_main:  # the metrics, once, on every view's prediction
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               **_epoch_metrics("train", train_images, trained),
               **(_epoch_metrics("tune", run["tune"], tuned) if tuned else {}),
               **_epoch_metrics("valid", run["valid"], validated),
               "epoch_time_s": time.perf_counter() - started,
               "train_images_per_s": len(trained["probs"]) / train_time, "processes": ctx.world_size}
    return _from_main(row, ctx)


def _print_epoch(row: dict, cfg: TrainConfig, epoch: int, improved: bool) -> None:
    """The epoch's line: its losses and AUROCs, images/s, and whether it is the best so far."""
    shown = [f"{k.replace('_', ' ')} {row[k]:.4f}" for k in ("train_loss", "tune_loss", "tune_auroc", "valid_loss",
                                                              "valid_auroc") if k in row]
    print(f"epoch {epoch + 1}/{cfg.epochs}  " + "  ".join(shown) +
          f"  {row['train_images_per_s']:.0f} img/s" + ("  (best)" if improved else ""), flush=True)


def launch_training(cfg: TrainConfig | AnomalyConfig, devices: int | str = "auto",
                    progress: bool = True) -> pd.DataFrame:
    """Train a TrainConfig (train) or an autoencoder's AnomalyConfig (train_anomaly) on `devices` processes and
    return the history: "auto" uses every visible GPU; 1 (or one GPU, or none, or a GAN) trains in this process;
    N > 1 starts N worker processes with torchrun (NCCL on GPUs, gloo on a CPU), shows rank 0's epoch lines, and
    raises with the workers' output when one fails."""
    anomaly = isinstance(cfg, AnomalyConfig)
    n = torch.cuda.device_count() if devices == "auto" else int(devices)
    if n <= 1 or (anomaly and cfg.is_gan):  # the GANs stay on one device (train_anomaly says why)
        return train_anomaly(cfg, progress) if anomaly else train(cfg, progress)
    out = Path(cfg.output_dir)
    fd, config = tempfile.mkstemp(prefix="mura_launch_", suffix=".json")  # the workers' settings: outside the run
    with os.fdopen(fd, "w") as f:  # folder, where the run alone writes (and moves aside what it did not write)
        json.dump(_config_dict(cfg), f, indent=2)
    module_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [module_dir, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "mura_helpers", "train-anomaly" if anomaly else "train", "--config", config, "--no-progress"]
    lines = []
    try:
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                lines.append(line)
                if progress and (line.startswith(("epoch ", "resuming ")) or (anomaly and " epoch " in line)):
                    print(line, end="", flush=True)
    finally:
        os.unlink(config)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training on {n} processes failed (exit {proc.returncode}); the workers' "
                           f"last output:\n{''.join(lines[-40:])}")
    return pd.read_csv(out / "history.csv")


def _keep_top_k_weights(model, cfg: TrainConfig, history: list[dict], epoch: int, folder: Path) -> None:
    """Save this epoch's weights as epoch_NNN.pt, keeping only the files of the cfg.keep_top_k best epochs."""
    save_atomic({"model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
                 "config": _config_dict(cfg), "epoch": epoch}, folder / f"epoch_{epoch + 1:03d}.pt")
    for path in _rank_epoch_files(folder, history, cfg.select_metric)[cfg.keep_top_k:]:
        path.unlink()


def _rank_epoch_files(folder: Path, history: list[dict], metric: str) -> list[Path]:
    """The epoch_NNN.pt files of this run's epochs in `folder`, best first by `metric` (epochs without a score
    last); files of epochs not in `history` (an earlier run's) are left out."""
    sign = 1 if SELECT_METRICS[metric] == "min" else -1
    scores = {int(row["epoch"]): sign * float(row[metric]) for row in history if not math.isnan(float(row[metric]))}
    epochs = {int(row["epoch"]) for row in history}
    files = {e: p for p in folder.glob("epoch_*.pt") if (e := int(p.stem.split("_")[1])) in epochs}
    return [files[e] for e in sorted(files, key=lambda e: (e not in scores, scores.get(e, 0.0), e))]


def top_k_checkpoints(run_dir: str | os.PathLike, k: int = 5) -> list[Path]:
    """The k best saved epochs of a run, best first by its selection metric (the MURA paper's ensemble: k=5)."""
    run_dir = Path(run_dir)
    config, history = run_dir / "config.json", run_dir / "history.csv"
    if not config.is_file() or not history.is_file():
        raise FileNotFoundError(f"{run_dir}: not a training run (no config.json/history.csv); train one first")
    metric = json.loads(config.read_text())["select_metric"]
    ranked = _rank_epoch_files(run_dir / "checkpoints", pd.read_csv(history).to_dict("records"), metric)
    if not ranked:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no epoch_*.pt weights (train with keep_top_k > 0)")
    return ranked[:k]


def ensemble_checkpoints(run_dirs: Sequence[str | os.PathLike], k: int = 1) -> tuple[list[Path], str]:
    """An ensemble's checkpoints over runs (several seeds) and epochs: each run's best.pt (k=1) or its k best epochs
    (top_k_checkpoints); and a note that says which (the MURA paper's "5 models" could be either)."""
    paths, seeds, metric = [], [], None
    for run_dir in map(Path, run_dirs):
        if k <= 1 and not (run_dir / "checkpoints" / "best.pt").is_file():
            raise FileNotFoundError(f"{run_dir}: no checkpoints/best.pt; train a model with notebook 03 first")
        paths += [run_dir / "checkpoints" / "best.pt"] if k <= 1 else top_k_checkpoints(run_dir, k)
        config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
        seeds.append(config.get("seed"))
        metric = metric or config.get("select_metric")
    members = "best.pt" if k <= 1 else f"the {k} best epochs by {metric}"
    runs = f"of {len(seeds)} run{'s' if len(seeds) > 1 else ''} (seed{'s' if len(seeds) > 1 else ''} " \
           f"{', '.join(map(str, seeds))})"
    return paths, f"{len(paths)} checkpoint{'s' if len(paths) > 1 else ''}: {members} {runs}"


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """Load a checkpoint (weights_only, its digest checked) and return (model in eval mode, its TrainConfig)."""
    state = _load_state(path, "supervised")
    cfg = _stored_config(TrainConfig, state, path)
    model = build_model(pretrained=False, arch=cfg.arch)
    model.load_state_dict(state["model"])
    return model.to(resolve_device(device)).eval(), cfg


# ---------------------------------------------------------------- evaluation & metrics

def study_metrics(labels, probs, threshold: float = 0.5) -> dict:
    """Accuracy, Cohen's kappa, AUROC, sensitivity, specificity and the confusion counts and row-normalised rates."""
    labels, probs = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    preds = (probs > threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, preds, labels=[0, 1]).ravel())
    one_class = len(np.unique(labels)) < 2
    if one_class:
        warnings.warn(f"only one class in the labels ({len(labels)} studies): AUROC is undefined (NaN)", stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa = cohen_kappa_score(labels, preds) if len(np.unique(np.r_[labels, preds])) > 1 else float("nan")
    return {
        "accuracy": (tp + tn) / max(len(labels), 1), "kappa": float(kappa),
        "auroc": float("nan") if one_class else float(roc_auc_score(labels, probs)),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
        "tn_rate": tn / (tn + fp) if tn + fp else float("nan"), "fp_rate": fp / (tn + fp) if tn + fp else float("nan"),
        "fn_rate": fn / (fn + tp) if fn + tp else float("nan"), "tp_rate": tp / (fn + tp) if fn + tp else float("nan"),
    }


def predict_studies(model, studies: pd.DataFrame, image_size: int = 224, resize: str = "squash",
                    cache_dir: str | os.PathLike = "data/cache", device: str = "auto", batch_size: int = 64,
                    amp: str = "auto", num_workers: int = 0, upright: bool = False) -> pd.DataFrame:
    """Each study's abnormality probability: the mean of its views' probabilities (abnormal when > 0.5); the views
    prepared as the model was trained (image_size, resize, upright: its TrainConfig's)."""
    images = studies_to_images(studies)
    cache = build_image_cache(images["image_path"], image_size, cache_dir, resize, progress=False, upright=upright)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    loader = make_view_loader(cache, images, batch_size, num_workers=num_workers, pin_memory=dev.type == "cuda")
    result = evaluate_views(model, loader, dev, (0.5, 0.5), amp, desc="predict", progress=False)
    views = images.iloc[result["index"]].assign(prob=result["probs"])
    out = views.groupby("study_path", sort=False).agg(label=("label", "first"), prob=("prob", "mean"),
                                                      n_views=("prob", "size"), view_probs=("prob", list))
    return out.reset_index()


def youden_threshold(labels, probs) -> float:
    """The threshold that maximises sensitivity + specificity - 1 (Youden's J) on these labels."""
    fpr, tpr, thresholds = roc_curve(np.asarray(labels, int), np.asarray(probs, float), drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    if best == 0:  # the (0, 0) corner: call nothing abnormal
        return 1.0
    # roc_curve counts prob >= t as abnormal, the suite prob > t: return the midpoint to the next lower score
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else thresholds[best] - 1e-6
    return float((thresholds[best] + lower) / 2)


CI_METRICS = ("accuracy", "kappa", "auroc", "sensitivity", "specificity")


def _resample_counts(groups, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, rows) multiplicities of each row when its group (a patient) is drawn with replacement: a group's
    rows are drawn together. With one row per group this is the plain bootstrap of rows."""
    codes, uniques = pd.factorize(np.asarray(groups))  # groups in order of appearance
    n = len(uniques)
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    counts = np.bincount((np.arange(n_boot)[:, None] * n + idx).ravel(), minlength=n_boot * n).reshape(n_boot, n)
    return counts[:, codes]


def _weighted_auroc_rows(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """AUROC of labels `y` and scores `p` under each row of row weights `w` (Mann-Whitney with multiplicities; ties
    count one half; NaN when a row holds one class only)."""
    order = np.argsort(p, kind="stable")
    p, y, w = p[order], y[order], w[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(p)) + 1]  # runs of tied scores
    pos, neg = np.add.reduceat(w * y, starts, axis=1), np.add.reduceat(w * (1 - y), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(divide="ignore", invalid="ignore"):
        return (pos * (below + neg / 2)).sum(1) / (pos.sum(1) * neg.sum(1))


def auroc_interval(labels, scores, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
                   patients=None) -> tuple[float, float]:
    """A (1 - alpha) percentile bootstrap interval of the AUROC, resampling the rows (studies) with replacement, or
    with `patients` (one per row) the patients, each with all its rows."""
    labels, scores = np.asarray(labels, int), np.asarray(scores, float)
    counts = _resample_counts(np.arange(len(labels)) if patients is None else patients, n_boot, seed)
    draws = _weighted_auroc_rows(counts, labels, scores)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return np.nan, np.nan
    lo, hi = np.percentile(draws, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_metrics(labels, probs, threshold: float = 0.5, n_boot: int = 2000, seed: int = 0,
                      alpha: float = 0.05, patients=None) -> pd.DataFrame:
    """Each study metric with a (1 - alpha) percentile bootstrap interval, resampling studies with replacement, or
    with `patients` (one per study) the patients, a patient's studies together (what independence means here).

    Vectorised over resamples; resamples with one class only (AUROC undefined) are left out of the AUROC interval.
    """
    labels, probs = np.asarray(labels, int), np.asarray(probs, float)
    point = study_metrics(labels, probs, threshold)
    counts = _resample_counts(np.arange(len(labels)) if patients is None else patients, n_boot, seed)
    pred = (probs > threshold).astype(int)
    tp, tn = counts @ (pred & labels), counts @ ((1 - pred) & (1 - labels))
    fp, fn = counts @ (pred & (1 - labels)), counts @ ((1 - pred) & labels)
    n = counts.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        po = (tp + tn) / n
        pe = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
        draws = {"accuracy": po, "kappa": np.where(pe < 1, (po - pe) / (1 - pe), np.nan),
                 "auroc": _weighted_auroc_rows(counts, labels, probs),
                 "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp)}
    rows = []
    for name in CI_METRICS:
        values = draws[name][np.isfinite(draws[name])]
        lo, hi = (np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(values)
                  else (np.nan, np.nan))
        rows.append({"metric": name, "estimate": point[name], "ci_low": lo, "ci_high": hi,
                     "n_boot_used": len(values)})
    return pd.DataFrame(rows).set_index("metric")


def trivial_baselines(labels) -> pd.DataFrame:
    """What rules that look at no image score on these labels: calling every study the majority class (accuracy,
    sensitivity, specificity; Cohen's kappa 0) and any constant score (AUROC 0.5)."""
    labels = np.asarray(labels, int)
    majority = int(labels.mean() > 0.5)  # a tie calls every study normal
    rule = f"every study {'abnormal' if majority else 'normal'} ({int((labels == majority).sum())}/{len(labels)})"
    rows = {"accuracy": (float((labels == majority).mean()), rule), "kappa": (0.0, "chance (any rule blind to "
            "the image)"), "auroc": (0.5, "chance (a constant or random score)"),
            "sensitivity": (float(majority), rule), "specificity": (float(1 - majority), rule)}
    return pd.DataFrame(rows, index=["baseline", "baseline_rule"]).T.rename_axis("metric") \
        .astype({"baseline": float})


def evaluation_report(preds: pd.DataFrame, n_boot: int = 2000, seed: int = 0, level: str = "patient",
                      tune_preds: pd.DataFrame | None = None) -> pd.DataFrame:
    """Study metrics with 95% bootstrap CIs (resampled by patient, or by study with level="study") at the paper's
    0.5 threshold and at Youden's threshold, chosen on `tune_preds` (the tuning split) or, without them, on these
    studies themselves (then optimistic, and labelled so); beside each, the trivial baseline on these studies."""
    if level not in ("patient", "study"):
        raise ValueError(f"level must be 'patient' or 'study', got {level!r}")
    if level == "patient" and "patient" not in preds:
        raise ValueError("a bootstrap by patient needs a 'patient' column (ensemble_predict adds it); or level='study'")
    patients = preds["patient"].to_numpy() if level == "patient" else None
    chosen = preds if tune_preds is None else tune_preds
    youden = youden_threshold(chosen["label"], chosen["prob"])
    where = "this set" if tune_preds is None else "the tuning set"
    baselines = trivial_baselines(preds["label"])
    tables = []
    for name, threshold in (("0.5 (MURA paper)", 0.5), (f"{youden:.3f} (Youden, chosen on {where})", youden)):
        table = bootstrap_metrics(preds["label"], preds["prob"], threshold, n_boot, seed, patients=patients)
        tables.append(table.join(baselines).assign(threshold=name, threshold_value=threshold, resampled=level))
    return pd.concat(tables).reset_index().set_index(["threshold", "metric"])


def run_studies(cfg: TrainConfig, data_dir: str | os.PathLike | None = None) -> dict[str, pd.DataFrame | None]:
    """A run's studies as it used them: 'train' (without the tuning patients), 'tune' (None when tune_fraction is 0)
    and 'test' (MURA's validation split)."""
    root = config_data_root(cfg, data_dir)
    train, tune = tuning_split(load_studies(root, "train", cfg.body_part, on_bad=cfg.on_bad), cfg.tune_fraction,
                               cfg.split_seed)
    return {"train": train, "tune": tune if cfg.tune_fraction > 0 else None,
            "test": load_studies(root, "valid", cfg.body_part, on_bad=cfg.on_bad)}


_SCORE_ID_COLUMNS = ("image_path", "study_path", "patient", "label", "subset")  # a score table's non-scores


def model_free_floor(sets: dict[str, pd.DataFrame], train_studies: pd.DataFrame,
                     cache_dir: str | os.PathLike = "data/cache", size: int = 64, n_boot: int = 2000, seed: int = 0,
                     level: str = "patient", progress: bool = True) -> pd.DataFrame:
    """The unsupervised path's model-free scores (reference_anomaly_scores: template error against the mean normal
    view of `train_studies`, intensity, hand area; full+HE preprocessing at `size` px) as study-level AUROCs with
    95% bootstrap CIs (by patient, or by study), on each named set of studies."""
    template = studies_to_images(train_studies[train_studies["label"] == 0])
    views = {name: studies_to_images(studies) for name, studies in sets.items()}
    paths = list(dict.fromkeys([*template["image_path"], *(p for v in views.values() for p in v["image_path"])]))
    cache = build_anomaly_cache(paths, PreprocessConfig(size=size), cache_dir, progress=progress)
    rows = []
    for name, images in views.items():
        scores = study_scores(reference_anomaly_scores(cache, images, template))
        if "patient" not in scores:  # (study_scores keeps the views' patient column)
            scores = scores.merge(sets[name][["study_path", "patient"]], on="study_path")
        for score in [c for c in scores.columns if c not in _SCORE_ID_COLUMNS]:
            low, high = auroc_interval(scores["label"], scores[score], n_boot, seed,
                                       patients=scores["patient"] if level == "patient" else None)
            rows.append({"set": name, "score": score, "auroc": roc_auc_score(scores["label"], scores[score]),
                         "ci_low": low, "ci_high": high, "n_studies": len(scores)})
    return pd.DataFrame(rows)


_MURA_PAPER_CAVEAT = ("MURA's hidden test set, labelled by the majority vote of radiologists; the paper's model is "
                      "'an ensemble of the 5 models with the lowest validation losses', which does not say whether "
                      "these are 5 checkpoints of one run or 5 runs; chosen on MURA's validation split")
_REFERENCE_RESULTS = pd.DataFrame([
    {"source": "Reference report (2023), DenseNet-169, MURA hand, validation", "metric": "accuracy",
     "set": "MURA hand validation split, 167 studies (101 normal)", "value": 0.611, "baseline": 101 / 167,
     "baseline_rule": "every study normal (101/167)",
     "note": "best validation accuracy, its Figure 31: 102/167 studies, one more than calling every study normal; "
             "the best of its 5 epochs by accuracy on these same 167 studies (chosen on the set it is reported on); "
             "its DenseNet loaded ImageNet weights with strict=False (pyaf/DenseNet-MURA-PyTorch densenet.py:24) into "
             "renamed layers whose keys do not match, so its dense layers started untrained"},
    {"source": "Rajpurkar et al. 2017 (MURA paper), DenseNet-169, hand, hidden test set", "metric": "kappa",
     "set": "MURA hidden test set, hand studies", "value": 0.851, "baseline": 0.0, "baseline_rule": "chance",
     "note": "Cohen's kappa vs radiologists' gold standard; " + _MURA_PAPER_CAVEAT},
    {"source": "Rajpurkar et al. 2017 (MURA paper), best radiologist, all body parts, hidden test set",
     "metric": "kappa", "set": "MURA hidden test set, all body parts", "value": 0.778, "baseline": 0.0,
     "baseline_rule": "chance",
     "note": "the best of the paper's three radiologists against the gold standard (the majority vote of three "
             "others), as the MURA leaderboard cites it (stanfordmlgroup.github.io competitions/mura/index.html); "
             "the paper's model: 0.705 overall (_PAPER_KAPPA_BY_TYPE)"},
    {"source": "Rajpurkar et al. 2017 (MURA paper), DenseNet-169, all body parts, hidden test set",
     "metric": "auroc", "set": "MURA hidden test set, all body parts", "value": 0.929, "baseline": 0.5,
     "baseline_rule": "chance",
     "note": "overall AUROC; " + _MURA_PAPER_CAVEAT},
    {"source": "Davletshina et al. 2020, best unsupervised (alpha-GAN), MURA hand, test", "metric": "auroc",
     "set": "their test split of MURA's training hands", "value": 0.607, "baseline": 0.5, "baseline_rule": "chance",
     "note": "ROC-AUC from the discriminator; chosen by ROC-AUC on their validation split of MURA's training hands, "
             "reported on their test split of it"},
])
_HEADLINE_METRICS = ("accuracy", "kappa", "auroc")


def _at_half(report: pd.DataFrame) -> pd.DataFrame:
    """The rows of an evaluation_report at its first threshold (the paper's 0.5)."""
    return report.xs(report.index.get_level_values(0)[0], level=0)


def comparison_table(report: pd.DataFrame, label: str = "this model", tune_report: pd.DataFrame | None = None,
                     floor: pd.DataFrame | None = None, models: str = "best.pt") -> pd.DataFrame:
    """Our estimates at 0.5 with their CIs, on the tuning split (when given) and the held-out test, the model-free
    floor (when given), and the cited reference numbers (cited, not recomputed), each beside its trivial
    baseline, with what was chosen on which set in the note."""
    tuned = tune_report is not None
    names = {"tune": "tuning split (of MURA's training patients)",
             "test": "MURA validation split, held out (scored once)" if tuned else
             "MURA validation split, which also chose the checkpoint (tune_fraction=0)"}
    sets = ([(names["tune"], tune_report,
              f"{models}; chose the checkpoint(s), the learning-rate plateaus and Youden's threshold on this set")]
            if tuned else [])
    sets.append((names["test"], report, f"{models}; " + ("selected on the tuning split, not on this set" if tuned else
                                                         "chosen on the set it is reported on: optimistic")))
    rows = []
    for name, rep, note in sets:
        ours = _at_half(rep)
        rows += [{"source": label, "set": name, "metric": m, "value": ours.loc[m, "estimate"],
                  "ci_low": ours.loc[m, "ci_low"], "ci_high": ours.loc[m, "ci_high"],
                  "baseline": ours.loc[m, "baseline"], "baseline_rule": ours.loc[m, "baseline_rule"],
                  "note": f"95% CI resampled by {ours['resampled'].iloc[0]}; {note}"} for m in _HEADLINE_METRICS]
    for row in ([] if floor is None else floor.reset_index().to_dict("records")):
        rows.append({"source": f"no model: {row['score']} (model-free floor)", "set": names[row["set"]],
                     "metric": "auroc",
                     "value": row["auroc"], "ci_low": row["ci_low"], "ci_high": row["ci_high"], "baseline": 0.5,
                     "baseline_rule": "chance", "note": "template error or hand size, no training "
                     "(reference_anomaly_scores, study mean of its views); a model should beat it"})
    return pd.concat([pd.DataFrame(rows), _REFERENCE_RESULTS], ignore_index=True)[
        ["source", "set", "metric", "value", "ci_low", "ci_high", "baseline", "baseline_rule", "note"]]


def headline_table(report: pd.DataFrame, tune_report: pd.DataFrame | None = None,
                   floor: pd.DataFrame | None = None) -> pd.DataFrame:
    """The headline numbers at 0.5 side by side: tuning split and held-out test, each with its 95% CI and the
    trivial baseline on that set; the model-free floor's AUROCs as extra rows (phantom)."""
    columns = {}
    for prefix, rep in (("tune", tune_report), ("test", report)):
        if rep is None:
            continue
        ours = _at_half(rep)
        columns.update({prefix: ours["estimate"], f"{prefix}_ci_low": ours["ci_low"],
                        f"{prefix}_ci_high": ours["ci_high"], f"{prefix}_baseline": ours["baseline"]})
    table = pd.DataFrame(columns).assign(baseline_rule=_at_half(report)["baseline_rule"].str.replace(
        r" \(\d+/\d+\)", "", regex=True))
    if floor is not None:
        for score, rows in floor.groupby("score", sort=False):
            values = {}
            for prefix in ("tune", "test"):
                row = rows[rows["set"] == prefix]
                if prefix in table and len(row):
                    values.update({prefix: row["auroc"].iloc[0], f"{prefix}_ci_low": row["ci_low"].iloc[0],
                                   f"{prefix}_ci_high": row["ci_high"].iloc[0], f"{prefix}_baseline": 0.5})
            table.loc[f"auroc, no model: {score}"] = {**values, "baseline_rule": "chance"}
    return table.rename_axis("metric")


def _findings_by_study(findings: pd.DataFrame) -> pd.Series:
    """Phantom only: the planted finding type of each abnormal study, indexed by (split, body part, patient, study)."""
    keys = [_relative_key(p)[:-1] for p in findings["image_path"]]
    return pd.Series(list(findings["finding"]), index=pd.MultiIndex.from_tuples(keys)).groupby(level=[0, 1, 2, 3]) \
        .first()


def metrics_by_finding(studies: pd.DataFrame, findings: pd.DataFrame, scores: Sequence[str] = ("prob",),
                       threshold: float | None = None, intervals: bool = False) -> pd.DataFrame:
    """Phantom only: per planted finding type (and all), its abnormal studies' count and each score's AUROC against
    all normal studies; with `threshold`, also the share of them scored above it (the sensitivity); with
    `intervals`, each AUROC's 95% interval resampled by patient (auroc_interval; `studies` needs a patient column)."""
    kinds = _findings_by_study(findings)
    finding = [kinds.get(_relative_key(p), "(none listed)") if label else None
               for p, label in zip(studies["study_path"], studies["label"])]
    studies = studies.assign(finding=finding)
    is_normal = studies["label"] == 0
    rows = []
    for kind in [*sorted(studies["finding"].dropna().unique()), "all"]:
        is_abnormal = studies["label"] == 1 if kind == "all" else studies["finding"] == kind
        abnormal, both = studies[is_abnormal], studies[is_normal | is_abnormal]  # (in the studies' order)
        row = {"finding": kind, "n_abnormal": len(abnormal), "n_normal": int(is_normal.sum())}
        both_classes = bool(row["n_normal"] and len(abnormal))
        for score in scores:
            row[f"auroc_{score}"] = roc_auc_score(both["label"], both[score]) if both_classes else np.nan
            if intervals:
                row[f"auroc_{score}_ci_low"], row[f"auroc_{score}_ci_high"] = (
                    auroc_interval(both["label"], both[score], patients=both["patient"]) if both_classes
                    else (np.nan, np.nan))
            if threshold is not None:
                row[f"sensitivity_{score}"] = float((abnormal[score] > threshold).mean()) if len(abnormal) else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("finding")


# The MURA paper's Table 2, model column: Cohen's kappa (95% CI) per study type against the radiologists' majority
# vote on its hidden test set (Rajpurkar et al. 2017); cited, not recomputed.
_PAPER_KAPPA_BY_TYPE = {"XR_ELBOW": 0.710, "XR_FINGER": 0.389, "XR_FOREARM": 0.737, "XR_HAND": 0.851,
                       "XR_HUMERUS": 0.600, "XR_SHOULDER": 0.729, "XR_WRIST": 0.931, "overall": 0.705}


def metrics_by_body_part(preds: pd.DataFrame, threshold: float = 0.5, n_boot: int = 2000,
                         seed: int = 0) -> pd.DataFrame:
    """The paper's Table 2 layout: per study type and overall, the studies, Cohen's kappa with its 95% bootstrap
    interval (studies resampled), accuracy and AUROC, beside the paper's model kappa (its hidden test set)."""
    body_part = [_relative_key(p)[1] if len(_relative_key(p)) > 1 else "?" for p in preds["study_path"]]
    preds = preds.assign(body_part=body_part)
    rows = []
    for part, group in [*preds.groupby("body_part", sort=True), ("overall", preds)]:
        table = bootstrap_metrics(group["label"], group["prob"], threshold, n_boot, seed)
        rows.append({"study_type": part, "studies": len(group), "abnormal": int(group["label"].sum()),
                     "kappa": table.loc["kappa", "estimate"], "kappa_ci_low": table.loc["kappa", "ci_low"],
                     "kappa_ci_high": table.loc["kappa", "ci_high"], "accuracy": table.loc["accuracy", "estimate"],
                     "auroc": table.loc["auroc", "estimate"],
                     "paper_model_kappa": _PAPER_KAPPA_BY_TYPE.get(part, np.nan)})
    return pd.DataFrame(rows).set_index("study_type")


def load_ensemble(checkpoints: str | os.PathLike | Sequence[str | os.PathLike], device: str = "auto"):
    """Load one or several checkpoints; return (models, the first one's TrainConfig)."""
    paths = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    if not paths:
        raise FileNotFoundError("no checkpoints given")
    loaded = [load_checkpoint(p, device) for p in paths]
    sizes = {(cfg.image_size, cfg.resize, cfg.upright) for _, cfg in loaded}
    if len(sizes) > 1:
        raise ValueError(f"the checkpoints were trained at different input settings {sizes} (image_size, resize, "
                         f"upright); ensemble like with like")
    splits = {(c.data_dir, c.phantom_seed, c.phantom_patients, c.body_part, c.tune_fraction, c.split_seed)
              for _, c in loaded}
    if len(splits) > 1:  # a member's training patients would be another's tuning patients
        raise ValueError(f"the checkpoints were trained on different data or tuning splits {splits} (data_dir, "
                         f"phantom_seed, phantom_patients, body_part, tune_fraction, split_seed); ensemble runs that "
                         f"share them (several seeds: change only `seed`)")
    return [m for m, _ in loaded], loaded[0][1]


def ensemble_predict(models, studies: pd.DataFrame, image_size: int, resize: str = "squash",
                     cache_dir: str | os.PathLike = "data/cache", device: str = "auto",
                     upright: bool = False) -> pd.DataFrame:
    """Study predictions averaged over models (the MURA paper: the 5 best checkpoints); one model works too."""
    runs = [predict_studies(m, studies, image_size, resize, cache_dir, device, upright=upright) for m in models]
    out = runs[0].copy()
    out["prob"] = np.mean([r["prob"].to_numpy() for r in runs], axis=0)
    out["view_probs"] = [list(np.mean(v, axis=0)) for v in zip(*[r["view_probs"] for r in runs])]
    out["model_probs"] = [list(v) for v in zip(*[r["prob"] for r in runs])]
    return out.merge(studies[["study_path", "patient", "image_paths"]], on="study_path")


def confident_cases(preds: pd.DataFrame, threshold: float = 0.5, k: int = 2) -> pd.DataFrame:
    """The k most confident true/false positives and negatives (by distance of the probability from 0.5)."""
    predicted = (preds["prob"] > threshold).astype(int)
    kind = np.select([(predicted == 1) & (preds["label"] == 1), (predicted == 1) & (preds["label"] == 0),
                      (predicted == 0) & (preds["label"] == 1)], ["true positive", "false positive",
                                                                   "false negative"], "true negative")
    cases = preds.assign(case=kind, confidence=(preds["prob"] - 0.5).abs())
    order = ["true positive", "false positive", "false negative", "true negative"]
    top = cases.sort_values("confidence", ascending=False).groupby("case").head(k)
    return top.assign(case=pd.Categorical(top["case"], order, ordered=True)).sort_values(["case", "confidence"],
                                                                                          ascending=[True, False])


# ---------------------------------------------------------------- heatmaps: class activation maps (the MURA paper)

def class_activation_maps(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CAMs of a DenseNet-style model (features -> ReLU -> global pool -> linear): (maps (B, h, w), logits (B)).

    The map is sum_k w_k * ReLU(features)_k, so its spatial mean plus the bias is the logit. The features are
    taken by calling model.features directly and applying a fresh (not in-place) ReLU, which avoids the pitfall
    of hooking torchvision's DenseNet, whose forward applies ReLU in place to the hooked tensor.
    """
    features = F.relu(model.features(x)).float()
    weight, bias = model.classifier.weight[0].float(), model.classifier.bias[0].float()
    maps = torch.einsum("bchw,c->bhw", features, weight)
    return maps, maps.mean(dim=(1, 2)) + bias


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] (min-max; a constant map, up to float rounding, becomes all zeros)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    varies = (hi - lo) > 1e-5 * hi.abs().clamp_min(1.0)  # else rounding noise would be stretched to [0, 1]
    return torch.where(varies, (maps - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(maps))


def _map_to_original(cam: np.ndarray, size: tuple[int, int], resize: str) -> np.ndarray:
    """Bring a square map at the model's input size back onto the original view's pixel grid (w, h)."""
    w, h = size
    if resize == "pad":
        s = cam.shape[0]
        scale = s / max(w, h)
        cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
        x0, y0 = (s - cw) // 2, (s - ch) // 2
        cam = cam[y0:y0 + ch, x0:x0 + cw]
    return np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))


def view_heatmaps(models, image_paths: Sequence[str], image_size: int, resize: str = "squash",
                  device: str = "auto", batch_size: int = 32, upright: bool = False) -> list[dict]:
    """For each view: the grey image (as stored), its CAM in [0, 1] on the image's own pixel grid (averaged over
    models), and its abnormality probability (averaged over models), the model's input prepared as it was trained
    (image_size, resize, upright). Runs in batches of `batch_size` views."""
    if len(image_paths) == 0:
        return []
    if len(image_paths) > batch_size:
        return [h for i in range(0, len(image_paths), batch_size)
                for h in view_heatmaps(models, image_paths[i:i + batch_size], image_size, resize, device, batch_size,
                                       upright)]
    models = models if isinstance(models, (list, tuple)) else [models]
    dev = resolve_device(device)
    images = [load_image(p) for p in image_paths]
    views = torch.from_numpy(np.stack([np.asarray(model_input_view(im, image_size, resize, upright))
                                       for im in images]))[:, None]
    x = prepare_batch(views, dev, train=False, channels_last=False)
    maps, probs = [], []
    with torch.inference_mode():
        for model in models:
            m, logits = class_activation_maps(model.to(dev).eval(), x)
            up = F.interpolate(m[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
            maps.append(normalise_maps(up).cpu().numpy())
            probs.append(torch.sigmoid(logits).cpu().numpy())
    mean_maps, mean_probs = np.mean(maps, axis=0), np.mean(probs, axis=0)
    return [{"image_path": str(p), "image": np.asarray(im), "cam": _map_to_original(cam, im.size, resize),
             "prob": float(prob)} for p, im, cam, prob in zip(image_paths, images, mean_maps, mean_probs)]


def heatmap_localisation(heatmaps: Sequence[dict], boxes: pd.DataFrame) -> pd.DataFrame:
    """Score maps against ground-truth boxes: pointing game (is the peak inside? a flat map has none: a miss) and
    the share of heat inside, beside the box's share of the image (what a uniform map would score)."""
    rows = []
    for h in heatmaps:
        for b in boxes[boxes["image_file"] == h["image_path"]].itertuples():
            cam = h["cam"]
            inside = np.zeros(cam.shape, bool)
            inside[b.y0:b.y1 + 1, b.x0:b.x1 + 1] = True
            peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
            hit = bool(inside[peak]) and cam.max() > cam.min()
            rows.append({"image_path": h["image_path"], "finding": b.finding, "pointing_hit": hit,
                         "heat_in_box": float(cam[inside].sum() / max(cam.sum(), 1e-12)),
                         "box_share": float(inside.mean()), "prob": h["prob"]})
    return pd.DataFrame(rows, columns=["image_path", "finding", "pointing_hit", "heat_in_box", "box_share", "prob"])


def cam_localisation(models, studies: pd.DataFrame, boxes: pd.DataFrame, image_size: int, resize: str = "squash",
                     device: str = "auto", upright: bool = False) -> pd.DataFrame:
    """Score the CAMs of every view of `studies` that has a ground-truth box (see heatmap_localisation)."""
    views = studies_to_images(studies)
    scored = list(views.loc[views["image_path"].isin(boxes["image_file"]), "image_path"])
    return heatmap_localisation(view_heatmaps(models, scored, image_size, resize, device, upright=upright), boxes)


# ---------------------------------------------------------------- prediction on a new study

def _study_image_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The image files of one study: a folder's PNG/JPEG files (natural order) or a given list (a file given twice
    counted once, said); all checked first (a view without contrast is warned about)."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source)
        files = sorted((p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
                        and not p.name.startswith(".")), key=_natural_image_order)
        others = [p.name for p in folder.iterdir() if p.is_file() and p not in files]
        if others:
            warnings.warn(f"{folder}: ignored {len(others)} non-image file(s): {others[:5]}", stacklevel=2)
        if not files:
            raise MuraDataError(f"{folder}: no .png/.jpg/.jpeg images in this folder")
    elif isinstance(source, (str, os.PathLike)):
        files = [Path(source)]
    else:
        files = [Path(p) for p in source]
    if not files:
        raise MuraDataError("no views given: a study needs at least one image (a folder of them or a list of files)")
    same_file: dict[str, list[Path]] = {}
    for p in files:
        same_file.setdefault(os.path.realpath(p), []).append(p)
    repeated = [f"{given[0]} given {len(given)} times" for given in same_file.values() if len(given) > 1]
    if repeated:
        warnings.warn("; ".join(repeated) + ": counted once in the study", stacklevel=2)
    files = [given[0] for given in same_file.values()]
    bad = [f"  {p}: {issue}" for p in files if (issue := _check_image_file(p, full_decode=True))]
    if bad:
        raise MuraDataError(f"{len(bad)} unusable image(s):\n" + "\n".join(bad))
    blank = [f"  {p}: {issue}" for p in files if (issue := _contrast_problem(np.asarray(load_image(p))))]
    if blank:
        warnings.warn(f"{len(blank)} of {len(files)} view(s) show nothing to judge, yet count in the study's "
                      f"probability:\n" + "\n".join(blank), stacklevel=2)
    return files


def predict_new_study(checkpoints, source, device: str = "auto") -> dict:
    """Predict one new study (a folder of views or a list of files) with one checkpoint or an ensemble.

    Returns {"study_prob", "abnormal", "views" (DataFrame: image_path, prob), "heatmaps" (per view)}.
    """
    files = _study_image_files(source)
    models, cfg = load_ensemble(checkpoints, device)
    heatmaps = view_heatmaps(models, [str(f) for f in files], cfg.image_size, cfg.resize, device,
                             upright=cfg.upright)
    views = pd.DataFrame({"image_path": [h["image_path"] for h in heatmaps], "prob": [h["prob"] for h in heatmaps]})
    study_prob = float(views["prob"].mean())
    return {"study_prob": study_prob, "abnormal": study_prob > 0.5, "views": views, "heatmaps": heatmaps,
            "n_models": len(models), "image_size": cfg.image_size}


# ---------------------------------------------------------------- plots: data, pipeline, training, results, heatmaps

def _seaborn():
    """seaborn, imported by the first plot that uses it: at the module's top it cost every process that imports
    this module (torchrun ranks, pool workers, notebook kernels; none of them plots) about 1 s of CPU."""
    import seaborn

    return seaborn


def save_figure(fig, name: str, output_dir: str | os.PathLike = "outputs", dpi: int = 120) -> Path:
    """Save `fig` as `output_dir/figures/<name>.png` (a stable name) and return the path."""
    path = Path(output_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def dataset_overview(studies: pd.DataFrame) -> pd.DataFrame:
    """Return per-split counts: patients, studies, images, and abnormal share at study and image level."""
    images = studies_to_images(studies)
    g = studies.groupby("split", sort=False)
    gi = images.groupby("split", sort=False)
    overview = pd.DataFrame({
        "patients": g["patient"].nunique(),
        "studies": g.size(),
        "images": gi.size(),
        "abnormal_studies": g["label"].sum(),
        "abnormal_images": gi["label"].sum(),
    })
    overview["abnormal_study_share"] = (overview["abnormal_studies"] / overview["studies"]).round(3)
    overview["abnormal_image_share"] = (overview["abnormal_images"] / overview["images"]).round(3)
    overview["views_per_study"] = (overview["images"] / overview["studies"]).round(2)
    return overview


def patients_in_both_splits(studies: pd.DataFrame) -> list[str]:
    """Return the patients (per body part) that appear in more than one split: leakage if any."""
    splits = studies.groupby(["body_part", "patient"])["split"].nunique()
    return [f"{part}/{patient}" for (part, patient), n in splits.items() if n > 1]


def plot_xray_grid(images: pd.DataFrame, n: int = 12, seed: int = 0, cols: int = 6, title: str | None = None,
                   boxes: pd.DataFrame | None = None):
    """Show a grid of `n` random views with patient, study and label (and ground-truth boxes when given)."""
    sample = images.sample(min(n, len(images)), random_state=seed)
    rows = math.ceil(len(sample) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, sample.itertuples()):
        ax.imshow(load_image(row.image_path), cmap="gray", vmin=0, vmax=255)
        label = "abnormal" if row.label else "normal"
        ax.set_title(f"{row.patient}\n{row.study.split('_')[0]} view {row.view}: {label}", fontsize=8,
                     color="crimson" if row.label else "black")
        if boxes is not None:
            for b in boxes[boxes["image_file"] == row.image_path].itertuples():
                ax.add_patch(Rectangle((b.x0, b.y0), b.x1 - b.x0, b.y1 - b.y0, fill=False, color="red", lw=1.2))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_patients_per_split(studies: pd.DataFrame):
    """Bar chart of the number of patients in each split (the report's Figure 17)."""
    sns = _seaborn()  # (imported here, not at the top: see _seaborn)
    counts = studies.groupby("split", sort=False)["patient"].nunique().reset_index(name="patients")
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    sns.barplot(data=counts, x="split", y="patients", hue="split", legend=False, ax=ax)
    for c in ax.containers:
        ax.bar_label(c)
    ax.set_title("Patients per split")
    fig.tight_layout()
    return fig


def _split_countplot(data: pd.DataFrame, x: str, title: str, xlabel: str, ylabel: str):
    """Bar chart of the counts of `x`, one bar per split, labelled with the counts."""
    sns = _seaborn()  # (imported here, not at the top: see _seaborn)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    sns.countplot(data=data, x=x, hue="split", ax=ax)
    for c in ax.containers:
        ax.bar_label(c, fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    return fig


def plot_studies_per_patient(studies: pd.DataFrame):
    """Bar chart of how many patients have 1, 2, 3... studies, per split (the report's Figure 18)."""
    per_patient = studies.groupby(["split", "body_part", "patient"]).size().reset_index(name="studies")
    return _split_countplot(per_patient, "studies", "Studies per patient", "studies of one patient", "patients")


def plot_views_per_study(studies: pd.DataFrame):
    """Bar chart of how many studies have 1..5 views (images), per split (the report's Figure 19)."""
    return _split_countplot(studies, "n_views", "Images (views) per study", "views in the study", "studies")


def plot_label_balance(studies: pd.DataFrame):
    """Two bar charts of normal vs abnormal counts per split, at study level and at image level."""
    sns = _seaborn()  # (imported here, not at the top: see _seaborn)
    images = studies_to_images(studies)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, df, level in ((axes[0], studies, "studies"), (axes[1], images, "images")):
        data = df.assign(label=df["label"].map({0: "normal", 1: "abnormal"}))
        sns.countplot(data=data, x="split", hue="label", hue_order=["normal", "abnormal"],
                      palette={"normal": "tab:blue", "abnormal": "tab:red"}, ax=ax)
        for c in ax.containers:
            ax.bar_label(c, fontsize=8)
        ax.set(title=f"Label balance: {level}", ylabel=level)
    fig.tight_layout()
    return fig


def image_properties(images: pd.DataFrame) -> pd.DataFrame:
    """Return each image's width, height, PNG mode and file size, read from the headers (no decode)."""
    rows = []
    for path in images["image_path"]:
        with Image.open(path) as im:
            rows.append({"image_path": path, "width": im.width, "height": im.height, "mode": im.mode,
                         "bytes": Path(path).stat().st_size})
    return images.merge(pd.DataFrame(rows), on="image_path")


def plot_image_properties(props: pd.DataFrame):
    """Scatter of image width vs height coloured by PNG mode, and the count of each mode per split."""
    sns = _seaborn()  # (imported here, not at the top: see _seaborn)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1.4, 1]})
    sns.scatterplot(data=props, x="width", y="height", hue="mode", style="split", alpha=0.6, s=18, ax=axes[0])
    axes[0].set_title("Image sizes (pixels)")
    sns.countplot(data=props, x="mode", hue="split", ax=axes[1])
    for c in axes[1].containers:
        axes[1].bar_label(c, fontsize=8)
    axes[1].set_title("Stored PNG modes (all are read as 8-bit grey)")
    fig.tight_layout()
    return fig


def plot_intensity_histograms(images: pd.DataFrame, n_per_label: int = 40, seed: int = 0):
    """Pixel-intensity histograms of sampled normal and abnormal views, and each image's mean intensity."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    means = {}
    for label, name, color in ((0, "normal", "tab:blue"), (1, "abnormal", "tab:red")):
        subset = images[images["label"] == label]
        if subset.empty:
            continue
        sample = subset.sample(min(n_per_label, len(subset)), random_state=seed)
        pixels = [np.asarray(load_image(p)) for p in sample["image_path"]]
        hist = sum(np.bincount(p.ravel(), minlength=256) for p in pixels)
        axes[0].plot(np.arange(256), hist / hist.sum(), color=color, label=f"{name} ({len(sample)} views)")
        means[name] = [p.mean() for p in pixels]
        axes[1].hist(means[name], bins=20, range=(0, 255), alpha=0.6, color=color, label=name)
    axes[0].set(title="Pixel intensity distribution", xlabel="intensity (0-255)", ylabel="share of pixels",
                yscale="log")
    axes[0].legend()
    axes[1].set(title="Mean intensity per view (bright = inverted or over-exposed)", xlabel="mean intensity",
                ylabel="views")
    axes[1].legend()
    fig.tight_layout()
    return fig


def epoch_table(history: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch table in the layout of the report's Figure 31: confusion rates, losses and accuracies (with the
    tuning split's loss, accuracy, kappa and AUROC when the run had one)."""
    columns = {"epoch": "Epoch"}
    for split, name in (("train", "Training"), ("valid", "Validation")):
        for k, label in (("tn", "True Negative"), ("fp", "False Positive"), ("fn", "False Negative"),
                         ("tp", "True Positive")):
            columns[f"{split}_{k}_rate"] = f"{label} ({name})"
    columns.update({"train_loss": "Training Loss", "train_accuracy": "Training Accuracy"})
    if "tune_loss" in history:
        columns.update({"tune_loss": "Tuning Loss", "tune_accuracy": "Tuning Accuracy", "tune_kappa": "Tuning Kappa",
                        "tune_auroc": "Tuning AUROC"})
    columns.update({"valid_loss": "Validation Loss", "valid_accuracy": "Validation Accuracy",
                    "valid_kappa": "Validation Kappa", "valid_auroc": "Validation AUROC", "lr": "Learning Rate"})
    return history[list(columns)].rename(columns=columns).set_index("Epoch").round(4)


def plot_training_curves(history: pd.DataFrame, select_metric: str = "valid_loss"):
    """Loss, accuracy and Cohen's kappa per epoch for train, tune (when the run had a tuning split) and valid (the
    report's Figure 32), the best epoch by the selection metric marked."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    best = history[select_metric].idxmin() if SELECT_METRICS[select_metric] == "min" else \
        history[select_metric].idxmax()
    tuned = "tune_loss" in history
    splits = [("train", "o-", "train"), ("tune", "^-", "tune (selects)"), ("valid", "s-", "valid (held-out test)")] \
        if tuned else [("train", "o-", "train"), ("valid", "s-", "valid")]
    for ax, metric in zip(axes, ("loss", "accuracy", "kappa")):
        for split, style, label in splits:
            ax.plot(history["epoch"], history[f"{split}_{metric}"], style, label=label)
        ax.axvline(history.loc[best, "epoch"], color="grey", ls="--", lw=1, label=f"best ({select_metric})")
        ax.set(title=metric.capitalize() + (" (weighted BCE)" if metric == "loss" else " (study level)"),
               xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_pipeline_views(images: pd.DataFrame, cache: _ImageCache, n: int = 4, seed: int = 0,
                        rotation_degrees: float = 10.0, hflip: bool = True):
    """For n random views: the raw file, the cached resized view, and two random training augmentations."""
    sample = images.sample(min(n, len(images)), random_state=seed)
    cached = torch.from_numpy(cache.array[cache.rows(sample["image_path"])][:, None].copy())
    generator = torch.Generator().manual_seed(seed)
    augmented = [prepare_batch(cached, torch.device("cpu"), True, generator, rotation_degrees, hflip, False)
                 for _ in range(2)]
    fig, axes = plt.subplots(len(sample), 4, figsize=(10, 2.7 * len(sample)), squeeze=False)
    for i, row in enumerate(sample.itertuples()):
        raw = load_image(row.image_path)
        panels = [(raw, f"raw file {raw.width}x{raw.height}"), (cached[i, 0], f"cached {cache.size}px")]
        panels += [(aug[i, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0], f"augmented #{k + 1}")
                   for k, aug in enumerate(augmented)]
        for ax, (img, title) in zip(axes[i], panels):
            ax.imshow(np.asarray(img), cmap="gray")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        axes[i, 0].set_title(f"{row.patient} ({'abnormal' if row.label else 'normal'})\nraw {raw.width}x{raw.height}",
                             fontsize=9)
    fig.tight_layout()
    return fig


def plot_roc(preds: pd.DataFrame, title: str = "ROC, validation studies", youden: float | None = None):
    """ROC curve with its AUROC, the 0.5 operating point and Youden's point (at `youden`, a threshold chosen on a
    tuning set; None: chosen on these studies)."""
    fpr, tpr, _ = roc_curve(preds["label"], preds["prob"])
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {roc_auc_score(preds['label'], preds['prob']):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for threshold, marker, name in ((0.5, "o", "threshold 0.5"),
                                    (youden_threshold(preds["label"], preds["prob"]) if youden is None else youden,
                                     "s", "Youden" + (" (this set)" if youden is None else " (tuning set)"))):
        m = study_metrics(preds["label"], preds["prob"], threshold)
        ax.plot(1 - m["specificity"], m["sensitivity"], marker, ms=8, label=f"{name} ({threshold:.2f})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_confusion(labels, probs, threshold: float = 0.5):
    """Confusion matrix at a threshold: counts and row-normalised rates side by side."""
    sns = _seaborn()  # (imported here, not at the top: see _seaborn)
    m = study_metrics(labels, probs, threshold)
    counts = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    rates = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.6))
    ticks = ["normal", "abnormal"]
    sns.heatmap(counts, annot=True, fmt="d", cmap="Blues", cbar=False, ax=axes[0], xticklabels=ticks,
                yticklabels=ticks)
    sns.heatmap(rates, annot=True, fmt=".3f", cmap="Blues", vmin=0, vmax=1, cbar=False, ax=axes[1],
                xticklabels=ticks, yticklabels=ticks)
    for ax, name in zip(axes, ("counts", "rates (per true class)")):
        ax.set(xlabel="predicted", ylabel="true", title=f"Confusion {name}, threshold {threshold:.2f}")
    fig.tight_layout()
    return fig


def plot_headline(table: pd.DataFrame, title: str = "Study level, threshold 0.5: 95% CIs and trivial baselines"):
    """Each headline metric's estimate with its CI on the tuning split and the held-out test, the trivial baseline
    of each set marked (x), the model-free floor's AUROCs beside."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(table)), 4))
    sets = [(p, name, c) for p, name, c in (("tune", "tuning split", "tab:orange"), ("test", "held-out test",
                                                                                        "tab:blue")) if p in table]
    x = np.arange(len(table))
    for k, (prefix, name, color) in enumerate(sets):
        dx = (k - (len(sets) - 1) / 2) * 0.22
        est = table[prefix].to_numpy(float)
        err = np.vstack([est - table[f"{prefix}_ci_low"], table[f"{prefix}_ci_high"] - est])
        ax.errorbar(x + dx, est, yerr=np.abs(err), fmt="o", color=color, capsize=4, label=name)
        ax.plot(x + dx, table[f"{prefix}_baseline"], "x", color=color, ms=9, mew=2,
                label=f"trivial baseline ({name})")
    ax.set_xticks(x, [m.replace("auroc, no model: ", "floor AUROC: ") for m in table.index], fontsize=8, rotation=20,
                  ha="right")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(ylabel="value", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_cases(cases: pd.DataFrame, max_views: int = 3):
    """Each case's views in a row, titled with the case type, the study and its probability."""
    fig, axes = plt.subplots(len(cases), max_views, figsize=(2.6 * max_views, 2.8 * len(cases)), squeeze=False)
    for row_axes, case in zip(axes, cases.itertuples()):
        for ax in row_axes:
            ax.axis("off")
        header = f"{case.case}, study p={case.prob:.2f}\n{'/'.join(case.study_path.split('/')[-3:-1])}\n"
        for i, (ax, path) in enumerate(zip(row_axes, case.image_paths)):
            ax.imshow(load_image(path), cmap="gray")
            ax.set_title((header if i == 0 else "") + f"view {i + 1}: p={case.view_probs[i]:.2f}", fontsize=8,
                         color="black" if i else "darkgreen" if case.case.startswith("true") else "crimson")
    fig.tight_layout()
    return fig


def plot_heatmaps(heatmaps: Sequence[dict], boxes: pd.DataFrame | None = None, cols: int = 4, alpha: float = 0.45,
                  title: str | None = None, value_label: str = "p(abnormal)"):
    """Each view with its heatmap overlaid (and ground-truth boxes when given), titled with its score."""
    rows = max(1, math.ceil(len(heatmaps) / cols))  # constrained layout: two-line titles clear the row above
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.5 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    if not heatmaps:
        axes[0, 0].text(0, 0.5, "no views to show", fontsize=10)
    for ax, h in zip(axes.flat, heatmaps):
        ax.imshow(h["image"], cmap="gray")
        ax.imshow(h["cam"], cmap="jet", alpha=alpha, vmin=0, vmax=1)
        parts = Path(h["image_path"]).parts
        ax.set_title(f"{'/'.join(parts[-3:])}\n{value_label} = {h['prob']:.3g}", fontsize=7)
        if boxes is not None:
            for b in boxes[boxes["image_file"] == h["image_path"]].itertuples():
                ax.add_patch(Rectangle((b.x0, b.y0), b.x1 - b.x0, b.y1 - b.y0, fill=False, color="white", lw=1.5))
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- anomaly detection (Davletshina 2020): preprocessing

_MAD_TO_SD = 1.4826  # a normal distribution's standard deviation per median absolute deviation


@dataclass(frozen=True)
class CropRules:
    """The carrier crop's thresholds (find_carrier and what it calls, _collimated_field): one field per threshold,
    with what it measures and why its value. Grey levels are 0-255; "block px" are find_carrier's block means."""

    # the search (find_carrier)
    block: int = 4  # the plate is searched on means of block x block pixels: it is large, and a block's mean has a
    #                 quarter of a pixel's noise (a dark plate only a few levels above a black surround)
    block_min_side: int = 256  # a view with a shorter side is searched pixel by pixel (a block would blur its rim)
    least_pixels: int = 64  # fewer searched pixels, or one level only: no plate can be told from its surround
    otsu_depth: int = 3  # Otsu again on each side of the last threshold, this deep: a dark plate a few levels off a
    #                      black surround lies a few splits down, below the hand and soft tissue that take the first
    classes: int = 3  # a multi-level Otsu's classes: a plate between a darker and a brighter surround
    commonest_bin: int = 16  # the direct-exposure background: the commonest bin of this many levels
    smooth_sigma: float = 1.0  # Gaussian smoothing (block px) before gradients and steps: a block mean's noise
    denoise_sigma: float = 1.5  # where no plate stands out, the search runs again on the block means smoothed over
    #                             this many block px (Gaussian sigma): a low-contrast plate 5-15 levels off its
    #                             surround, whose grain and mottle break its component apart at block scale (phantom
    #                             v7 seed 0, 300 patients: 32 of 123 low-contrast views had no plate found, 5 of them
    #                             masked well); a smoothed view also shows rectangles that are no plate, so there the
    #                             plate must hold every edge of the hand (detail_outside 0) ...
    denoise_sides: int = 3  # ... and show this many of its sides as steps inside the view: a low-contrast plate lies
    #                         within its surround (the phantom's: 78-98% of the view), while a patch of background
    #                         beside a hand or a marker, cut by two of the view's edges, may pass on the other two;
    denoise_most_aspect: float = 2.5  # not in a view this many times as long as wide: a close-up, whose plate fills
    #                                   it (MaskRules.narrow_aspect), its smoothed soft tissue a rectangle
    detail_gradient: float = 4.0  # an edge of the hand: a gradient this many times the view's median one ...
    least_gradient: float = 0.25  # ... that median taken as at least this (levels/block px): a flat view has none
    detail_border: int = 3  # gradients this close (block px) to the view's border are the view's edge, not detail
    large_component: float = 0.05  # components of this share of the largest one's size or more join it in a
    #                                candidate: a hand lying across the plate can cut its background apart
    # plate-like (_plate_rect): shares are of the searched pixels
    min_share: float = 0.25  # a plate covers at least a quarter of the view (the hand lies on it)
    max_share: float = 0.97  # ... and leaves some of it out: the whole view is no plate
    least_plate_pixels: int = 16  # a smaller component is no plate, whatever its rectangle
    min_area_fill: float = 0.45  # the component fills this much of its rectangle: a hand may cover half a plate
    min_hull_fill: float = 0.9  # the component's convex hull fills this much of its rectangle: a plate is one
    min_hull_fill_background: float = 0.85  # ... for the background's class, which may miss a plate's corner (a
    #                                          collimated wedge); a hand's class may not
    along_near: float = 1.5  # a plate reaching past the view's edges (its rectangle around what is in view no
    #                          plate): its rectangle is the one with the most outline pixels within this many px of
    #                          its sides (its own sides, not the view's edges, which cut its corners off)
    rim_gap: float = 2.0  # what lies "outside" the rectangle starts this many px beyond it (1 on each side): its rim
    outside_share: float = 0.01  # outside pixels (of the searched ones) under this share: nothing to tell
    outside_class: float = 0.2  # a plate stands out: at most this share of what lies outside it is of its class
    frame_depth: float = 3.0  # ... or it is framed: a band this deep (px) beyond its rim ...
    frame_seen: float = 0.6  # ... that lies mostly (this share) in the view, with at most outside_class of its class
    # the candidate holds the hand (_holds_the_detail)
    detail_margin: float = 8.0  # the candidate's own edges, this far (block px) on either side of its sides, left out
    detail_outside: float = 2.0  # edges outside at most this many times those inside: the hand lies on the plate
    detail_slack: float = 0.002  # ... plus this share of the view (a few edges of text or a tag outside)
    along_length: float = 0.5  # edges outside it along one of its sides, over this share of the side, are a frame's
    #                            outer rim, not the hand's
    along_spread: int = 3  # ... within this many block px of one distance from the side (a frame tilted off it)
    # the sides are steps (_sides_are_steps)
    step: float = 3.0  # across a plate's side the level changes by this many levels more than just inside it
    step_offset: float = 2.0  # sampled this far (block px) outside and inside the side, and as far again inside
    step_seen: float = 0.5  # a side with less than this share of its length inside the view is not judged
    step_clear: int = 1  # the step is read where neither the sample outside nor the one deepest inside lies within
    #                      this many block px (1 or more) of detail: a hand, a tag or a line of burned-in text across
    #                      a false side made its median a step, and a band of the view was taken for the plate
    #                      (phantom v7 seed 0, 128 px: patient00240 IoU 0.37 -> 0.90, 1057 views at IoU >= 0.85,
    #                      not 1051; at 2 block px, with step_clear_share 0.25, 1054 against 1056) ...
    step_clear_share: float = 0.2  # ... when at least this share of the side is clear (else all of it: a plate
    #                                that the hand covers); at 0.5, 1055; at 0.25, 1056 (patient00072's false side,
    #                                21% clear, read whole); 0.15 as 0.2; seeds 20261206 and 20261207 alike at 0.2
    #                                and 0.25. Not in a close-up (its hand fills it: read beside the hand, seed
    #                                20261206 lost 2 close-ups, seed 0 none)
    # the exposed field inside the plate (_collimated_field, _border_band)
    field_size: int = 256  # the plate is made upright at this many px to look for unexposed borders
    field_least_side: int = 32  # a plate under this many px (upright) is kept whole: too small to hold borders
    field_depth: float = 0.2  # borders are cut at most this deep (share of the plate's side)
    field_middle: float = 0.2  # the field's level and noise are those of its middle: this share in from each side
    field_corners: float = 0.1  # a side's lines leave out this share at each end (the corners: two borders meet)
    band_noise: float = 3.0  # a band's pixels lie within this many of the field's noise of its level
    band_within: float = 0.7  # a border band: at least this share of its pixels at its level ...
    band_after: int = 6  # ... and at most band_after_share of the pixels of the next this many lines
    band_after_share: float = 0.25  # (a border ends abruptly; the field's own background does not)
    # a marker strip along the view's edge (_without_marker_strips)
    strip_depth: float = 0.08  # at most this share of the view's short side deep (the phantom's: 3-6%)
    strip_levels: float = 4.0  # burned in flat: its pixels within this many grey levels of its level (its lettering
    #                            aside: band_within)
    strip_extreme: float = 0.75  # lead: this share of the way from the view's commonest level to its extreme on
    #                              the strip's side or more ...
    strip_least_side: float = 1 / 3  # ... that side's contrast taken as at least this share of the view's larger
    #                                  one: a light strip in a light-grey view with a dark surround lies far from
    #                                  its background on its own side, not towards the surround (phantom v7 seed 0,
    #                                  patient00225: the strip left in, the mask empty); with no floor a dark view's
    #                                  black surround, a few levels off its background, was cut (2 views broken)
    strip_percentile: float = 1.0  # the view's extremes: this percentile in from either end
    # the square (preprocess_view)
    resample_max: int = 4  # a square this many times smaller than the view (or more) is warped at up to this many
    #                        times its size and averaged down: the 128-px square of a 512-px view as smooth as 512's


@dataclass(frozen=True)
class MaskRules:
    """The hand mask's thresholds (_hand_mask and what it calls): one field per threshold, with what it measures and
    why its value. Grey levels are 0-255; pixels are the working resolution's (at most work_size square)."""

    work_size: int = 128  # the mask is found at most this many px square, then upsampled: fast, and a view
    #                       averaged down this far is smoother than its grey levels
    least_pixels: int = 64  # fewer content pixels, or one level only: no mask
    rim_share: float = 0.05  # the content's rim: this share of the side deep ...
    least_rim: int = 3  # ... and at least this many px
    narrow_aspect: float = 2.5  # content this many times as long as wide is a close-up (real: 3-4 times): its hand
    #                             crosses the short sides and runs along the long ones, so no rim or frame rule
    # the background (_background_level)
    local_window: int = 5  # the local standard deviation's window (px)
    noise_percentile: float = 25.0  # the noise: this percentile of the local standard deviation (the flattest
    #                                 quarter: the background, whatever share of the view the hand covers)
    least_noise: float = 0.5  # ... at least this (levels): a view with no noise still has rounding
    flat_noise: float = 2.0  # a flat pixel: local standard deviation within this many times the noise
    least_flat: int = 32  # fewer flat pixels: the background level is the content's median
    commonest_width: float = 4.0  # the commonest level: the peak of the histogram smoothed over this many levels
    both_sides_share: float = 0.15  # over this share of the content on each side of that level: it is no background
    #                                 (the soft tissue filling a close-up); the hand lies on one side of its background
    narrow_side_share: float = 0.05  # ... in a close-up, this share: its background is a sliver beside a hand that
    #                                  fills 70-90% of it, its bone a few per cent (the soft tissue's level is no
    #                                  background; chosen on phantom v4's even patients: 0.02, 0.05, 0.1)
    both_sides_noise: float = 3.0  # (a side: beyond this many times the noise from the level)
    # the heel effect: a plane through the background, subtracted
    plane_noise: float = 8.0  # the plane's pixels: flat, within this many times the noise of the background level
    plane_rounds: int = 8  # fitted this many times, each on the pixels the last fit left within ...
    plane_mad: float = 2.5  # ... this many robust standard deviations (1.4826 MADs) of its residuals ...
    plane_hand_mad: float = 0.5  # ... and on the hand's side only this many: a faint hand's soft tissue lies
    #                              within plane_noise of the background, on one side of it, and tilted a symmetric
    #                              fit (light-grey views with a heel of 15-20 levels kept it). Phantom v6 seed 0's
    #                              even patients, 128 px, share of IoU >= 0.85: 2 symmetric rounds, heel_spread 4:
    #                              83.7%; 4 rounds with 1 or 0.5 here 84.3%, 84.7%; 8 rounds, 0.5, heel_spread 2:
    #                              85.4% (odd patients: 86.3% -> 86.7%, IoU < 0.5 in 20 -> 13 views) ...
    plane_slack: float = 1.0  # ... plus this many levels (a noiseless view's residuals are all 0)
    heel_spread: float = 2.0  # a real gradient: the plane's slopes (levels across the view) above this many times
    heel_slack: float = 2.0  # the residuals' spread plus this many levels; less is noise, left alone (the spread
    #                          of the background alone, the hand's side trimmed: 4 times it left real heels in)
    faint_noise: float = 20.0  # a view whose extremes (tags aside) lie within this many times the noise of the
    #                            background is faint: a dim or low-contrast hand, its soft tissue in the grain (the
    #                            noise, the flattest quarter's, is below the grain's own; on phantom v4 smoothing
    #                            helps views under about 20, and costs a crisp hand's edge above) ...
    faint_smooth: float = 0.7  # ... and is smoothed over this many px (Gaussian sigma) before the levels are
    #                            searched: the grain falls by about half, the soft tissue's step stays (1 px blurs
    #                            a crisp view's edge: more views lost than won); its tags are looked for again then
    #                            (a light holder a few times the grain off the background is clear once smoothed)
    faint_outline: float = 2.0  # a faint view's mask: its outline smoothed over this many px (a Gaussian of the mask,
    #                             kept where it is half or more): in the grain its edge follows the noise, a hand's
    #                             is smooth (phantom v7 seed 0, 128 px, the 169 faint views that are no close-up:
    #                             sigma 1, 1.5, 2, 2.5, 3 gave IoU >= 0.85 in 0, +2, +3, +4, 0 views more, their
    #                             mean IoU +0.0015 at 2 and -0.0017 at 3). Not a close-up's: its finger's sides run
    #                             along the crop's (every close-up smoothed at 1.5: 3 of 70 fell under 0.85).
    #                             The doubts (MASK_DOUBTS) read the edge before: smoothed, it left the foreground
    #                             just outside it, and suspect_masks flagged 12% of good views, not 6%
    # polarity and thresholds
    extreme_percentile: float = 0.5  # the view's extremes: this percentile from either end (not a few specks)
    text_share: float = 0.3  # burned-in text and lines: thin strokes within this share of the way from an extreme to
    #                          the background, left out of the extremes that set the view's contrast (its floor, the
    #                          faint test, the polarity): in many views text is the brightest thing, not the hand, and
    #                          a dim hand's soft tissue sank below a floor set by it (phantom v6 seed 0's even
    #                          patients, 128 px, IoU >= 0.85: none 87.3%, 0.15 87.5%, 0.3 88.2%, 0.4 and 0.5 88.0%) ...
    text_width: int = 3  # ... thinner than this many px (an opening this wide takes them off): a stroke or line at
    #                      128 px is 1-2 px, a bone or a tag wider
    graded_percentile: float = 3.0  # a close-up's polarity: the texture of this percentile at either end (its
    #                                 bone, graded, or its background: flat but for the grain) ...
    graded_ratio: float = 1.35  # ... read from the texture when one end is this many times as textured as the
    #                             other (its bone), else from where the extremes lie (chosen on phantom v5's even
    #                             patients, seed 0: an inverted close-up's ends differ by up to 1.16 times)
    beside_share: float = 0.5  # ... its background then: the commonest flat level past this share of the way from
    #                            the soft tissue's level to the far extreme (halfway: not the soft tissue's margin)
    beside_plateau_noise: float = 1.0  # a close-up whose polarity stands: that level is its background (its
    #                                    commonest, soft tissue) when it peaks this many times the noise past the
    #                                    halfway cut, a plateau of its own, not the commonest level's tail (whose
    #                                    peak lies at the cut; three phantom v7 seeds at 128 px, 200 close-ups: 6
    #                                    moved, all better, 3 over IoU 0.85; with no gap 165 moved, 100 worse; 0.5:
    #                                    46, 27 worse; 2: 2 moved)
    otsu_bins: int = 64  # the four-class Otsu's histogram bins (for speed)
    off_background_noise: float = 3.0  # thresholds just off the background (a faint soft tissue): this many times
    #                                    the noise from it, and twice as far
    contrast_floor: float = 0.065  # no threshold within this share of the view's contrast of the background: a
    #                                plate a level or two off its surround, in a view averaged down smoother than
    #                                its levels; and the mask's edge (it grows up to margin_growth px above it): at
    #                                128 px a true hand's edge pixels lie at 0.09-0.13 of the contrast inside, 0.03-
    #                                0.05 outside (phantom v6, seed 0's even patients); with heel and rounds as set,
    #                                IoU >= 0.85: 0.05 85.4%, 0.065 86.9%, 0.07 86.9%, 0.08 87.3% but 17 views under
    #                                0.5, not 13 (odd patients, 0.05 -> 0.065: 86.7% -> 87.6%)
    floor_noise: float = 2.0  # ... nor within this many times the noise (the background's own noise)
    # markers and plate edges: the brightest and flat, touching the rim
    edge_noise: float = 3.0  # the brightest: within this many times the noise of the view's extreme ...
    edge_flat_noise: float = 1.5  # ... and flat: local standard deviation within this many times the noise ...
    edge_flat_slack: float = 0.5  # ... plus this many levels
    edge_grow: int = 2  # such patches are grown by this many px (their blurred edge)
    # hand-like components (_hand_components): shares of the content
    least_area: float = 0.01  # a hand covers at least this share ...
    most_area: float = 0.75  # ... and at most this (more: the field or the plate)
    narrow_most_area: float = 0.95  # ... in a close-up, this: its hand fills 70-90% of it (phantom v4), and no
    #                                 filled rectangle over it is the plate (its soft tissue may be one)
    most_rim: float = 0.3  # a hand covers at most this share of the content's rim (more: a plate's frame)
    texture_noise: float = 2.0  # a hand is textured: its standard deviation at least this many times the noise
    #                             (a dim hand's, over its soft tissue and bone, 2.3 times: at 2.5 it lost to a blob of
    #                             mottle or a tag, the mask that alone; phantom v6, 128 px, IoU < 0.5 in 22 -> 17,
    #                             19 -> 19, 20 -> 18, 21 -> 20 views of seeds 0, 985764, 533107, 677186) ...
    texture_contrast: float = 0.06  # ... and this share of the view's contrast (a uniform marker or plate edge is not)
    least_thickness: float = 2.0  # a hand is thick: somewhere at least this many px from its edge ...
    thickness_share: float = 0.02  # ... and this share of the side (a thin line of text or a plate edge is not)
    plate_area: float = 0.2  # a component of at least this share ...
    plate_fill: float = 0.8  # ... filling this much of its rectangle ...
    plate_cover: float = 0.6  # ... which covers this share of the content is the plate: that level shows no hand
    frame_full: float = 0.6  # a line covered over this share of its length near a side is a frame, not a hand (a
    #                          forearm or a wrist crosses a side over a third of it at most)
    strip_width: int = 2  # strips near the rim that an opening of this many px takes off are a plate's frame or
    #                       border, not hand: at 128 px a frame the crop left in is 2-4 px wide (tilted or partly
    #                       covered: no line of it full), a forearm or wrist leaving the view 20 or more ...
    strip_depth: float = 0.2  # ... within this share of the side from the content's edge (such a frame lies inside
    #                           a margin of the surround; chosen on phantom v4's even patients: 0.12, 0.2, 0.3, 0.5)
    bar_aspect: float = 3.0  # a piece of the mask apart from its largest, at least this many times as long as wide
    #                          (its minimum-area rectangle) and at most bar_piece_share of its size, is a bar of a
    #                          plate's frame or edge that the crop left in, too thick for the strips, not hand
    #                          (phantom v6 seed 0, 128 px: of 25 such pieces 3 were hand, 2 of them in close-ups,
    #                          which keep theirs: a finger is such a bar) ...
    bar_piece_share: float = 0.45  # ... (a second hand is about as large as the first: 0.7-1 times its size)
    # the mask's edge
    margin_growth: int = 3  # the mask grows this many px into the faint margin above the floor (in a low-contrast
    #                         view the margin lies in the noise, and the levels that would take it in leak)
    hole_share: float = 0.005  # holes under this share of the content are filled (joint spaces, dark trabeculae);
    #                            larger ones are kept (a loop of flexed fingers)
    doubt_band: int = 2  # the doubts' bands just outside and inside the mask's edge (px)
    doubt_far: int = 8  # the background's grain is measured farther than this (px) from the mask
    doubt_least_area: float = 0.0025  # foreground left out counts from this share of the content (a quarter of the
    #                                   least hand: a finger, a second hand; not grain, text or a tag's letter)
    # lead tags (_find_tags): a solid rectangular holder, lighter or darker than the field, 6-15% of the view's
    # short side wide and 1.5-3 times as tall (real views and phantom v4), off the hand
    tag_levels: tuple = (0.2, 0.4, 0.6)  # looked for at these shares of the way from the background to each
    #                                      extreme: a holder's rim is a step, whichever level cuts it
    tag_least_noise: float = 4.0  # no level within this many times the noise of the background (grain)
    tag_min_side: float = 0.03  # a tag's short side: at least this share of the content's short side ...
    tag_least_side: float = 3.0  # ... and this many px (smaller ones cannot be told from grain and text) ...
    tag_max_side: float = 0.25  # ... at most this share (a tag on a plate cropped to its field can be 20% of
    #                              it; a finger or forearm in a close-up is wider, and longer)
    tag_max_aspect: float = 4.0  # its long side at most this many times its short one (real: 1.5-3)
    tag_fill: float = 0.6  # it fills this much of its minimum-area rectangle (its letter, ring or initials may
    #                        break through a darker holder's rim) ...
    tag_hull_fill: float = 0.8  # ... and its convex hull this much (a small one's corners are blurred): a rectangle;
    #                             a hand, a bone, grain do not
    tag_ring_gap: int = 1  # its surround: a band beyond this many px outside it (its blurred edge) ...
    tag_ring: int = 2  # ... this many px wide ...
    tag_ring_background: float = 0.5  # ... lies at the background's level over this share at least: a tag lies on
    #                                   the background (a hand beside it along one side at most); a bone lies in
    #                                   soft tissue
    tag_ring_noise: float = 3.0  # the background's level: within this many times the noise of it ...
    tag_ring_contrast: float = 0.25  # ... or this share of the tag's own contrast, whichever is more
    tag_piece_share: float = 0.6  # a piece of the mask apart from its largest, at most this share of its size and
    #                               tag-shaped, is a tag: a tag 15% of the short side wide and three times as tall
    #                               covers 7% of the square, a close-up's finger 13% (phantom v6 seed 985764: a tag
    #                               28% of its hand's size was kept at 0.25; v7 seed 0: one 54% of a dim hand's
    #                               larger piece, two hands, kept at 0.5); a second hand is about as large as the
    #                               first, and no rectangle
    piece_hull_fill: float = 0.75  # such a piece's convex hull fills at least this much of its rectangle, less than a
    #                                tag found on its own (tag_hull_fill): at the hand's level its holder's faint
    #                                corners fall below and its letter or a stroke of text breaks its side (phantom
    #                                v7 seed 0, 128 px, beside piece_text_width and tag_piece_share 0.6: a tag in the
    #                                mask in 10 -> 9 views, no hand lost; at 0.75 for _find_tags too, a wrist was
    #                                taken for a tag)
    tag_sharp_noise: float = 3.5  # a piece apart from the hand that only an opening text_width px wide makes
    #                               tag-shaped (a dash of burned-in text, or a blurred bridge, stuck out of it) is a
    #                               tag when its edges are sharp: its median local standard deviation at least this
    #                               many times the noise (phantom v6 seeds 533107 and 677186, 128 px: tags 3.8-12,
    #                               the faint hand's pieces 1.4-3.1)
    tag_sharp_share: float = 0.25  # a tag found once a faint view is smoothed: at least this share of its pixels
    #                                were sharp before (local standard deviation tag_sharp_noise times the noise or
    #                                more: its rim and letter). Blobs of a faint hand or mottle, smoothed into
    #                                rectangles, are not (phantom v7 seed 0, 128 px: tags 0.38-0.95, blobs 0-0.09)
    tag_grow: int = 1  # a tag found is grown by this many px (its blurred edge) and left out of the mask
    tag_alone_spread: float = 0.17  # the first mask's largest piece, tag-shaped (piece_hull_fill) and sharp
    #                                 (tag_sharp_noise), is a lead tag taken for the hand when the interquartile
    #                                 range of its levels is within this share of the view's contrast: a holder is
    #                                 one level, its letter a small share of it; a hand is graded from soft tissue
    #                                 to bone (phantom v7 seeds 0, 20261206, 20261207 at 128 px, the five views
    #                                 whose largest piece was tag-shaped: the two tags 0.04 and 0.12, two hands
    #                                 0.24 and 0.36, the third hand not sharp, 2.3 times the noise)

    @property
    def faint_contrast(self) -> float:
        """A threshold just above the contrast floor (1.2 times it) between the background and each extreme."""
        return 1.2 * self.contrast_floor

    @property
    def piece_text_width(self) -> int:
        """A stroke of text in a piece of the mask: a px wider than text_width, its blurred edge above the hand's
        level (phantom v7 seed 0, 128 px: a dash 3 px wide across a tag kept it in the mask)."""
        return self.text_width + 1


@dataclass(frozen=True)
class PreprocessConfig:
    """Their Figure 1 pipeline; every step can be switched off: 'raw', 'crop' or 'full', each with or without HE.
    The crop's and the mask's thresholds are named rules (CropRules, MaskRules), part of the cache's key."""

    crop: bool = True  # carrier crop: Otsu + the detector plate's minimum-area rotated rectangle (else whole image)
    segment: bool = True  # foreground segmentation: a hand mask, and the background set to 0
    equalize: str | None = "he"  # histogram equalisation: "he", "clahe" or None
    size: int = 512  # aspect-preserving resize and padding to a square (512: autoencoders; 128: the GAN family)
    crop_rules: CropRules = CropRules()  # the plate and field search's thresholds
    mask_rules: MaskRules = MaskRules()  # the hand mask's thresholds

    def __post_init__(self):
        for name in ("crop", "segment"):
            object.__setattr__(self, name, _bool_setting("PreprocessConfig", name, getattr(self, name)))
        object.__setattr__(self, "size", _number_setting("PreprocessConfig", "size", self.size, int, 4, 8192))
        if self.equalize not in ("he", "clahe", None):
            raise ConfigError(f"PreprocessConfig.equalize must be one of ('he', 'clahe', None), got {self.equalize!r}")
        for name, kind in (("crop_rules", CropRules), ("mask_rules", MaskRules)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"PreprocessConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r}")

    @property
    def name(self) -> str:
        """The variant's name in the paper's table: raw / crop / full, plus +HE or +CLAHE."""
        base = "full" if self.segment else "crop" if self.crop else "raw"
        return base + {"he": "+HE", "clahe": "+CLAHE", None: ""}[self.equalize]


def preprocess_variants(size: int = 512, names: Sequence[str] | None = None) -> dict[str, PreprocessConfig]:
    """The paper's six variants (raw, crop, full; without and with HE), or those named (+CLAHE also works)."""
    variants = {cfg.name: cfg for crop, segment in ((False, False), (True, False), (True, True))
                for cfg in (PreprocessConfig(crop, segment, eq, size) for eq in (None, "he", "clahe"))}
    names = [n for n in variants if not n.endswith("+CLAHE")] if names is None else list(names)
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise ValueError(f"unknown preprocessing variant(s) {unknown}: choose from {list(variants)}")
    return {n: variants[n] for n in names}


def _edge_frames(points: np.ndarray, hull_only: bool, corners: np.ndarray | None = None):
    """The points' bounding rectangles in the frame of each edge angle of their convex hull: (angles, u, v, lo, hi),
    u and v the coordinates (of the hull's points alone when hull_only: the same rectangles, fewer points) as
    (points, angles), lo and hi each rectangle's corners as (2, angles). `corners`: the hull's vertices (indices into
    points, in order) when the caller has them."""
    hull = points[ConvexHull(points).vertices if corners is None else corners]
    edges = np.diff(np.vstack([hull, hull[:1]]), axis=0)
    angles = np.unique(np.mod(np.arctan2(edges[:, 1], edges[:, 0]), np.pi / 2))
    cos, sin = np.cos(angles), np.sin(angles)
    projected = hull if hull_only else points
    u = projected[:, 0, None] * cos + projected[:, 1, None] * sin  # every edge's frame at once
    v = -projected[:, 0, None] * sin + projected[:, 1, None] * cos
    return angles, u, v, np.stack([u.min(0), v.min(0)]), np.stack([u.max(0), v.max(0)])


def _frame_rect(angles: np.ndarray, lo: np.ndarray, hi: np.ndarray, best: int):
    """Rectangle `best` of _edge_frames as (center, (w, h), angle rad), its angle kept in (-45, 45] degrees."""
    a = float(angles[best])
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    center = rot.T @ ((lo[:, best] + hi[:, best]) / 2)
    w, h = float(hi[0, best] - lo[0, best]), float(hi[1, best] - lo[1, best])
    if a > np.pi / 4:  # keep the rectangle close to upright
        a, w, h = a - np.pi / 2, h, w
    return center, (w, h), a


def min_area_rect(points: np.ndarray,
                  corners: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, float], float]:
    """Minimum-area enclosing rectangle of 2-D points (x, y), by rotating calipers: (center, (w, h), angle rad).
    `corners`: the points' convex hull's vertices (ConvexHull(points).vertices) when the caller has them."""
    angles, _, _, lo, hi = _edge_frames(points, hull_only=True, corners=corners)
    best = int(np.argmin(np.prod(hi - lo, axis=0)))  # the first of equal areas, as a loop would keep
    return _frame_rect(angles, lo, hi, best)


def rect_mask(shape: tuple[int, int], rect) -> np.ndarray:
    """Pixels (of an image of `shape`) inside a rotated rectangle (center, (w, h), angle)."""
    (cx, cy), (w, h), angle = rect
    yy, xx = np.arange(shape[0])[:, None], np.arange(shape[1])[None, :]  # (broadcast: a row and a column)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it or on the image's border: mask & ~binary_erosion(mask),
    by slicing (several times faster on the small masks the plate and tag searches outline by the dozen)."""
    interior = np.zeros_like(mask)
    interior[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                            & mask[1:-1, :-2] & mask[1:-1, 2:])
    return mask & ~interior


def _rect_along(points: np.ndarray, near: float) -> tuple[np.ndarray, tuple[float, float], float]:
    """The rectangle (center, (w, h), angle) around points that lie along its sides (a plate's outline whose corners
    lie beyond the view): of the bounding rectangles at each of their hull's edge angles, the one with the most
    points within `near` px of its sides."""
    angles, u, v, lo, hi = _edge_frames(points, hull_only=False)
    gap = np.minimum(np.minimum(u - lo[0], hi[0] - u), np.minimum(v - lo[1], hi[1] - v))
    return _frame_rect(angles, lo, hi, int(np.argmax((gap <= near).sum(0))))


def _least_plate_area(searched: int, rules: CropRules) -> float:
    """The fewest pixels a plate's component can have, of `searched` pixels: it fills rules.min_area_fill of a
    rectangle of at least rules.min_share of them."""
    return max(rules.least_plate_pixels, rules.min_area_fill * rules.min_share * searched)


def _plate_rect(component: np.ndarray, region: np.ndarray, searched: np.ndarray, min_hull_fill: float,
                rules: CropRules):
    """(share, center, (w, h), angle) of a component's minimum-area rectangle when it is plate-like, else None:
    it covers at least rules.min_share of the searched pixels and leaves at least 1 - rules.max_share of them out
    (a tilted plate may reach past the view's edges; the whole view is no plate), the convex hull fills
    `min_hull_fill` of it (of the part in view of the rectangle along its own sides when the view's edges cut its
    corners off: _rect_along), and what lies outside it is mostly not of the component's class (`region`): a plate
    stands out from its surround, while the background beside a straight finger, a rectangle too, does not."""
    area, total = int(component.sum()), searched.sum()
    if area < _least_plate_area(total, rules):
        return None  # too small to be a plate, whatever its rectangle
    rows = np.flatnonzero(component.any(1))  # each row's first and last pixel: they hold its hull, fewer points
    first, last = component.argmax(1)[rows], component.shape[1] - 1 - component[:, ::-1].argmax(1)[rows]
    spans = last.max() - first.min(), rows[-1] - rows[0]  # (np.ptp of its columns and of its rows)
    # (with both spans 2 or more, fewer than 3 outline pixels means fewer than 3 pixels)
    if area < 3 or min(spans) < 2:  # a line (a hull needs 3 points): no area, not a plate
        return None
    if (spans[0] + 1) * (spans[1] + 1) < rules.min_share * total:
        return None
    ends = np.column_stack([np.concatenate([first, last]), np.concatenate([rows, rows])]).astype(float)
    convex = ConvexHull(ends)
    center, (w, h), angle = min_area_rect(ends, convex.vertices)
    share = w * h / total  # above 1 for a tilted plate reaching past the view's edges
    if not (share >= rules.min_share and area / (w * h) > rules.min_area_fill):
        return None
    hull = convex.volume
    if hull / max(w * h, 1e-9) <= min_hull_fill:  # (1e-9: no division by zero)
        ys, xs = np.nonzero(_outline(component))  # its outline: the pixels that may lie along its own sides
        points = np.column_stack([xs, ys]).astype(float)
        own = ~((xs == 0) | (ys == 0) | (xs == searched.shape[1] - 1) | (ys == searched.shape[0] - 1))
        if own.all() or own.sum() < 3 or np.ptp(xs[own]) < 2 or np.ptp(ys[own]) < 2:  # (a hull needs 3 points)
            return None
        # a tilted plate reaching past the view's edges: its rectangle is that of its own sides, not the view's
        center, (w, h), angle = _rect_along(points[own], rules.along_near)
        seen = max(float((rect_mask(searched.shape, (center, (w, h), angle)) & searched).sum()), 1.0)
        share = w * h / total
        if not (share >= rules.min_share and area / seen > rules.min_area_fill and hull / seen > min_hull_fill):
            return None
    if (searched & ~rect_mask(searched.shape, (center, (w, h), angle))).sum() < (1 - rules.max_share) * total:
        return None  # the whole view, not a plate in it
    rim = (w + rules.rim_gap, h + rules.rim_gap)
    outside = searched & ~rect_mask(searched.shape, (center, rim, angle))
    if outside.sum() > rules.outside_share * total and region[outside].mean() > rules.outside_class:
        # ... or framed: a band just around it lies mostly in the view and is not of its class (a field inside a
        # plate's lighter frame, with the surround beyond it as dark as the field)
        beyond = (rim[0] + 2 * rules.frame_depth, rim[1] + 2 * rules.frame_depth)
        band = rect_mask(searched.shape, (center, beyond, angle)) & ~rect_mask(searched.shape, (center, rim, angle))
        band &= searched
        if (band.sum() < rules.frame_seen * (2 * (w + h) * rules.frame_depth)
                or region[band].mean() > rules.outside_class):
            return None
    return share, center, (w, h), angle


def _holds_the_detail(found, detail: np.ndarray, rules: CropRules) -> bool:
    """Whether a plate candidate (share, center, (w, h), angle) holds most of the view's edges (the hand's): a dark
    rectangle beside a light surround that holds the hand is not the plate. (`detail`: strong edges, away from
    the searched area's border; rules.detail_margin: the candidate's own edges, left out.)"""
    _, center, (w, h), angle = found
    margin = rules.detail_margin
    inner = detail & rect_mask(detail.shape, (center, (w - margin, h - margin), angle))
    outer = detail & ~rect_mask(detail.shape, (center, (w + margin, h + margin), angle))
    outer &= ~_lines_along(outer, found, rules)
    return outer.sum() <= rules.detail_outside * inner.sum() + rules.detail_slack * detail.size


def _lines_along(detail: np.ndarray, found, rules: CropRules) -> np.ndarray:
    """The edge pixels outside a plate candidate (share, center, (w, h), angle) that run along one of its sides, at
    one distance from it over at least rules.along_length of the side and no farther from it than a border may be
    deep (rules.field_depth of the candidate's side across): a frame's outer rim (the field found inside a plate's
    lighter border), not the hand's edges (a straight forearm beside a dark rectangle runs along it too, farther)."""
    _, (cx, cy), (w, h), angle = found
    ys, xs = np.nonzero(detail)
    u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
    v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
    along = np.zeros(len(xs), bool)
    for across, beside, length, depth in ((v, u, w, h), (u, v, h, w)):  # beyond the top and bottom, the sides
        within = (np.abs(beside) <= length / 2) & (np.abs(across) <= depth / 2 + rules.field_depth * depth)
        key = np.round(across).astype(np.int64)
        for sign in (-1, 1):
            on = within & (np.sign(across) == sign)
            if not on.any():
                continue
            offsets = np.abs(key[on])
            spread = np.ones(rules.along_spread)  # (a rim slightly tilted off the side spreads over a few offsets)
            lines = np.convolve(np.bincount(offsets), spread, mode="same") >= rules.along_length * length
            near_line = np.convolve(lines, spread, mode="same") > 0
            along[np.flatnonzero(on)[near_line[offsets]]] = True
    out = np.zeros_like(detail)
    out[ys[along], xs[along]] = True
    return out


def _sides_are_steps(found, smooth: np.ndarray, rules: CropRules, least_sides: int = 0,
                     busy: np.ndarray | None = None) -> bool:
    """Whether each side of a plate candidate (share, center, (w, h), angle) that lies mostly inside the view is a
    step, and at least `least_sides` do: across it (from rules.step_offset pixels outside to as far inside) the
    smoothed view changes by rules.step grey levels more than over as far again inside, in the median along the
    side, read where the side is clear of `busy` (the detail grown by rules.step_clear: _step_crossings) when
    rules.step_clear_share of it is. A plate's rim is such a
    step; the line where a smooth gradient (a heel effect) crosses a threshold is none, nor is a rectangle around a
    hand, which runs through background, nor a band of the view bounded by a line of burned-in text."""
    _, center, (w, h), angle = found
    offset = rules.step_offset
    u, v = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]], float).T * [[w / 2], [h / 2]]
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    corners = np.column_stack([u, v]) @ turn.T + center
    steps = 0
    for a, b in zip(corners, corners[1:]):
        points = np.linspace(a, b, max(int(np.hypot(*(b - a))), 2))
        inward = (center - (a + b) / 2) / max(float(np.hypot(*(center - (a + b) / 2))), 1e-9)  # (no division by 0)
        depths = np.array([-1, 1, 3])  # in offsets: outside, inside, and as far again inside (3 = 1 + 2)
        xs, ys = np.round(points[None] + depths[:, None, None] * offset * inward).astype(int).T
        valid = ((xs >= 0) & (ys >= 0) & (xs < smooth.shape[1]) & (ys < smooth.shape[0])).all(1)
        if valid.mean() < rules.step_seen:
            continue
        outside, inside, deeper = smooth[ys[valid].T, xs[valid].T]
        change = (inside - outside) - (deeper - inside)
        if busy is not None:  # the hand or text across the side: the step read beside them
            crossed = busy[ys[valid][:, 0], xs[valid][:, 0]] | busy[ys[valid][:, 2], xs[valid][:, 2]]
            if (~crossed).sum() >= rules.step_clear_share * len(crossed):
                change = change[~crossed]
        if abs(np.median(change)) < rules.step:
            return False
        steps += 1
    return steps >= least_sides


def _step_crossings(detail: np.ndarray, rules: CropRules) -> np.ndarray:
    """Where a plate candidate's side is crossed by the hand or text: the detail grown by rules.step_clear block px
    (_sides_are_steps reads the step beside it)."""
    return ndimage.binary_dilation(detail, iterations=rules.step_clear)


def find_carrier(gray: np.ndarray, rules: CropRules = CropRules()):
    """The detector plate as a rotated rectangle (center, (w, h), angle), or None when no plate stands out.

    Searched on block means at a quarter resolution, binarised at Otsu's threshold, at Otsu's threshold of each
    side of it and again of each side of that, three deep (a dark plate a few levels off a black surround, beside
    a hand and soft tissue that take the first splits) and at the two of a three-class Otsu (a plate between a
    darker and a brighter surround); for each threshold and polarity, the largest component and the union of the
    large ones (a hand lying across the plate can cut its background apart) are candidates, kept when plate-like
    (see _plate_rect: a plate is a rectangle even with a hand across it, and stands out from its surround; a hand
    does neither), whose sides inside the view are steps (_sides_are_steps; read beside the hand and text, but in
    a close-up, whose hand fills it, along the whole side) and which holds the hand's edges. The
    largest wins. When none does, the search runs again on the block means smoothed (rules.denoise_sigma: a
    low-contrast plate's grain breaks it apart; not in a close-up), the plate then holding every edge of the hand
    and showing rules.denoise_sides of its sides as steps.
    """
    small, step = _block_means(gray, rules)
    values = small.ravel()  # the whole view
    if values.size < rules.least_pixels or values.min() == values.max():
        return None
    commonest = _commonest_bin(np.bincount(values, minlength=256), rules)  # (256: 8-bit levels)
    smooth = ndimage.gaussian_filter(small.astype(np.float32), rules.smooth_sigma)
    grad = np.hypot(*np.gradient(smooth))
    border = rules.detail_border  # (the whole view eroded this deep: a rectangle set in by it, without the erosion)
    away = np.zeros(small.shape, bool)
    away[border:small.shape[0] - border, border:small.shape[1] - border] = True
    detail = away & (grad > rules.detail_gradient * max(float(np.median(grad)), rules.least_gradient))
    close_up = max(gray.shape) >= rules.denoise_most_aspect * min(gray.shape)
    best = _largest_plate(small, commonest, detail, smooth, rules, close_up=close_up)
    if best is None and not close_up:
        # a low-contrast plate, broken apart by its grain: the search again, smoothed, stricter
        denoised = ndimage.gaussian_filter(small.astype(np.float32), rules.denoise_sigma)
        denoised = np.clip(np.round(denoised), 0, 255).astype(np.uint8)  # (8-bit levels, as the block means)
        best = _largest_plate(denoised, commonest, detail, smooth, replace(rules, detail_outside=0.0),
                              rules.denoise_sides)
    if best is None:
        return None
    _, center, (w, h), angle = best
    return center * step + (step - 1) / 2, (w * step, h * step), angle  # in the view's pixels


def _commonest_bin(histogram: np.ndarray, rules: CropRules) -> int:
    """The direct-exposure background, mostly: the middle of the commonest bin of rules.commonest_bin levels of an
    8-bit view's histogram (256 counts)."""
    bin_ = rules.commonest_bin
    return bin_ * int(np.argmax(np.add.reduceat(histogram, np.arange(0, len(histogram), bin_)))) + bin_ // 2


def _largest_plate(small: np.ndarray, commonest: float, detail: np.ndarray, smooth: np.ndarray, rules: CropRules,
                   least_sides: int = 0, close_up: bool = False):
    """find_carrier's search on one image of block means: the largest plate-like candidate (_plate_rect) that holds
    the hand's edges (`detail`) and whose sides are steps in `smooth` (at least `least_sides` of them in view), as
    (share, center, (w, h), angle), or None. In a `close_up` the plate is as long for its width as the view
    (rules.denoise_most_aspect): a close-up's plate fills it."""
    searched, best = np.ones(small.shape, bool), None
    crossing = None if close_up else _step_crossings(detail, rules)  # (a close-up's hand fills it)
    for component, region, background in _plate_candidates(small, _plate_thresholds(small.ravel(), rules), commonest,
                                                           rules):
        # the background's class may miss a plate's corner (a collimated wedge); a hand's class may not
        fill = rules.min_hull_fill_background if background else rules.min_hull_fill
        found = _plate_rect(component, region, searched, fill, rules)
        if found is not None and close_up and max(found[2]) < rules.denoise_most_aspect * min(found[2]):
            found = None
        if found is not None and _holds_the_detail(found, detail, rules) and (
                _sides_are_steps(found, smooth, rules, least_sides, crossing)) and (best is None or found[0] > best[0]):
            best = found
    return best


def _block_means(gray: np.ndarray, rules: CropRules) -> tuple[np.ndarray, int]:
    """The view as rounded means of rules.block-square blocks (a small view: its own pixels), and the block's side."""
    step = rules.block if min(gray.shape) >= rules.block_min_side else 1  # each pixel its block's mean
    h, w = gray.shape[0] // step * step, gray.shape[1] // step * step
    if gray.dtype == np.uint8 and step & (step - 1) == 0:  # PIL's box reduction of 8-bit blocks of a power of two
        #                                                     pixels is the rounded mean exactly (a shift), faster
        small = np.asarray(Image.fromarray(np.ascontiguousarray(gray[:h, :w])).reduce(step))
    else:
        small = (gray[:h, :w].reshape(h // step, step, w // step, step).mean((1, 3)) + 0.5).astype(np.uint8)  # rounded
    return small, step


def _plate_thresholds(values: np.ndarray, rules: CropRules) -> set:
    """The levels a plate may stand out at: Otsu's threshold, Otsu's again on each side of it rules.otsu_depth
    deep, and a multi-level Otsu's."""
    otsu = threshold_otsu(values)
    thresholds = {otsu}
    for side in (np.less_equal, np.greater):  # Otsu again on each side, rules.otsu_depth deep
        part, cut = values, otsu
        for _ in range(rules.otsu_depth):
            part = part[side(part, cut)]
            if np.ptp(part) == 0:
                break
            cut = threshold_otsu(part)
            thresholds.add(cut)
    if np.count_nonzero(np.bincount(values)) > rules.classes:  # (the number of levels: 8-bit block means)
        thresholds |= set(threshold_multiotsu(values, classes=rules.classes).tolist())
    return thresholds


def _plate_candidates(small: np.ndarray, thresholds: set, commonest: float, rules: CropRules):
    """Each candidate plate once, as (component, its class's region, whether that class is the background's): for
    each threshold and polarity, the largest component and the union of the large ones (a hand lying across the
    plate can cut its background apart). A region too small to hold a plate (_least_plate_area) is not labelled."""
    tried, least = set(), _least_plate_area(small.size, rules)
    for threshold in sorted(thresholds):
        above = small > threshold
        for region, background in ((above, commonest > threshold), (~above, commonest <= threshold)):
            if region.sum() < least:
                continue
            labels, n = ndimage.label(region)
            if n == 0:
                continue
            sizes = np.bincount(labels.ravel())[1:]
            largest = labels == np.argmax(sizes) + 1
            large = np.zeros(n + 1, bool)  # by label (0: the other class)
            large[1:] = sizes >= rules.large_component * sizes.max()
            for component in (largest, large[labels]) if large.sum() > 1 else (largest,):
                key = (background, hash(component.tobytes()))  # close thresholds often give the same component
                if key not in tried:
                    tried.add(key)
                    yield component, region, background


def _border_band(lines: np.ndarray, tol: float, depth: int, background: float | None, rules: CropRules) -> int:
    """How many of the first `lines` (rows: a side's lines, from the edge in), at most `depth`, form a band of one
    level, not the field's `background` (None: any level), that ends abruptly: rules.band_within of their pixels
    within `tol` of its level, at most rules.band_after_share of the next rules.band_after lines'. 0 when none
    (background up to a hand that fills the lines is no band). NaN pixels (beyond the view) count for nothing."""
    after = rules.band_after
    lines = lines[:depth + after]
    seen = ~np.isnan(lines)
    rows = np.repeat(np.arange(len(lines)), seen.sum(1))  # each line's histogram of (rounded) grey levels
    bins = 256  # a bin per 8-bit grey level
    levels = np.clip(np.round(lines[seen]), 0, bins - 1).astype(np.int64)
    cumulative = np.cumsum(np.bincount(rows * bins + levels, minlength=len(lines) * bins).reshape(len(lines), bins), 1)
    totals = cumulative[:, -1]
    medians = np.where(totals > 0, (cumulative < totals[:, None] / 2).sum(1), np.nan)  # each line's median level
    counts = np.cumsum(totals)
    cuts = np.arange(2, min(depth, len(lines) - after) + 1)  # every depth of band at once
    if not len(cuts):
        return 0
    prefix = np.where(np.arange(len(lines))[None, :] < cuts[:, None], medians[None, :], np.nan)
    ranked, known = np.sort(prefix, 1), (~np.isnan(prefix)).sum(1)  # (np.sort puts NaN last)
    seen_any = known > 0
    each = np.arange(len(cuts))
    # the band's level: its lines' median (np.nanmedian's, computed directly: it is slow on many short rows)
    levels = np.where(seen_any, (ranked[each, (known - 1) // 2] + ranked[each, known // 2]) / 2, np.nan)
    valid = seen_any & ((np.abs(levels - background) > tol) if background is not None else True)
    levels = np.where(valid, levels, 0.0)
    low = np.clip(np.ceil(levels - tol), 0, bins - 1).astype(np.int64)
    high = np.clip(np.floor(levels + tol), 0, bins - 1).astype(np.int64)
    near = cumulative[:, high] - np.where(low > 0, cumulative[:, np.maximum(low - 1, 0)], 0)  # (lines, cuts)
    within = np.cumsum(near, 0)  # pixels near each band's level, over its first lines
    inside = within[cuts - 1, np.arange(len(cuts))] / np.maximum(counts[cuts - 1], 1)
    next_ = (within[cuts + after - 1, np.arange(len(cuts))] - within[cuts - 1, np.arange(len(cuts))]) / np.maximum(
        counts[cuts + after - 1] - counts[cuts - 1], 1)
    score = np.where(valid & (inside >= rules.band_within) & (next_ <= rules.band_after_share), inside - next_, 0.0)
    return int(cuts[np.argmax(score)]) if score.max() > 0 else 0


def _collimated_field(gray: np.ndarray, plate, rules: CropRules = CropRules(), level_rules: MaskRules = MaskRules()):
    """The exposed field inside a plate (a rectangle like it): along each side, bands of one level each (the
    surround that the plate's rectangle took in, collimation's unexposed border; see _border_band), at most
    rules.field_depth of the plate deep, are cut off. Looked for in the plate made upright at rules.field_size px;
    the field's level and noise are measured as the mask measures the background (`level_rules`). In a close-up
    (a plate level_rules.narrow_aspect times as long as wide) that level is its hand's, which fills its middle:
    there a band that ends abruptly is cut off whatever its level (a border as light as the soft tissue, the
    field's dark background beyond it; phantom v7 seed 0: 2 more of 70 close-ups masked with IoU >= 0.85 at
    128 px, none worse)."""
    size = rules.field_size
    affine = _square_affine((gray.shape[1], gray.shape[0]), plate, size)
    upright = _warp(gray, affine, size).astype(np.float32)
    scale = size / max(plate[1])
    x0, y0 = (int(math.ceil(size / 2 - side * scale / 2)) for side in plate[1])
    inner = upright[y0:size - y0, x0:size - x0]
    h, w = inner.shape
    if min(h, w) < rules.field_least_side:
        return plate
    in_view = _warp(np.full(gray.shape, 255, np.uint8), affine, size, order=0)[y0:size - y0, x0:size - x0] > 0  # 8 bit
    seen = np.where(in_view, inner, np.nan)
    my, mx = int(rules.field_middle * h), int(rules.field_middle * w)
    middle = inner[my:h - my, mx:w - mx]  # the field's, whatever its borders
    _, noise, _, background = _background_level(middle, np.ones(middle.shape, bool), level_rules)
    tol = rules.band_noise * noise
    ch, cw = int(rules.field_corners * h), int(rules.field_corners * w)
    close_up = max(plate[1]) >= level_rules.narrow_aspect * min(plate[1])
    margins = []
    for lines in (seen[:, cw:w - cw], seen[::-1, cw:w - cw],  # top, bottom,
                  seen[ch:h - ch].T, seen[ch:h - ch, ::-1].T):  # left, right (corners out)
        deepest, cut = int(rules.field_depth * len(lines)), 0
        while True:  # the surround, then a border
            band = _border_band(lines[cut:], tol, deepest - cut, background, rules)
            if not band:  # a surround as dark as the field counts when a border follows it (in a close-up: alone)
                band = _border_band(lines[cut:], tol, deepest - cut, None, rules)
                border = _border_band(lines[cut + band:], tol, deepest - cut - band, background, rules) if band else 0
                band = band + border if border or close_up else 0
            if not band:
                break
            cut += band
        margins.append(cut)
    top, bottom, left, right = margins
    if not any(margins):
        return plate
    center = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2] @ [x0 + (left + w - right) / 2,
                                                                  y0 + (top + h - bottom) / 2, 1]
    return center, ((w - left - right) / scale, (h - top - bottom) / scale), plate[2]


def find_field(gray: np.ndarray, rules: CropRules = CropRules(), level_rules: MaskRules = MaskRules()):
    """The carrier crop's rectangle: the plate (find_carrier), narrowed to the exposed field inside it when
    collimation left unexposed borders (see _collimated_field); with no plate standing out, the field inside the
    view's own borders (a close-up's plate fills it: its hand covers most of its field, so no level shows the field
    as a rectangle); None when neither."""
    plate = find_carrier(gray, rules)
    if plate is None:
        whole = (np.array([gray.shape[1] / 2, gray.shape[0] / 2]), (float(gray.shape[1]), float(gray.shape[0])), 0.0)
        field = _collimated_field(gray, whole, rules, level_rules)
        return None if field is whole else field
    return _collimated_field(gray, plate, rules, level_rules)


def _without_marker_strips(gray: np.ndarray, rules: CropRules = CropRules()) -> tuple[np.ndarray, tuple[int, int]]:
    """The view without the marker strips burned in along its edges, and the (x, y) offset of what is left: such a
    strip (a lead name band) is a band of one level (_border_band, within rules.strip_levels grey levels) at most
    rules.strip_depth of the short side deep, as far from the view's commonest level (its background) as lead:
    rules.strip_extreme of the way to the extreme on its side (rules.strip_percentile in; that side's contrast at
    least rules.strip_least_side of the larger one), on either side (a dark surround lies near a dark background;
    lead, on a negative, is dark). No hand is such a band; left in, a
    strip is the view's brightest thing and sends the plate search and the mask's levels astray (phantom v7 seed
    0, 300 patients, 128 px: of its 93 views with one, 30 masked with IoU < 0.85 and 7 under 0.5 with the strip
    left in, 10 and 2 without; of the other 1,061 views, 103 under 0.85). A band this finds that is no strip (a
    dark surround beside an upright plate in a light view: 28 views of that phantom) is no hand either."""
    histogram = np.bincount(gray[::2, ::2].ravel(), minlength=256)  # (256: 8-bit levels) every 4th pixel's: fast
    counts = np.cumsum(histogram)
    dark, bright = (int(np.searchsorted(counts, share * counts[-1]))
                    for share in (rules.strip_percentile / 100, 1 - rules.strip_percentile / 100))  # (per cent)
    commonest = _commonest_bin(histogram, rules)  # (a flat strip's one level would outnumber a grainy background's)
    depth = int(rules.strip_depth * min(gray.shape))
    cuts = []
    for lines in (gray, gray[::-1], gray.T, gray.T[::-1]):  # top, bottom, left, right
        edge = float(np.median(lines[0]))
        side = bright - commonest if edge > commonest else commonest - dark  # (the extreme on the edge's side)
        contrast = max(side, rules.strip_least_side * max(bright - commonest, commonest - dark))
        if depth < 2 or abs(edge - commonest) < rules.strip_extreme * contrast:
            cuts.append(0)  # (its edge line is no lead: no strip there)
            continue
        near = lines[:depth + rules.band_after].astype(np.float32)
        band = _border_band(near, rules.strip_levels, depth, None, rules)
        level = float(np.median(near[:band])) if band else commonest
        lead = abs(level - commonest) >= rules.strip_extreme * contrast > 0
        cuts.append(band if lead else 0)
    top, bottom, left, right = cuts
    return np.ascontiguousarray(gray[top:gray.shape[0] - bottom, left:gray.shape[1] - right]), (left, top)


def _square_affine(size_wh, carrier, out_size: int) -> np.ndarray:
    """2x3 affine mapping input pixels to the output square: crop the (rotated) carrier, fit it, pad it."""
    if carrier is None:
        w, h = size_wh
        center, (cw, ch), angle = np.array([w / 2, h / 2]), (float(w), float(h)), 0.0
    else:
        center, (cw, ch), angle = carrier
    scale = out_size / max(cw, ch)
    ca, sa = math.cos(angle), math.sin(angle)
    rotate = np.array([[ca, sa], [-sa, ca]]) * scale  # input offsets -> rectangle axes, scaled
    offset = np.array([out_size / 2, out_size / 2]) - rotate @ np.asarray(center, float)
    return np.hstack([rotate, offset[:, None]])


def _warp(image: np.ndarray, affine: np.ndarray, out_size: int, order: int = 1) -> np.ndarray:
    """Apply an input->output affine with PIL (inverse mapping, zero fill)."""
    inv = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2]
    resample = Image.Resampling.BILINEAR if order else Image.Resampling.NEAREST
    warped = Image.fromarray(image).transform((out_size, out_size), Image.Transform.AFFINE, inv.ravel().tolist(),
                                              resample=resample, fillcolor=0)
    return np.asarray(warped)


def _class_thresholds(values: np.ndarray, rules: MaskRules) -> list[float]:
    """Candidate thresholds between a view's intensity classes: Otsu's, and those of a three- and a four-class
    Otsu (the four-class one on a rules.otsu_bins histogram, for speed), ascending."""
    if np.ptp(values) == 0:
        return []
    thresholds = {float(threshold_otsu(values))}
    first = values[:64]  # (64 values most often show more than 3 levels: np.unique need not sort them all)
    if len(np.unique(first)) > 3 or len(np.unique(values)) > 3:  # (a three-class Otsu needs more than 3 levels)
        thresholds |= set(threshold_multiotsu(values, classes=3).tolist())  # (3 classes: the split of its name)
        counts, edges = np.histogram(values, bins=rules.otsu_bins)
        if (counts > 0).sum() > 4:  # (a four-class Otsu: more than 4 filled bins)
            centers = (edges[:-1] + edges[1:]) / 2
            thresholds |= set(threshold_multiotsu(hist=(counts, centers), classes=4).tolist())  # (4: its name)
    return sorted(thresholds)


def _hand_components(fg: np.ndarray, work: np.ndarray, ring: np.ndarray, content: np.ndarray, flat: float,
                     spread: float, rules: MaskRules = MaskRules(), narrow: bool = False) -> np.ndarray:
    """The hand-like components of a foreground: large, thick, textured, not the plate or field (covering much of
    the content's rim or most of the content), not a marker or plate edge (thin, or uniform like the background).
    None at all when one is a large filled rectangle: the plate, at a level that shows no hand apart from it.
    (`flat`: the background's noise; `spread`: the view's contrast; 0 for either drops the texture test's part.)"""
    labels, n = ndimage.label(fg)
    if n == 0:
        return fg
    index = np.arange(1, n + 1)
    area = ndimage.sum_labels(fg, labels, index)
    on_rim = ndimage.sum_labels(ring, labels, index)
    total = content.sum()
    most = rules.narrow_most_area if narrow else rules.most_area
    keep = (area >= rules.least_area * total) & (area <= most * total) & (
        on_rim <= rules.most_rim * ring.sum())
    if keep.any():
        keep &= ndimage.standard_deviation(work, labels, index) >= max(rules.texture_noise * flat,
                                                                       rules.texture_contrast * spread)
    if keep.any():
        thickness = np.zeros(n + 1)  # each component's deepest pixel (ndimage.maximum sorts all pixels: slower)
        np.maximum.at(thickness, labels.ravel(), ndimage.distance_transform_edt(fg).ravel())
        keep &= thickness[1:] >= max(rules.least_thickness, rules.thickness_share * fg.shape[0])
    for k in np.flatnonzero(keep & (area >= rules.plate_area * total) & ~narrow):  # a filled rectangle: the plate
        component = labels == index[k]
        ys, xs = np.nonzero(_outline(component))
        _, (w, h), _ = min_area_rect(np.column_stack([xs, ys]).astype(float))
        if area[k] >= rules.plate_fill * w * h and w * h >= rules.plate_cover * total:
            return np.zeros_like(fg)  # this level shows the plate, and the hand within it only at another
    return np.isin(labels, index[keep])


def _commonest_level(values: np.ndarray, width: float) -> float:
    """The most common grey level of `values`: the peak of their histogram smoothed over about `width` levels
    (no bin edges to split a level's pixels between two bins)."""
    values = np.asarray(values, np.float32)
    low = float(values.min())
    counts = np.bincount(np.round(values - low).astype(np.int64)).astype(np.float32)
    return low + float(np.argmax(ndimage.gaussian_filter1d(counts, width / 2, mode="constant")))


def _without_frame(mask: np.ndarray, inside: np.ndarray, depth: int, full: float,
                   axes: Sequence[int] = (0, 1)) -> np.ndarray:
    """The mask without a plate's frame: a run of at most `depth` lines, starting within `depth` of a side of the
    (upright, cropped) content, each covered for more than `full` of its length, is a frame or a plate edge, not
    a hand (a forearm or a wrist crosses a side over a third of it at most). `axes`: the sides looked at (0: top
    and bottom, 1: left and right; a narrow view's hand crosses its short sides whole)."""
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    if not len(rows):
        return mask
    cleaned = mask.copy()
    for axis, lines in ((0, rows), (1, cols)):
        if axis not in axes:
            continue
        covered = cleaned.sum(1 - axis) / np.maximum(inside.sum(1 - axis), 1)
        for side in (lines, lines[::-1]):
            start = next((k for k in range(min(depth, len(side))) if covered[side[k]] > full), None)
            if start is None:
                continue
            stop = start
            while stop < min(start + depth, len(side)) and covered[side[stop]] > full:
                stop += 1
            if axis == 0:
                cleaned[side[start:stop]] = False
            else:
                cleaned[:, side[start:stop]] = False
    return cleaned


def hand_mask(image: np.ndarray, content: np.ndarray, rules: MaskRules = MaskRules()) -> tuple[np.ndarray, bool]:
    """Foreground (hand) mask inside `content` pixels, and whether the view was inverted (see _hand_mask)."""
    mask, inverted, _ = _hand_mask(image, content, rules)
    return mask, inverted


# signals of a doubtful hand mask (measured at the working resolution), and where suspect_masks flags them
MASK_DOUBTS = {"missed": "hand-sized foreground left outside the mask (share of its area)",
               "cut": "the mask's edge cuts through foreground (share of a band outside it at the hand's level, "
                      "beyond the background's share at that level)",
               "background_inside": "background inside the mask's edge (share of a band inside it at the floor, "
                                    "beyond the background's grain)",
               "rim": "the mask covers much of the content's rim (share)",
               "flat": "the mask is hardly more textured than the content it leaves out (median local standard "
                       "deviation outside it over inside it): the background or a plate taken for the hand",
               "enclosed": "the mask rings content it leaves out (share of the content): a plate's frame joined to "
                           "the hand"}


def _background_level(small: np.ndarray, inside: np.ndarray,
                      rules: MaskRules) -> tuple[np.ndarray, float, np.ndarray, float]:
    """(local standard deviation, the background's noise, its flat pixels, its level) of a view at working size:
    the noise is the flattest quarter's; the level the commonest flat one (not the rim's: a plate's frame along the
    rim is not it)."""
    mean = ndimage.uniform_filter(small, rules.local_window)
    local = np.sqrt(np.maximum(ndimage.uniform_filter(small * small, rules.local_window) - mean * mean, 0))
    noise = max(float(np.percentile(local[inside], rules.noise_percentile)), rules.least_noise)
    flat = inside & (local <= rules.flat_noise * noise)
    level = (_commonest_level(small[flat], rules.commonest_width) if flat.sum() >= rules.least_flat
             else float(np.median(small[inside])))
    return local, noise, flat, level


def _hand_background(small: np.ndarray, inside: np.ndarray, rules: MaskRules, flattened: bool = False,
                     narrow: bool = False) -> tuple[np.ndarray, float, np.ndarray, float]:
    """_background_level for the hand mask. Once the view is `flattened` (no heel effect left to split the
    background): when much of the content lies on both sides of that level (soft tissue filling a close-up,
    background on one side and bone on the other), the background is the commonest flat level on the side that
    is flatter (bone is textured), its noise that of the pixels near it (the flattest quarter of such a view is
    partly hand)."""
    local, noise, flat, level = _background_level(small, inside, rules)
    off = rules.both_sides_noise * noise
    below, above = inside & (small < level - off), inside & (small > level + off)
    least_side = rules.narrow_side_share if narrow else rules.both_sides_share
    if flattened and min(below.sum(), above.sum()) > least_side * inside.sum():
        side = below if (flat & below).sum() / below.sum() > (flat & above).sum() / above.sum() else above
        if (flat & side).sum() >= rules.least_flat:
            level = _commonest_level(small[flat & side], rules.commonest_width)
            near = flat & side & (np.abs(small - level) <= off)
            noise = max(float(np.median(local[near])), rules.least_noise) if near.any() else noise
            flat = inside & (local <= rules.flat_noise * noise)
    return local, noise, flat, level


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """ndimage.binary_fill_holes, by labelling what lies outside the mask once (several times faster)."""
    labels, count = ndimage.label(~mask)
    outside = np.zeros(count + 1, bool)  # by label: what touches the image's edge (a look-up: faster than np.isin)
    outside[labels[0]] = outside[labels[-1]] = outside[labels[:, 0]] = outside[labels[:, -1]] = True
    return mask | ~outside[labels] & (labels > 0)


def _piece_rect(part: np.ndarray) -> tuple | None:
    """A component's minimum-area rectangle, from its outline: (width, length) in px, short side first, its convex
    hull's area and the rectangle's area between outline centres; None for a line (a hull needs 3 points)."""
    ys, xs = np.nonzero(_outline(part))
    if len(xs) < 3 or np.ptp(xs) < 2 or np.ptp(ys) < 2:  # a line (a hull needs 3 points)
        return None
    points = np.column_stack([xs, ys]).astype(float)
    hull = ConvexHull(points)
    _, sides, _ = min_area_rect(points, hull.vertices)
    width, length = sorted(s + 1 for s in sides)  # (+1: outline centres to pixel edges)
    return width, length, hull.volume, float(np.prod(sides))


def _tag_shaped(part: np.ndarray, least: float, most: float, rules: MaskRules, rect: tuple | None = None,
                hull_fill: float | None = None) -> bool:
    """Whether a component has a lead tag's shape: a rectangle (it fills rules.tag_fill of its minimum-area
    rectangle, its convex hull `hull_fill`, by default rules.tag_hull_fill) whose short side lies between `least`
    and `most` px and whose long side is at most rules.tag_max_aspect times it. `rect`: its _piece_rect, when
    already measured."""
    rect = rect or _piece_rect(part)
    if rect is None:  # a line: no tag
        return False
    width, length, hull_area, rect_area = rect
    hull_fill = rules.tag_hull_fill if hull_fill is None else hull_fill
    return bool(least <= width <= most and length <= rules.tag_max_aspect * width
                and part.sum() >= rules.tag_fill * width * length and hull_area >= hull_fill * rect_area)


def _bar_shaped(rect: tuple | None, rules: MaskRules) -> bool:
    """Whether a component whose _piece_rect is `rect` is a bar: at least rules.bar_aspect times as long as wide."""
    return rect is not None and rect[1] >= rules.bar_aspect * rect[0]


def _tag_sides(inside: np.ndarray, rules: MaskRules, view_short: float | None = None) -> tuple[float, float]:
    """The least and most short side (px) of a lead tag in `inside`: shares of its short side; the most, of the
    view's (`view_short`, a share of the square's side) when that is longer: a tag is sized by its film, not by a
    crop narrower than it (phantom v7 seed 0: 3 of the 16 views with a tag in their mask at 128 px held one 11-19
    px wide in a crop 26-68 px wide: a collimated field, and twice a rectangle round the hand taken for a plate).
    The least stays the crop's: raised, dashes of text were no longer taken for tags."""
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    short = min(np.ptp(rows), np.ptp(cols)) + 1
    film = max(short, view_short * inside.shape[0]) if view_short is not None else short
    return max(rules.tag_least_side, rules.tag_min_side * short), rules.tag_max_side * film


def _find_tags(small: np.ndarray, inside: np.ndarray, background: float, noise: float, lo: float, hi: float,
               rules: MaskRules) -> np.ndarray:
    """Lead tags at working size (bool, grown by their blurred edge): components, at levels between the background
    and each extreme (`lo`, `hi`), that are tag-sized rectangles lying on the background (MaskRules' tag_* rules: a
    tag is small, flat and rectangular with sharp edges; a hand large, graded and of no rectangle's shape; their
    sizes: _tag_sides)."""
    least, most = _tag_sides(inside, rules)
    ring_px = rules.tag_ring_gap + rules.tag_ring
    tags = np.zeros(inside.shape, bool)
    for extreme in (lo, hi):
        contrast = extreme - background
        if abs(contrast) <= rules.tag_least_noise * noise:
            continue
        for share in rules.tag_levels:
            level = background + share * contrast
            if abs(level - background) <= rules.tag_least_noise * noise:
                continue
            region = ((small - level) * np.sign(contrast) > 0) & inside & ~tags
            region = ndimage.binary_opening(_fill_holes(region))  # (the letter in a darker holder)
            labels, count = ndimage.label(region)
            areas = np.bincount(labels.ravel())
            for k, box in enumerate(ndimage.find_objects(labels), 1):
                if box is None or not least * least <= areas[k] <= most * most * rules.tag_max_aspect:
                    continue
                extent = sorted(s.stop - s.start for s in box)  # (a tilted rectangle's box: its sides summed at most)
                if extent[0] < least or extent[1] > most * (1 + rules.tag_max_aspect):
                    continue
                y0, x0 = max(box[0].start - ring_px, 0), max(box[1].start - ring_px, 0)
                near = (slice(y0, box[0].stop + ring_px), slice(x0, box[1].stop + ring_px))
                part = _fill_holes(labels[near] == k)
                if not _tag_shaped(part, least, most, rules):
                    continue
                ring = ndimage.binary_dilation(part, iterations=ring_px) & inside[near] & ~ndimage.binary_dilation(
                    part, iterations=rules.tag_ring_gap)
                tolerance = max(rules.tag_ring_noise * noise, rules.tag_ring_contrast * abs(level - background))
                if ring.any() and (np.abs(small[near][ring] - background) <= tolerance).mean() >= (
                        rules.tag_ring_background):
                    tags[near] |= part
    return ndimage.binary_dilation(tags, iterations=rules.tag_grow) & inside if tags.any() else tags


def _mostly_within(found: np.ndarray, within: np.ndarray, share: float) -> np.ndarray:
    """The components of `found` with at least `share` of their pixels `within`."""
    labels, count = ndimage.label(found)
    if not count:
        return found
    shares = np.asarray(ndimage.mean(within, labels, np.arange(1, count + 1)))
    return np.isin(labels, 1 + np.flatnonzero(shares >= share))


def _without_stray_pieces(found: np.ndarray, inside: np.ndarray, narrow: bool, local: np.ndarray, noise: float,
                          rules: MaskRules, view_short: float | None = None) -> np.ndarray:
    """A hand mask without the pieces apart from its largest that are no hand: one at most rules.tag_piece_share
    of its size with a tag's shape (_tag_shaped, its hull filling rules.piece_hull_fill) is a lead tag that
    _find_tags missed (text or a letter across its holder broke its rim), and so is one that has it once an
    opening rules.piece_text_width px wide takes off what sticks out of it (a dash of burned-in text) when its
    edges are sharp (`local`'s median at least rules.tag_sharp_noise times the `noise`: a faint hand's piece is
    graded); outside a close-up (`narrow`: its finger may be one), a bar at most rules.bar_piece_share of it
    (_bar_shaped) is a plate's frame or edge. A second hand is about as large as the first, and neither."""
    labels, count = ndimage.label(found)
    if count < 2:
        return found
    least, most = _tag_sides(inside, rules, view_short)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    kept = found.copy()
    for k, box in enumerate(ndimage.find_objects(labels), 1):
        tag_sized = areas[k] <= rules.tag_piece_share * areas.max()
        bar_sized = not narrow and areas[k] <= rules.bar_piece_share * areas.max()
        if not (tag_sized or bar_sized):
            continue
        part = labels[box] == k
        rect = _piece_rect(part)  # (one hull for both shapes)
        tag_shaped = tag_sized and _tag_shaped(part, least, most, rules, rect, rules.piece_hull_fill)
        if tag_shaped or (bar_sized and _bar_shaped(rect, rules)) or (  # (in turn: the opening only when needed)
                tag_sized and np.median(local[box][part]) >= rules.tag_sharp_noise * noise
                and _tag_shaped_without_text(part, least, most, rules)):
            kept[box] &= ~part
    return kept


def _tag_shaped_without_text(part: np.ndarray, least: float, most: float, rules: MaskRules) -> bool:
    """Whether a piece is tag-shaped (_tag_shaped, its hull filling rules.piece_hull_fill) once an opening
    rules.piece_text_width px wide takes off what sticks out of it (a dash of burned-in text, a blurred bridge)."""
    square = np.ones((rules.piece_text_width, rules.piece_text_width), bool)
    opened = ndimage.binary_opening(part, structure=square)
    return bool(opened.any()) and _tag_shaped(_fill_holes(opened), least, most, rules, hull_fill=rules.piece_hull_fill)


def _mask_doubts(mask: np.ndarray, fg: np.ndarray, above: np.ndarray, inside: np.ndarray, ring: np.ndarray,
                 local: np.ndarray, rules: MaskRules) -> dict:
    """The signals of a doubtful mask (MASK_DOUBTS), at working size: hand-sized parts of the foreground `fg` (the
    level that found the hand) left outside it; a band just outside its edge in `fg`, and one just inside at or
    below the floor (not `above` it), each beyond the share the same test gives where the content is background
    (far from the mask: film grain and mottle); the rim it covers; how flat it is beside what it leaves out (the
    `local` standard deviation's medians, off the content's edge: a hand's bone is textured, a background, plate or
    field flat; a mask as flat as its surround lies on the wrong thing, or is the background of a polarity read
    wrong); the content it encloses without holding it (a plate's frame joined to the hand rings the background).
    (A band outside above the floor, not in `fg`, is no cut: a right mask's wide, graded soft-tissue margin lies
    there; phantom v6.)"""
    pieces, count = ndimage.label(fg & ~mask)
    sizes = np.bincount(pieces.ravel())[1:]
    missed = sizes[sizes >= rules.doubt_least_area * inside.sum()].sum() if count else 0
    band_out = ndimage.binary_dilation(mask, iterations=rules.doubt_band) & ~mask & inside
    band_in = mask & ~ndimage.binary_erosion(mask, iterations=rules.doubt_band) & inside
    far = inside & ~ndimage.binary_dilation(mask, iterations=rules.doubt_far)
    grain = float(above[far].mean()) if far.any() else 0.0  # background above the floor: its grain
    fg_grain = float(fg[far].mean()) if far.any() else 0.0  # background at the hand's level: its mottle
    core = ndimage.binary_erosion(inside, iterations=rules.local_window // 2 + 1)  # off the content's edge
    flat = (float(np.median(local[core & ~mask]) / max(np.median(local[core & mask]), rules.least_noise))
            if (core & mask).any() and (core & ~mask).any() else 0.0)
    return {"missed": float(missed / max(mask.sum(), 1)),
            "cut": max(float(fg[band_out].mean()) - fg_grain, 0.0) if band_out.any() else 0.0,
            "background_inside": max(float((~above[band_in]).mean()) - grain, 0.0) if band_in.any() else 0.0,
            "rim": float((mask & ring).sum() / max(ring.sum(), 1)), "flat": flat,
            "enclosed": float((_fill_holes(mask) & ~mask & inside).sum() / max(inside.sum(), 1))}


def _hand_mask(image: np.ndarray, content: np.ndarray, rules: MaskRules = MaskRules(),
               view_short: float | None = None) -> tuple[np.ndarray, bool, dict]:
    """Foreground (hand) mask inside `content` pixels, whether the view was inverted (hand darker than its
    background), and the signals of a doubtful mask (MASK_DOUBTS). `view_short`: the whole view's short side as a
    share of the square's side, which sizes its lead tags (_tag_sides); None: the content's.

    Classical, as a stand-in for the paper's SSD hand detector and Photoshop masks, at a working resolution of at
    most rules.work_size (the mask is upsampled): the background is the commonest flat level; the hand lies on the
    side of it where the view's extremes lie farthest (bone: brighter, or darker when inverted). Thresholds
    between intensity classes (Otsu, 3- and 4-class Otsu) and just off the background are tried from the
    background's side outwards, none closer to it than its noise or a share of the view's contrast; the first that
    leaves hand-like components (see _hand_components; every one kept: two hands) wins, else the other polarity is
    tried; a first mask that is a lead tag alone (_tag_alone) is a tag, and the hand is looked for again. Uniform
    bright patches touching the rim (markers, plate edges; not those the hand borders: its bone) and a plate's
    frame are cut out first, thin strips near the rim after; a faint view (its extremes a few times the noise off
    the background) is smoothed first; tag-shaped pieces and bars (a plate's frame or edge) apart from the hand are
    dropped; the mask then grows a few pixels into the soft tissue's faint margin above that floor, and a faint
    view's outline is smoothed (see MaskRules).
    """
    size = image.shape[0]
    n = min(size, rules.work_size)
    found_levels = _hand_levels(image, content, rules)
    if found_levels is None:
        return np.zeros_like(content, bool), False, dict.fromkeys(MASK_DOUBTS, 0.0)
    views, levels, values, narrow = found_levels
    found, inverted, work, least, edge, fg = _search_hand_levels(views, levels, values, narrow, rules)
    if found.any() and not narrow:
        alone = _tag_alone(found, views, levels, rules, view_short)
        if alone.any():  # a bright tag taken for a dim hand: its levels read again without it
            views, levels, values, narrow = _hand_levels(image, content, rules, views["tags"] | alone)
            found, inverted, work, least, edge, fg = _search_hand_levels(views, levels, values, narrow, rules)
    inside, whole, ring, tags = (views[k] for k in ("inside", "whole", "ring", "tags"))
    prior = levels["prior"]
    if not found.any():
        return np.zeros_like(content, bool), prior, dict.fromkeys(MASK_DOUBTS, 0.0)
    kept = _without_stray_pieces(found, inside, narrow, views["local"], levels["noise"], rules, view_short)
    filled = _finished_mask(kept, work > least, inside, edge, whole, tags, rules)
    fg &= ~(found & ~kept)  # the tags and bars dropped: no hand left out
    doubts = _mask_doubts(filled, fg, work > least, inside & ~edge, ring, views["local"], rules)
    if levels["faint"] and not narrow:  # (after the doubts: they read the threshold's own edge)
        filled = _smoothed_outline(filled, inside, rules.faint_outline)
    if n < size:
        filled_8bit = Image.fromarray(filled.astype(np.uint8) * 255)  # (255: 8-bit white)
        filled = np.asarray(filled_8bit.resize((size, size), Image.Resampling.BILINEAR)) >= 128  # (128: halfway)
    return filled & content, inverted, doubts


def _tag_alone(found: np.ndarray, views: dict, levels: dict, rules: MaskRules,
               view_short: float | None = None) -> np.ndarray:
    """The largest piece of a first mask (`found`) grown by its blurred edge when it is a lead tag that _find_tags
    missed (text joined to it broke its ring; in a dim view it is the brightest thing): sharp-edged, tag-shaped
    (or so once a dash of text is opened off it: _tag_shaped_without_text, as for _without_stray_pieces' pieces)
    and of near one level (MaskRules.tag_alone_spread); else nothing."""
    inside, local, small = views["inside"], views["local"], views["small"]
    labels, _ = ndimage.label(found)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    part = labels == np.argmax(areas)
    least, most = _tag_sides(inside, rules, view_short)
    nothing = np.zeros_like(found)
    if np.median(local[part]) < rules.tag_sharp_noise * levels["noise"]:
        return nothing
    core = ndimage.binary_erosion(part)  # (its blurred rim aside)
    lower, upper = np.percentile(small[core if core.any() else part], [25, 75])  # (25, 75: its quartiles)
    if upper - lower > rules.tag_alone_spread * (levels["hi"] - levels["lo"]):  # (first: the cheaper test)
        return nothing
    if not (_tag_shaped(part, least, most, rules, hull_fill=rules.piece_hull_fill)
            or _tag_shaped_without_text(part, least, most, rules)):
        return nothing
    return ndimage.binary_dilation(part, iterations=rules.tag_grow) & inside


def _smoothed_outline(mask: np.ndarray, inside: np.ndarray, sigma: float) -> np.ndarray:
    """A mask with its outline smoothed: where its Gaussian blur (`sigma` px), over that of the `inside`
    pixels (no loss where the hand leaves the content), is a half or more."""
    blurred = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    return (blurred >= 0.5 * ndimage.gaussian_filter(inside.astype(np.float32), sigma)) & inside  # (0.5: half)


def _hand_levels(image: np.ndarray, content: np.ndarray, rules: MaskRules,
                 known_tags: np.ndarray | None = None) -> tuple | None:
    """What _hand_mask reads off a view before it thresholds: its working square (at most rules.work_size), the
    content's rim, whether it is a close-up, its background's level and noise, its extremes, its tags (with
    `known_tags`, at working size: tags found before), the polarity they imply (`prior`: bone darker than the
    background) and whether it is faint. Returns (views, levels, values, narrow), or None when the content is too
    small or one level only."""
    n = min(image.shape[0], rules.work_size)
    small, inside, whole = _working_square(image, content, n)
    values = small[inside]
    if values.size < rules.least_pixels or np.ptp(values) == 0:
        return None
    rim = max(rules.least_rim, int(rules.rim_share * n))
    ring = inside & ~ndimage.binary_erosion(inside, iterations=rim, border_value=0)
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    narrow = max(len(rows), len(cols)) >= rules.narrow_aspect * min(len(rows), len(cols))
    if narrow:  # a close-up's hand crosses its short sides whole and runs along its long ones: no rim, no frame
        ring = np.zeros_like(inside)
    local, noise, flat, background = _hand_background(small, inside, rules)
    if not narrow:
        small = _without_heel(small, inside, flat, noise, background, rules)
        values = small[inside]
    local, noise, flat, background = _hand_background(small, inside, rules, flattened=True, narrow=narrow)
    lo, hi = _extremes(values, rules)
    tags = _find_tags(small, inside, background, noise, lo, hi, rules)  # not hand, whatever their level
    if known_tags is not None:
        tags |= known_tags
    if narrow:  # a close-up's commonest level may be its soft tissue: its tags lie on the background beyond it
        beside, beside_noise = _background_beside(small, inside & ~tags, local, background, noise,
                                                  _darker_hand(background, lo, hi), rules)
        if beside != background:
            tags |= _find_tags(small, inside & ~tags, beside, beside_noise, lo, hi, rules)
    if tags.any():
        values = small[inside & ~tags]
        lo, hi = _extremes(values, rules)
    untagged = inside & ~tags
    measured = untagged & ~_thin_extremes(small, untagged, background, lo, hi, rules)  # text: not the hand's contrast
    if measured.sum() < rules.least_pixels:
        measured = untagged
    values = small[measured]
    lo, hi = _extremes(values, rules)
    faint = max(background - lo, hi - background) < rules.faint_noise * noise
    if faint:  # a faint hand in the grain: smoothed
        sharp = local >= rules.tag_sharp_noise * noise  # (before smoothing: a tag's rim and letter)
        small = _smoothed_inside(small, inside, rules.faint_smooth)
        local, noise, flat, background = _hand_background(small, inside, rules, flattened=True, narrow=narrow)
        values = small[measured]
        lo, hi = _extremes(values, rules)
        smoothed_tags = _find_tags(small, inside & ~tags, background, noise, lo, hi, rules)
        tags |= _mostly_within(smoothed_tags, sharp, rules.tag_sharp_share)
    prior = _darker_hand(background, lo, hi)
    if narrow:  # a close-up's soft tissue, filling it, is no background: its bone (textured) says the polarity
        graded = _graded_polarity(small, inside & ~tags, local, rules)
        if graded is not None and graded != prior:
            background, noise = _background_beside(small, inside & ~tags, local, background, noise, graded, rules)
            prior = graded
        else:  # a plateau of its own beyond the commonest level: the background (its tags lie on it), the
            #    commonest soft tissue
            beside, beside_noise = _background_beside(small, inside & ~tags, local, background, noise, prior, rules,
                                                      rules.beside_plateau_noise)
            if beside != background:
                background, noise = beside, beside_noise
                tags |= _find_tags(small, inside & ~tags, background, noise, lo, hi, rules)
    views = {"small": small, "inside": inside, "whole": whole, "ring": ring, "local": local, "tags": tags}
    levels = {"noise": noise, "background": background, "lo": lo, "hi": hi, "prior": prior, "rim": rim,
              "faint": faint}
    return views, levels, values, narrow


def _thin_extremes(small: np.ndarray, inside: np.ndarray, background: float, lo: float, hi: float,
                   rules: MaskRules) -> np.ndarray:
    """Burned-in text and lines: pixels near either extreme (`lo`, `hi`; within rules.text_share of the way to the
    background) in strokes thinner than rules.text_width px, which an opening that wide takes off."""
    square = np.ones((rules.text_width, rules.text_width), bool)
    text = np.zeros_like(inside)
    for extreme in (lo, hi):
        near = (np.abs(small - extreme) <= rules.text_share * abs(extreme - background)) & inside
        text |= near & ~ndimage.binary_opening(near, structure=square)
    return text


def _extremes(values: np.ndarray, rules: MaskRules) -> tuple[float, float]:
    """A view's darkest and brightest levels, rules.extreme_percentile in from either end (not a few specks)."""
    lo, hi = np.percentile(values, [rules.extreme_percentile, 100 - rules.extreme_percentile])  # (100: per cent)
    return float(lo), float(hi)


def _darker_hand(background: float, lo: float, hi: float) -> bool:
    """Whether the hand lies below its background (a negative): the side where the view's extremes lie farthest."""
    return bool(background - lo > hi - background)


def _graded_polarity(small: np.ndarray, inside: np.ndarray, local: np.ndarray, rules: MaskRules) -> bool | None:
    """Whether a close-up is inverted, read from its texture: its bone (graded: trabeculae, cortex) lies at the
    textured end of its levels, brighter than its soft tissue unless inverted; its background at the flat end
    (rules.graded_percentile, graded_ratio). None when neither end is clearly the more textured."""
    values = small[inside]
    dark, bright = np.percentile(values, [rules.graded_percentile, 100 - rules.graded_percentile])  # (100: per cent)
    dark_texture = float(np.median(local[inside][values <= dark]))
    bright_texture = float(np.median(local[inside][values >= bright]))
    if bright_texture >= rules.graded_ratio * dark_texture:
        return False
    if dark_texture >= rules.graded_ratio * bright_texture:
        return True
    return None


def _background_beside(small: np.ndarray, inside: np.ndarray, local: np.ndarray, level: float, noise: float,
                       inverted: bool, rules: MaskRules, least_gap: float = 0.0) -> tuple[float, float]:
    """(level, noise) of a close-up's background when its commonest flat level lies on the hand's side (soft tissue
    filling it): the commonest flat level beyond it on the other side (darker, or brighter when `inverted`), its
    noise that of the flat pixels near it (a strip too thin for flat pixels: the commonest level of its own, the
    old noise); the old ones when too few pixels lie there, or when it lies less than `least_gap` times the noise
    beyond. Beyond: past rules.beside_share of the way from that level to the view's extreme (soft tissue thins
    towards its edge)."""
    share = 100 - rules.extreme_percentile if inverted else rules.extreme_percentile  # (100: per cent)
    end = np.percentile(small[inside], share)
    beyond = level + rules.beside_share * (end - level)
    side = inside & ((small > beyond) if inverted else (small < beyond))
    flat = side & (local <= rules.flat_noise * noise)
    if side.sum() < rules.least_flat:
        return level, noise
    found = _commonest_level(small[flat if flat.sum() >= rules.least_flat else side], rules.commonest_width)
    if (found - beyond) * (1 if inverted else -1) < least_gap * noise:
        return level, noise
    near = flat & (np.abs(small - found) <= rules.both_sides_noise * noise)
    return found, (max(float(np.median(local[near])), rules.least_noise) if near.any() else noise)


def _working_square(image: np.ndarray, content: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The view averaged down to n x n (when larger), the content pixels wholly inside it with its edge pixels
    (they blend with the zero fill) taken off, and the content before that: (small, inside, whole)."""
    if n < image.shape[0]:
        small = np.asarray(Image.fromarray(image).resize((n, n), Image.Resampling.BOX), np.float32)
        content_8bit = content.astype(np.uint8) * 255  # (255: 8-bit white)
        whole_block = np.asarray(Image.fromarray(content_8bit).resize((n, n), Image.Resampling.BOX))
        inside = whole_block > 250  # (250 of 255: a block wholly inside the content)
    else:
        small, inside = image.astype(np.float32), content.astype(bool)
    return small, ndimage.binary_erosion(inside, border_value=0), inside


def _without_heel(small: np.ndarray, inside: np.ndarray, flat: np.ndarray, noise: float, background: float,
                  rules: MaskRules) -> np.ndarray:
    """The view with its background's gradient (a heel effect) taken off: a plane fitted, robustly, through the
    flat pixels near the background's level, subtracted only when it is a real gradient, not noise. (Not for a
    close-up: its background is a sliver along a side, and a plane through it and the soft tissue near its level
    tilts across the view, the hand's margin sunk below the floor.)"""
    n = small.shape[0]
    near = flat & (np.abs(small - background) <= rules.plane_noise * noise)
    if near.sum() < rules.least_flat:
        return small
    ys, xs = np.nonzero(near)
    design = np.column_stack([np.ones(len(xs)), xs / n - 0.5, ys / n - 0.5])  # (0.5: about the view's centre)
    hand_side = -1 if _darker_hand(background, *_extremes(small[inside], rules)) else 1
    fit = np.ones(len(xs), bool)
    for _ in range(rules.plane_rounds):
        coef = np.linalg.lstsq(design[fit], small[ys, xs][fit], rcond=None)[0]
        residual = small[ys, xs] - design @ coef
        deviation = np.abs(residual - np.median(residual))
        sd = _MAD_TO_SD * np.median(deviation)
        fit = (deviation <= rules.plane_mad * sd + rules.plane_slack) & (
            hand_side * (residual - np.median(residual)) <= rules.plane_hand_mad * sd + rules.plane_slack)
    spread = _MAD_TO_SD * np.median(np.abs(residual[fit] - np.median(residual[fit])))
    if abs(coef[1]) + abs(coef[2]) <= rules.heel_spread * spread + rules.heel_slack:
        return small
    yy, xx = np.mgrid[:n, :n] / n - 0.5  # (0.5: about the view's centre, as the fit)
    return np.where(inside, small - coef[1] * xx - coef[2] * yy, small).astype(np.float32)


def _smoothed_inside(small: np.ndarray, inside: np.ndarray, sigma: float) -> np.ndarray:
    """The view smoothed (Gaussian, `sigma` px) over the content's own pixels only, not the zero fill beyond."""
    weight = ndimage.gaussian_filter(inside.astype(np.float32), sigma)
    smooth = ndimage.gaussian_filter(np.where(inside, small, 0), sigma)
    return np.where(inside, smooth / np.maximum(weight, np.finfo(np.float32).tiny), small).astype(np.float32)


def _search_hand_levels(views: dict, levels: dict, values: np.ndarray, narrow: bool, rules: MaskRules) -> tuple:
    """Thresholds tried from the background's side outwards, for the expected polarity, then the other, then
    without the texture test; the first that leaves hand-like components wins. Returns (found, inverted, the
    working image, its floor, the cut-out bright flat edges and tags, the thresholded foreground)."""
    small, inside, ring, local, tags = (views[k] for k in ("small", "inside", "ring", "local", "tags"))
    noise, background, lo, hi, prior, rim = (levels[k] for k in ("noise", "background", "lo", "hi", "prior", "rim"))
    thresholds = _class_thresholds(values, rules)  # besides the classes: just off the background (faint soft tissue)
    thresholds += [background + k * rules.off_background_noise * noise * (-1 if side else 1)
                   for side in (prior, not prior) for k in (1, 2)]
    thresholds += [background + rules.faint_contrast * (extreme - background) for extreme in (lo, hi)]
    found, inverted = np.zeros(small.shape, bool), prior
    for inverted, texture in ((prior, 1.0), (not prior, 1.0), (prior, 0.0)):  # last: a hand without texture
        work = 255 - small if inverted else small  # (255: the 8-bit negative)
        candidates = sorted(255 - t for t in thresholds) if inverted else sorted(thresholds)  # (the 8-bit negative)
        extreme = 255 - lo if inverted else hi  # (the 8-bit negative)
        # the brightest and flat: markers, plate edges
        edge = (work > extreme - rules.edge_noise * noise) & (
            local <= rules.edge_flat_noise * noise + rules.edge_flat_slack) & inside
        labels, count = ndimage.label(edge)
        if count:
            touching = np.unique(labels[ring & edge])
            edge = ndimage.binary_dilation(np.isin(labels, touching[touching > 0]), iterations=rules.edge_grow)
        edge |= tags
        base = 255 - background if inverted else background  # (the 8-bit negative)
        # below: the background's own noise, or a share of the view's contrast above it (the floor)
        least = base + max(rules.floor_noise * noise, rules.contrast_floor * (extreme - base))
        for level in (v for v in candidates if v > least):
            fg = _without_frame(ndimage.binary_opening((work > level) & inside & ~edge), inside, rim,
                                rules.frame_full, () if narrow else (0, 1))
            found = _hand_components(fg, work, ring, inside, texture * noise, texture * (hi - lo), rules, narrow)
            if found.any():
                break
        if found.any():
            bone = _bone_at_rim(found, edge & ~tags)  # (taken for a marker: the hand's)
            found, edge = _without_rim_strips(found | bone, inside, narrow, rules), edge & ~bone
            break
    return found, inverted, work, least, edge, (fg if found.any() else None)


def _without_rim_strips(found: np.ndarray, inside: np.ndarray, narrow: bool, rules: MaskRules) -> np.ndarray:
    """The hand without thin strips along the content's rim: its pixels within rules.strip_depth of the side from
    the content's edge that an opening of rules.strip_width px takes off (a plate's frame or border that the crop
    left in, tilted or partly covered, so no line of it is full; a forearm or wrist leaves the view thick)."""
    if narrow:
        return found
    depth = max(1, int(rules.strip_depth * found.shape[0]))
    band = inside & ~ndimage.binary_erosion(inside, iterations=depth, border_value=0)
    thin = found & band & ~ndimage.binary_opening(found, iterations=rules.strip_width)
    return found & ~thin if thin.any() else found


def _bone_at_rim(found: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """The bright flat patches at the rim (`edge`, taken for markers and plate edges) that the hand borders: a
    forearm's bone where it leaves the view, in a light-grey view as bright and smooth as a marker, is hand (on
    phantom v4 the patches held hand in 171 of 902 views, a marker or plate edge in 14); a marker lies apart."""
    labels, count = ndimage.label(edge)
    if not count:
        return edge
    touching = np.unique(labels[ndimage.binary_dilation(found) & edge])
    return np.isin(labels, touching[touching > 0])


def _finished_mask(found: np.ndarray, above_floor: np.ndarray, inside: np.ndarray, edge: np.ndarray,
                   whole: np.ndarray, tags: np.ndarray, rules: MaskRules) -> np.ndarray:
    """The hand found, grown a few pixels into the soft tissue's faint margin above the floor, closed, its small
    holes filled (joint spaces, dark trabeculae; a loop of flexed fingers stays open), set back onto the content's
    edge pixels, without the tags."""
    faint = above_floor & inside & ~edge
    for _ in range(rules.margin_growth):
        found |= ndimage.binary_dilation(found) & faint
    found = ndimage.binary_closing(found, iterations=1, border_value=0)
    filled = _fill_holes(found)
    holes, count = ndimage.label(filled & ~found)
    if count:  # keep large holes (a loop of flexed fingers)
        big = np.flatnonzero(np.bincount(holes.ravel())[1:] > rules.hole_share * inside.sum()) + 1
        filled &= ~np.isin(holes, big)
    filled |= ndimage.binary_dilation(filled) & whole & ~inside  # back onto the content's edge pixels
    return filled & ~tags  # (a tag's hole in a closed mask stays open)


def _square_view(gray: np.ndarray, carrier, size: int, rules: CropRules) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A view (or its plate) made a size x size square: (image, content pixels, input->output affine)."""
    affine = _square_affine((gray.shape[1], gray.shape[0]), carrier, size)
    fold = int(np.clip(max(gray.shape) // size, 1, rules.resample_max))
    if fold > 1:  # a square smaller than the view: warped larger and averaged down (film grain not aliased)
        fine = _warp(gray, affine * fold, size * fold)
        image = np.asarray(Image.fromarray(fine).resize((size, size), Image.Resampling.BOX))
    else:
        image = _warp(gray, affine, size)
    content = _warp(np.full(gray.shape, 255, np.uint8), affine, size, order=0) > 0
    if carrier is not None:  # the plate only: what lies beside a tilted or narrow plate is not part of the view
        half = np.asarray(carrier[1]) * size / max(carrier[1]) / 2  # the plate's half sides in the square
        centers = np.arange(size) + 0.5 - size / 2
        content &= (np.abs(centers)[:, None] <= half[1]) & (np.abs(centers)[None, :] <= half[0])
    return image, content, affine


POLARITY_CENTRE = 0.55  # view_inverted reads a view's polarity off this central share of its sides: the hand lies
#                         there, a scanned film's black surround and a tilted plate's corners beyond it (phantom v5,
#                         seeds 0 and 985764, all inverted and light-grey views and 100 normal ones: 0.55 misread 6 of
#                         514, 0.5 12, 0.6 9, the whole view 49; with close-ups read whole, 0.55 misread 4, the
#                         plate-crop test 7 at 7 times the cost)


def view_inverted(gray: np.ndarray, crop_rules: CropRules = CropRules(), mask_rules: MaskRules = MaskRules()) -> bool:
    """Whether a view is stored as a negative (its bone darker than its background): the polarity the hand mask
    starts from (_hand_levels: on which side of the background the view's extremes lie, a close-up's from its
    texture), read off the view averaged down to the mask's working size, its central POLARITY_CENTRE only. No
    plate search (find_field): ~0.008 s a 512-px view on one core, not ~0.06. A close-up (as long as
    MaskRules.narrow_aspect times its width) is read whole: its hand fills it. On phantom v5 seed 7 (not used to
    choose POLARITY_CENTRE) it inverts 66 of 68 inverted views, 4 of 95 light-grey and none of 100 normal ones (the
    plate-crop test: 67, 7 and 1)."""
    scale = mask_rules.work_size / max(gray.shape)
    if scale < 1:  # (box-averaged, as _square_view averages a larger view down)
        small_wh = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        gray = np.asarray(Image.fromarray(gray).resize(small_wh, Image.Resampling.BOX))
    image, content, _ = _square_view(gray, None, max(gray.shape), crop_rules)
    rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
    share = 1.0 if max(gray.shape) >= mask_rules.narrow_aspect * min(gray.shape) else POLARITY_CENTRE
    half_h, half_w = share * len(rows) / 2, share * len(cols) / 2
    centers = np.arange(image.shape[0]) + 0.5  # (pixel centres)
    central = (np.abs(centers - (rows[0] + rows[-1] + 1) / 2) <= half_h)[:, None] & (
        np.abs(centers - (cols[0] + cols[-1] + 1) / 2) <= half_w)[None, :]
    found = _hand_levels(image, content & central, mask_rules)
    return bool(found is not None and found[1]["prior"])


def _cropped_square(path: str | os.PathLike, cfg: PreprocessConfig, size: int | None = None) -> tuple:
    """A stored view read and cropped as preprocess_view does (marker strips off, then its plate and field when
    cfg.crop) and made a `size` square (None: the mask's working size, or the view's long side if smaller):
    (the view without its strips, its carrier or None, the square, its content pixels, the stored view's
    pixels -> the square's affine)."""
    stored = np.asarray(load_image(path))
    gray, (left, top) = _without_marker_strips(stored, cfg.crop_rules) if cfg.crop else (stored, (0, 0))
    carrier = find_field(gray, cfg.crop_rules, cfg.mask_rules) if cfg.crop else None
    size = size or min(cfg.mask_rules.work_size, max(gray.shape))
    image, content, affine = _square_view(gray, carrier, size, cfg.crop_rules)
    affine[:, 2] -= affine[:, :2] @ [left, top]  # from the stored view's pixels: the strips' lines before them
    return gray, carrier, image, content, affine


def preprocess_view(path: str | os.PathLike, cfg: PreprocessConfig) -> dict:
    """Run the pipeline on one view: {'image' uint8 (S, S), 'mask' uint8 0/1, 'affine' 2x3 input->output, ...}.
    A square smaller than the mask's working size (MaskRules.work_size, or the view's own size if smaller) has
    its mask found on a square of that size and averaged down: a 32-px square's mask is a 128-px one's."""
    gray, carrier, image, content, affine = _cropped_square(path, cfg, cfg.size)
    inverted, doubts = False, dict.fromkeys(MASK_DOUBTS, 0.0)
    if cfg.segment:
        view_short = min(gray.shape) / max(carrier[1] if carrier is not None else gray.shape)  # sizes its tags
        work = max(cfg.size, min(cfg.mask_rules.work_size, max(gray.shape)))
        if work > cfg.size:
            big, big_content, _ = _square_view(gray, carrier, work, cfg.crop_rules)
            big_mask, inverted, doubts = _hand_mask(big, big_content, cfg.mask_rules, view_short)
            mask_8bit = Image.fromarray(big_mask.astype(np.uint8) * 255)  # (255: 8-bit white)
            shares = np.asarray(mask_8bit.resize((cfg.size, cfg.size), Image.Resampling.BOX))
            mask = (shares >= 128) & content  # (128: halfway)
        else:
            mask, inverted, doubts = _hand_mask(image, content, cfg.mask_rules, view_short)
        if inverted:
            image = np.where(content, 255 - image, 0).astype(np.uint8)
    else:
        mask = content
    region = mask if mask.any() else content
    levels = image[region]
    if levels.size == 0 or levels.min() == levels.max():  # one grey: nothing to equalise (both would make it white)
        pass
    elif cfg.equalize == "he":  # skimage's equalize_hist, as a look-up table over the 256 grey levels
        cdf, centers = exposure.cumulative_distribution(levels, 256)
        image = (np.interp(np.arange(256), centers, cdf) * 255).astype(np.uint8)[image]
    elif cfg.equalize == "clahe":
        image = (exposure.equalize_adapthist(image, clip_limit=0.01) * 255).astype(np.uint8)
    image = np.where(mask if cfg.segment else content, image, 0).astype(np.uint8)
    return {"image": image, "mask": mask.astype(np.uint8), "affine": affine.astype(np.float32),
            "carrier_found": carrier is not None, "inverted": inverted, "doubts": doubts}


def _anomaly_cache_chunk(task: tuple) -> int:
    """Preprocess a chunk of views into the cache's arrays (runs in a worker process)."""
    folder, start, paths, cfg = task
    images = np.load(folder / "images.npy", mmap_mode="r+")
    masks = np.load(folder / "masks.npy", mmap_mode="r+")
    affines = np.load(folder / "affines.npy", mmap_mode="r+")
    doubts = np.load(folder / "doubts.npy", mmap_mode="r+")
    for i, p in enumerate(paths):
        out = preprocess_view(p, cfg)
        images[start + i], masks[start + i], affines[start + i] = out["image"], out["mask"], out["affine"]
        doubts[start + i] = [out["doubts"][k] for k in MASK_DOUBTS]
    for a in (images, masks, affines, doubts):
        a.flush()
    return len(paths)


@dataclass
class AnomalyCache:
    """Preprocessed views, hand masks and each view's affine into the square, memory-mapped on disk."""

    folder: Path
    image_paths: list[str]
    cfg: PreprocessConfig

    def __post_init__(self):
        self.row_of = {p: i for i, p in enumerate(self.image_paths)}
        self._arrays = None

    def _open(self) -> dict:
        """Open the three arrays on first use (also inside data-loader workers)."""
        if self._arrays is None:
            self._arrays = {n: np.load(self.folder / f"{n}.npy", mmap_mode="r") for n in ("images", "masks", "affines")}
        return self._arrays

    images = property(lambda self: self._open()["images"], doc="(N, S, S) uint8 preprocessed views")
    masks = property(lambda self: self._open()["masks"], doc="(N, S, S) uint8 hand masks (0/1)")
    affines = property(lambda self: self._open()["affines"], doc="(N, 2, 3) original -> square pixel affines")

    @property
    def doubts(self) -> pd.DataFrame | None:
        """Each view's signals of a doubtful hand mask (columns: MASK_DOUBTS), or None for a cache without them."""
        path = self.folder / "doubts.npy"
        return pd.DataFrame(np.load(path), columns=list(MASK_DOUBTS)) if path.is_file() else None

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """Row numbers of the given image paths."""
        return np.array([self.row_of[p] for p in paths], dtype=np.int64)

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}  # workers re-open the memory maps


# bump when preprocess_view changes its output, so that caches built by an older version are rebuilt
# (2: the exposed field inside collimated plates, plates barely darker than their surround, three-class Otsu masks;
# 3: a plate of the background's class may miss a corner; 4: polarity from the content, every hand, markers and
# plates kept out, the mask found at <= 128 px, framed fields, fields that hold the hand; 5: the background is the
# commonest flat level; 6: the plate found on block means and deeper Otsu splits, its sides steps, the field by
# the bands along its sides; the mask's levels at least 5% of the contrast off the background, its faint margin;
# 7: lead tags left out, narrow close-ups, the background of a view that is mostly hand, 128 px squares averaged
# down; 9: a close-up's background beside a hand that fills it, bone at the rim kept, thin frame strips near the
# rim left out; 10: a plate reaching past the view by its own sides, collimated borders of a view with no plate;
# 11: a close-up's polarity from its textured end (its bone), its background then beside its soft tissue;
# 12: the doubt signal cut counts the foreground at the hand's level outside the mask, not what lies above the floor;
# 13: the heel's plane fitted with the hand's side of the background trimmed, the doubt signal flat (a fifth
# column of doubts); 14: bars apart from the hand (a plate's frame or edge) left out of the mask; 15: burned-in
# text left out of the view's extremes (its contrast); 16: a close-up's tags looked for on the background beside
# its soft tissue, and a stray piece tag-shaped once the text stuck to it is opened off left out; the doubt
# missed without the pieces so dropped, and the doubt enclosed (a sixth column of doubts); 17: a dim hand's
# texture test at 2 times the noise (MaskRules.texture_noise); 18: where no plate stands out, the plate searched
# for again on the block means smoothed (CropRules.denoise_sigma: a low-contrast plate); 19: a close-up's
# unexposed border cut off whatever its level (its middle, all hand, gives no background to tell it from); 20: a
# lead tag apart from the hand as wide as a quarter of the view's short side, not of a narrower crop's (_tag_sides);
# 21: a frame's outer rim along a plate candidate's side is none of the hand's edges (_lines_along); 22: marker
# strips along the view's edges cut off before the crop (_without_marker_strips), a close-up's plate as long for its
# width as the close-up; 23: a stray piece of the mask tag-shaped with its hull filling MaskRules.piece_hull_fill,
# the text opened off it one px wider than text_width (MaskRules.piece_text_width); 24: a faint view's tags looked
# for again once it is smoothed, those sharp before (MaskRules.tag_sharp_share); 25: a faint view's mask outline
# smoothed unless it is a close-up (MaskRules.faint_outline); 26: a marker strip as far from the background as lead
# towards the extreme on its own side (CropRules.strip_least_side); 27: a plate candidate's sides read as steps
# where no detail (the hand, text) crosses them (CropRules.step_clear); 28: a close-up's background a plateau of
# its own beyond its commonest level, its tags looked for on it (MaskRules.beside_plateau_noise); 30 (29 was
# reverted): a first mask that is a lead tag alone is the tag, the hand looked for again without it
# (MaskRules.tag_alone_spread); 31: ... also when a dash of text stuck to it is opened off; a changed rule
# (CropRules, MaskRules) needs no bump: the cache's key holds the rules)
ANOMALY_PIPELINE_VERSION = 31


def build_anomaly_cache(image_paths: Sequence[str], cfg: PreprocessConfig, cache_dir: str | os.PathLike = "data/cache",
                        workers: int | None = None, progress: bool = True) -> AnomalyCache:
    """Run the offline preprocessing once per (views, settings) and keep it on disk (its space reserved first: a
    full disk is said before any work); reuse it afterwards, unless damaged (then said and rebuilt)."""
    paths = [str(p) for p in image_paths]
    _remove_dead_cache_builds(cache_dir)
    folder = _cache_path(cache_dir, f"anomaly_{cfg.name.replace('+', '_')}_{cfg.size}px", paths,
                         {**asdict(cfg), "pipeline": ANOMALY_PIPELINE_VERSION})
    n, s = len(paths), cfg.size
    arrays = {"images": ((n, s, s), np.uint8), "masks": ((n, s, s), np.uint8), "affines": ((n, 2, 3), np.float32),
              "doubts": ((n, len(MASK_DOUBTS)), np.float32)}
    if (folder / "affines.npy").is_file() and not _damaged_cache([(folder / f"{name}.npy", *spec)
                                                                  for name, spec in arrays.items()]):
        return AnomalyCache(folder, paths, cfg)
    tmp = _make_folder(folder.with_name(f".{folder.name}.tmp{os.getpid()}"))
    tasks = [(tmp, i, paths[i:i + 32], cfg) for i in range(0, n, 32)]
    try:
        _new_arrays([(tmp / f"{name}.npy", *spec) for name, spec in arrays.items()], folder)
        _run_tasks(_anomaly_cache_chunk, tasks, f"preprocessing ({cfg.name}, {s}px)", progress, workers,
                   [len(t[2]) for t in tasks])
    except BaseException:  # a full disk, an undecodable image (named in the error), an interrupt: no partial folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return AnomalyCache(folder, paths, cfg)


# where a doubt signal flags a view, fitted on the good masks (IoU >= 0.85) of phantom v6's even patients (seed 0,
# 240 patients; 389 good views, 19 with IoU < 0.5; ANOMALY_PIPELINE_VERSION 12) at 128 and 512 px, checked on its
# odd ones: cut, background_inside and rim at the 99th percentile of those good masks, rounded up; missed at about
# their 95th (0.048 at 128 px, 0.043 at 512: coarse mottle leaves hand-sized foreground outside a right mask in a
# share of views, and the failed masks' missed hand lies in that range too: at 0.05 one more failed mask of 20 goes
# unflagged). On v6 the limits before (missed 0.04, cut above the floor 0.025, background_inside 0.03, rim 0.23)
# flagged 23% of the good masks: cut 99 (95 of them with a wide soft-tissue margin), background_inside 91 (89).
# Even / odd patients at 128 px: 19/19 and 18/20 failed masks flagged, 8.5% and 7.2% of the good ones.
# flat (pipeline 13), the same way: the 99th percentile of those good masks (0.634 at 512 px, 0.636 at 128), rounded
# up; their median is 0.25 (a hand's bone makes it four times as textured as its background). It is above the
# limit on 14 of seed 0's 36 failed masks at 512 px, and alone on: the background beside a hand that the crop cut
# (0.96), the background of a low-contrast view read with the wrong polarity (0.82; both seed 985764), a close-up
# whose mask left out a part of its hand as textured as the part it holds (1.08; seed 0). With it, seed 0
# even / odd at 128 px: 19/19 and 19/20 flagged, 9.5% and 7.4% of the good; 512 px: 17/17 and 18/19, 9.0% and
# 6.9%; seed 985764 (no limit fitted on it; its failures looked at): 25/26 at both sizes (23 before), 7.8-7.9%.
# missed again (pipeline 16: the tags and bars dropped from the mask no longer count as hand left out), the same
# way: about the 95th percentile of seed 0's even good masks (0.039 at 512 px, 0.045 at 128; 0.058 and 0.070 before).
# enclosed (pipeline 16): the 99th percentile of those good masks (0.0075 at 512 px, 0.0073 at 128; their 95th is 0,
# a loop of flexed fingers or a tag's hole the rest), rounded up; a plate's frame joined to the hand by text or a tag
# rings the field (0.08-0.30 on the three failed masks of six seeds that it alone flags).
# flat set again (pipeline 28, phantom v7, seeds 0, 20261206 and 20261207, 300 patients each, 128 and 512 px): 0.55,
# about the 97th-98th percentile of the good masks (their 99th: 0.58-0.65), where the failed masks no signal flagged
# lay (0.56-0.58: light-grey views whose mask lies on a mottled background as textured as the hand). Recall 88-100%
# -> 100%, good masks flagged 6.0-8.1% -> 7.6-9.1%; on seed 20261208, drawn before, 79-81% -> 86-88%; on seeds
# 20261209, 20261210 and 20261211, drawn after it was set, no failed mask more than at 0.65 (100%; 88% and 100%;
# 94%), 0.6-1.9 points more good masks flagged (7.3-9.4%). (cut stays: a clean cut through two hands reads 0.03)
MASK_DOUBT_LIMITS = {"missed": 0.04, "cut": 0.025, "background_inside": 0.08, "rim": 0.27, "flat": 0.55,
                     "enclosed": 0.01}


def suspect_masks(cache: AnomalyCache, low: float = 0.02, high: float = 0.45,
                  limits: dict | None = MASK_DOUBT_LIMITS) -> pd.DataFrame:
    """Views whose hand mask is implausible, to look at before training: covering more than `high` of the square
    (mostly the plate or the exposed field taken for the hand) or less than `low` (the hand missed), or with a
    doubt signal (MASK_DOUBTS) above its limit (`limits`; None: shares only). None for variants without
    segmentation, whose mask is the whole view."""
    rows = np.arange(len(cache.image_paths)) if cache.cfg.segment else np.arange(0)
    shares = np.array([cache.masks[i].mean() for i in rows], dtype=float)
    problems = [[f"mask covers more than {high:.0%} of the square"] if s > high else
                [f"mask under {low:.0%}"] if s < low else [] for s in shares]
    doubts = cache.doubts if limits else None
    if doubts is not None and len(rows):
        for name, limit in limits.items():
            for k in np.flatnonzero(doubts[name].to_numpy()[rows] > limit):
                problems[k].append(f"{MASK_DOUBTS[name]} above {limit}")
    table = pd.DataFrame({"image_path": [cache.image_paths[i] for i in rows], "mask_share": shares,
                          "problem": ["; ".join(p) for p in problems]})
    return table[table["problem"] != ""].sort_values("mask_share", ascending=False).reset_index(drop=True)


def _truth_in_square(truth: np.ndarray, affine: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """A true mask (original pixels) warped into a preprocessed square by its affine, and how much of it (in the
    square's pixels) the crop cut off."""
    affine = np.asarray(affine, float)
    warped = _warp(np.asarray(truth, bool).astype(np.uint8) * 255, affine, size) >= 128
    ys, xs = np.nonzero(truth)
    xy = np.column_stack([xs + 0.5, ys + 0.5]) @ affine[:, :2].T + affine[:, 2]
    cut_off = ((xy < 0) | (xy >= size)).any(1).sum() * abs(np.linalg.det(affine[:, :2]))
    return warped, float(cut_off)


def mask_iou(mask: np.ndarray, affine: np.ndarray, truth: np.ndarray) -> float:
    """IoU of a preprocessed view's hand mask (in its square) with the true mask (in the original view's pixels),
    in the square's pixels: the truth warped by the view's affine; true hand that the crop cut off counts as missed."""
    warped, cut_off = _truth_in_square(truth, affine, mask.shape[0])
    return _iou(np.asarray(mask, bool), warped, cut_off)


def _iou(a: np.ndarray, b: np.ndarray, cut_off: float = 0) -> float:
    """Intersection over union of two masks (`cut_off`: pixels of the second beyond the square, in the union)."""
    union = (a | b).sum() + cut_off
    return float((a & b).sum() / union) if union else 1.0


def _phantom_tags(shape: tuple[int, int], tags: list) -> np.ndarray:
    """A phantom view's lead tags (load_phantom_truth's `tags`: each tag's 4 corners) as a mask of its pixels."""
    found = np.zeros(shape, bool)
    for corners in tags:  # (corners around pixel centres; rect_mask counts from pixel corners)
        center, sides, angle = min_area_rect(np.asarray(corners, float))
        found |= rect_mask(shape, (center - 0.5, sides, angle))
    return found


def _mask_iou_rows(task: tuple) -> list[dict]:
    """mask_iou of a chunk of cached views against their true masks, how much of their lead tags the masks hold,
    the IoU of the truth moved in and out by one of the mask's working pixels, and the IoU with every
    disagreement within one working pixel of the true edge forgiven (runs in a worker process)."""
    cache, views = task
    rows = []
    size = cache.cfg.size
    step = max(1, round(size / min(size, cache.cfg.mask_rules.work_size)))  # one working pixel, in output px
    for v in views:
        i = cache.row_of[v["image_file"]]
        mask, affine = np.asarray(cache.masks[i], bool), cache.affines[i]
        truth = phantom_hand_mask(v["mask_file"])
        warped, cut_off = _truth_in_square(truth, affine, mask.shape[0])
        tags_in_square = _truth_in_square(_phantom_tags(truth.shape, v["tags"]), affine, mask.shape[0])[0]
        beyond = _warp(np.full(truth.shape, 255, np.uint8), affine, mask.shape[0]) < 128  # outside the view: no edge
        eroded = ndimage.binary_erosion(warped | beyond, iterations=step, border_value=1) & warped
        dilated = ndimage.binary_dilation(warped, iterations=step)
        edge = dilated & ~eroded  # within a working pixel of the true edge: there the truth's answer is taken
        forgiven = (mask & ~edge) | (warped & edge)
        rows.append({"image_path": v["image_path"], "iou": _iou(mask, warped, cut_off),
                     "iou_truth_eroded": _iou(eroded, warped), "iou_truth_dilated": _iou(dilated, warped),
                     "iou_edge_forgiven": _iou(forgiven, warped, cut_off),
                     "truth_share": float(warped.mean()), "mask_share": float(mask.mean()),
                     "cut_off_share": float(cut_off / mask.size),
                     "tag_in_mask": float(mask[tags_in_square].mean()) if tags_in_square.any() else np.nan})
    return rows


def mask_iou_table(data_dir: str | os.PathLike, cache: AnomalyCache | PreprocessConfig,
                   cache_dir: str | os.PathLike = "data/cache", workers: int | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Per-view IoU of the hand masks with a phantom's true masks (v3+), one row per view: iou; iou_truth_eroded
    and iou_truth_dilated, the IoU that the truth itself scores moved in or out by one of the mask's working pixels
    (MaskRules.work_size; how far from the truth a mask 0.85 allows in that view); iou_edge_forgiven, the mask's
    IoU with its disagreements within a working pixel of the true edge forgiven (a view failing 0.85 that passes
    with them forgiven fails at its edge only; one that still fails, grossly: a finger lost, background taken
    in); truth_share and mask_share (of the square), cut_off_share (true hand the crop left out), tag_in_mask
    (the share of its lead tags' pixels, in the square, that the mask holds; NaN without a tag in view: v4+), and
    the truth's view_type, n_hands, polarity, low_contrast, narrow, dim, marker, n_tags and its kind_* columns
    (PHANTOM_VIEW_KINDS). Computed in the preprocessed square (mask_iou). `cache`: a built AnomalyCache (its views
    that the phantom knows), or a PreprocessConfig, built for all the phantom's views."""
    truth = load_phantom_truth(data_dir)
    if isinstance(cache, PreprocessConfig):
        cache = build_anomaly_cache(truth["image_file"], cache, cache_dir, workers=workers, progress=progress)
    if not cache.cfg.segment:
        raise ValueError(f"variant {cache.cfg.name} has no hand mask (its mask is the whole view): use a full variant")
    truth = truth[truth["image_file"].isin(cache.row_of)].reset_index(drop=True)
    views = truth[["image_path", "image_file", "mask_file", "tags"]].to_dict("records")
    tasks = [(cache, views[i:i + 32]) for i in range(0, len(views), 32)]
    rows = [r for chunk in _run_tasks(_mask_iou_rows, tasks, "mask IoU", progress, workers,
                                      [len(t[1]) for t in tasks]) for r in chunk]
    table = pd.DataFrame(rows, columns=["image_path", "iou", "iou_truth_eroded", "iou_truth_dilated",
                                        "iou_edge_forgiven", "truth_share", "mask_share", "cut_off_share",
                                        "tag_in_mask"])
    keep = ["image_path", "image_file", "mask_file", "view_type", "n_hands", "polarity", "low_contrast", "narrow",
            "dim", "wide_margin", "mottle", "marker", "n_tags", *(f"kind_{k}" for k in PHANTOM_VIEW_KINDS)]
    return truth[keep].merge(table, on="image_path").assign(size=cache.cfg.size, variant=cache.cfg.name)


def mask_iou_summary(table: pd.DataFrame, good: float = 0.85, bad: float = 0.5) -> dict:
    """The IoU distribution in numbers: views, share >= `good`, median, 5th percentile, count < `bad`; and, when
    the table has them (mask_iou_table), the share >= `good` of the truth moved in and out by a working pixel and
    of the masks with their disagreements within a working pixel of the true edge forgiven."""
    iou = table["iou"].to_numpy()
    summary = {"views": int(len(iou)), f"share_iou_ge_{good}": float(np.mean(iou >= good)),
               "median_iou": float(np.median(iou)), "p5_iou": float(np.percentile(iou, 5)),
               f"n_iou_lt_{bad}": int(np.sum(iou < bad))}
    for moved in ("eroded", "dilated"):
        if f"iou_truth_{moved}" in table:
            summary[f"share_truth_{moved}_ge_{good}"] = float(np.mean(table[f"iou_truth_{moved}"] >= good))
    if "iou_edge_forgiven" in table:
        summary[f"share_edge_forgiven_ge_{good}"] = float(np.mean(table["iou_edge_forgiven"] >= good))
    return summary


def mask_iou_by_kind(table: pd.DataFrame, good: float = 0.85, bad: float = 0.5, tag_kept: float = 0.02) -> pd.DataFrame:
    """mask_iou_summary over all views and over each kind of view (PHANTOM_VIEW_KINDS; a view may be of several),
    one row each, with the share of its views with a lead tag whose mask holds more than `tag_kept` of the tag."""
    rows = []
    for kind in ("all", *PHANTOM_VIEW_KINDS):
        part = table if kind == "all" else table[table[f"kind_{kind}"]]
        tagged = part[part["n_tags"] > 0]
        rows.append({"kind": kind, **(mask_iou_summary(part, good, bad) if len(part) else {"views": 0}),
                     "share_tag_in_mask": float((tagged["tag_in_mask"] > tag_kept).mean()) if len(tagged) else np.nan})
    return pd.DataFrame(rows).set_index("kind")


_ONE_LEVEL_PERCENTILES = tuple(range(2, 100, 2))  # mask_one_level_table's levels: every other percentile of a view's
#                                                   greys, its lead tags left out (every 4th: 5 fewer of seed 0's
#                                                   1,154 views at 0.85, in two thirds of the time) ...
_ONE_LEVEL_SIGMAS = (0.0, 1.0)  # ... read as stored and smoothed (Gaussian, working px: the grain; 2 and 3 px raised
#                                 no close-up or dim view of seeds 0, 20261206, 20261207 to 0.85 that these do not) ...
_ONE_LEVEL_PLANE_GAP = 3  # ... and again with its background's plane taken off (a heel effect, a graded plate),
#                           fitted on the content this many working px or more from the true hand, its tags out ...
_ONE_LEVEL_PLANE_SHARE = 0.05  # ... where that is at least this share of the content (a close-up's may be a sliver),
_ONE_LEVEL_PLANE_TRIM = 2.5  # ... fitted again without pixels this many robust SDs off it (text, a plate's edge) ...
_ONE_LEVEL_CRUMB = 0.2  # ... each level's components under this share of its largest dropped (two hands both kept)


def _true_background_plane_off(image: np.ndarray, content: np.ndarray, truth: np.ndarray,
                               tags: np.ndarray) -> np.ndarray | None:
    """A view with the plane through its true background (_ONE_LEVEL_PLANE_GAP from the hand, tags out; fitted
    twice, _ONE_LEVEL_PLANE_TRIM) taken off; None when too little background for it (_ONE_LEVEL_PLANE_SHARE)."""
    far = content & ~tags & ~ndimage.binary_dilation(truth, iterations=_ONE_LEVEL_PLANE_GAP)
    if far.sum() < max(_ONE_LEVEL_PLANE_SHARE * content.sum(), 3):  # (3: a plane's unknowns)
        return None
    ys, xs = np.nonzero(far)
    design, values = np.column_stack([np.ones(len(xs)), xs, ys]), image[far].astype(float)
    coef = np.linalg.lstsq(design, values, rcond=None)[0]
    residual = values - design @ coef
    deviation = np.abs(residual - np.median(residual))
    kept = deviation <= _ONE_LEVEL_PLANE_TRIM * _MAD_TO_SD * np.median(deviation)
    if kept.sum() >= 3:  # (3: a plane's unknowns)
        coef = np.linalg.lstsq(design[kept], values[kept], rcond=None)[0]
    yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
    return (image - coef[1] * xx - coef[2] * yy).astype(np.float32)


def _best_one_level_iou(image: np.ndarray, content: np.ndarray, truth: np.ndarray, tags: np.ndarray,
                        cut_off: float = 0.0) -> float:
    """The best IoU with `truth` of any one grey level's mask of `image`: the `content` pixels, `tags` left out,
    on either side of a level (_ONE_LEVEL_PERCENTILES), the view read as stored and with its true background's
    plane off (_true_background_plane_off), each at _ONE_LEVEL_SIGMAS; holes filled, crumbs dropped
    (_ONE_LEVEL_CRUMB). `cut_off`: true hand beyond the square, in the union (as _iou)."""
    allowed = content & ~tags
    if not allowed.any():
        return 0.0
    readings = [image.astype(np.float32), _true_background_plane_off(image, content, truth, tags)]
    best = 0.0
    for reading in (r for r in readings if r is not None):
        for sigma in _ONE_LEVEL_SIGMAS:
            view = _smoothed_inside(reading, content, sigma) if sigma else reading
            for level in np.unique(np.percentile(view[allowed], _ONE_LEVEL_PERCENTILES)):
                for side in (view > level, view < level):  # (the hand brighter than its background, or darker)
                    found = _fill_holes(allowed & side)
                    labels, count = ndimage.label(found)
                    if count > 1:
                        areas = np.bincount(labels.ravel())
                        areas[0] = 0
                        found = (areas >= _ONE_LEVEL_CRUMB * areas.max())[labels]
                    best = max(best, _iou(found, truth, cut_off))
    return best


def _one_level_rows(views: list[dict]) -> list[dict]:
    """_best_one_level_iou of a chunk of phantom views, each cropped as preprocess_view crops it (default rules)
    into a square of the mask's working size (runs in a worker process)."""
    rows = []
    for v in views:
        _, _, image, content, affine = _cropped_square(v["image_file"], PreprocessConfig(crop=True))
        n = image.shape[0]
        truth = phantom_hand_mask(v["mask_file"])
        warped, cut_off = _truth_in_square(truth, affine, n)
        tags = _truth_in_square(_phantom_tags(truth.shape, v["tags"]), affine, n)[0]
        rows.append({"image_path": v["image_path"],
                     "iou_one_level": _best_one_level_iou(image, content, warped, tags, cut_off)})
    return rows


def mask_one_level_table(data_dir: str | os.PathLike, workers: int | None = None,
                         progress: bool = True) -> pd.DataFrame:
    """For each view of a phantom (v4+), the best IoU with its true hand mask of any one grey level's mask
    (iou_one_level): the view cropped as preprocess_view does, at the mask's working size (MaskRules.work_size),
    its lead tags known from the truth and left out, every level (_ONE_LEVEL_PERCENTILES) on either side, as
    stored and with its true background's plane taken off, each as stored and smoothed (_ONE_LEVEL_SIGMAS), holes
    filled and crumbs dropped (_ONE_LEVEL_CRUMB). It knows the truth: not a method but what one threshold of the
    view could reach, the rules' own kind of mask (one level, found after the background's gradient is taken off;
    they then grow and clean it, and pass it on some views). Where it is under 0.85, no level chosen better
    reaches 0.85: the view asks for a mask whose level changes across it."""
    truth = load_phantom_truth(data_dir)
    views = truth[["image_path", "image_file", "mask_file", "tags"]].to_dict("records")
    tasks = [views[i:i + 16] for i in range(0, len(views), 16)]
    rows = [r for chunk in _run_tasks(_one_level_rows, tasks, "one-level bound", progress, workers,
                                      [len(t) for t in tasks]) for r in chunk]
    return pd.DataFrame(rows, columns=["image_path", "iou_one_level"])


def anomaly_split(studies: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Davletshina et al.'s split by patient: positive patients halved into val and test, each joined by as many
    normal-only patients; all other (normal-only) patients train. Adds a column 'subset' (train/val/test)."""
    patient_key = studies["body_part"] + "/" + studies["patient"]
    positive = sorted(set(patient_key[studies["label"] == 1]))
    normal = sorted(set(patient_key) - set(positive))
    rng = np.random.default_rng(seed)
    positive, normal = list(rng.permutation(positive)), list(rng.permutation(normal))
    half = len(positive) // 2
    val_pos, test_pos = positive[:half], positive[half:]
    if len(normal) <= len(positive):
        raise MuraDataError(f"the split needs more normal-only patients ({len(normal)}) than patients with an "
                            f"abnormal study ({len(positive)}): as many go to val and test, the rest train")
    if half == 0:
        raise MuraDataError(f"the split needs at least 2 patients with an abnormal study, found {len(positive)}: "
                            f"half of them go to validation, half to test")
    val_neg, test_neg, train = normal[:len(val_pos)], normal[len(val_pos):len(positive)], normal[len(positive):]
    subset = {**dict.fromkeys(train, "train"), **dict.fromkeys(val_pos + val_neg, "val"),
              **dict.fromkeys(test_pos + test_neg, "test")}
    return studies.assign(subset=patient_key.map(subset))


# ---------------------------------------------------------------- anomaly detection: models and masked losses

def _conv_block(cin: int, cout: int, kernel: int, stride: int, padding: int) -> torch.nn.Sequential:
    """Convolution, batch norm, ReLU."""
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                               torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=True))


def _deconv_block(cin: int, cout: int, kernel: int = 4, stride: int = 2, padding: int = 1) -> torch.nn.Sequential:
    """Transposed convolution, batch norm, ReLU."""
    return torch.nn.Sequential(torch.nn.ConvTranspose2d(cin, cout, kernel, stride, padding, bias=False),
                               torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=True))


class ConvAutoencoder(torch.nn.Module):
    """The CAE of Davletshina et al.'s Figure 5: 3x3 and stride-2 4x4 conv/BN/ReLU blocks from 1x512x512 down to
    512x16x16 (any input size divisible by 32 gives size/32), mirrored by a transposed-convolution decoder; with
    architecture "paper", their code's shorter decoder (_PaperCAEDecoder)."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128, 256, 512), architecture: str = "suite"):
        super().__init__()
        layers = [_conv_block(1, widths[0], 3, 1, 1)]
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(_conv_block(cin, cout, 4, 2, 1))
            if i < len(widths) - 2:
                layers.append(_conv_block(cout, cout, 3, 1, 1))
        self.encoder = torch.nn.Sequential(*layers)
        layers = []
        for i, (cin, cout) in enumerate(zip(widths[::-1][:-1], widths[::-1][1:])):
            layers.append(_deconv_block(cin, cout))
            if i < len(widths) - 2:
                layers.append(_conv_block(cout, cout, 3, 1, 1))
        layers += [torch.nn.Conv2d(widths[0], 1, 3, 1, 1), torch.nn.Sigmoid()]
        self.decoder = _PaperCAEDecoder(widths) if architecture == "paper" else torch.nn.Sequential(*layers)

    def forward(self, x):
        """Reconstruct x (B, 1, H, W) in [0, 1]."""
        return {"recon": self.decoder(self.encoder(x)), "mu": None, "logvar": None}


class VariationalAutoencoder(torch.nn.Module):
    """The VAE of Davletshina et al.'s Figure 7 and of their code (vaetorch.py:56-107 with run_params.py:70-71):
    unpadded stride-2 4x4 convolutions down to 512x2x2 (seven for a 512 input; h_dim 2048), fully connected mu and
    log-variance (1024 in both), reparameterisation, and a mirrored decoder whose last transposed convolution
    restores the exact input size (6x6 for 512). `sample_scores`: draw z when scoring too, as their forward does
    (vaetorch.py:138-139); else the posterior mean (a view's score does not change from one scoring to the next)."""

    def __init__(self, image_size: int = 512, latent: int = 1024, sample_scores: bool = False):
        super().__init__()
        sizes = [image_size]
        while sizes[-1] > 2:
            sizes.append((sizes[-1] - 4) // 2 + 1)
        if sizes[-1] != 2 or len(sizes) < 3:
            raise ValueError(f"image_size {image_size} does not reach 2x2 with stride-2 4x4 convolutions; use 64, "
                             f"128, 256 or 512")
        n = len(sizes) - 1
        widths = [512 // 2 ** (n - 1 - i) for i in range(n)]  # 8, 16, ..., 512 for seven layers
        self.encoder = torch.nn.Sequential(*[_conv_block(c_in, c_out, 4, 2, 0)
                                             for c_in, c_out in zip([1, *widths[:-1]], widths)])
        self.sample_scores = sample_scores
        cells = 512 * 2 * 2
        self.fc_mu, self.fc_logvar = torch.nn.Linear(cells, latent), torch.nn.Linear(cells, latent)
        self.fc_decode = torch.nn.Linear(latent, cells)
        rev = widths[::-1]
        layers, size = [], 2
        for c_in, c_out in zip(rev[:-1], rev[1:]):
            layers.append(_deconv_block(c_in, c_out, 4, 2, 0))
            size = 2 * size + 2
        layers += [torch.nn.ConvTranspose2d(rev[-1], 1, image_size - 2 * (size - 1), 2, 0), torch.nn.Sigmoid()]
        self.decoder = torch.nn.Sequential(*layers)

    def forward(self, x):
        """Reconstruct x; also return the posterior's mu and log-variance (for the KLD)."""
        h = self.encoder(x).flatten(1)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h).clamp(-20, 20)  # (a guard against exp overflow)
        sample = self.training or self.sample_scores
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        recon = self.decoder(self.fc_decode(z).view(-1, 512, 2, 2))
        return {"recon": recon, "mu": mu, "logvar": logvar}


def masked_mse(x, recon, mask):
    """Per image: ||m * (x - x_hat)||^2 / ||m||_1 (Davletshina et al.'s masked reconstruction loss L_M)."""
    err = (mask * (x.float() - recon.float())) ** 2
    return err.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def masked_l1(x, recon, mask):
    """Per image: ||m * (x - x_hat)||_1 / ||m||_1 (alpha-GAN's reconstruction loss, inside the hand mask)."""
    err = (mask * (x.float() - recon.float())).abs()
    return err.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def kl_divergence(mu, logvar):
    """Per image: KL( N(mu, diag(exp(logvar))) || N(0, I) )."""
    return -0.5 * (1 + logvar.float() - mu.float() ** 2 - logvar.float().exp()).sum(1)


def reconstruction_scores(x, out: dict, mask, top_k: int = 200, kld_scale: float | None = None,
                          smooth_l1: bool = False) -> dict[str, torch.Tensor]:
    """Per-image anomaly scores: masked MSE and L1 and their top-k pixel means (where the model reconstructs), for a
    VAE the KLD and the sums l1+kld and mse+kld, the KLD in them times `kld_scale` (None: per pixel, 1 / pixels;
    1: the raw KLD, as their vaetorch.py:260-261 add it), and the scores a GAN computes itself (out['scores']);
    `smooth_l1`: the L1 scores as smooth L1 (beta 1), as their VAE's loss_L1 (vaetorch.py:207, 251)."""
    scores = dict(out.get("scores") or {})
    if out["recon"] is None:
        return scores
    m = mask.float().flatten(1)
    diff = (x.float() - out["recon"].float()).flatten(1) * m
    n = m.sum(1).clamp_min(1)
    sq, ab = diff**2, diff.abs()
    if smooth_l1:
        ab = torch.where(ab < 1, 0.5 * sq, ab - 0.5)
    k = min(top_k, sq.shape[1])
    scores.update({"mse": sq.sum(1) / n, "l1": ab.sum(1) / n, f"mse_top{top_k}": sq.topk(k, 1).values.mean(1),
                   f"l1_top{top_k}": ab.topk(k, 1).values.mean(1)})
    if out["mu"] is not None:
        kld = kl_divergence(out["mu"], out["logvar"])
        scaled = kld * (1 / sq.shape[1] if kld_scale is None else kld_scale)
        scores.update({"kld": kld, "l1+kld": scores["l1"] + scaled, "mse+kld": scores["mse"] + scaled})
    return scores


# ---------------------------------------------------------------- anomaly detection: GANs (DCGAN, BiGAN, alpha-GAN)

GAN_MODELS = ("dcgan", "bigan", "alphagan")
ANOMALY_MODELS = ("cae", "vae", *GAN_MODELS)
ANOMALY_MODEL_NAMES = {"cae": "CAE", "vae": "VAE", "dcgan": "DCGAN", "bigan": "BiGAN", "alphagan": "alpha-GAN"}


def _down_block(cin: int, cout: int, norm: bool = True) -> torch.nn.Sequential:
    """Stride-2 4x4 convolution, batch norm (not on the first layer, as in DCGAN), leaky ReLU."""
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 4, 2, 1, bias=not norm),
                               *([torch.nn.BatchNorm2d(cout)] if norm else []), torch.nn.LeakyReLU(0.2, inplace=True))


def _gan_depth(image_size: int) -> int:
    """Stride-2 steps between 4x4 and image_size (a power of two, at least 16)."""
    depth = int(round(math.log2(image_size / 4))) if image_size > 0 else 0
    if image_size < 16 or 4 * 2**depth != image_size:
        raise ValueError(f"the GAN models need a power-of-two image size of at least 16, got {image_size}")
    return depth


class _ImageCritic(torch.nn.Module):
    """The DCGAN discriminator's convolutions of Davletshina et al.'s Figure 9: stride-2 4x4 layers whose width
    doubles as the map halves (4 channels at 256x256 ... 256 at 4x4 for a 512 input), then a 4x4 convolution to
    512x1x1: the image's 512 features."""

    def __init__(self, image_size: int):
        super().__init__()
        depth = _gan_depth(image_size)
        widths = [256 // 2 ** (depth - 1 - i) for i in range(depth)]
        self.features = torch.nn.Sequential(
            *[_down_block(cin, cout, norm=i > 0) for i, (cin, cout) in enumerate(zip([1, *widths[:-1]], widths))],
            torch.nn.Conv2d(widths[-1], 512, 4, 1, 0), torch.nn.LeakyReLU(0.2, inplace=True), torch.nn.Flatten())

    def forward(self, x):
        """(B, 1, S, S) -> (B, 512)."""
        return self.features(x)


class _MinibatchDiscrimination(torch.nn.Module):
    """Salimans et al. (2016): how close each sample's features are to the rest of its batch, as extra features
    (512 -> 528 in DCGAN's discriminator). In eval mode the sample is compared with a reference batch kept from
    training, so that an anomaly score does not depend on which views were scored together."""

    def __init__(self, in_features: int = 512, out_features: int = 16, kernel_dim: int = 5, reference: int = 64):
        super().__init__()
        self.out_features, self.kernel_dim = out_features, kernel_dim
        self.projection = torch.nn.Parameter(torch.randn(in_features, out_features * kernel_dim) * 0.05)
        self.register_buffer("reference", torch.zeros(reference, out_features, kernel_dim))
        self.register_buffer("reference_size", torch.zeros((), dtype=torch.long))
        self.largest_batch = 0  # on the host: checking the buffer each step would wait for the GPU

    def forward(self, h, remember: bool = False):
        """(B, F) -> (B, F + out_features); `remember` keeps this (real, training) batch as the reference."""
        rows = (h @ self.projection.to(h.dtype)).view(-1, self.out_features, self.kernel_dim)
        if self.training:
            closeness = torch.exp(-(rows[:, None] - rows[None]).abs().sum(3)).sum(1) - 1  # less itself
            keep = min(len(rows), len(self.reference))
            if remember and keep >= self.largest_batch:  # a short last batch keeps the full one before
                self.reference[:keep] = rows[:keep].detach().float()
                self.reference_size.fill_(keep)
                self.largest_batch = keep
        else:
            others = self.reference[: int(self.reference_size)].to(rows.dtype)
            scale = (len(others) - 1) / max(len(others), 1)  # as many others as in a training batch
            closeness = torch.exp(-(rows[:, None] - others[None]).abs().sum(3)).sum(1) * scale
        return torch.cat([h, closeness.to(h.dtype)], 1)


class _Generator(torch.nn.Module):
    """The DCGAN generator of Davletshina et al.'s Figure 9: a latent code to 1024x4x4, then stride-2 4x4
    transposed convolutions halving the width as the map doubles, to a 1-channel image in [0, 1]."""

    def __init__(self, image_size: int, latent: int = 128):
        super().__init__()
        depth = _gan_depth(image_size)
        widths = [1024 // 2**i for i in range(depth)]
        self.net = torch.nn.Sequential(
            torch.nn.Unflatten(1, (latent, 1, 1)), _deconv_block(latent, widths[0], 4, 1, 0),
            *[_deconv_block(cin, cout) for cin, cout in zip(widths[:-1], widths[1:])],
            torch.nn.ConvTranspose2d(widths[-1], 1, 4, 2, 1), torch.nn.Sigmoid())

    def forward(self, z):
        """(B, latent) -> (B, 1, S, S)."""
        return self.net(z)


class AdversarialAnomalyModel(torch.nn.Module):
    """The GAN family of Davletshina et al. in one module, trained on normal views only:
    'dcgan' (generator G, discriminator D with minibatch discrimination), 'bigan' (BiGAN/ALI: an encoder E, and D
    judging image-code pairs), 'alphagan' (alpha-GAN, Rosca et al. 2017: E, G, an image D and a code discriminator
    C, with a reconstruction loss). Called on views in eval mode it returns the anomaly scores: 1 - D's
    probability that the view is real ('disc'), for alpha-GAN also 1 - C's for its code ('code_disc') and their
    mean ('c+d'), and the reconstruction G(E(x)) where there is an encoder."""

    def __init__(self, kind: str, image_size: int, latent: int = 128):
        super().__init__()
        if kind not in GAN_MODELS:
            raise ValueError(f"kind must be one of {GAN_MODELS}, got {kind!r}")
        self.kind, self.latent = kind, latent
        self.generator = _Generator(image_size, latent)
        self.critic = _ImageCritic(image_size)
        if kind == "bigan":
            self.code_features = torch.nn.Sequential(torch.nn.Linear(latent, 512), torch.nn.LeakyReLU(0.2, True))
            self.head = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.LeakyReLU(0.2, True),
                                            torch.nn.Linear(512, 1))
        else:
            self.minibatch = _MinibatchDiscrimination(512)
            self.head = torch.nn.Linear(512 + self.minibatch.out_features, 1)
        if kind != "dcgan":
            self.encoder = torch.nn.Sequential(_ImageCritic(image_size), torch.nn.Linear(512, latent))
        if kind == "alphagan":
            self.code_critic = torch.nn.Sequential(torch.nn.Linear(latent, 750), torch.nn.LeakyReLU(0.2, True),
                                                   torch.nn.Linear(750, 750), torch.nn.LeakyReLU(0.2, True),
                                                   torch.nn.Linear(750, 1))

    def discriminate(self, x, z=None, remember: bool = False):
        """D's logit that x (with its code z, for BiGAN) is a real normal view; `remember`: x is a real training
        batch, kept as minibatch discrimination's reference for scoring."""
        h = self.critic(x)
        if self.kind == "bigan":
            return self.head(torch.cat([h, self.code_features(z)], 1))[:, 0]
        return self.head(self.minibatch(h, remember))[:, 0]

    def discriminator_parameters(self):
        """The parameters of the discriminating side (D, and C for alpha-GAN)."""
        names = ("critic", "head", "code_features", "minibatch", "code_critic")
        return [p for name, module in self.named_children() if name in names for p in module.parameters()]

    def generator_parameters(self):
        """The parameters of the generating side (G, and E where there is one)."""
        return [p for name, module in self.named_children() if name in ("generator", "encoder")
                for p in module.parameters()]

    def forward(self, x):
        """Anomaly scores of views x (B, 1, S, S) in [0, 1], and their reconstruction where there is an encoder."""
        z = self.encoder(x) if self.kind != "dcgan" else None
        disc = 1 - torch.sigmoid(self.discriminate(x, z).float())
        scores = {"disc": disc}
        if self.kind == "alphagan":
            scores["code_disc"] = 1 - torch.sigmoid(self.code_critic(z)[:, 0].float())
            scores["c+d"] = (scores["code_disc"] + disc) / 2
        return {"recon": self.generator(z) if z is not None else None, "mu": None, "logvar": None, "scores": scores}


def _adversarial_loss(logits, real: bool):
    """Binary cross-entropy of D's logits against 'real' (1) or 'fake' (0)."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def gan_step(model: AdversarialAnomalyModel, x, mask, optimizers: dict, scaler, dtype, generator,
             recon_weight: float = 10.0, masked: bool = True) -> dict[str, torch.Tensor]:
    """One training step of a GAN on normal views: the discriminating side first (on detached fakes), then the
    generating side against the updated discriminators (non-saturating losses); alpha-GAN adds recon_weight x the
    masked L1 reconstruction loss. Returns the step's losses."""
    device_type = x.device.type
    z = torch.randn(len(x), model.latent, device=x.device, generator=generator)
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        fake = model.generator(z)
        code = model.encoder(x) if model.kind != "dcgan" else None
        recon = model.generator(code) if model.kind == "alphagan" else None
        fakes = [fake] + ([recon] if recon is not None else [])
        d_loss = _adversarial_loss(model.discriminate(x, None if code is None else code.detach(), remember=True), True)
        for f in fakes:
            d_loss = d_loss + _adversarial_loss(model.discriminate(f.detach(), z if model.kind == "bigan" else None),
                                                False) / len(fakes)
        if model.kind == "alphagan":
            d_loss = d_loss + _adversarial_loss(model.code_critic(z)[:, 0], True) \
                + _adversarial_loss(model.code_critic(code.detach())[:, 0], False)
    optimizers["discriminator"].zero_grad(set_to_none=True)
    scaler.scale(d_loss).backward()
    scaler.step(optimizers["discriminator"])
    discriminating = model.discriminator_parameters()
    for p in discriminating:
        p.requires_grad_(False)
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        if model.kind == "bigan":  # E and G fool D the other way round: real pairs called fake, fake pairs real
            g_loss = _adversarial_loss(model.discriminate(x, code), False) \
                + _adversarial_loss(model.discriminate(fake, z), True)
        else:
            g_loss = sum(_adversarial_loss(model.discriminate(f), True) for f in fakes) / len(fakes)
        if model.kind == "alphagan":
            g_loss = g_loss + _adversarial_loss(model.code_critic(code)[:, 0], True)
            g_loss = g_loss + recon_weight * masked_l1(x, recon, mask if masked else torch.ones_like(mask)).mean()
    optimizers["generator"].zero_grad(set_to_none=True)
    scaler.scale(g_loss).backward()
    scaler.step(optimizers["generator"])
    scaler.update()
    for p in discriminating:
        p.requires_grad_(True)
    return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}


# ---------------------------------------------------------------- anomaly detection: their networks (recipe "paper")

# Written afresh from a reading of their repository at its last commit (github.com/Valentyn1997/xray @ c801459; the
# model code equals that of 5eb48b8, which added the published notebooks/summary.csv): the networks and training
# steps their code runs, where those differ from the suite's; file:line at c801459. Our own networks above follow
# the paper's figures; these follow the code.
_DCGAN_MIXED_SAMPLES = 4  # gans.py:177: D's 512 features viewed as rows of 512 x 4, so minibatch discrimination mixes
# four samples into each row


def _spectral(layer: torch.nn.Module) -> torch.nn.Module:
    """Spectral normalisation of a layer's weight (Miyato et al. 2018; their gans.py:33-85 SpectralNorm)."""
    return torch.nn.utils.parametrizations.spectral_norm(layer)


class _PaperCAEDecoder(torch.nn.Sequential):
    """Their CAE decoder (autoencoders.py:48-51, 77-86; batch_normalisation True, run_params.py:37): five stride-2
    4x4 transposed convolutions with BN and ReLU, 512 -> 16 channels, then a 3x3 one to one channel without bias or
    BN, ReLU, then Tanh (so outputs lie in [0, 1))."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128, 256, 512)):
        rev = list(widths[::-1])
        layers = [_deconv_block(cin, cout) for cin, cout in zip(rev[:-1], rev[1:])]
        layers += [torch.nn.ConvTranspose2d(rev[-1], 1, 3, 1, 1, bias=False), torch.nn.ReLU(), torch.nn.Tanh()]
        super().__init__(*layers)


class SelfAttention(torch.nn.Module):
    """Self-attention over a feature map (Zhang et al. 2019, SAGAN): x + gamma * attention-weighted values, gamma
    starting at 0 (their sagan.py:21-55 and alphagan.py:21-55 Self_Attn)."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = torch.nn.Conv2d(channels, max(1, channels // 8), 1)
        self.key = torch.nn.Conv2d(channels, max(1, channels // 8), 1)
        self.value = torch.nn.Conv2d(channels, channels, 1)
        self.gamma = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        attention = torch.softmax(self.query(x).flatten(2).transpose(1, 2) @ self.key(x).flatten(2), -1)
        out = self.value(x).flatten(2) @ attention.transpose(1, 2)
        return x + self.gamma * out.view(b, c, h, w)


class _PaperMinibatchDiscrimination(torch.nn.Module):
    """Minibatch discrimination as their code uses it (torchgan's MinibatchDiscrimination1d; gans.py:172,
    alphagan.py:262): a projection T (in x out x kernel, drawn from N(0, 1)), and per sample and output feature the
    sum over the other rows of the batch of exp(-L1 distance), appended to the features. Always over the batch it is
    called on, in training and scoring alike (their evaluate() scores batches too)."""

    def __init__(self, in_features: int, out_features: int, kernel_dim: int):
        super().__init__()
        self.out_features, self.kernel_dim = out_features, kernel_dim
        self.projection = torch.nn.Parameter(torch.randn(in_features, out_features * kernel_dim))

    def forward(self, h):
        """(B, F) -> (B, F + out_features)."""
        rows = (h @ self.projection.to(h.dtype)).view(-1, self.out_features, self.kernel_dim)
        closeness = torch.exp(-(rows[:, None] - rows[None]).abs().sum(3)).sum(1) - 1  # less itself
        return torch.cat([h, closeness], 1)


def _attention_stack(image_size: int, conv_dim: int = 64) -> tuple[torch.nn.Sequential, int]:
    """Their BiGAN/alpha-GAN image stack (sagan.py:156-214, 231-271; alphagan.py:156-210, 231-258): stride-2 4x4
    spectral-norm convolutions doubling from 64 channels down to 4x4 (1024 channels at 128 px), leaky ReLU 0.1,
    self-attention after the last two. Returns (stack, channels)."""
    depth = _gan_depth(image_size)
    layers, cin = [], 1
    for i in range(depth):
        cout = conv_dim * 2**i
        layers += [_spectral(torch.nn.Conv2d(cin, cout, 4, 2, 1)), torch.nn.LeakyReLU(0.1)]
        if i >= depth - 2:
            layers.append(SelfAttention(cout))
        cin = cout
    return torch.nn.Sequential(*layers), cin


class _AttentionGenerator(torch.nn.Module):
    """Their BiGAN/alpha-GAN generator (sagan.py:58-140 = alphagan.py:58-140): a spectral-norm 4x4 transposed
    convolution from the code to 8*size channels (1024 at 128 px), halving stride-2 blocks with BN and ReLU,
    self-attention after the last two, and a last transposed convolution to one channel with Tanh."""

    def __init__(self, image_size: int, latent: int = 100, conv_dim: int = 64):
        super().__init__()
        depth = _gan_depth(image_size) - 1
        width = conv_dim * image_size // 8
        layers = [torch.nn.Unflatten(1, (latent, 1, 1)), _spectral(torch.nn.ConvTranspose2d(latent, width, 4)),
                  torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
        for i in range(depth):
            layers += [_spectral(torch.nn.ConvTranspose2d(width, width // 2, 4, 2, 1)),
                       torch.nn.BatchNorm2d(width // 2), torch.nn.ReLU()]
            width //= 2
            if i >= depth - 2:
                layers.append(SelfAttention(width))
        layers += [torch.nn.ConvTranspose2d(width, 1, 4, 2, 1), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, z):
        """(B, latent) -> (B, 1, S, S) in [-1, 1]."""
        return self.net(z)


class PaperGAN(torch.nn.Module):
    """The GAN family as their code builds it, trained by paper_gan_step:
    'dcgan' (gans.py:88-180 with run_params.py:79-80: spectral norm on every convolution, no BN, leaky ReLU 0.01 in
    both networks, G ending in Tanh, D's convolutions to 512 features, minibatch discrimination over rows that mix
    four samples, one linear unit; latent 2048);
    'bigan' (their class SAGAN, sagan.py:143-352: an encoder, a generator and a discriminator of image-code pairs,
    with self-attention and spectral norm; latent 100); 'alphagan' (alphagan.py:143-374: a stochastic encoder with
    mean and 'log-variance' heads, the same generator, an image D with minibatch discrimination and a code
    discriminator C, 100-50-25-1).
    Called on views in eval mode it returns the same scores as AdversarialAnomalyModel: 'disc' (D's probability
    that the view is abnormal), for alpha-GAN 'code_disc' and 'c+d', and the reconstruction G(E(x))."""

    def __init__(self, kind: str, image_size: int, latent: int):
        super().__init__()
        if kind not in GAN_MODELS:
            raise ValueError(f"kind must be one of {GAN_MODELS}, got {kind!r}")
        self.kind, self.latent = kind, latent
        if kind == "dcgan":
            self._build_dcgan(_gan_depth(image_size), latent)
        else:
            self.generator = _AttentionGenerator(image_size, latent)
            if kind == "bigan":
                self._build_bigan(image_size, latent)
            else:
                self._build_alphagan(image_size, latent)

    def _build_dcgan(self, depth: int, latent: int) -> None:
        """gans.py Generator/Discriminator defaults (512 px), generalised to other sizes."""
        widths = [1024 // 2**i for i in range(depth)]
        layers = [torch.nn.Unflatten(1, (latent, 1, 1)), _spectral(torch.nn.ConvTranspose2d(latent, widths[0], 4)),
                  torch.nn.LeakyReLU()]  # (torch's default slope 0.01: their nn.LeakyReLU())
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [_spectral(torch.nn.ConvTranspose2d(cin, cout, 4, 2, 1)), torch.nn.LeakyReLU()]
        self.generator = torch.nn.Sequential(*layers, _spectral(torch.nn.ConvTranspose2d(widths[-1], 1, 4, 2, 1)),
                                             torch.nn.Tanh())
        widths = [256 // 2 ** (depth - 1 - i) for i in range(depth)]
        layers = []
        for cin, cout in zip([1, *widths[:-1]], widths):
            layers += [_spectral(torch.nn.Conv2d(cin, cout, 4, 2, 1)), torch.nn.LeakyReLU()]
        self.critic = torch.nn.Sequential(*layers, _spectral(torch.nn.Conv2d(widths[-1], 512, 4, 1, 0)),
                                          torch.nn.LeakyReLU(), torch.nn.Flatten())
        self.minibatch = _PaperMinibatchDiscrimination(512 * _DCGAN_MIXED_SAMPLES, 16 * _DCGAN_MIXED_SAMPLES, 128)
        self.head = torch.nn.Linear(512 + 16, 1)

    def _build_bigan(self, image_size: int, latent: int) -> None:
        """sagan.py Encoder, Discriminator (its infer_z and infer_joint heads); the generator is built already."""
        stack, channels = _attention_stack(image_size)
        encoder_stack, _ = _attention_stack(image_size)
        self.encoder = torch.nn.Sequential(encoder_stack, torch.nn.Conv2d(channels, latent, 4), torch.nn.Flatten())
        self.critic = torch.nn.Sequential(stack, _spectral(torch.nn.Conv2d(channels, channels, 4)),
                                          torch.nn.LeakyReLU(0.1))
        self.code_features = torch.nn.Sequential(
            _spectral(torch.nn.Conv2d(latent, 512, 1)), torch.nn.LeakyReLU(0.1),
            _spectral(torch.nn.Conv2d(512, 512, 1)), torch.nn.LeakyReLU(0.1))
        self.head = torch.nn.Sequential(
            _spectral(torch.nn.Conv2d(channels + 512, 1024, 1)), torch.nn.LeakyReLU(0.1),
            _spectral(torch.nn.Conv2d(1024, 1024, 1)), torch.nn.LeakyReLU(0.1), torch.nn.Conv2d(1024, 1, 1),
            torch.nn.Flatten())

    def _build_alphagan(self, image_size: int, latent: int) -> None:
        """alphagan.py Encoder (mean and log_var heads, each Conv 4x4 + Tanh), Discriminator, Codescriminator; the
        generator is built already."""
        stack, channels = _attention_stack(image_size)
        encoder_stack, _ = _attention_stack(image_size)
        self.encoder = encoder_stack
        self.encoder_mean = torch.nn.Sequential(torch.nn.Conv2d(channels, latent, 4), torch.nn.Tanh(),
                                                torch.nn.Flatten())
        self.encoder_spread = torch.nn.Sequential(torch.nn.Conv2d(channels, latent, 4), torch.nn.Tanh(),
                                                  torch.nn.Flatten())
        self.critic = stack
        self.minibatch = _PaperMinibatchDiscrimination(channels * 4 * 4, 4 * 4 * 4, 256)  # alphagan.py:261-264
        self.head = torch.nn.Sequential(_spectral(torch.nn.Conv2d(channels + 4, 1, 4)), torch.nn.Flatten())
        widths = [latent, latent // 2, latent // 4]  # alphagan.py:306-318: z -> z/2 -> z/4 -> 1
        layers = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(cin, cout), torch.nn.LeakyReLU(0.1)]
        self.code_critic = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], 1))

    def encode(self, x, sample: bool = False):
        """E(x): the code (alpha-GAN: its mean, or with `sample` mean + spread * noise, as their training does)."""
        if self.kind == "bigan":
            return self.encoder(x)
        h = self.encoder(x)
        mean = self.encoder_mean(h)
        # alphagan.py:447 z_hat = z_mean + z_logvar * randn, the 'log-variance' used as a spread
        return mean + self.encoder_spread(h) * torch.randn_like(mean) if sample else mean

    def discriminate(self, x, z=None):
        """D's logit that x (with its code z, for BiGAN) is real (for DCGAN: that it is FAKE, their inverted labels).
        DCGAN's minibatch discrimination needs rows of four samples (gans.py:177; their loaders drop a last short
        batch, train.py:104-108): a batch of another size is completed by repeating its first samples."""
        h = self.critic(x)
        if self.kind == "bigan":
            return self.head(torch.cat([h, self.code_features(z[:, :, None, None])], 1))[:, 0]
        if self.kind == "alphagan":  # alphagan.py:288-290: per sample, the closeness reshaped to 4 channels of 4x4
            return self.head(self.minibatch(h.flatten(1)).view(len(h), -1, 4, 4))[:, 0]
        n = len(h)
        full = h[torch.arange(n + (-n % _DCGAN_MIXED_SAMPLES), device=h.device) % n]
        mixed = self.minibatch(full.reshape(-1, h.shape[1] * _DCGAN_MIXED_SAMPLES)).reshape(len(full), -1)
        return self.head(mixed[:n])[:, 0]

    def forward(self, x):
        """Anomaly scores of views x (B, 1, S, S), and their reconstruction where there is an encoder."""
        if self.kind == "dcgan":  # gans.py:359: D learns 0 for real, 1 for fake: D is the probability of abnormal
            return {"recon": None, "mu": None, "logvar": None,
                    "scores": {"disc": torch.sigmoid(self.discriminate(x).float())}}
        z = self.encode(x)
        scores = {"disc": 1 - torch.sigmoid(self.discriminate(x, z).float())}  # sagan.py:573, alphagan.py:561
        if self.kind == "alphagan":  # alphagan.py:562-563
            scores["code_disc"] = 1 - torch.sigmoid(self.code_critic(z)[:, 0].float())
            scores["c+d"] = (scores["code_disc"] + scores["disc"]) / 2
        return {"recon": self.generator(z), "mu": None, "logvar": None, "scores": scores}

    def parameter_groups(self) -> dict[str, list]:
        """The parameters each of their optimisers updates."""
        def params(*names):
            return [p for name in names if hasattr(self, name) for p in getattr(self, name).parameters()]
        groups = {"discriminator": params("critic", "minibatch", "code_features", "head"),
                  "generator": params("generator")}
        if self.kind == "bigan":  # sagan.py:348-352: one optimiser for G and E, one for D
            groups["generator"] += params("encoder")
        if self.kind == "alphagan":  # alphagan.py:366-374: four optimisers, E, G, D and C
            groups["encoder"] = params("encoder", "encoder_mean", "encoder_spread")
            groups["code_discriminator"] = params("code_critic")
        return groups


def _bce(logits, target):
    """Binary cross-entropy of logits against a target (a number or a tensor of soft labels)."""
    target = torch.as_tensor(target, dtype=torch.float32, device=logits.device).expand(logits.shape)
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def paper_gan_step(model: PaperGAN, x, optimizers: dict, scaler, dtype, generator, cfg) -> dict[str, torch.Tensor]:
    """One step of their GAN training (their train_on_batch), with logits in place of their sigmoid + BCELoss (the
    same loss, safe under autocast), each loss a mean over the batch:
    dcgan (gans.py:258-318): inverted soft labels, real -> U(0, d), fake -> U(1 - d, 1) (d = cfg.label_noise), D
    first, then G towards 'real' (0, unsoftened) against the updated D;
    bigan (sagan.py:391-485, adv_loss 'hinge', which is the log loss, :436-440): D on (x, E(x)) real and (G(z), z)
    fake; G and E step on the gradient of their own loss (the other way round) PLUS D's loss, since nothing is
    detached and D's backward (:449) leaves its gradient in G and E before theirs (:478-480) adds to it;
    alphagan (alphagan.py:419-502): E: 0.01-weighted unmasked L1 + [bce(C(z^), 1) - bce(C(z^), 0)]; G: the same
    L1 + the same difference for D(x_rec) and D(G(z)); D: x real, x_rec and G(z) fake; C: z^ fake, z real; each
    from the same forward pass, each with its own optimiser (each zeroes its gradients first).
    Their BiGAN's instance noise (sagan.py:412-415: std 0.01 (epoch + 1 - E) / (epoch + 1), negative before the
    last epoch) is left out: PyTorch refuses a negative std."""
    device_type = x.device.type
    z = torch.randn(len(x), model.latent, device=x.device, generator=generator)
    groups = model.parameter_groups()
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        if model.kind == "dcgan":
            losses, fake = _paper_dcgan_discriminator_loss(model, x, z, generator, cfg)
        elif model.kind == "bigan":
            losses = _paper_bigan_losses(model, x, z)
        else:
            losses = _paper_alphagan_losses(model, x, z, cfg)
    for name, loss in losses.items():  # each optimiser's gradient of its own loss, from the same forward pass
        _set_gradients(scaler.scale(loss), groups[name], retain_graph=True, allow_unused=True)
    for name in losses:
        scaler.step(optimizers[name])
    if model.kind == "dcgan":  # then G, against the updated D, towards the 'real' label 0
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses["generator"] = _bce(model.discriminate(fake), 0)
        _set_gradients(scaler.scale(losses["generator"]), groups["generator"])
        scaler.step(optimizers["generator"])
    scaler.update()
    for group in groups.values():
        for p in group:
            p.grad = None
    return {f"{name}_loss": loss.detach() for name, loss in losses.items()}


def _set_gradients(loss, params, retain_graph: bool = False, allow_unused: bool = False) -> None:
    """Set each parameter's .grad to the gradient of `loss` alone (None, when allowed, where it does not reach)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=allow_unused)
    for p, g in zip(params, grads):
        p.grad = g


def _paper_dcgan_discriminator_loss(model: PaperGAN, x, z, generator, cfg) -> tuple[dict, torch.Tensor]:
    """Their DCGAN's D loss with inverted soft labels (real -> U(0, d), fake -> U(1 - d, 1)), and the fakes G
    then steps on."""
    d = cfg.label_noise
    real_t = torch.rand(len(x), device=x.device, generator=generator) * d
    fake_t = 1 - torch.rand(len(x), device=x.device, generator=generator) * d
    fake = model.generator(z)
    loss = _bce(model.discriminate(x), real_t) + _bce(model.discriminate(fake.detach()), fake_t)
    return {"discriminator": loss}, fake


def _paper_bigan_losses(model: PaperGAN, x, z) -> dict:
    """Their BiGAN's losses: D on (x, E(x)) real and (G(z), z) fake; G and E on their own loss plus D's."""
    code = model.encode(x)
    real, fake = model.discriminate(x, code), model.discriminate(model.generator(z), z)
    d_loss = _bce(real, 1) + _bce(fake, 0)
    return {"discriminator": d_loss, "generator": _bce(fake, 1) + _bce(real, 0) + d_loss}


def _paper_alphagan_losses(model: PaperGAN, x, z, cfg) -> dict:
    """Their alpha-GAN's four losses (E, G, D, C) from one forward pass."""
    code = model.encode(x, sample=True)
    recon, fake = model.generator(code), model.generator(z)
    d_real, d_recon, d_fake = (model.discriminate(v) for v in (x, recon, fake))
    c_code, c_prior = model.code_critic(code)[:, 0], model.code_critic(z)[:, 0]
    l1 = cfg.recon_weight * (x.float() - recon.float()).abs().mean()  # alphagan.py:463: 0.01 * nn.L1Loss()
    return {"encoder": l1 + _bce(c_code, 1) - _bce(c_code, 0),
            "generator": l1 + _bce(d_recon, 1) - _bce(d_recon, 0) + _bce(d_fake, 1) - _bce(d_fake, 0),
            "discriminator": _bce(d_real, 1) + _bce(d_recon, 0) + _bce(d_fake, 0),
            "code_discriminator": _bce(c_code, 0) + _bce(c_prior, 1)}


def build_anomaly_model(model: str, image_size: int, latent: int = 128, architecture: str = "suite",
                        vae_latent: int = 1024) -> torch.nn.Module:
    """One of ANOMALY_MODELS for this input size: 'cae', 'vae' or a GAN ('dcgan', 'bigan', 'alphagan'); the
    suite's networks or ("paper") their code's. `latent`: the GANs' code size; `vae_latent`: the VAE's."""
    if architecture not in ("suite", "paper"):
        raise ValueError(f"architecture must be 'suite' or 'paper', got {architecture!r}")
    if model == "cae":
        if image_size % 32:
            raise ValueError(f"the CAE needs an image size divisible by 32, got {image_size}")
        return ConvAutoencoder(architecture=architecture)
    if model == "vae":
        return VariationalAutoencoder(image_size, vae_latent, sample_scores=architecture == "paper")
    if model in GAN_MODELS:
        return (PaperGAN if architecture == "paper" else AdversarialAnomalyModel)(model, image_size, latent)
    raise ValueError(f"model must be one of {ANOMALY_MODELS}, got {model!r}")


def anomaly_score_names(model: str, top_k: int = 200) -> list[str]:
    """The scores a model gives (columns of evaluate_anomaly, rows of the results table)."""
    recon = ["mse", "l1", f"mse_top{top_k}", f"l1_top{top_k}"]
    return {"cae": recon, "vae": [*recon, "kld", "l1+kld", "mse+kld"], "dcgan": ["disc"],
            "bigan": ["disc", *recon], "alphagan": ["disc", "code_disc", "c+d", *recon]}[model]


# ---------------------------------------------------------------- anomaly detection: recipes (suite, paper), config

# Two recipes, as data: every setting a recipe fixes, per model. "paper": Davletshina et al.'s code at its last
# commit (github.com/Valentyn1997/xray @ c801459; where their code and paper disagree, the code), each value's
# file:line in PAPER_SOURCES. "suite": ours, each difference kept for the reason in RECIPE_REASONS. AnomalyConfig
# takes every setting left None from its recipe; a value given explicitly wins.
_PAPER_FLIPS = {"hflip": True, "vflip": True, "rotation_degrees": 0.0, "scale_range": (1.0, 1.0),
                "intensity_range": (1.0, 1.0), "augment_p": 1.0}  # DEFAULT_AUGMENTATION: Fliplr(0.5), Flipud(0.5)
_PAPER_ADVANCED = {"hflip": True, "vflip": True, "rotation_degrees": 20.0, "scale_range": (0.8, 1.2),
                   "intensity_range": (0.8, 1.2), "augment_p": 0.5}  # ADVANCED_AUGMENTATION: each 'Sometimes(0.5)'
ANOMALY_RECIPES = {
    "suite": {
        "common": {"architecture": "suite", "epochs": 20, "batch_size": 16, "hflip": True, "vflip": False,
                   "rotation_degrees": 10.0, "scale_range": (0.9, 1.1), "intensity_range": (0.9, 1.1),
                   "augment_p": 1.0, "hand_crop": False, "minmax": False, "masked_loss": True,
                   "masked_scores": True, "smooth_l1": False, "input_range": (0.0, 1.0), "mask_from": "hand",
                   "loss_reduction": "image"},
        "cae": {"lr": 5e-4},
        "vae": {"lr": 5e-4, "vae_latent": 1024, "vae_loss": "mse", "kld_weight": 1.0, "kld_in_sums": "per_pixel"},
        "dcgan": {"gan_lr": 2e-4, "d_lr": 2e-4, "gan_latent": 128, "label_noise": 0.0},
        "bigan": {"gan_lr": 2e-4, "d_lr": 2e-4, "gan_latent": 128},
        "alphagan": {"gan_lr": 2e-4, "d_lr": 2e-4, "code_lr": 2e-4, "gan_latent": 128, "recon_weight": 10.0},
    },
    "paper": {
        "common": {"architecture": "paper", "hand_crop": True, "minmax": True, "masked_loss": True,
                   "masked_scores": True, "smooth_l1": False, "mask_from": "input", "loss_reduction": "batch"},
        "cae": {"epochs": 1000, "batch_size": 32, "lr": 1e-4, "input_range": (0.0, 1.0), **_PAPER_ADVANCED},
        "vae": {"epochs": 500, "batch_size": 32, "lr": 5e-5, "vae_latent": 1024, "vae_loss": "bce", "kld_weight": 1.0,
                "kld_in_sums": "raw", "masked_loss": False, "masked_scores": False, "smooth_l1": True,
                "input_range": (0.0, 1.0), **_PAPER_FLIPS},
        "dcgan": {"epochs": 500, "batch_size": 80, "gan_lr": 1e-3, "d_lr": 1e-5, "gan_latent": 2048,
                  "label_noise": 0.01, "input_range": (-1.0, 1.0), **_PAPER_FLIPS},
        "bigan": {"epochs": 500, "batch_size": 16, "gan_lr": 1e-3, "d_lr": 5e-6, "gan_latent": 100,
                  "input_range": (-1.0, 1.0), **_PAPER_FLIPS},
        "alphagan": {"epochs": 500, "batch_size": 16, "gan_lr": 1e-3, "d_lr": 1e-4, "code_lr": 1e-6, "gan_latent": 100,
                     "recon_weight": 0.01, "masked_loss": False, "input_range": (-1.0, 1.0), **_PAPER_FLIPS},
    },
}
# where each "paper" value comes from: file:line in xray @ c801459 (run_params.py is src/models/run_params.py);
# per (model, setting), or per setting for every model. summary.csv (notebooks/, added in 5eb48b8, unchanged since)
# holds the published runs' pipelines.
_FLIP_SOURCES = {k: "run_params.py:5-8 DEFAULT_AUGMENTATION" for k in _PAPER_FLIPS}
PAPER_SOURCES = {
    "architecture": "ARCHITECTURES", "hand_crop": "XR_HAND_CROPPED: detect_and_save_hands.py:156-194",
    "minmax": "train.py:74, transforms.py:92", "mask_from": "transforms.py:108 (mask = image != 0, after min-max)",
    "loss_reduction": "autoencoders.py:35-37 (MaskedMSELoss: sums over the batch)",
    "masked_loss": "run_params.py:39 masked_loss_on_train", "masked_scores": "run_params.py:38, 93, 104",
    "smooth_l1": "autoencoders.py:164-167 (MSE)", **{("cae", k): "run_params.py:10-17 ADVANCED_AUGMENTATION"
                                                   for k in _PAPER_ADVANCED},
    ("cae", "epochs"): "run_params.py:36", ("cae", "batch_size"): "run_params.py:34", ("cae", "lr"): "run_params.py:40",
    ("cae", "input_range"): "run_params.py:26 normalisation (0, 1); summary.csv:2-7",
    **{(m, k): v for m in ("vae", "dcgan", "bigan", "alphagan") for k, v in _FLIP_SOURCES.items()},
    ("vae", "epochs"): "run_params.py:66", ("vae", "batch_size"): "run_params.py:64", ("vae", "lr"): "run_params.py:72",
    ("vae", "vae_latent"): "run_params.py:70 z_dim (h_dim 2048 = 512x2x2, :71)",
    ("vae", "vae_loss"): "vaetorch.py:163, 336", ("vae", "kld_weight"): "vaetorch.py:337 (BCE + KLD)",
    ("vae", "loss_reduction"): "vaetorch.py:163 (BCE mean), 165 (KLD summed over batch and code)",
    ("vae", "kld_in_sums"): "vaetorch.py:259-261", ("vae", "masked_loss"): "run_params.py:69",
    ("vae", "masked_scores"): "run_params.py:68", ("vae", "smooth_l1"): "vaetorch.py:207, 251",
    ("vae", "input_range"): "run_params.py:26; summary.csv:14-19",
    ("dcgan", "epochs"): "run_params.py:78", ("dcgan", "batch_size"): "run_params.py:76",
    ("dcgan", "gan_lr"): "run_params.py:82", ("dcgan", "d_lr"): "run_params.py:83", ("dcgan", "gan_latent"):
    "run_params.py:85", ("dcgan", "label_noise"): "run_params.py:81, 84; gans.py:209-216",
    ("dcgan", "input_range"): "summary.csv:20-25 normalisation (-1, 1) (run_params.py:26 says (0, 1))",
    ("bigan", "epochs"): "run_params.py:103", ("bigan", "batch_size"): "run_params.py:101",
    ("bigan", "gan_lr"): "run_params.py:105", ("bigan", "d_lr"): "run_params.py:106",
    ("bigan", "gan_latent"): "run_params.py:108",
    ("bigan", "input_range"): "summary.csv:26-28 normalisation (-1, 1) (its one full+HE run, :29, (0, 1))",
    ("alphagan", "epochs"): "run_params.py:92", ("alphagan", "batch_size"): "run_params.py:90",
    ("alphagan", "gan_lr"): "run_params.py:94", ("alphagan", "d_lr"): "run_params.py:95",
    ("alphagan", "code_lr"): "alphagan.py:372-374 (0.01 x dlr)", ("alphagan", "gan_latent"): "run_params.py:96",
    ("alphagan", "recon_weight"): "alphagan.py:463", ("alphagan", "masked_loss"): "alphagan.py:359, 463 (nn.L1Loss)",
    ("alphagan", "input_range"): "summary.csv:30-32 normalisation (-1, 1)",
}
# why the suite differs, per setting (or per (model, setting)); read by recipe_deviations
RECIPE_REASONS = {
    ("cae", "architecture"): "four more 3x3 blocks in the decoder, mirroring the encoder, and a Sigmoid: outputs "
                             "reach 1 (their ReLU then Tanh reaches only [0, 1))",
    ("vae", "architecture"): "the posterior mean when scoring: a view scores the same each time (theirs draws z)",
    ("dcgan", "architecture"): "BatchNorm and leaky ReLU 0.2 (Radford et al.), a Sigmoid output as the views' "
                               "[0, 1], and minibatch discrimination per sample against a reference batch kept from "
                               "training: a view's score does not depend on the views scored beside it (theirs "
                               "mixes four samples in each row and compares with the scoring batch)",
    ("bigan", "architecture"): "the DCGAN networks with an encoder, without self-attention (whose memory grows with "
                               "the square of the map, so it also trains at 512 px); G and E do not also descend "
                               "D's loss",
    ("alphagan", "architecture"): "the DCGAN networks, a deterministic encoder and an MLP code discriminator "
                                  "(Rosca et al.); no self-attention; minibatch discrimination against a kept "
                                  "reference batch",
    "epochs": "20, resumable, best.pt kept on validation: a Colab session's budget (theirs: 500-1000, the last "
              "epoch scored)",
    "batch_size": "16 fits every model at 512 px on a T4",
    "lr": "5e-4 converges within 20 epochs",
    "gan_lr": "2e-4 for both sides (Radford et al.): G and D learn at one pace (theirs: D 10-200x slower than G)",
    "d_lr": "2e-4 for both sides (Radford et al.): G and D learn at one pace (theirs: D 10-200x slower than G)",
    "code_lr": "as the other discriminator (theirs: 0.01 x D's)",
    "gan_latent": "128: a compact code, the same for the three GANs",
    "vae_loss": "the paper's masked loss L_M (MSE inside the hand): the background does not dominate",
    "loss_reduction": "each image's loss is its own masked mean and images weigh alike whatever their hand's size; "
                      "the KLD per pixel, so kld_weight 1 balances it with a per-pixel error (theirs: squared errors "
                      "summed over the batch over mask pixels summed over the batch; the VAE's BCE a mean over all "
                      "pixels, its KLD summed over the batch and the code)",
    "kld_in_sums": "the KLD per pixel, as weighted in the loss (theirs add the raw KLD to the per-pixel error)",
    "masked_loss": "the loss inside the hand mask (the paper's L_M), for every model",
    "masked_scores": "scores inside the hand mask: the background holds no finding",
    "smooth_l1": "a true L1 score (their 'L1' is smooth L1, which on errors below 1 ranks as the MSE)",
    "label_noise": "plain labels with the non-saturating loss (theirs: soft inverted labels, real in [0, 0.01), "
                   "fake in (0.99, 1])",
    "recon_weight": "10 x masked L1 keeps alpha-GAN a reconstruction model; their 0.01 x L1 is 1000x lighter",
    "vflip": "hands are not seen upside down in MURA",
    "rotation_degrees": "milder (+-10 deg), applied to every view",
    "scale_range": "milder (0.9-1.1), applied to every view",
    "intensity_range": "milder (0.9-1.1), applied to every view",
    "augment_p": "every augmentation on every view (theirs: each with probability 0.5, or flips only)",
    "hand_crop": "the whole plate kept: heatmaps and boxes map back through one affine, and a crop per hand needs "
                 "a reliable per-hand mask (theirs: an SSD detector)",
    "minmax": "intensities kept: per-image min-max rescales a view by its own extremes (one bright marker changes "
              "it all)",
    "input_range": "[0, 1] for every model: the suite's generators end in a Sigmoid, so real and generated views "
                   "share one range (theirs: Tanh generators and views in (-1, 1))",
    "mask_from": "the preprocessing's hand mask (theirs: every pixel not 0 after min-max: in (-1, 1) nearly all of "
                 "the view, in (0, 1) all but the view's darkest level)",
}
# what each architecture is, per model (the deviations table shows these)
ARCHITECTURES = {
    ("cae", "suite"): "decoder: 5 stride-2 4x4 deconvs, each followed by a 3x3 conv block (but the last), 3x3 conv, "
                      "Sigmoid",
    ("cae", "paper"): "decoder: 5 stride-2 4x4 deconvs (BN, ReLU), a 3x3 deconv without bias, ReLU, Tanh "
                      "(autoencoders.py:48-51, 77-86)",
    ("vae", "suite"): "7 unpadded stride-2 4x4 convs to 512x2x2 (512 px), fc to a code of 1024; scored at the "
                      "posterior mean",
    ("vae", "paper"): "the same network (vaetorch.py:56-107); z drawn when scoring too (vaetorch.py:134-141)",
    ("dcgan", "suite"): "BN + leaky ReLU 0.2 D with a 512-feature layer and minibatch discrimination against a kept "
                        "reference batch; BN + ReLU G ending in Sigmoid",
    ("dcgan", "paper"): "spectral norm on every conv, no BN, leaky ReLU 0.01 in G and D, G ending in Tanh; D to 512 "
                        "features, minibatch discrimination over rows mixing 4 samples (out 64, kernel 128), a "
                        "linear unit (gans.py:88-180)",
    ("bigan", "suite"): "DCGAN-style G, E and D; D joins 512 image and 512 code features (MLP)",
    ("bigan", "paper"): "their SAGAN: spectral norm, self-attention in E, G and D, 1x1-conv joint head, G ending in "
                        "Tanh (sagan.py:58-317); G and E step on D's loss plus theirs (sagan.py:404-406, 449, "
                        "478-480)",
    ("alphagan", "suite"): "DCGAN-style G, D (minibatch discrimination against a kept reference batch), a "
                           "deterministic E, an MLP code discriminator (750 units)",
    ("alphagan", "paper"): "self-attention and spectral norm, E with mean and 'log-variance' heads (Tanh), D with "
                           "minibatch discrimination over the batch (out 64, kernel 256), code discriminator "
                           "100-50-25-1 (alphagan.py:58-332)",
}
# which models a setting concerns (the others ignore it); settings not named concern every model
_MASKED_MODELS = ("cae", "vae", "bigan", "alphagan")  # the models that reconstruct (DCGAN's scores use no mask)
_RECIPE_SETTING_MODELS = {"lr": ("cae", "vae"), "vae_latent": ("vae",), "vae_loss": ("vae",), "kld_weight": ("vae",),
                         "kld_in_sums": ("vae",), "smooth_l1": ("vae",), "loss_reduction": ("cae", "vae"),
                         "gan_lr": GAN_MODELS, "d_lr": GAN_MODELS, "gan_latent": GAN_MODELS,
                         "code_lr": ("alphagan",), "recon_weight": ("alphagan",), "label_noise": ("dcgan",),
                         "masked_loss": ("cae", "vae", "alphagan"), "masked_scores": _MASKED_MODELS,
                         "mask_from": _MASKED_MODELS}
# preprocessing, training and evaluation facts that are not settings: their pipeline against ours
PIPELINE_DIFFERENCES = pd.DataFrame([
    {"step": "hand detection", "paper": "data_source XR_HAND_PHOTOSHOP (run_params.py:21): hands cleaned by hand; "
     "XR_HAND_CROPPED: an SSD (MobileNet) hand detector's boxes (src/features/hand_detection/"
     "detect_and_save_hands.py:156-194), each hand saved and scored as an image of its own; XR_HAND: the raw views",
     "suite": "a classical mask (polarity, Otsu, largest components); hand crops from its components (hand_crop), "
              "a view scored as its worst hand; our 'full' stands in for their manual cleaning",
     "why": "no detector weights or hand-drawn masks to ship"},
    {"step": "histogram equalisation", "paper": "cv2.equalizeHist over the whole image, before the resize "
     "(train.py:66, transforms.py:76)", "suite": "inside the hand mask (or the plate), after the crop",
     "why": "the background's share does not shift the hand's intensities"},
    {"step": "augmentation", "paper": "imgaug on the uint8 view before the resize (train.py:70-71): rotation with "
     "fit_output (the view shrinks to fit), x and y zoomed independently, brightness before min-max",
     "suite": "on the device after the resize, alike on view and mask: rotation within the square, one zoom for x "
              "and y; brightness before min-max (paper recipe)",
     "why": "one grid_sample on the GPU for view and mask; the paper recipe keeps their probabilities and ranges"},
    {"step": "short batches", "paper": "DCGAN's loaders drop a last short batch, at test too (train.py:104-108): "
     "some test views are never scored", "suite": "every view scored; the paper recipe's DCGAN completes a batch "
     "to a multiple of 4 by repeating its first views (its minibatch discrimination mixes 4 samples a row)",
     "why": "no test view is left out"},
    {"step": "BiGAN instance noise", "paper": "noise of std 0.01 (epoch + 1 - E) / (epoch + 1) added to D's inputs "
     "(sagan.py:412-422), negative before the last epoch", "suite": "none, in both recipes",
     "why": "PyTorch refuses a negative standard deviation; what their PyTorch drew from it is not known"},
    {"step": "split", "paper": "images: negatives split 70/30 by patient, every positive image to val/test "
     "(src/data/__init__.py:43-66), so positive patients' normal views can train",
     "suite": "patients (the paper's text): a patient is in one subset only",
     "why": "no patient both trains and tests"},
    {"step": "metric level", "paper": "per image (their evaluate(), e.g. autoencoders.py:141-181; src/utils.py:68-92)",
     "suite": "per image and per study (mean of its views), both with a 95% bootstrap interval",
     "why": "MURA labels studies; image level is kept to compare with theirs"},
    {"step": "uncertainty", "paper": "+- the SD over 4 seeds (run_params.py:28), each its own split (train.py:95)",
     "suite": "95% bootstrap interval of one run, resampling patients (a patient's views and studies together) at "
              "both levels; with `seeds`, also mean +- SD over seeds (own split each)",
     "why": "the interval covers the test sample; the SD only the training's randomness"},
    {"step": "model selection", "paper": "the last epoch, evaluated on test (train.py:143-190)",
     "suite": "best.pt by validation ROC-AUC; the heatmap gallery's run chosen on validation",
     "why": "nothing chosen on the test set"},
])
RECIPE_SETTINGS = ("architecture", "epochs", "batch_size", "lr", "gan_lr", "d_lr", "code_lr", "gan_latent",
                   "vae_latent", "vae_loss", "kld_weight", "loss_reduction", "kld_in_sums", "recon_weight",
                   "label_noise", "input_range", "mask_from", "masked_loss", "masked_scores", "smooth_l1", "hflip",
                   "vflip", "rotation_degrees", "scale_range", "intensity_range", "augment_p", "hand_crop", "minmax")


def recipe_settings(recipe: str, model: str) -> dict:
    """Every setting the recipe fixes for this model (the others' settings at the suite's values)."""
    if recipe not in ANOMALY_RECIPES:
        raise ValueError(f"recipe must be one of {list(ANOMALY_RECIPES)}, got {recipe!r}")
    if model not in ANOMALY_MODELS:
        raise ValueError(f"model must be one of {ANOMALY_MODELS}, got {model!r}")
    suite = ANOMALY_RECIPES["suite"]
    base = {**suite["common"], **{k: v for m in ANOMALY_MODELS for k, v in suite[m].items()}}
    chosen = ANOMALY_RECIPES[recipe]
    return {**base, **chosen["common"], **chosen[model]}


def paper_source(model: str, setting: str) -> str:
    """Where the paper recipe's value of a setting for a model comes from in their code (PAPER_SOURCES)."""
    return PAPER_SOURCES.get((model, setting), PAPER_SOURCES.get(setting, ""))


def recipe_deviations() -> pd.DataFrame:
    """Every setting where the paper's recipe and the suite's differ, per model, with where theirs comes from and
    the suite's reason; then the pipeline's differences that are not settings (PIPELINE_DIFFERENCES). Generated
    from ANOMALY_RECIPES."""
    rows = []
    for model in ANOMALY_MODELS:
        paper, suite = recipe_settings("paper", model), recipe_settings("suite", model)
        for key in RECIPE_SETTINGS:
            if model in _RECIPE_SETTING_MODELS.get(key, ANOMALY_MODELS) and paper[key] != suite[key]:
                shown = {r: ARCHITECTURES[model, v[key]] if key == "architecture" else v[key]
                         for r, v in (("paper", paper), ("suite", suite))}
                rows.append({"model": ANOMALY_MODEL_NAMES[model], "setting": key, **shown,
                             "source": "" if key == "architecture" else paper_source(model, key),
                             "why": RECIPE_REASONS.get((model, key), RECIPE_REASONS.get(key, ""))})
    settings = pd.DataFrame(rows)
    pipeline = PIPELINE_DIFFERENCES.rename(columns={"step": "setting"}).assign(model="all", source="")
    return pd.concat([settings, pipeline], ignore_index=True)[["model", "setting", "paper", "suite", "source", "why"]]


@dataclass
class AnomalyConfig(RunConfig):
    """Every knob of an unsupervised run (one model on one preprocessing variant)."""

    model: str = "cae"  # "cae" (their Figure 5), "vae" (Figure 7), or a GAN: "dcgan" (Figure 9), "bigan", "alphagan"
    variant: str = "full+HE"  # raw, raw+HE, crop, crop+HE, full, full+HE
    splits: tuple[str, ...] = ("train",)  # MURA splits pooled before the patient split (the paper: train)
    output_dir: str = _free("outputs/anomaly/cae_full+HE")
    image_size: int = 512  # the paper: 512 for the autoencoders and DCGAN, 128 for BiGAN and alpha-GAN
    recipe: str = "suite"  # "suite" (ours) or "paper" (their code): fills every setting below left None
    # (ANOMALY_RECIPES; recipe_deviations() lists the differences and why)
    architecture: str | None = None  # "suite" (the paper's figures, ours) or "paper" (their code's networks)
    batch_size: int | None = None
    epochs: int | None = _free(None)
    lr: float | None = None  # the autoencoders' Adam learning rate
    kld_weight: float | None = None  # VAE: loss = reconstruction + kld_weight * KLD / pixels
    vae_latent: int | None = None  # the VAE's latent size
    vae_loss: str | None = None  # VAE reconstruction loss: "mse" (the paper's L_M) or "bce" (their code)
    loss_reduction: str | None = None  # autoencoders: "image" (each image's masked mean, averaged; the KLD per
    # pixel) or "batch" (theirs: sums over the batch over the mask's sum; the VAE's KLD summed over batch and code)
    kld_in_sums: str | None = None  # VAE scores l1+kld, mse+kld: "per_pixel" (kld_weight x KLD / pixels) or "raw"
    input_range: tuple[float, float] | None = None  # the views' range as the model sees them: (0, 1) or (-1, 1)
    mask_from: str | None = None  # "hand" (the preprocessing's hand mask) or "input" (theirs: every pixel whose
    # value in input_range is not 0)
    masked_loss: bool | None = None  # reconstruction losses inside the mask (else over the whole view)
    masked_scores: bool | None = None  # reconstruction scores inside the mask
    smooth_l1: bool | None = None  # the "l1" scores as smooth L1 (their VAE's loss_L1)
    gan_latent: int | None = None  # the GANs' latent code size
    gan_lr: float | None = None  # the GANs' generating side's Adam learning rate (betas 0.5, 0.999, as DCGAN)
    d_lr: float | None = None  # ... and the discriminator's
    code_lr: float | None = None  # alpha-GAN's code discriminator's
    recon_weight: float | None = None  # alpha-GAN: weight of the L1 reconstruction loss beside the adversarial ones
    label_noise: float | None = None  # DCGAN "paper": their inverted soft labels' width (0: plain labels)
    top_k: int = 200
    hflip: bool | None = None
    vflip: bool | None = None
    rotation_degrees: float | None = None
    scale_range: tuple[float, float] | None = None
    intensity_range: tuple[float, float] | None = None
    augment_p: float | None = None  # each of rotation, scale and intensity applied with this probability
    hand_crop: bool | None = None  # crop/full variants: one crop per hand (its mask's component), view = max
    minmax: bool | None = None  # per-image min-max scaling to [0, 1] (their MinMaxNormalization)
    explicit: tuple[str, ...] = _free(())  # the recipe's settings given explicitly (filled in; the grid keeps
    # only these)
    select_score: str | None = None  # best.pt by the validation ROC-AUC of this score (None: "mse" for the
    # autoencoders, "disc" for the GANs, whose discriminator gives the paper's GAN scores); the paper chose by ROC-AUC

    def __post_init__(self):
        self.model = _choice_setting("AnomalyConfig", "model", self.model, ANOMALY_MODELS)  # the recipe reads it
        self.explicit = tuple(self.explicit) or tuple(k for k in RECIPE_SETTINGS if getattr(self, k) is not None)
        for key, value in recipe_settings(self.recipe, self.model).items():  # the recipe fills what is not given
            if getattr(self, key) is None:
                setattr(self, key, value)
        _validate_anomaly_config(self)
        self.splits, self.scale_range = tuple(self.splits), tuple(self.scale_range)
        self.intensity_range, self.input_range = tuple(self.intensity_range), tuple(self.input_range)
        preprocess_variants(self.image_size, [self.variant])  # validates the name
        if self.model not in ANOMALY_MODELS:
            raise ValueError(f"AnomalyConfig.model must be one of {ANOMALY_MODELS}, got {self.model!r}")
        if self.model in GAN_MODELS:
            _gan_depth(self.image_size)  # validates the size
        if self.select_score is not None and self.select_score not in anomaly_score_names(self.model, self.top_k):
            raise ValueError(f"AnomalyConfig.select_score {self.select_score!r} is not a score of {self.model}: "
                             f"{anomaly_score_names(self.model, self.top_k)}")

    @property
    def is_gan(self) -> bool:
        """Whether the model is a GAN (trained on one device; its scores are the discriminator's)."""
        return self.model in GAN_MODELS

    @property
    def selection_score(self) -> str:
        """The validation score best.pt is kept by: select_score, or the model's default."""
        return self.select_score or ("disc" if self.model in GAN_MODELS else "mse")


def _anomaly_size_allowed(model: str, size: int) -> bool:
    """Whether `model` takes square inputs of this size (CAE: a multiple of 32; VAE: down to 2x2 by its stride-2
    4x4 convolutions, e.g. 64, 128, 256, 512; GANs: a power of two from 16)."""
    if model == "cae":
        return size % 32 == 0
    if model == "vae":
        sizes = [size]
        while sizes[-1] > 2:
            sizes.append((sizes[-1] - 4) // 2 + 1)
        return sizes[-1] == 2 and len(sizes) >= 3
    return size >= 16 and size & (size - 1) == 0


def _validate_anomaly_config(cfg) -> None:
    """Every AnomalyConfig setting checked (types, ranges, names, the image size for the model) before any data."""
    owner = "AnomalyConfig"
    cfg.model = _choice_setting(owner, "model", cfg.model, ANOMALY_MODELS)
    _validate_common(cfg, owner, {
        "image_size": (16, 4096), "batch_size": (2, 1_000_000),  # batch norm needs two values a channel
        "epochs": (1, 1_000_000), "gan_latent": (1, 1_000_000), "top_k": (1, 2**40), "split_seed": (0, 2**32 - 1),
    }, {"lr": (0.0, 1.0, True), "gan_lr": (0.0, 1.0, True), "d_lr": (0.0, 1.0, True), "code_lr": (0.0, 1.0, True),
        "kld_weight": (0.0, 1e6, False), "recon_weight": (0.0, 1e6, False), "rotation_degrees": (0.0, 180.0, False)})
    if not _anomaly_size_allowed(cfg.model, cfg.image_size):
        _bad_setting(owner, "image_size", cfg.image_size, {
            "cae": "a multiple of 32 for the CAE", "vae": "64, 128, 256 or 512 for the VAE (a size its stride-2 "
            "convolutions take down to 2x2)"}.get(cfg.model, f"a power of two of at least 16 for {cfg.model}"))
    cfg.sync_batchnorm = _bool_setting(owner, "sync_batchnorm", cfg.sync_batchnorm)
    cfg.splits = _names_setting(owner, "splits", cfg.splits, SPLITS)
    cfg.scale_range = _range_pair_setting(owner, "scale_range", cfg.scale_range, 0.01, 100.0)
    cfg.intensity_range = _range_pair_setting(owner, "intensity_range", cfg.intensity_range, 0.0, 100.0)
    cfg.input_range = _range_pair_setting(owner, "input_range", cfg.input_range, -1.0, 1.0)
    if cfg.input_range[0] >= cfg.input_range[1]:
        _bad_setting(owner, "input_range", cfg.input_range, "(low, high) with low < high, e.g. (0, 1) or (-1, 1)")
    for name, allowed in (("vae_loss", ("mse", "bce")), ("loss_reduction", ("image", "batch")),
                          ("kld_in_sums", ("per_pixel", "raw")), ("mask_from", ("hand", "input"))):
        setattr(cfg, name, _choice_setting(owner, name, getattr(cfg, name), allowed))
    if isinstance(cfg.select_score, str) and cfg.select_score.strip().lower() in ("", "none", "null"):
        cfg.select_score = None


# ---------------------------------------------------------------- anomaly detection: training, scores, heatmaps, grid

class _AnomalyViewBatches:
    """Dataset whose items are whole batches of preprocessed views: indices -> (uint8 views, uint8 masks, indices)."""

    def __init__(self, cache: AnomalyCache, rows: np.ndarray):
        self.cache, self.rows = cache, np.asarray(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, batch: list[int]):
        batch = np.asarray(batch)
        rows = self.rows[batch]
        order = np.argsort(rows)
        images = np.empty((len(batch), 1, *self.cache.images.shape[1:]), np.uint8)
        masks = np.empty_like(images)
        images[order, 0] = self.cache.images[rows[order]]
        masks[order, 0] = self.cache.masks[rows[order]]
        return torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(batch)


def hand_boxes(mask: np.ndarray, min_share: float = 0.05) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1) of a hand mask's connected components, one per hand, largest first;
    components under `min_share` of the mask's area (specks) are left out."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    slices = ndimage.find_objects(labels)
    return [(slices[i][1].start, slices[i][0].start, slices[i][1].stop, slices[i][0].stop)
            for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_share * sizes.sum()]


def _hand_crop_chunk(task: tuple) -> int:
    """Cut a chunk of views' hand crops into the crop arrays (runs in a worker process)."""
    folder, views, masks, jobs = task
    images, crop_masks, affines = (np.load(folder / f"{n}.npy", mmap_mode="r+") for n in ("images", "masks",
                                                                                           "affines"))
    view_images, view_masks = np.load(views, mmap_mode="r"), np.load(masks, mmap_mode="r")
    view_affines = np.load(Path(views).with_name("affines.npy"), mmap_mode="r")
    size = view_images.shape[1]
    for row, view_row, (x0, y0, x1, y1) in jobs:
        affine = _square_affine(None, (((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0, y1 - y0), 0.0), size)
        images[row] = _warp(np.ascontiguousarray(view_images[view_row]), affine, size)
        crop_masks[row] = _warp(np.ascontiguousarray(view_masks[view_row]), affine, size, order=0)
        affines[row] = (np.vstack([affine, [0, 0, 1]]) @ np.vstack([view_affines[view_row], [0, 0, 1]]))[:2]
    for a in (images, crop_masks, affines):
        a.flush()
    return len(jobs)


def build_hand_crops(cache: AnomalyCache, hands: AnomalyCache, progress: bool = True) -> AnomalyCache:
    """Their hand crop, from our masks: one crop per hand (each connected component of the view's hand mask in
    `hands`, a segmented cache of the same views and geometry), its bounding box fitted into the square and padded,
    cut from `cache`'s view and mask. Returns a cache with one row per crop (image_paths: each crop's view; a view
    without a hand has no crop); affines map the original view onto each crop. Kept on disk beside `cache`."""
    jobs, paths = [], []
    for view_row, path in enumerate(cache.image_paths):
        for box in hand_boxes(hands.masks[hands.row_of[path]]):
            jobs.append((len(jobs), view_row, box))
            paths.append(path)
    stamp = hashlib.sha1(json.dumps([hands.folder.name, [list(map(int, j[2])) for j in jobs]]).encode()).hexdigest()
    folder = cache.folder.with_name(f"{cache.folder.name}_hands_{stamp[:10]}")
    s = cache.cfg.size
    arrays = {"images": ((len(jobs), s, s), np.uint8), "masks": ((len(jobs), s, s), np.uint8),
              "affines": ((len(jobs), 2, 3), np.float32)}
    if not (folder / "affines.npy").is_file() or _damaged_cache([(folder / f"{name}.npy", *spec)
                                                                 for name, spec in arrays.items()]):
        tmp = _make_folder(folder.with_name(f".{folder.name}.tmp{os.getpid()}"))
        tasks = [(tmp, cache.folder / "images.npy", cache.folder / "masks.npy", jobs[i:i + 64])
                 for i in range(0, len(jobs), 64)]
        try:
            _new_arrays([(tmp / f"{name}.npy", *spec) for name, spec in arrays.items()], folder)
            _run_tasks(_hand_crop_chunk, tasks, f"hand crops ({cache.cfg.name})", progress, None,
                       [len(t[3]) for t in tasks])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return AnomalyCache(folder, paths, cache.cfg)


def prepare_anomaly_data(cfg: AnomalyConfig, progress: bool = True, state: dict | None = None) -> dict:
    """Studies with their train/val/test subset (Davletshina et al.'s split), one row per view, and the cache (for a
    resume: of the same data as its checkpoint `state`, else an error); with cfg.hand_crop on a cropped variant, one
    row per hand crop (its 'cache_row' in the crop cache), views without a hand left out and counted in a warning
    (data['no_hand'])."""
    root = config_data_root(cfg)
    studies = pd.concat([load_studies(root, s, cfg.body_part, on_bad=cfg.on_bad) for s in cfg.splits],
                        ignore_index=True)
    record = _data_record(root, studies)
    _check_same_data(state, record, Path(cfg.output_dir) / "checkpoints" / "last.pt")
    studies = anomaly_split(studies, cfg.split_seed)
    images = studies_to_images(studies)
    pre = preprocess_variants(cfg.image_size, [cfg.variant])[cfg.variant]
    cache = build_anomaly_cache(images["image_path"], pre, cfg.cache_dir, progress=progress)
    data = {"root": root, "studies": studies, "images": images, "cache": cache, "data": record, "no_hand": []}
    if cfg.hand_crop and pre.crop:
        hands = cache if pre.segment else build_anomaly_cache(
            images["image_path"], replace(pre, segment=True, equalize=None), cfg.cache_dir, progress=progress)
        crops = build_hand_crops(cache, hands, progress)
        rows = pd.DataFrame({"image_path": crops.image_paths, "cache_row": np.arange(len(crops.image_paths))})
        data["no_hand"] = sorted(set(images["image_path"]) - set(rows["image_path"]))
        if data["no_hand"]:
            warnings.warn(f"{len(data['no_hand'])} of {len(images)} views have no hand in their mask: left out of "
                          f"the hand crops (data['no_hand'] lists them)", stacklevel=2)
        data.update(view_cache=cache, cache=crops, images=images.merge(rows, on="image_path"))
    return data


def _anomaly_loader(cache: AnomalyCache, images: pd.DataFrame, batch_size: int, num_workers: int, pin: bool):
    """A DataLoader of whole batches of preprocessed views (re-shuffle via loader.sampler.batches)."""
    sampler = _EpochBatches()
    sampler.batches = epoch_batches(len(images), batch_size, False, 0, 0)
    rows = images["cache_row"].to_numpy() if "cache_row" in images else cache.rows(images["image_path"])
    return DataLoader(_AnomalyViewBatches(cache, rows), sampler=sampler, batch_size=None,
                      num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0,
                      multiprocessing_context=_worker_context() if num_workers > 0 else None,
                      generator=torch.Generator())  # its own: starting workers leaves the VAE's noise alone


def anomaly_inputs(views, masks, device, cfg: AnomalyConfig, generator=None):
    """uint8 views and masks (B, 1, S, S) -> float views and masks on `device`, as the model sees them: with a
    `generator` (training) augmented first (_augment_views_and_masks), then per-image min-max scaled when cfg.minmax
    (their MinMaxNormalization, after their augmentation: train.py:70-74), then mapped onto cfg.input_range; the
    masks as cfg.mask_from says (theirs: every pixel whose value is not 0, transforms.py:108)."""
    x = views.to(device, non_blocking=True).float() / 255
    m = masks.to(device, non_blocking=True).float()
    if generator is not None:
        x, m = _augment_views_and_masks(x, m, generator, cfg)
    if cfg.minmax:
        low = x.amin((1, 2, 3), keepdim=True)
        x = (x - low) / (x.amax((1, 2, 3), keepdim=True) - low).clamp_min(1e-6)
    low, high = cfg.input_range
    x = low + (high - low) * x
    return x, (x != 0).float() if cfg.mask_from == "input" else m


def to_unit_range(x, cfg: AnomalyConfig):
    """Views in cfg.input_range (model inputs, reconstructions, generated views) back in [0, 1], for display."""
    low, high = cfg.input_range
    return ((x - low) / (high - low)).clamp(0, 1)


def evaluate_anomaly(model, cache: AnomalyCache, images: pd.DataFrame, cfg: AnomalyConfig, device,
                     progress: bool = False) -> pd.DataFrame:
    """Every score for every view of `images` (no augmentation), with the view's study, patient, label and subset;
    for hand crops (images with 'cache_row'), a view's score is the maximum over its crops. A model that draws
    noise when scoring (the paper recipe's VAE) draws it from cfg.seed, so a view scores the same each time."""
    model.eval()
    dtype = amp_dtype(cfg.amp, device)
    loader = _anomaly_loader(cache, images, cfg.batch_size, 0, False)
    pixels = cache.cfg.size**2
    kld_scale = 1.0 if cfg.kld_in_sums == "raw" else cfg.kld_weight / pixels
    columns, index = {}, []
    with torch.inference_mode(), torch.random.fork_rng([device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        for views, masks, idx in tqdm(loader, desc="scoring", leave=False, disable=not progress):
            x, m = anomaly_inputs(views, masks, device, cfg)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            m = m if cfg.masked_scores else torch.ones_like(m)
            for k, v in reconstruction_scores(x, out, m, cfg.top_k, kld_scale, cfg.smooth_l1).items():
                columns.setdefault(k, []).append(v.float().cpu())
            index.append(idx)
    order = torch.cat(index).numpy()
    scores = pd.DataFrame({k: torch.cat(v).numpy() for k, v in columns.items()})
    keep = [c for c in _SCORE_ID_COLUMNS if c in images.columns]
    scores = pd.concat([images.iloc[order][keep].reset_index(drop=True), scores], axis=1)
    if "cache_row" in images:  # hand crops: a view is as abnormal as its most abnormal hand (every crop holds a
        names = [c for c in scores.columns if c not in _SCORE_ID_COLUMNS]  # hand: views without one were left out)
        scores = scores.groupby("image_path", sort=False).agg(
            {**{c: "first" for c in keep if c != "image_path"}, **dict.fromkeys(names, "max")}).reset_index()
        scores.attrs["empty_masks"] = []
        return scores
    return _without_empty_masks(scores, cache)


def _without_empty_masks(scores: pd.DataFrame, cache: AnomalyCache) -> pd.DataFrame:
    """The score table without views whose hand mask is empty (every masked score would be 0, the most normal):
    they are counted in a warning and listed in attrs['empty_masks']."""
    empty = np.array([not cache.masks[row].any() for row in cache.rows(scores["image_path"])], dtype=bool)
    flagged = list(scores.loc[empty, "image_path"])
    kept = scores[~empty].reset_index(drop=True)
    kept.attrs["empty_masks"] = flagged
    if flagged:
        warnings.warn(f"{len(flagged)} of {len(scores)} view(s) have an empty hand mask and were left out of the "
                      f"scores: {flagged[:5]}{' ...' if len(flagged) > 5 else ''}", stacklevel=3)
    return kept


def study_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """View scores to study scores (the mean of its views), one row per study with its label (and patient)."""
    names = [c for c in scores.columns if c not in _SCORE_ID_COLUMNS]
    ids = {c: "first" for c in ("label", "patient") if c in scores}
    return scores.groupby("study_path").agg({**ids, **dict.fromkeys(names, "mean")}).reset_index()


def anomaly_metrics(scores: pd.DataFrame, level: str = "study", n_boot: int = 2000, seed: int = 0,
                    resample: str = "patient") -> pd.DataFrame:
    """ROC-AUC and average precision of every score, per study (mean of its views) or per image, the ROC-AUC with a
    95% percentile bootstrap interval when n_boot > 0 that resamples patients, each with all its studies and views
    (views of a patient are not independent; auroc_interval's `patients`, as the supervised path), or with
    resample="rows" the rows themselves."""
    if level not in ("study", "image"):
        raise ValueError(f"level must be 'study' or 'image', got {level!r}")
    if resample not in ("patient", "rows"):
        raise ValueError(f"resample must be 'patient' or 'rows', got {resample!r}")
    if n_boot > 0 and resample == "patient" and "patient" not in scores:
        raise ValueError("a bootstrap by patient needs a 'patient' column in the scores (evaluate_anomaly keeps it); "
                         "or resample='rows'")
    data = study_scores(scores) if level == "study" else scores
    patients = data["patient"].to_numpy() if resample == "patient" and "patient" in data else None
    names = [c for c in data.columns if c not in _SCORE_ID_COLUMNS]
    rows = []
    for name in names:
        one_class = data["label"].nunique() < 2
        low, high = (np.nan, np.nan) if one_class or n_boot <= 0 else \
            auroc_interval(data["label"], data[name], n_boot, seed, patients=patients)
        rows.append({"score": name, "roc_auc": np.nan if one_class else roc_auc_score(data["label"], data[name]),
                     "roc_auc_ci_low": low, "roc_auc_ci_high": high, "resampled": resample,
                     "average_precision": np.nan if one_class else average_precision_score(data["label"], data[name]),
                     "n": len(data), "n_abnormal": int(data["label"].sum()),
                     "n_patients": data["patient"].nunique() if "patient" in data else np.nan})
    return pd.DataFrame(rows).set_index("score")


def reference_anomaly_scores(cache: AnomalyCache, images: pd.DataFrame, train_images: pd.DataFrame,
                             top_k: int = 200, chunk: int = 64) -> pd.DataFrame:
    """Model-free scores of the views of `images`, a floor that a trained model must beat: the masked MSE and its
    top-k against the mean normal training view (a template), the mean intensity inside the hand mask, and the
    mask's share of the square (hand size)."""
    def batches(views):  # the loader the scoring uses: (views, masks, positions in `views`), read in file order
        for x, m, idx in _anomaly_loader(cache, views, chunk, 0, False):
            yield x.float() / 255, m.float(), idx
    total, count = 0, 0
    for x, m, _ in batches(train_images):
        total, count = total + (x * m).sum(0, keepdim=True), count + m.sum(0, keepdim=True)
    template = total / count.clamp(min=1)
    columns, order = {}, []
    for x, m, idx in batches(images):
        s = reconstruction_scores(x, {"recon": template.expand_as(x), "mu": None, "logvar": None}, m, top_k)
        found = {"template_mse": s["mse"], f"template_mse_top{top_k}": s[f"mse_top{top_k}"],
                 "intensity": (x * m).sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp(min=1), "hand_area": m.mean((1, 2, 3))}
        for k, v in found.items():
            columns.setdefault(k, []).append(v.numpy())
        order.append(idx.numpy())
    scores = pd.DataFrame({k: np.concatenate(v) for k, v in columns.items()}, index=np.concatenate(order)).sort_index()
    keep = [c for c in _SCORE_ID_COLUMNS if c in images.columns]
    return _without_empty_masks(pd.concat([images[keep].reset_index(drop=True), scores.reset_index(drop=True)], axis=1),
                                cache)


def anomaly_model_for(cfg: AnomalyConfig) -> torch.nn.Module:
    """The network a config trains (its model, size, architecture and latent sizes)."""
    return build_anomaly_model(cfg.model, cfg.image_size, cfg.gan_latent, cfg.architecture, cfg.vae_latent)


def anomaly_optimizers(model, cfg: AnomalyConfig, device) -> dict:
    """Adam for an autoencoder ({'model'}); for a GAN one per side ({'discriminator', 'generator'}, betas 0.5/0.999,
    D at d_lr); their alpha-GAN has four: also 'encoder' (gan_lr) and 'code_discriminator' (code_lr)."""
    if isinstance(model, PaperGAN):
        lrs = {"discriminator": cfg.d_lr, "generator": cfg.gan_lr, "encoder": cfg.gan_lr,
               "code_discriminator": cfg.code_lr}
        return {name: build_optimizer(params, lrs[name], device, (0.5, 0.999))
                for name, params in model.parameter_groups().items()}
    if cfg.model in GAN_MODELS:
        return {"discriminator": build_optimizer(model.discriminator_parameters(), cfg.d_lr, device, (0.5, 0.999)),
                "generator": build_optimizer(model.generator_parameters(), cfg.gan_lr, device, (0.5, 0.999))}
    return {"model": build_optimizer(model.parameters(), cfg.lr, device)}


def autoencoder_loss(x, out: dict, mask, kld_weight: float = 1.0, vae_loss: str = "mse",
                     reduction: str = "image") -> torch.Tensor:
    """An autoencoder's training loss: the masked reconstruction error (MSE, the paper's L_M; or with vae_loss
    "bce" their VAE's binary cross-entropy), plus for a VAE kld_weight x its KLD. `reduction` "image": each image's
    error a mean over its mask, averaged over the images, and the KLD per pixel; "batch" (theirs): the error summed
    over the batch over the mask's pixels summed over the batch (autoencoders.py:35-37; with an all-ones mask the
    mean over every pixel, vaetorch.py:163), and the KLD summed over the batch and the code (vaetorch.py:165)."""
    recon, x = out["recon"].float(), x.float()
    if out["mu"] is not None and vae_loss == "bce":
        err = F.binary_cross_entropy(recon.clamp(1e-6, 1 - 1e-6), x, reduction="none")
    else:
        err = (recon - x) ** 2
    err, mask = (err * mask).flatten(1), mask.flatten(1)
    if reduction == "batch":
        loss = err.sum() / mask.sum().clamp_min(1)
    else:
        loss = (err.sum(1) / mask.sum(1).clamp_min(1)).mean()
    if out["mu"] is not None:
        kld = kl_divergence(out["mu"], out["logvar"])
        loss = loss + kld_weight * (kld.sum() if reduction == "batch" else kld.mean() / x[0].numel())
    return loss


def _autoencoder_step(model, x, mask, optimizer, scaler, dtype, kld_weight: float = 1.0, vae_loss: str = "mse",
                     reduction: str = "image") -> dict[str, torch.Tensor]:
    """One training step of an autoencoder on its loss (autoencoder_loss; pass an all-ones mask for an unmasked
    loss)."""
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        result = model(x)
    loss = autoencoder_loss(x, result, mask, kld_weight, vae_loss, reduction)
    amp_step(loss, optimizer, scaler)
    return {"loss": loss.detach()}


def train_anomaly(cfg: AnomalyConfig, progress: bool = True) -> pd.DataFrame:
    """Train (or resume) an autoencoder (masked loss) or a GAN on normal training views; returns the history. The
    run folder is locked meanwhile; an earlier run there is moved aside when this one starts afresh.

    Under torchrun the autoencoders train with DistributedDataParallel as train() does (each process its share of
    every global batch of batch_size x processes views, validation sharded by view and gathered, rank 0 alone
    scores, holds the lock and writes). The GANs stay on one device: their alternating discriminator and
    generator steps, minibatch discrimination and spectral norm would each see one process's batch, which changes
    their dynamics; they are refused under torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and cfg.model in GAN_MODELS:
        raise ConfigError(f"AnomalyConfig.model = {cfg.model!r}: the GANs train on one device (DDP would change "
                          f"their dynamics); run it without torchrun, or train an autoencoder ('cae', 'vae')")
    ctx, device = _setup_distributed(cfg.device)
    with run_lock(cfg.output_dir) if ctx.is_main else contextlib.nullcontext():
        return _train_anomaly_locked(cfg, progress, ctx, device)


def _view_shard(images: pd.DataFrame, ctx: _Distributed) -> pd.DataFrame:
    """This process's share of the rows of `images`, split by view (a view's hand crops stay together)."""
    if ctx.world_size == 1:
        return images
    views = pd.unique(images["image_path"])
    return images[images["image_path"].isin(set(views[ctx.rank::ctx.world_size]))]


def _gather_scores(scores: pd.DataFrame, ctx: _Distributed) -> pd.DataFrame | None:
    """Every process's score table joined on rank 0 (their empty-mask lists too); None elsewhere."""
    if ctx.world_size == 1:
        return scores
    parts = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object((scores, scores.attrs.get("empty_masks", [])), parts, dst=0)
    if not ctx.is_main:
        return None
    joined = pd.concat([p[0] for p in parts], ignore_index=True)
    joined.attrs["empty_masks"] = [path for p in parts for path in p[1]]
    return joined


def _summed_losses(loss_sums: dict, n_seen: int, ctx: _Distributed, device) -> tuple[dict[str, float], int]:
    """Each loss averaged over every view of the epoch across processes, and the number of those views."""
    names = sorted(loss_sums)
    totals = torch.stack([torch.as_tensor(loss_sums[k], dtype=torch.float64, device=device) for k in names]
                         + [torch.tensor(float(n_seen), dtype=torch.float64, device=device)])
    if ctx.world_size > 1:
        dist.all_reduce(totals)
    n = int(totals[-1])
    return {f"train_{k}": float(totals[i]) / max(n, 1) for i, k in enumerate(names)}, n


def _train_anomaly_one_epoch(model, loader, optimizers: dict, scaler, device, cfg: AnomalyConfig, epoch: int,
                            progress: bool = True, rank: int = 0) -> dict:
    """One pass over the normal training views (this process's share of them), augmented: {'losses': each loss
    summed over the views, 'n': views seen}."""
    model.train()
    dtype = amp_dtype(cfg.amp, device)
    generator = _epoch_generator(cfg, epoch, rank, device)
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    loss_sums, n_seen = {}, 0
    bar = tqdm(total=steps, desc=f"{cfg.model} {cfg.variant} epoch {epoch + 1}", leave=False, disable=not progress)
    for step, (views, masks, _) in enumerate(loader):
        if step >= steps:
            break
        x, m = anomaly_inputs(views, masks, device, cfg, generator)
        if isinstance(_unwrap(model), PaperGAN):
            losses = paper_gan_step(model, x, optimizers, scaler, dtype, generator, cfg)
        elif cfg.is_gan:
            losses = gan_step(model, x, m, optimizers, scaler, dtype, generator, cfg.recon_weight, cfg.masked_loss)
        else:
            losses = _autoencoder_step(model, x, m if cfg.masked_loss else torch.ones_like(m), optimizers["model"],
                                      scaler, dtype, cfg.kld_weight, cfg.vae_loss, cfg.loss_reduction)
        for name, value in losses.items():
            loss_sums[name] = loss_sums.get(name, 0) + value * len(x)
        n_seen += len(x)
        bar.update()
    bar.close()
    return {"losses": loss_sums, "n": n_seen}


def _train_anomaly_locked(cfg: AnomalyConfig, progress: bool, ctx: _Distributed, device) -> pd.DataFrame:
    """train_anomaly() while rank 0 holds the run folder's lock."""
    out = Path(cfg.output_dir)
    state, data = _start_run(cfg, ctx, device, prepare_anomaly_data, progress)
    model = anomaly_model_for(cfg).to(device)
    optimizers = anomaly_optimizers(model, cfg, device)
    scaler = _grad_scaler(cfg, device)
    history, best, start_epoch = _resume_into(state, model, optimizers, None, scaler, cfg, ctx)
    model = _for_processes(model, cfg, ctx, device)
    eval_model = _unwrap(model)  # no collectives in evaluation
    images = data["images"]
    train_images = images[(images["subset"] == "train") & (images["label"] == 0)]
    val_images = images[images["subset"] == "val"]
    val_shard = _view_shard(val_images, ctx)
    loader = _anomaly_loader(data["cache"], train_images, cfg.batch_size, cfg.num_workers, device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        loader.sampler.batches = epoch_batches(len(train_images), cfg.batch_size, True, cfg.seed, epoch, None,
                                               ctx.rank, ctx.world_size)
        started = time.perf_counter()
        trained = _train_anomaly_one_epoch(model, loader, optimizers, scaler, device, cfg, epoch,
                                          progress and ctx.is_main, ctx.rank)
        losses, n_all = _summed_losses(trained["losses"], trained["n"], ctx, device)
        train_time = time.perf_counter() - started  # rank 0's; its images/s counts every process's views
        val_scores = _gather_scores(evaluate_anomaly(eval_model, data["cache"], val_shard, cfg, device), ctx)
        row = None
        if ctx.is_main:  # the metrics, once, on every validation view's scores
            val_metrics = anomaly_metrics(val_scores, n_boot=0)
            normal = val_scores[val_scores["label"] == 0]
            row = {"epoch": epoch + 1, **losses,
                   **({"val_normal_mse": float(normal["mse"].mean())} if "mse" in normal else {}),
                   **{f"val_auroc_{k}": v for k, v in val_metrics["roc_auc"].items()},
                   "epoch_time_s": time.perf_counter() - started,
                   "train_images_per_s": n_all / train_time, "processes": ctx.world_size}
        row = _from_main(row, ctx)
        history.append(row)
        score = row[f"val_auroc_{cfg.selection_score}"]
        improved = _improves(score, best, "max")
        if improved:
            best = score
        if ctx.is_main:
            _save_epoch(_checkpoint(model, optimizers, None, scaler, epoch, history, cfg, best, data["data"]),
                        improved, out)
        if progress and ctx.is_main:
            shown = ", ".join(f"{k.removeprefix('train_').replace('_', ' ')} {v:.5f}" for k, v in losses.items())
            print(f"{cfg.model} {cfg.variant} epoch {epoch + 1}/{cfg.epochs}: train {shown}, "
                  f"val ROC-AUC ({cfg.selection_score}) {score:.3f}" + ("  (best)" if improved else ""), flush=True)
    if ctx.world_size > 1:
        dist.barrier()  # every process returns after rank 0 has written the last epoch
    return pd.DataFrame(history)


def load_anomaly_model(path: str | os.PathLike, device: str = "cpu"):
    """Load an unsupervised checkpoint (weights_only, its digest checked): (model in eval mode, its AnomalyConfig)."""
    state = _load_state(path, "anomaly")
    cfg = _stored_config(AnomalyConfig, state, path)
    model = anomaly_model_for(cfg)
    model.load_state_dict(state["model"])
    return model.to(resolve_device(device)).eval(), cfg


def anomaly_heatmaps(model, cache: AnomalyCache, image_paths: Sequence[str], device: str = "auto",
                     sigma: float = 2.0, batch_size: int = 16, cfg: AnomalyConfig | None = None) -> list[dict]:
    """Per view: the preprocessed image, its masked squared reconstruction error (smoothed, scaled to [0, 1]),
    and its masked-MSE score, in the format of plot_heatmaps and heatmap_localisation; in batches. `cfg`: the
    run's config, for its input scaling (min-max)."""
    if len(image_paths) == 0:
        return []
    if len(image_paths) > batch_size:
        return [h for i in range(0, len(image_paths), batch_size)
                for h in anomaly_heatmaps(model, cache, image_paths[i:i + batch_size], device, sigma, batch_size, cfg)]
    dev = resolve_device(device)
    rows = cache.rows(image_paths)
    x, m = anomaly_inputs(torch.from_numpy(cache.images[rows][:, None]), torch.from_numpy(cache.masks[rows][:, None]),
                          dev, cfg or AnomalyConfig(image_size=cache.cfg.size))
    with torch.inference_mode():
        out = model.to(dev).eval()(x)
    if out["recon"] is None:
        raise ValueError(f"{type(model).__name__} ({getattr(model, 'kind', '')}) reconstructs nothing: no error map")
    errors = ((x - out["recon"]) ** 2 * m)[:, 0].cpu().numpy()
    scores = masked_mse(x, out["recon"], m).cpu().numpy()
    maps = []
    for path, img, err, score in zip(image_paths, cache.images[rows], errors, scores):
        smooth = ndimage.gaussian_filter(err, sigma)
        maps.append({"image_path": str(path), "image": np.asarray(img), "prob": float(score),
                     "cam": smooth / smooth.max() if smooth.max() > 0 else smooth})
    return maps


def transform_boxes(findings: pd.DataFrame, cache: AnomalyCache) -> pd.DataFrame:
    """Ground-truth boxes moved from the original views into the preprocessed squares (cropped, rotated, scaled)."""
    rows = []
    for f in findings[findings["image_file"].isin(cache.row_of)].itertuples():
        affine = cache.affines[cache.row_of[f.image_file]]
        corners = np.array([[f.x0, f.y0, 1], [f.x1, f.y0, 1], [f.x0, f.y1, 1], [f.x1, f.y1, 1]], float) @ affine.T
        lo = np.clip(np.floor(corners.min(0)), 0, cache.cfg.size - 1).astype(int)
        hi = np.clip(np.ceil(corners.max(0)), 0, cache.cfg.size - 1).astype(int)
        rows.append({**f._asdict(), "x0": lo[0], "y0": lo[1], "x1": hi[0], "y1": hi[1]})
    return pd.DataFrame(rows, columns=["Index", *findings.columns]).drop(columns=["Index"])


_REFERENCE_MODEL = "no model"  # the grid's rows of model-free scores (reference_anomaly_scores)
# Their published ROC-AUCs (Davletshina et al. 2020, Figure 11) as data: notebooks/summary.csv of
# github.com/Valentyn1997/xray, added in commit 5eb48b8 (23 Nov 2019) and unchanged at c801459: per run (one CSV
# line: model, data source, pipeline) each score's mean and SD over their seeds (run_params.py:28: four, each its own
# split), per image on their test split of MURA's training hands; rounded to 4 decimals. `line` is the CSV line.
# Their models: cae, vae, dcgan, bigan (their class SAGAN), alphagan, and bae (a bottleneck autoencoder the suite has
# not); their scores: mse, mse_top_k and l1_top_k (k = 200, src/__init__.py:16), l1 (smooth L1), kld, mse_kld and
# l1_kld (the sums), proba (the discriminator), coproba (the code discriminator) and proba_coproba (their mean).
_THEIR_SUMMARY_CSV = """line,their_model,data_source,hist_equalisation,normalisation,their_score,roc_auc,roc_auc_sd
2,cae,XR_HAND_CROPPED,0,0 1,mse,0.4657,0.0224
2,cae,XR_HAND_CROPPED,0,0 1,mse_top_k,0.4859,0.0153
3,cae,XR_HAND_CROPPED,1,0 1,mse,0.5100,0.0212
3,cae,XR_HAND_CROPPED,1,0 1,mse_top_k,0.4731,0.0181
4,cae,XR_HAND,1,0 1,mse,0.5039,0.0335
4,cae,XR_HAND,1,0 1,mse_top_k,0.4483,0.0251
5,cae,XR_HAND_PHOTOSHOP,1,0 1,mse,0.5700,0.0185
5,cae,XR_HAND_PHOTOSHOP,1,0 1,mse_top_k,0.5534,0.0228
6,cae,XR_HAND,0,0 1,mse,0.4598,0.0332
6,cae,XR_HAND,0,0 1,mse_top_k,0.4655,0.0132
7,cae,XR_HAND_PHOTOSHOP,0,0 1,mse,0.5006,0.0133
7,cae,XR_HAND_PHOTOSHOP,0,0 1,mse_top_k,0.5057,0.0392
8,bae,XR_HAND_PHOTOSHOP,0,,mse,0.5063,0.0084
8,bae,XR_HAND_PHOTOSHOP,0,,mse_top_k,0.4544,0.0126
9,bae,XR_HAND,0,,mse,0.4619,0.0193
9,bae,XR_HAND,0,,mse_top_k,0.4410,0.0109
10,bae,XR_HAND_PHOTOSHOP,1,,mse,0.5599,0.0256
10,bae,XR_HAND_PHOTOSHOP,1,,mse_top_k,0.5162,0.0193
11,bae,XR_HAND,1,,mse,0.4729,0.0179
11,bae,XR_HAND,1,,mse_top_k,0.4551,0.0166
12,bae,XR_HAND_CROPPED,1,,mse,0.4802,0.0142
12,bae,XR_HAND_CROPPED,1,,mse_top_k,0.4513,0.0094
13,bae,XR_HAND_CROPPED,0,,mse,0.4607,0.0201
13,bae,XR_HAND_CROPPED,0,,mse_top_k,0.4455,0.0127
14,vae,XR_HAND,0,0 1,mse,0.4322,0.0331
14,vae,XR_HAND,0,0 1,mse_top_k,0.4383,0.0171
14,vae,XR_HAND,0,0 1,mse_kld,0.4322,0.0331
14,vae,XR_HAND,0,0 1,kld,0.4882,0.0311
14,vae,XR_HAND,0,0 1,l1_top_k,0.4383,0.0171
14,vae,XR_HAND,0,0 1,l1,0.4322,0.0331
14,vae,XR_HAND,0,0 1,l1_kld,0.4322,0.0332
15,vae,XR_HAND_PHOTOSHOP,0,0 1,mse,0.4351,0.0140
15,vae,XR_HAND_PHOTOSHOP,0,0 1,mse_top_k,0.4281,0.0129
15,vae,XR_HAND_PHOTOSHOP,0,0 1,mse_kld,0.4358,0.0132
15,vae,XR_HAND_PHOTOSHOP,0,0 1,kld,0.5202,0.0259
15,vae,XR_HAND_PHOTOSHOP,0,0 1,l1_top_k,0.4281,0.0129
15,vae,XR_HAND_PHOTOSHOP,0,0 1,l1,0.4351,0.0140
15,vae,XR_HAND_PHOTOSHOP,0,0 1,l1_kld,0.4383,0.0111
16,vae,XR_HAND_CROPPED,0,0 1,mse,0.4381,0.0335
16,vae,XR_HAND_CROPPED,0,0 1,mse_top_k,0.4397,0.0248
16,vae,XR_HAND_CROPPED,0,0 1,mse_kld,0.4382,0.0335
16,vae,XR_HAND_CROPPED,0,0 1,kld,0.4699,0.0463
16,vae,XR_HAND_CROPPED,0,0 1,l1_top_k,0.4397,0.0248
16,vae,XR_HAND_CROPPED,0,0 1,l1,0.4381,0.0335
16,vae,XR_HAND_CROPPED,0,0 1,l1_kld,0.4382,0.0335
17,vae,XR_HAND_CROPPED,1,0 1,mse,0.4378,0.0163
17,vae,XR_HAND_CROPPED,1,0 1,mse_top_k,0.4707,0.0127
17,vae,XR_HAND_CROPPED,1,0 1,mse_kld,0.4376,0.0161
17,vae,XR_HAND_CROPPED,1,0 1,kld,0.4961,0.0448
17,vae,XR_HAND_CROPPED,1,0 1,l1_top_k,0.4707,0.0127
17,vae,XR_HAND_CROPPED,1,0 1,l1,0.4378,0.0163
17,vae,XR_HAND_CROPPED,1,0 1,l1_kld,0.4375,0.0159
18,vae,XR_HAND,1,0 1,mse,0.4460,0.0158
18,vae,XR_HAND,1,0 1,mse_top_k,0.4721,0.0102
18,vae,XR_HAND,1,0 1,mse_kld,0.4459,0.0158
18,vae,XR_HAND,1,0 1,kld,0.4913,0.0133
18,vae,XR_HAND,1,0 1,l1_top_k,0.4721,0.0102
18,vae,XR_HAND,1,0 1,l1,0.4460,0.0158
18,vae,XR_HAND,1,0 1,l1_kld,0.4459,0.0157
19,vae,XR_HAND_PHOTOSHOP,1,0 1,mse,0.4828,0.0091
19,vae,XR_HAND_PHOTOSHOP,1,0 1,mse_top_k,0.4806,0.0097
19,vae,XR_HAND_PHOTOSHOP,1,0 1,mse_kld,0.4856,0.0105
19,vae,XR_HAND_PHOTOSHOP,1,0 1,kld,0.5326,0.0137
19,vae,XR_HAND_PHOTOSHOP,1,0 1,l1_top_k,0.4806,0.0097
19,vae,XR_HAND_PHOTOSHOP,1,0 1,l1,0.4828,0.0091
19,vae,XR_HAND_PHOTOSHOP,1,0 1,l1_kld,0.4878,0.0109
20,dcgan,XR_HAND_CROPPED,0,-1 1,proba,0.4932,0.0150
21,dcgan,XR_HAND,0,-1 1,proba,0.4966,0.0175
22,dcgan,XR_HAND_PHOTOSHOP,0,-1 1,proba,0.5301,0.0271
23,dcgan,XR_HAND_PHOTOSHOP,1,-1 1,proba,0.5272,0.0220
24,dcgan,XR_HAND,1,-1 1,proba,0.4908,0.0408
25,dcgan,XR_HAND_CROPPED,1,-1 1,proba,0.4928,0.0247
26,bigan,XR_HAND,0,-1 1,mse,0.4713,0.0207
26,bigan,XR_HAND,0,-1 1,mse_top_k,0.4709,0.0113
26,bigan,XR_HAND,0,-1 1,proba,0.5079,0.0068
27,bigan,XR_HAND_PHOTOSHOP,0,-1 1,mse,0.4905,0.0418
27,bigan,XR_HAND_PHOTOSHOP,0,-1 1,mse_top_k,0.4751,0.0331
27,bigan,XR_HAND_PHOTOSHOP,0,-1 1,proba,0.5489,0.0055
28,bigan,XR_HAND_CROPPED,0,-1 1,mse,0.4379,0.0393
28,bigan,XR_HAND_CROPPED,0,-1 1,mse_top_k,0.4593,0.0296
28,bigan,XR_HAND_CROPPED,0,-1 1,proba,0.5338,0.0161
29,bigan,XR_HAND_PHOTOSHOP,1,0 1,mse,0.5059,
29,bigan,XR_HAND_PHOTOSHOP,1,0 1,mse_top_k,0.5072,
29,bigan,XR_HAND_PHOTOSHOP,1,0 1,proba,0.5213,
30,alphagan,XR_HAND_CROPPED,0,-1 1,mse,0.4663,0.0220
30,alphagan,XR_HAND_CROPPED,0,-1 1,mse_top_k,0.4455,0.0178
30,alphagan,XR_HAND_CROPPED,0,-1 1,proba,0.5342,0.0220
30,alphagan,XR_HAND_CROPPED,0,-1 1,proba_coproba,0.5342,0.0220
30,alphagan,XR_HAND_CROPPED,0,-1 1,coproba,0.4996,0.0008
31,alphagan,XR_HAND,0,-1 1,mse,0.4757,0.0294
31,alphagan,XR_HAND,0,-1 1,mse_top_k,0.4646,0.0306
31,alphagan,XR_HAND,0,-1 1,proba,0.5033,0.0222
31,alphagan,XR_HAND,0,-1 1,proba_coproba,0.5033,0.0222
31,alphagan,XR_HAND,0,-1 1,coproba,0.5000,0.0000
32,alphagan,XR_HAND_PHOTOSHOP,0,-1 1,mse,0.4415,0.0131
32,alphagan,XR_HAND_PHOTOSHOP,0,-1 1,mse_top_k,0.4216,0.0165
32,alphagan,XR_HAND_PHOTOSHOP,0,-1 1,proba,0.6072,0.0165
32,alphagan,XR_HAND_PHOTOSHOP,0,-1 1,proba_coproba,0.6072,0.0165
32,alphagan,XR_HAND_PHOTOSHOP,0,-1 1,coproba,0.5000,0.0000
"""
_PUBLISHED_SOURCE = "Davletshina et al. 2020: Valentyn1997/xray notebooks/summary.csv @ 5eb48b8 (= c801459)"
_THEIR_MODELS = {"cae": "CAE", "vae": "VAE", "dcgan": "DCGAN", "bigan": "BiGAN", "alphagan": "alpha-GAN",
                "bae": "their bottleneck AE"}
_THEIR_SCORES = {"mse": "mse", "mse_top_k": "mse_top200", "l1": "l1", "l1_top_k": "l1_top200", "kld": "kld",
                "mse_kld": "mse+kld", "l1_kld": "l1+kld", "proba": "disc", "coproba": "code_disc",
                "proba_coproba": "c+d"}
# which of their data sources each of our preprocessing bases sits beside (our "full" is an automatic mask standing
# in for their hands cleaned by hand)
_THEIR_DATA_SOURCES = {"raw": ("XR_HAND", "theirs: raw views"), "crop": ("XR_HAND_CROPPED", "theirs: SSD hand crops"),
                      "full": ("XR_HAND_PHOTOSHOP", "theirs: manual masks")}
PUBLISHED_ANOMALY_AUROC = pd.read_csv(io.StringIO(_THEIR_SUMMARY_CSV), dtype={"normalisation": str}).assign(
    hist_equalisation=lambda t: t["hist_equalisation"].astype(bool),
    model=lambda t: t["their_model"].map(_THEIR_MODELS), score=lambda t: t["their_score"].map(_THEIR_SCORES),
    variant=lambda t: t["data_source"].map({v[0]: k for k, v in _THEIR_DATA_SOURCES.items()})
    + np.where(t["hist_equalisation"], "+HE", ""), source=_PUBLISHED_SOURCE)


def anomaly_grid_names(models, variants) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The grid's models and preprocessing variants, checked; one name given as a string is a list of one."""
    every_variant = [f"{base}{eq}" for base in ("raw", "crop", "full") for eq in ("", "+HE", "+CLAHE")]
    return (_names_setting("run_anomaly_grid", "models", models, ANOMALY_MODELS),
            _names_setting("run_anomaly_grid", "variants", variants, every_variant))


def anomaly_grid_recipes(recipes) -> tuple[str, ...]:
    """The grid's recipes, checked: names of ANOMALY_RECIPES, each given once; one given as a string is a list."""
    return _names_setting("run_anomaly_grid", "recipes", recipes, tuple(ANOMALY_RECIPES))


def anomaly_grid_seeds(seeds) -> tuple[int, ...] | None:
    """The grid's seeds, checked: whole numbers, each given once (0, 0.0 and "0" are one seed: it would be trained
    and scored several times, and seed_summary would count it as several); one seed, or a string ("0,1"), is a list;
    None (or an empty list): base's seed."""
    if isinstance(seeds, str):
        seeds = [s for s in re.split(r"[,\s]+", seeds) if s]
    elif isinstance(seeds, (int, float, np.integer, np.floating)) and not isinstance(seeds, bool):
        seeds = [seeds]
    if seeds is None or (isinstance(seeds, (list, tuple, np.ndarray)) and len(seeds) == 0):
        return None
    if not isinstance(seeds, (list, tuple, np.ndarray)):
        _bad_setting("run_anomaly_grid", "seeds", seeds, "a list of whole numbers, or None")
    numbers = tuple(_number_setting("run_anomaly_grid", "seeds", s, int, 0, 2**32 - 1) for s in seeds)
    repeated = sorted({s for s in numbers if numbers.count(s) > 1})
    if repeated:
        _bad_setting("run_anomaly_grid", "seeds", seeds, f"each seed given once (given more than once: {repeated})")
    return numbers


def _grid_config(base: AnomalyConfig, **changes) -> AnomalyConfig:
    """A run of the grid: base's settings with `changes`; the recipe's settings that base did not give explicitly
    are taken afresh from the (possibly other) model's and recipe's preset."""
    fresh = {k: None for k in RECIPE_SETTINGS if k not in base.explicit}
    return AnomalyConfig(**{**_config_dict(base), **fresh, "explicit": (), **changes})


def _level_metrics(scores: pd.DataFrame, val_scores: pd.DataFrame, seed: int, n_boot: int = 2000) -> pd.DataFrame:
    """Test metrics per score at both levels (image, study), each with its bootstrap interval, and the validation
    ROC-AUC at the same level ('val_roc_auc': what choices may use)."""
    tables = []
    for level in ("study", "image"):
        test = anomaly_metrics(scores, level, n_boot, seed)
        val = anomaly_metrics(val_scores, level, 0)["roc_auc"].rename("val_roc_auc")
        tables.append(test.join(val).reset_index().assign(level=level))
    return pd.concat(tables, ignore_index=True)


def run_anomaly_grid(base: AnomalyConfig, models: Sequence[str], variants: Sequence[str],
                     image_sizes: dict[str, int] | None = None, progress: bool = True,
                     seeds: Sequence[int] | None = None, recipes: Sequence[str] | None = None,
                     devices: int | str = 1) -> pd.DataFrame:
    """Train (or resume) every model on every preprocessing variant (and recipe, and seed) and score each best
    checkpoint (kept on validation) on the test subset: one row per (recipe, model, variant, seed, level, score)
    with test ROC-AUC (and its 95% bootstrap interval) and average precision at the image and the study level,
    and the validation ROC-AUC ('val_roc_auc', for choosing); per variant also the model-free scores of
    reference_anomaly_scores (model "no model"), the floor a model must beat. Variant by variant, so that a grid
    cut short has scored every model on the first variants. `image_sizes` sets a model's own size (the paper:
    {'bigan': 128, 'alphagan': 128}); the others take base.image_size. `seeds`: train each run once per seed, each
    with its own split (split_seed = seed, as their 4 seeds); default base's seed and split. `recipes`: default
    [base.recipe]; runs of other recipes than "suite" go to <model>_<variant>_<recipe>. `devices`: the
    autoencoders train on this many processes (launch_training: "auto" = every visible GPU), the GANs on one."""
    models, variants = anomaly_grid_names(models, variants)
    recipes = anomaly_grid_recipes([base.recipe] if recipes is None else recipes)
    seeds = anomaly_grid_seeds(seeds)
    several = seeds is not None
    seeds = list(seeds) if several else [base.seed]
    rows = []
    for variant in variants:
        for seed in seeds:
            split_seed = seed if several else base.split_seed
            seed_tag = f"_seed{seed}" if several else ""
            for recipe in recipes:
                for model in models:
                    name = f"{model}_{variant}" + ("" if recipe == "suite" else f"_{recipe}") + seed_tag
                    cfg = _grid_config(base, model=model, variant=variant, recipe=recipe, seed=seed,
                                       split_seed=split_seed, output_dir=str(Path(base.output_dir) / name),
                                       image_size=(image_sizes or {}).get(model, base.image_size))
                    rows.append(_grid_run(cfg, devices, progress))
            cfg = _grid_config(base, variant=variant, seed=seed, split_seed=split_seed, recipe="suite")
            reference_dir = Path(base.output_dir) / f"{_REFERENCE_MODEL.replace(' ', '_')}_{variant}{seed_tag}"
            rows.append(_grid_floor(cfg, reference_dir))
    return pd.concat(rows, ignore_index=True)


def _grid_run(cfg: AnomalyConfig, devices: int | str, progress: bool) -> pd.DataFrame:
    """One run of the grid: trained (or resumed), its best checkpoint scored on the test and validation views
    (both written as CSVs in its folder), and its metrics at both levels, labelled with the run."""
    launch_training(cfg, devices, progress)
    net, _ = load_anomaly_model(Path(cfg.output_dir) / "checkpoints" / "best.pt", cfg.device)
    data = prepare_anomaly_data(cfg, progress=False)
    images, device = data["images"], resolve_device(cfg.device)
    scores = evaluate_anomaly(net, data["cache"], images[images["subset"] == "test"], cfg, device)
    val = evaluate_anomaly(net, data["cache"], images[images["subset"] == "val"], cfg, device)
    _write_csv_atomic(scores, Path(cfg.output_dir) / "test_scores.csv")
    _write_csv_atomic(val, Path(cfg.output_dir) / "val_scores.csv")
    return _level_metrics(scores, val, cfg.seed).assign(
        model=ANOMALY_MODEL_NAMES[cfg.model], recipe=cfg.recipe, variant=cfg.variant, seed=cfg.seed,
        image_size=cfg.image_size, run_dir=cfg.output_dir, n_empty_masks=len(scores.attrs.get("empty_masks", [])))


def _grid_floor(cfg: AnomalyConfig, reference_dir: Path) -> pd.DataFrame:
    """The floor of one variant and seed: the model-free scores on the suite's preprocessed views (whole views, no
    min-max) against the normal training views, their test scores written in `reference_dir`, and their metrics."""
    data = prepare_anomaly_data(cfg, progress=False)
    images = data["images"]
    normal_train = images[(images["subset"] == "train") & (images["label"] == 0)]
    scores, val = (reference_anomaly_scores(data["cache"], images[images["subset"] == subset], normal_train,
                                            cfg.top_k) for subset in ("test", "val"))
    reference_dir.mkdir(parents=True, exist_ok=True)
    _write_csv_atomic(scores, reference_dir / "test_scores.csv")
    return _level_metrics(scores, val, cfg.seed).assign(
        model=_REFERENCE_MODEL, recipe="-", variant=cfg.variant, seed=cfg.seed, image_size=cfg.image_size,
        run_dir=str(reference_dir), n_empty_masks=len(scores.attrs.get("empty_masks", [])))


def _one_run_per_cell(results: pd.DataFrame, level: str) -> pd.DataFrame:
    """The rows of one level and of the grid's first seed; models labelled with their recipe when several."""
    results = results[(results["level"] == level) & (results["seed"] == results["seed"].iloc[0])]
    if results.loc[results["model"] != _REFERENCE_MODEL, "recipe"].nunique() > 1:
        results = results.assign(model=[m if r == "-" else f"{m} ({r})" for m, r in results[["model", "recipe"]]
                                        .to_numpy()])
    return results


def anomaly_results_table(results: pd.DataFrame, value: str = "roc_auc", level: str = "study") -> pd.DataFrame:
    """Pivot the grid's results at one level ('study' or 'image'; the grid's first seed): rows model x score,
    columns preprocessing variants (their Figure 11 layout); value "roc_auc_ci" gives each ROC-AUC with its 95%
    bootstrap interval as text."""
    order = [v for v in preprocess_variants() if v in set(results["variant"])]
    results = _one_run_per_cell(results, level)
    if value == "roc_auc_ci":
        results = results.assign(roc_auc_ci=[f"{a:.3f} [{lo:.2f}, {hi:.2f}]" for a, lo, hi in
                                             results[["roc_auc", "roc_auc_ci_low", "roc_auc_ci_high"]].to_numpy()])
    table = results.pivot_table(index=["model", "score"], columns="variant", values=value, aggfunc="first",
                                sort=False)
    return table[order]


def seed_summary(results: pd.DataFrame, level: str = "image") -> pd.DataFrame:
    """Per recipe, model, variant and score: the test ROC-AUC's mean and SD over the grid's seeds (each with its own
    split: their '±'), beside the first seed's ROC-AUC and 95% bootstrap interval (ours)."""
    data = results[results["level"] == level]
    keys = ["recipe", "model", "variant", "score"]
    repeated = data[data.duplicated([*keys, "seed"])]
    if len(repeated):
        run = repeated.iloc[0]
        raise ValueError(f"seed_summary: seed {run['seed']} of {run['recipe']} {run['model']} on {run['variant']} "
                         f"(score {run['score']}) is in the results more than once ({len(repeated)} repeated row(s)): "
                         f"one run would count as several seeds; drop the repeats (results.drop_duplicates)")
    spread = data.groupby(keys, sort=False)["roc_auc"].agg(seeds_mean="mean", seeds_sd="std", n_seeds="count")
    first = data[data["seed"] == data["seed"].iloc[0]].set_index(keys)[["roc_auc", "roc_auc_ci_low",
                                                                         "roc_auc_ci_high"]]
    return first.join(spread).reset_index()


def published_comparison(results: pd.DataFrame) -> pd.DataFrame:
    """Each of our grid's scores at their level (image) beside their published row for the same model, score and
    variant (PUBLISHED_ANOMALY_AUROC; raw beside their XR_HAND, crop beside XR_HAND_CROPPED, full beside
    XR_HAND_PHOTOSHOP, "theirs: manual masks"), with their mean +- SD over seeds and their pipeline; ours: the first
    seed's ROC-AUC with its 95% interval (patients resampled) and, with several seeds, mean +- SD. Theirs are on real
    MURA; ours on this run's data (the phantom unless data_dir is MURA)."""
    ours = seed_summary(results, "image")
    ours = ours[ours["model"] != _REFERENCE_MODEL].assign(
        variant_base=lambda t: t["variant"].str.replace(r"\+(HE|CLAHE)$", "", regex=True))
    table = ours.merge(PUBLISHED_ANOMALY_AUROC, on=["model", "score", "variant"], suffixes=("", "_published"))
    return pd.DataFrame({
        "model": table["model"], "score": table["score"], "variant": table["variant"], "level": "image",
        "recipe": table["recipe"],
        "ours": [f"{a:.3f} [{lo:.2f}, {hi:.2f}]" for a, lo, hi in table[["roc_auc", "roc_auc_ci_low",
                                                                         "roc_auc_ci_high"]].to_numpy()],
        "ours_mean_sd": [f"{m:.3f} +- {sd:.3f} ({int(n)} seeds)" if n > 1 else "" for m, sd, n in
                         table[["seeds_mean", "seeds_sd", "n_seeds"]].to_numpy()],
        "theirs": [f"{_THEIR_DATA_SOURCES[b][1]} ({_THEIR_DATA_SOURCES[b][0]})" for b in table["variant_base"]],
        "published": table["roc_auc_published"], "published_sd": table["roc_auc_sd"],
        "published_text": [f"{m:.4f} +- {sd:.4f}" if sd == sd else f"{m:.4f} (one run)" for m, sd in
                           table[["roc_auc_published", "roc_auc_sd"]].to_numpy()],
        "their_pipeline": [f"HE {he}, normalisation ({n.replace(' ', ', ')})" for he, n in
                           table[["hist_equalisation", "normalisation"]].to_numpy()],
        "their_line": table["line"]})


def anomaly_findings_table(results: pd.DataFrame, findings: pd.DataFrame, variant: str | None = None) -> pd.DataFrame:
    """Phantom only: each model x score's test ROC-AUC per planted finding type (its abnormal studies against all
    normal ones), for one preprocessing variant (default: the grid's first); attrs["n_abnormal"]: the count of
    abnormal test studies of each type."""
    variant = variant or results["variant"].iloc[0]
    tables = []
    for run in results[results["variant"] == variant].drop_duplicates("run_dir").itertuples():
        studies = study_scores(pd.read_csv(Path(run.run_dir) / "test_scores.csv"))
        names = [c for c in studies.columns if c not in _SCORE_ID_COLUMNS]
        table = metrics_by_finding(studies, findings, names)
        aurocs = table[[f"auroc_{n}" for n in names]].T.set_axis(names)
        tables.append(aurocs.assign(model=run.model).rename_axis("score").reset_index())
        counts = table["n_abnormal"]
    table = pd.concat(tables).set_index(["model", "score"]).rename_axis(columns="finding")
    table.attrs["n_abnormal"] = {kind: int(n) for kind, n in counts.items()}
    return table


def best_run(results: pd.DataFrame, score: str = "mse") -> pd.Series:
    """The grid's run with the highest study-level VALIDATION ROC-AUC of `score` (test ROC-AUCs choose nothing)."""
    runs = results[(results["score"] == score) & (results["level"] == "study")]
    if runs.empty:
        raise ValueError(f"no run of the grid gives the score {score!r}")
    return runs.sort_values("val_roc_auc", ascending=False, na_position="last", kind="stable").iloc[0]


def best_run_heatmaps(results: pd.DataFrame, score: str = "mse", n: int = 8, device: str = "auto") -> dict:
    """For the grid's best run by `score`, chosen on VALIDATION (its study-level val_roc_auc; the test set chooses
    nothing): error heatmaps of abnormal test views (those with ground truth on the phantom), the boxes moved into
    the preprocessed frame (not for hand crops), and their localisation scores over all such views."""
    best = best_run(results, score)
    net, cfg = load_anomaly_model(Path(best["run_dir"]) / "checkpoints" / "best.pt", device)
    data = prepare_anomaly_data(cfg, progress=False)
    images = data["images"]
    abnormal = images[(images["subset"] == "test") & (images["label"] == 1)]
    findings = phantom_boxes(data["root"])
    boxes = transform_boxes(findings, data["cache"]) if findings is not None and "view_cache" not in data else None
    if boxes is not None:
        abnormal = abnormal[abnormal["image_path"].isin(boxes["image_file"])]
    heatmaps = anomaly_heatmaps(net, data["cache"], list(abnormal["image_path"]), device, cfg=cfg) \
        if len(abnormal) else []
    localisation = heatmap_localisation(heatmaps, boxes) if boxes is not None and heatmaps else None
    return {"best": best, "heatmaps": heatmaps[:n], "boxes": boxes, "localisation": localisation}


# ---------------------------------------------------------------- anomaly detection: plots

def plot_mask_iou(table: pd.DataFrame, worst: int = 6, good: float = 0.85):
    """The mask IoU's distribution (by polarity) and the worst views: each cropped view with its mask (red) and the
    true one (green; both: yellow) in the preprocessed square."""
    sns = _seaborn()  # (imported here, not at the top: see _seaborn)
    fig = plt.figure(figsize=(3 * max(worst, 4), 6.2))
    grid = fig.add_gridspec(2, max(worst, 4))
    ax = fig.add_subplot(grid[0, :])
    sns.histplot(table, x="iou", hue="polarity", bins=np.linspace(0, 1, 41), multiple="stack", ax=ax)
    ax.axvline(good, color="k", ls="--", lw=1)
    ax.set_title(f"Hand mask IoU with the phantom's truth ({table['variant'].iloc[0]}, {table['size'].iloc[0]} px): "
                 f"{np.mean(table['iou'] >= good):.1%} of {len(table)} views >= {good}")
    cfg = preprocess_variants(int(table["size"].iloc[0]), [table["variant"].iloc[0]])[table["variant"].iloc[0]]
    for k, row in enumerate(table.nsmallest(worst, "iou").itertuples()):
        out = preprocess_view(row.image_file, cfg)
        truth, _ = _truth_in_square(phantom_hand_mask(row.mask_file), out["affine"], cfg.size)
        view = preprocess_view(row.image_file, PreprocessConfig(cfg.crop, False, None, cfg.size))["image"] / 255
        overlay = np.stack([np.maximum(view * 0.6, out["mask"]), np.maximum(view * 0.6, truth * 0.8), view * 0.6], -1)
        axis = fig.add_subplot(grid[1, k])
        axis.imshow(overlay)
        kinds = [k for k in ("narrow", "dim", "low_contrast") if getattr(row, k, False)]
        axis.set_title(f"IoU {row.iou:.2f}: {row.view_type}, {row.polarity}\n{row.n_hands} hand(s), "
                       f"{getattr(row, 'n_tags', 0)} tag(s){''.join(', ' + k.replace('_', ' ') for k in kinds)}",
                       fontsize=8)
        axis.axis("off")
    fig.tight_layout()
    return fig


def plot_anomaly_table(table: pd.DataFrame, title: str = "Study-level ROC-AUC (rows: model and score)",
                       labels: pd.DataFrame | None = None):
    """Heatmap of ROC-AUCs: rows model x score, columns preprocessing variants (their Figure 11 layout); `labels`
    (same shape, text) annotates the cells instead of the values, e.g. anomaly_results_table(..., "roc_auc_ci")."""
    sns = _seaborn()  # (imported here, not at the top: see _seaborn)
    fig, ax = plt.subplots(figsize=((2.4 if labels is not None else 1.6) * table.shape[1] + 3,
                                    0.45 * table.shape[0] + 1.5))
    annot = True if labels is None else labels.loc[table.index, table.columns].to_numpy()
    sns.heatmap(table.astype(float), annot=annot, fmt=".3f" if labels is None else "", cmap="RdYlGn", vmin=0.3,
                vmax=0.9, center=0.5, ax=ax, cbar_kws={"label": "ROC-AUC"}, annot_kws={"fontsize": 8})
    ax.set(title=title, xlabel="preprocessing", ylabel="")
    fig.tight_layout()
    return fig


def plot_gan_samples(results: pd.DataFrame, n: int = 6, device: str = "auto", seed: int = 0):
    """A row per GAN run of the grid: views its generator draws from random codes (has it learned hands?); None
    when the grid holds no GAN."""
    runs = results[results["model"].isin([ANOMALY_MODEL_NAMES[m] for m in GAN_MODELS])].drop_duplicates("run_dir")
    if runs.empty:
        return None
    fig, axes = plt.subplots(len(runs), n, figsize=(1.6 * n, 1.8 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs.itertuples()):
        net, cfg = load_anomaly_model(Path(run.run_dir) / "checkpoints" / "best.pt", device)
        z = torch.randn(n, cfg.gan_latent, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            drawn = to_unit_range(net.generator(z.to(next(net.parameters()).device)), cfg)[:, 0].float().cpu().numpy()
        for ax, image in zip(row, drawn):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        row[0].set_title(f"{run.model} on {run.variant}: G(z)", fontsize=9, loc="left")
    fig.tight_layout()
    return fig


def plot_reconstructions(results: pd.DataFrame, n: int = 4, device: str = "auto", seed: int = 0):
    """Inputs, reconstructions and error maps (their Figure 12) for this grid: per run with a reconstruction (the
    autoencoders, BiGAN and alpha-GAN) typical test inputs (normal and abnormal alternating), their reconstructions
    and masked error maps; per GAN, views its generator draws from random codes. The grid's first seed and variant."""
    runs = results[(results["model"] != _REFERENCE_MODEL) & (results["seed"] == results["seed"].iloc[0])
                   & (results["variant"] == results["variant"].iloc[0])].drop_duplicates("run_dir")
    panels = []  # (title, images, cmap)
    for run in runs.itertuples():
        net, cfg = load_anomaly_model(Path(run.run_dir) / "checkpoints" / "best.pt", device)
        dev = next(net.parameters()).device
        label = f"{run.model} ({cfg.recipe}, {run.variant})"
        if run.model in [ANOMALY_MODEL_NAMES[m] for m in GAN_MODELS]:
            z = torch.randn(n, cfg.gan_latent, generator=torch.Generator().manual_seed(seed))
            with torch.inference_mode():
                drawn = to_unit_range(net.generator(z.to(dev)), cfg)[:, 0].float().cpu().numpy()
                panels.append((f"{label}: samples G(z)", drawn, "gray"))
        if run.model == ANOMALY_MODEL_NAMES["dcgan"]:
            continue
        data = prepare_anomaly_data(cfg, progress=False)
        test = data["images"][data["images"]["subset"] == "test"].drop_duplicates("image_path")
        picks = pd.concat([test[test["label"] == k].sample(min(n - n // 2 if k == 0 else n // 2, (test["label"] == k)
                                                                 .sum()), random_state=seed) for k in (0, 1)])
        rows = picks["cache_row"].to_numpy() if "cache_row" in picks else data["cache"].rows(picks["image_path"])
        x, m = anomaly_inputs(torch.from_numpy(data["cache"].images[rows][:, None]),
                              torch.from_numpy(data["cache"].masks[rows][:, None]), dev, cfg)
        with torch.inference_mode():
            recon = net.eval()(x)["recon"].float()
        error = ((x - recon) ** 2 * m)[:, 0].cpu().numpy()
        kinds = ["normal" if k == 0 else "abnormal" for k in picks["label"]]
        panels += [(f"{label}: inputs ({', '.join(kinds)})", to_unit_range(x, cfg)[:, 0].cpu().numpy(), "gray"),
                   (f"{label}: reconstructions", to_unit_range(recon, cfg)[:, 0].cpu().numpy(), "gray"),
                   (f"{label}: squared error in the mask", error, "inferno")]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), n, figsize=(1.9 * n, 2.1 * len(panels)), squeeze=False,
                             layout="constrained")
    for row, (title, images, cmap) in zip(axes, panels):
        for ax in row:
            ax.axis("off")
        for ax, image in zip(row, images):
            ax.imshow(image, cmap=cmap, **({"vmin": 0, "vmax": 1} if cmap == "gray" else {}))
        row[0].set_title(title, fontsize=8, loc="left")
    fig.suptitle("Inputs, reconstructions and error maps of each model; samples of each GAN (their Figure 12)")
    return fig


def plot_preprocessing(image_paths: Sequence[str], size: int = 256, variants: Sequence[str] = ("raw", "crop",
                       "full", "full+HE")):
    """Each view through the pipeline's variants side by side, with the hand mask."""
    configs = preprocess_variants(size, variants)
    fig, axes = plt.subplots(len(image_paths), len(configs) + 1, figsize=(2.4 * (len(configs) + 1),
                                                                          2.5 * len(image_paths)), squeeze=False)
    for row, path in zip(axes, image_paths):
        masked = None
        for ax, (name, cfg) in zip(row, configs.items()):
            out = preprocess_view(path, cfg)
            masked = out if cfg.segment else masked
            ax.imshow(out["image"], cmap="gray", vmin=0, vmax=255)
            ax.set_title(name + (" (no plate found)" if cfg.crop and not out["carrier_found"] else ""), fontsize=8)
        masked = masked or preprocess_view(path, PreprocessConfig(size=size))
        row[-1].imshow(masked["mask"], cmap="gray")
        row[-1].set_title("hand mask" + (" (view was inverted)" if masked["inverted"] else ""), fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- phantom: a synthetic MURA, with its truth

PHANTOM_FINDINGS_CSV = "phantom_findings.csv"
PHANTOM_TRUTH_CSV = "phantom_truth.csv"  # one row per view: pose, hands, polarity, plate, field, hand-mask file
_PHANTOM_TRUTH_DIR = "phantom_truth"  # the true hand masks, one PNG per view (outside the study folders)
PHANTOM_MANIFEST = "phantom_manifest.json"
# version 3: real XR_HAND views' intensities, textured bones, lateral/flexed/two-hand poses, polarities, truth;
# 4: lead tags as real ones (a holder, a bold letter, initials, a ring; not hand in the truth), narrow and dim
# views, film grain; 5: fractures and lesions on wider bones; 6: a wide, graded soft-tissue margin and coarse film
# mottle in a share of views (PHANTOM_WIDE_MARGIN_SHARE, PHANTOM_MOTTLE_SHARE); 7: 1,000 patients by default
# (PHANTOM_PATIENTS), the views drawn as in v6 (the same settings give the same bytes)
PHANTOM_VERSION = 7
# what makes a right mask of a real view read as "cut" and "missed" (v6; suspect_masks flagged 25 of 28 real views,
# two thirds of them rightly masked): on 80 views of seed 0's even patients, all drawn with it, good masks (IoU >=
# 0.85) flagged by the v5 limits: a wide margin, cut 1.4% -> 5.9% (spread 0.15-0.35, width 0.4-1) and 52% (0.3-0.5,
# 0.8-1.6), background_inside 1.4% -> 10% / 53%; mottle, missed 5.7% -> 12% (level 0.005-0.02, width 4-10) and 28%
# (0.01-0.03, 6-14); the film grain already drawn (v4, 1-3 px) and tags beside the hand raise neither. Each is drawn
# in a share of views, from a random stream of its own (the view's other draws stay as in v5)
PHANTOM_WIDE_MARGIN_SHARE = 0.4  # views whose soft tissue thins out over a wide, graded margin (the skin's edge
#                                  blurred by scatter and the film's screen) rather than the phantom's narrow halo
_WIDE_MARGIN_SPREAD = (0.25, 0.45)  # the share of the soft tissue's density spread into that margin ...
_WIDE_MARGIN_WIDTH = (0.6, 1.4)  # ... over this many typical bone widths (Gaussian sigma; 0.12 for the halo)
PHANTOM_MOTTLE_SHARE = 0.4  # views with coarse film mottle: noise correlated over several px, which the mask's
#                             working size (128 px) keeps, unlike the v4 grain
_MOTTLE_WIDTH = (4.0, 10.0)  # its correlation length, px of a 512-px view (Gaussian sigma)
_MOTTLE_LEVEL = (0.006, 0.018)  # its standard deviation, a share of full scale (1.5-4.6 grey levels)
PHANTOM_POSES = ("pa", "oblique", "lateral", "flexed")
PHANTOM_POLARITIES = ("normal", "light_grey", "inverted")  # light_grey: a light background, not inverted
PHANTOM_FINDING_MIX = {"fracture": 0.45, "hardware": 0.3, "lesion": 0.25}  # each kind's share of abnormal studies
PHANTOM_FINDINGS = tuple(PHANTOM_FINDING_MIX)
_PHANTOM_SETTINGS = ("n_patients", "seed", "valid_fraction", "positive_rate", "body_parts", "image_size",
                     "finding_kinds", "finding_scale", "finding_contrast", "film_noise")
PHANTOM_MADE_BY = "mura_helpers.make_phantom_mura"  # the manifest's mark: only a folder so marked is ever deleted
_PHANTOM_FILES = (PHANTOM_MANIFEST, PHANTOM_FINDINGS_CSV, *(f"{s}_{kind}.csv" for s in SPLITS
                                                          for kind in ("labeled_studies", "image_paths")))
_FINGERS = ("thumb", "index", "middle", "ring", "little")
# canonical right hand, PA view, wrist at the origin, fingers towards +y; unit: wrist to middle fingertip
_MC_BASE = {"thumb": (-0.085, 0.11), "index": (-0.045, 0.165), "middle": (-0.01, 0.17),
            "ring": (0.022, 0.163), "little": (0.052, 0.15)}
_MC_ANGLE = {"thumb": -38.0, "index": -7.0, "middle": -1.0, "ring": 6.0, "little": 14.0}
_MC_LENGTH = {"thumb": 0.16, "index": 0.26, "middle": 0.255, "ring": 0.235, "little": 0.215}
_PHALANX_LENGTHS = {"thumb": (0.13, 0.095), "index": (0.165, 0.1, 0.072), "middle": (0.185, 0.12, 0.075),
                    "ring": (0.175, 0.113, 0.072), "little": (0.14, 0.085, 0.066)}
_RADIUS = {"thumb": 0.021, "index": 0.02, "middle": 0.021, "ring": 0.019, "little": 0.017}
_CARPALS = [((-0.075, 0.045), (0.033, 0.026)), ((-0.03, 0.04), (0.026, 0.025)), ((0.015, 0.04), (0.024, 0.022)),
            ((0.05, 0.05), (0.017, 0.017)), ((-0.085, 0.1), (0.025, 0.022)), ((-0.045, 0.11), (0.02, 0.024)),
            ((-0.008, 0.105), (0.024, 0.035)), ((0.035, 0.1), (0.026, 0.03))]
# where a finding is planted, each bone's share: hardware on a finger bone half of the time (v4's draw, which the
# learning controls were measured on); fractures and lesions (v5) on the metacarpals, the distal radius and the
# proximal phalanges, the bones 4 px wide or more at 128 px (a middle phalanx is 2-3 px: a break there is lost in
# the resize; measured with the view rendered with and without its finding, see benchmarks/learnability.py)
_FINGER_BONES = [f"{f}_{p}" for f in _FINGERS[1:] for p in ("proximal", "middle")] + ["thumb_proximal"]
_LARGE_BONES = ["index_metacarpal", "middle_metacarpal", "ring_metacarpal", "little_metacarpal", "radius"]
_FINDING_BONES = {
    "hardware": {**{b: 0.5 / len(_FINGER_BONES) for b in _FINGER_BONES}, **{b: 0.1 for b in _LARGE_BONES}},
    "bone": {**{f"{f}_metacarpal": 0.15 for f in ("index", "middle", "ring", "little")}, "radius": 0.2,
             **{f"{f}_proximal": 0.2 / 3 for f in ("index", "middle", "ring")}},
}
_FRACTURE_DISPLACEMENT = (2.0, 3.0)  # the distal fragment's sideways shift, in bone radii (v4: 1.2-2.0)
_FRACTURE_ANGULATION = (15.0, 30.0)  # degrees the distal fragment turns at the break (v5; v4: none)
_LESION_SIZE = (2.0, 2.8)  # the lytic lesion's radius, in bone radii: expansile (v4: 1.6-2.2)
_FRACTURE_OVERRIDE = 0.8  # the fragments overlap along the bone, in bone radii: a dense band (v4: 0.3 apart)
_LESION_RIM = 1.8  # the lytic lesion's sclerotic rim, in bone radii of density (v4: 0.7)


@dataclass
class _Bone:
    """A tubular bone between two points, in pixel coordinates."""
    name: str
    p0: np.ndarray
    p1: np.ndarray
    radius: float
    waist: float = 0.25
    taper: float = 0.0  # the far end's radius is (1 - taper) of the near end's


def _region(shape, lo, hi):
    """Clip a box to the image; return (slices, yy, xx) grids or None when empty."""
    y0, x0 = max(int(lo[1]), 0), max(int(lo[0]), 0)
    y1, x1 = min(int(hi[1]) + 2, shape[0]), min(int(hi[0]) + 2, shape[1])
    if y1 <= y0 or x1 <= x0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), yy, xx


def _tube_density(xx, yy, bone: _Bone, hollow: float = 0.62, marrow: float = 0.35):
    """Projected density of a hollow tapered tube with flared, flat ends (cortex bright at the edges, marrow darker)."""
    d = bone.p1 - bone.p0
    length2 = max(float(d @ d), 1e-6)
    s = ((xx - bone.p0[0]) * d[0] + (yy - bone.p0[1]) * d[1]) / length2
    t = np.clip(s, 0, 1)
    dist2 = (xx - bone.p0[0] - s * d[0]) ** 2 + (yy - bone.p0[1] - s * d[1]) ** 2  # from the axis
    r = bone.radius * (1 - bone.taper * t) * (1 - bone.waist * (1 - (2 * t - 1) ** 2))
    r = r * np.sqrt(np.clip(1 - ((s - t) * math.sqrt(length2) / (0.3 * bone.radius)) ** 2, 0, None))  # end caps
    outer = np.sqrt(np.clip(r**2 - dist2, 0, None))
    inner = np.sqrt(np.clip((hollow * r) ** 2 - dist2, 0, None))
    return (outer - (1 - marrow) * inner) * 2


def _draw_tube(layer, bone: _Bone, weight: float, fracture: dict | None = None):
    """Add a tube's density to `layer`; with `fracture`, cut it along a line, then turn the distal part about the
    break by fracture["angle"] (radians; angulation) and shift it (displacement)."""
    reach = float(np.linalg.norm(bone.p1 - bone.p0)) * abs(math.sin(fracture.get("angle", 0.0))) if fracture else 0
    pad = bone.radius * 1.3 + (np.abs(fracture["shift"]).max() + reach if fracture else 0)
    reg = _region(layer.shape, np.minimum(bone.p0, bone.p1) - pad, np.maximum(bone.p0, bone.p1) + pad)
    if reg is None:
        return
    sl, yy, xx = reg
    if fracture is None:
        layer[sl] += weight * _tube_density(xx, yy, bone)
        return
    c, n, gap, shift = fracture["point"], fracture["normal"], fracture["gap"], fracture["shift"]
    side = (xx - c[0]) * n[0] + (yy - c[1]) * n[1]
    proximal = _tube_density(xx, yy, bone) * (side < -gap / 2)
    ca, sa = math.cos(fracture.get("angle", 0.0)), math.sin(fracture.get("angle", 0.0))
    ux, uy = xx - shift[0] - c[0], yy - shift[1] - c[1]  # back to where a distal pixel was before the break
    xs, ys = c[0] + ca * ux + sa * uy, c[1] - sa * ux + ca * uy
    distal = _tube_density(xs, ys, bone) * (((xs - c[0]) * n[0] + (ys - c[1]) * n[1]) > gap / 2)
    layer[sl] += weight * (proximal + distal)  # where the fragments override, their densities add: a dense band


def _draw_ellipsoid(layer, center, radii, angle, weight, hollow: float = 0.65, marrow: float = 0.4):
    """Add the projected density of a hollow ellipsoid (carpal bones, bone heads)."""
    reg = _region(layer.shape, np.asarray(center) - max(radii) - 1, np.asarray(center) + max(radii) + 1)
    if reg is None:
        return
    sl, yy, xx = reg
    ca, sa = math.cos(angle), math.sin(angle)
    u = ((xx - center[0]) * ca + (yy - center[1]) * sa) / radii[0]
    v = (-(xx - center[0]) * sa + (yy - center[1]) * ca) / radii[1]
    rho2 = u**2 + v**2
    outer = np.sqrt(np.clip(1 - rho2, 0, None))
    inner = hollow * np.sqrt(np.clip(1 - rho2 / hollow**2, 0, None))
    layer[sl] += weight * 2 * min(radii) * (outer - (1 - marrow) * inner)


def _draw_soft(layer, p0, p1, radius):
    """Max-blend the projected thickness of a soft-tissue capsule into `layer` (0..1)."""
    reg = _region(layer.shape, np.minimum(p0, p1) - radius - 1, np.maximum(p0, p1) + radius + 1)
    if reg is None:
        return
    sl, yy, xx = reg
    d = p1 - p0
    t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
    dist2 = (xx - p0[0] - t * d[0]) ** 2 + (yy - p0[1] - t * d[1]) ** 2
    np.maximum(layer[sl], np.sqrt(np.clip(1 - dist2 / radius**2, 0, None)), out=layer[sl])


def _draw_rect(layer, center, length, width, angle, value, blend="max"):
    """Draw a filled rotated rectangle (plates, screws, wires, rings) with a soft edge; return its corners."""
    ca, sa = math.cos(angle), math.sin(angle)
    corners = [np.asarray(center) + a * np.array([ca, sa]) * length / 2 + b * np.array([-sa, ca]) * width / 2
               for a in (-1, 1) for b in (-1, 1)]
    half = math.hypot(length, width) / 2 + 1
    reg = _region(layer.shape, np.asarray(center) - half, np.asarray(center) + half)
    if reg is None:
        return corners
    sl, yy, xx = reg
    u = (xx - center[0]) * ca + (yy - center[1]) * sa
    v = -(xx - center[0]) * sa + (yy - center[1]) * ca
    inside = np.clip(length / 2 - np.abs(u) + 0.5, 0, 1) * np.clip(width / 2 - np.abs(v) + 0.5, 0, 1)
    if blend == "max":
        np.maximum(layer[sl], value * inside, out=layer[sl])
    else:
        layer[sl] += value * inside
    return corners


def _unit(v):
    """Return `v` scaled to unit length."""
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _flexed(vector: np.ndarray, flex: float, squeeze: float) -> np.ndarray:
    """A canonical bone vector turned by `flex` radians in the image plane (a finger curling in a lateral view)."""
    sx, sy = vector[0] * squeeze, vector[1]
    c, s = math.cos(flex), math.sin(flex)
    return np.array([(c * sx - s * sy) / squeeze, s * sx + c * sy])


def _skeleton(anatomy: dict, pose: dict, to_px, px_per_unit: float) -> tuple[list[_Bone], list, list]:
    """Place the hand's bones, carpals and soft tissue in pixel coordinates for one pose."""
    scale = anatomy["size"] * px_per_unit
    bones, carpals, soft = [], [], []
    fore_r, fore_u = np.array([-0.1, -0.75]), np.array([0.1, -0.75])
    bones.append(_Bone("radius", to_px(fore_r), to_px([-0.07, -0.03]), 0.05 * scale, 0.3, -0.15))
    bones.append(_Bone("ulna", to_px(fore_u), to_px([0.075, -0.04]), 0.034 * scale, 0.25, 0.1))
    carpals.append((to_px([-0.075, -0.035]), (0.075 * scale, 0.032 * scale), 0.0))
    for (c, r), (dx, dy, fx, fy, turn) in zip(_CARPALS, pose["carpals"]):  # irregular, overlapping carpals
        carpals.append((to_px([c[0] + dx, c[1] + dy]), (r[0] * fx * scale, r[1] * fy * scale), turn))
    soft.append((to_px([0.0, -0.8]), to_px([0.0, 0.05]), 0.16 * scale))
    soft.append((to_px([-0.04, 0.14]), to_px([0.04, 0.14]), 0.11 * scale))  # palm
    soft.append((to_px([-0.05, 0.3]), to_px([0.05, 0.3]), 0.09 * scale))
    soft.append((to_px([-0.09, 0.12]), to_px([-0.16, 0.26]), 0.05 * scale))  # thenar eminence
    for f in _FINGERS:
        base = np.array(_MC_BASE[f])
        angle = math.radians(_MC_ANGLE[f] * pose["spread"] + pose["finger_angle"][f])
        direction = np.array([math.sin(angle), math.cos(angle)])
        head = base + direction * _MC_LENGTH[f] * anatomy["lengths"][f]
        r = _RADIUS[f] * scale
        bones.append(_Bone(f"{f}_metacarpal", to_px(base), to_px(head), r * 1.05, 0.3, 0.1))
        soft.append((to_px(base), to_px(head), r * 2.6 if f != "thumb" else r * 2.4))
        joint, flex = head, 0.0
        names = ("proximal", "distal") if f == "thumb" else ("proximal", "middle", "distal")
        for k, (name, length) in enumerate(zip(names, _PHALANX_LENGTHS[f])):
            bend = math.radians(pose["finger_angle"][f] * 0.4 * (k + 1) + (pose["curl"][f] * 6.0 if k else 0))
            flex += pose["flex"][f][k]
            direction = _flexed(np.array([math.sin(angle + bend), math.cos(angle + bend)]), flex, pose["squeeze"])
            start = joint + direction * 0.018  # the joint space
            end = start + direction * length * anatomy["lengths"][f] * pose["foreshorten"][f] ** (k + 1)
            taper = (1.0, 0.82, 0.66)[k if f != "thumb" else 2 * k]
            distal = name == "distal"
            bones.append(_Bone(f"{f}_{name}", to_px(start), to_px(end), r * taper, 0.1 if distal else 0.28,
                               0.45 if distal else 0.12))
            soft.append((to_px(joint), to_px(end + direction * (0.014 if distal else 0.0)),
                         r * (1.85, 1.7, 1.6)[k if f != "thumb" else 2 * k]))
            joint = end
    return bones, carpals, soft


def _phantom_pose(rng: np.random.Generator, view: str) -> dict:
    """Draw a hand pose for a PA, oblique, lateral or flexed (curled fingers, overlapping bones) view."""
    spread = {"pa": rng.uniform(0.7, 1.5), "oblique": rng.uniform(0.4, 0.9), "lateral": rng.uniform(0.05, 0.25),
              "flexed": rng.uniform(0.1, 0.6)}[view]
    squeeze = {"pa": 1.0, "oblique": rng.uniform(0.6, 0.8), "lateral": rng.uniform(0.3, 0.42),
               "flexed": rng.uniform(0.35, 0.75)}[view]
    curl_range = {"pa": (0.85, 1.0), "oblique": (0.7, 0.95), "lateral": (0.75, 1.0), "flexed": (0.75, 1.0)}[view]
    side = float(rng.choice([-1.0, 1.0]))  # the palm's side in the image plane
    flex = {}
    curled = rng.random(len(_FINGERS)) < 0.8
    for f, curl in zip(_FINGERS, curled):
        if view == "flexed" and curl:  # fingers curled towards the palm, over it and each other
            joints = [rng.uniform(0.2, 1.0), rng.uniform(0.6, 1.6), rng.uniform(0.2, 0.9)]
        elif view in ("lateral", "flexed"):
            joints = rng.uniform(0.0, 0.35, 3).tolist()
        else:
            joints = rng.uniform(-0.05, 0.1, 3).tolist()
        flex[f] = [side * j * (-1 if f == "thumb" and view == "flexed" else 1) for j in joints]
    return {
        "spread": spread, "squeeze": squeeze,
        "finger_angle": {f: rng.normal(0, 3.0 if view not in ("lateral", "flexed") else 1.0) for f in _FINGERS},
        "foreshorten": {f: rng.uniform(*curl_range) for f in _FINGERS},
        "curl": {f: rng.uniform(-1, 1) for f in _FINGERS},
        "flex": flex,
        "carpals": [(*rng.normal(0, 0.006, 2), *rng.uniform(0.8, 1.2, 2), rng.normal(0, 0.5)) for _ in _CARPALS],
    }


def _finding_box(shape, lo, hi, pad=2.0):
    """Clip a finding's box to the image and return it as ints, or None when mostly out of frame."""
    lo, hi = np.asarray(lo) - pad, np.asarray(hi) + pad
    clipped_lo = np.maximum(lo, 0)
    clipped_hi = np.minimum(hi, [shape[1] - 1, shape[0] - 1])
    area = np.prod(np.clip(hi - lo, 0, None))
    kept = np.prod(np.clip(clipped_hi - clipped_lo, 0, None))
    if area <= 0 or kept < 0.5 * area:
        return None
    return [int(clipped_lo[0]), int(clipped_lo[1]), int(math.ceil(clipped_hi[0])), int(math.ceil(clipped_hi[1]))]


def _plant_finding(finding: dict, bones: list[_Bone], bone_layer, metal_layer, soft_layer, rng) -> list:
    """Plant a study's abnormality on its bone (drawn already) and return the finding's box corners."""
    bone = next(b for b in bones if b.name == finding["bone"])
    axis = _unit(bone.p1 - bone.p0)
    normal = np.array([-axis[1], axis[0]])
    at = bone.p0 + (bone.p1 - bone.p0) * finding["t"]
    r, scale = bone.radius, finding.get("scale", 1.0)
    if finding["kind"] == "fracture":
        tilt = math.radians(finding["tilt"])
        line_normal = axis * math.cos(tilt) + normal * math.sin(tilt)
        shift = (normal * finding["displacement"] * r - axis * _FRACTURE_OVERRIDE * r) * scale
        (lo, hi), (near, far) = _FRACTURE_ANGULATION, _FRACTURE_DISPLACEMENT  # the more displaced, the more angled
        turn = lo + (hi - lo) * float(np.clip((abs(finding["displacement"]) - near) / (far - near), 0, 1))
        spec = {"point": at, "normal": line_normal, "gap": max(4.0, 0.7 * r) * scale, "shift": shift,
                "angle": math.copysign(math.radians(turn), finding["displacement"])}
        _draw_tube(bone_layer, bone, -1.0)  # replace the intact bone by the broken one
        _draw_tube(bone_layer, bone, 1.0, spec)
        _draw_soft(soft_layer, at - axis * 3.0 * r, at + axis * 3.0 * r, 3.6 * r)  # fusiform soft-tissue swelling
        return [at - 3.6 * r * max(scale, 1.0), at + 3.6 * r * max(scale, 1.0)]  # the fragments and the swelling
    if finding["kind"] == "lesion":
        size = finding["size"] * r * scale  # expansile: wider than the bone, thinning and ballooning its cortex
        reg = _region(bone_layer.shape, at - 1.3 * size, at + 1.3 * size)
        if reg is not None:
            sl, yy, xx = reg
            rho = np.sqrt((xx - at[0]) ** 2 + (yy - at[1]) ** 2) / size
            bone_layer[sl] *= np.where(rho < 1, 0.02 + 0.25 * rho**4, 1.0)  # lytic: the bone gone inside
            inside_hand = np.clip(2 * soft_layer[sl] - 0.5, 0, 1)  # the rim stays under the skin (and off the mask)
            bone_layer[sl] += _LESION_RIM * r * np.exp(-(((rho - 1.0) / 0.2) ** 2)) * inside_hand  # thick, sclerotic
        return [at - 1.15 * size, at + 1.15 * size]
    angle = math.atan2(axis[1], axis[0])
    corners = []
    if finding["hardware"] == "plate":
        length = np.linalg.norm(bone.p1 - bone.p0) * 0.7
        plate_at = at + normal * r * 0.95 * scale
        corners += _draw_rect(metal_layer, plate_at, length, max(5.0, 1.0 * r) * scale, angle, 1.0)
        for s in np.linspace(-0.38, 0.38, finding["screws"]):
            screw_at = at + axis * s * length + normal * r * 0.25
            corners += _draw_rect(metal_layer, screw_at, max(3.0, 0.45 * r) * scale, 3.2 * r, angle, 1.0)
            for k in np.linspace(-1.1, 1.1, 6):  # threads
                _draw_rect(metal_layer, screw_at + normal * k * r, max(3.0, 0.5 * r) * scale, max(1.0, 0.1 * r),
                           angle, 1.0)
    else:
        for k in range(finding["screws"] if finding["screws"] <= 2 else 2):
            wire_angle = angle + math.radians(rng.uniform(-12, 12))
            wire_at = at + normal * (k - 0.5) * 0.6 * r
            length = np.linalg.norm(bone.p1 - bone.p0) * rng.uniform(0.9, 1.3)
            corners += _draw_rect(metal_layer, wire_at, length, max(3.0, 0.3 * r) * scale, wire_angle, 1.0)
    return [np.min(corners, axis=0), np.max(corners, axis=0)]


def _draw_ring(metal_layer, bones: list[_Bone], finger: str):
    """Draw a wedding ring around a finger's proximal phalanx (a metal confounder, not an abnormality)."""
    bone = next(b for b in bones if b.name == f"{finger}_proximal")
    axis = _unit(bone.p1 - bone.p0)
    at = bone.p0 + (bone.p1 - bone.p0) * 0.4
    _draw_rect(metal_layer, at, max(2.0, 0.35 * bone.radius), 3.3 * bone.radius, math.atan2(axis[1], axis[0]), 0.8)


def _tag_patch(rng, letter: str, width: float, height: float, angle: float, supersample: int = 4):
    """A lead tag as two coverage maps (0..1: the holder, the lead in it), turned by `angle` radians: a solid
    holder `width` x `height` px holding a bold letter (the side), two or three initials under it and often a ring."""
    w, h = int(round(width * supersample)), int(round(height * supersample))
    holder, lead = Image.new("L", (w, h), 255), Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(lead)
    y = 0.06 * h
    for text, size in ((letter, 0.75 * w), ("".join(rng.choice(list("ABCDEHKLMNPRST"), int(rng.integers(2, 4)))),
                                            0.3 * w)):
        font = ImageFont.load_default(size=max(int(size), 6))
        stroke = max(1, int(size / 12))  # bold
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        draw.text(((w - (x1 - x0)) / 2 - x0, y - y0), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
        y += (y1 - y0) + 0.04 * h
    ring = 0.55 * w
    if h - y > ring + 0.04 * h and rng.random() < 0.6:  # a ring under them, where the holder is tall enough
        draw.ellipse([(w - ring) / 2, y, (w + ring) / 2, y + ring], outline=255, width=max(1, int(0.08 * w)))
    maps = []
    for layer in (holder, lead):
        turned = layer.rotate(math.degrees(-angle), Image.Resampling.BILINEAR, expand=True, fillcolor=0)
        small = turned.resize((max(1, round(turned.width / supersample)), max(1, round(turned.height / supersample))),
                              Image.Resampling.BOX)
        maps.append(np.asarray(small, np.float32) / 255)
    return maps


def _place_tags(rng, tissue: np.ndarray, field: np.ndarray, n_tags: int, short: int, finger: float) -> list:
    """Where lead tags lie: [(center, (w, h), angle)], each wholly inside the field and off the hand, about a third
    of them within a finger's width of it, some tilted, none over another. Fewer when the field has no room."""
    gap = ndimage.distance_transform_edt(~tissue)  # pixels from the hand
    room = ndimage.distance_transform_edt(np.pad(field, 1))[1:-1, 1:-1]  # pixels from the field's edge or the view's
    taken, placed = np.zeros(field.shape, bool), []
    w_img = field.shape[1]
    for _ in range(n_tags):
        w = short * rng.uniform(0.06, 0.15)
        size = (w, w * rng.uniform(1.5, 3.0))
        angle = math.radians(rng.uniform(-35, 35)) if rng.random() < 0.3 else 0.0
        near = rng.random() < 1 / 3
        half_short, half_diag = min(size) / 2, math.hypot(*size) / 2
        zone = (gap > half_short + 1) & (gap <= half_diag + finger) if near else gap > half_diag + finger
        candidates = np.flatnonzero(zone & (room > half_short) & ~taken)
        for k in rng.choice(candidates, min(len(candidates), 40), replace=False) if len(candidates) else ():
            center = np.array([k % w_img, k // w_img], float) + 0.5
            sl, yy, xx = _region(field.shape, center - half_diag - 1, center + half_diag + 1)
            box, corners = _rotated_box(center, size, angle, xx + 0.5, yy + 0.5)
            inside_view = all(0 <= x <= field.shape[1] and 0 <= y <= field.shape[0] for x, y in corners)
            if not (inside_view and box.any() and field[sl][box].all()) or taken[sl][box].any():
                continue
            nearest = gap[sl][box].min()
            if (1 <= nearest <= finger) if near else nearest > finger:
                placed.append((center, size, angle))
                taken[sl] |= ndimage.binary_dilation(box, iterations=2)
                break
    return placed


def _draw_tag(image: np.ndarray, rng, letter: str, tag, holder_level: float, lead_level: float) -> np.ndarray:
    """Draw a lead tag (center, (w, h), angle) into `image` (0..1, before blur and noise, as an X-ray shows it);
    return its pixels (the holder's rectangle)."""
    center, (w, h), angle = tag
    holder, lead = _tag_patch(rng, letter, w, h, angle)
    y0, x0 = int(round(center[1] - holder.shape[0] / 2)), int(round(center[0] - holder.shape[1] / 2))
    ys, xs = slice(max(y0, 0), min(y0 + holder.shape[0], image.shape[0])), slice(
        max(x0, 0), min(x0 + holder.shape[1], image.shape[1]))
    cut = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    patch = image[ys, xs]
    patch += (holder_level - patch) * holder[cut]
    patch += (lead_level - patch) * lead[cut]
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]].astype(np.float32) + 0.5
    return _rotated_box(center, (w, h), angle, xx, yy)[0]


_ANNOTATION_REFERENCE_SIDE = 512  # px: the view's long side at which annotation text has its drawn size below
_ANNOTATION_MIN_HEIGHT = 2  # px: annotation text's smallest height (a smaller view keeps text at least this tall)


def _draw_annotations(image: Image.Image, rng, lead: int) -> str:
    """Burn, into the displayed image, sometimes a marker strip along an edge, and a few lines of annotation text
    blobs (5 px tall, words 6-28 px wide on a view whose long side is 512 px, scaled with the view, never below
    _ANNOTATION_MIN_HEIGHT); return "+strip" when a strip was drawn, else ""."""
    w, h = image.size
    size = max(w, h) / _ANNOTATION_REFERENCE_SIDE  # text scales with the view, as a radiograph's does when resized
    text_h = max(5 * size, _ANNOTATION_MIN_HEIGHT)
    draw = ImageDraw.Draw(image)
    kind = ""
    if rng.random() < 0.08:  # a marker strip along an edge, with its lettering
        depth = int(min(h, w) * rng.uniform(0.03, 0.06))
        edge = int(rng.integers(4))
        strip = [[0, 0, w, depth], [0, h - depth, w, h], [0, 0, depth, h], [w - depth, 0, w, h]][edge]
        draw.rectangle(strip, fill=lead)
        if edge < 2:
            draw.text((strip[0] + depth, strip[1] + depth * 0.15), "A  B  C  D", fill=255 - lead,
                      font=ImageFont.load_default(size=max(int(depth * 0.7), 6)))
        kind = "+strip"
    for line in range(int(rng.integers(0, 4))):  # annotation text as blocks of "words"
        tx, ty = int(rng.uniform(0.02, 0.5) * w), int(rng.uniform(0.02, 0.95) * h)
        for _ in range(int(rng.integers(2, 6))):
            word = max(int(round(int(rng.integers(6, 28)) * size)), 1)
            draw.rectangle([tx, ty + line, tx + word, ty + line + int(round(text_h))], fill=lead)
            tx += word + max(int(round(4 * size)), 1)
    return kind


def _rotated_box(center, size, angle: float, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, list]:
    """Pixels (pixel-centre grids xx, yy) inside a rotated rectangle, and its 4 corners [[x, y], ...]."""
    ca, sa = math.cos(angle), math.sin(angle)
    u = (xx - center[0]) * ca + (yy - center[1]) * sa
    v = -(xx - center[0]) * sa + (yy - center[1]) * ca
    corners = [[round(float(center[0] + a * ca * size[0] / 2 - b * sa * size[1] / 2), 1),
                round(float(center[1] + a * sa * size[0] / 2 + b * ca * size[1] / 2), 1)]
               for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    return (np.abs(u) < size[0] / 2) & (np.abs(v) < size[1] / 2), corners


def _hand_to_px(mirror: float, squeeze: float, theta: float, scale: float, center: np.ndarray):
    """The map from canonical hand coordinates to pixels for one hand's placement."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    hand_center = np.array([0.0, 0.38])

    def to_px(p):
        q = (np.asarray(p, dtype=np.float64) - hand_center) * [mirror * squeeze, -1.0]
        return (rot @ q) * scale + center

    return to_px


def _narrow_view_center(rng, anatomy: dict, pose: dict, theta: float, scale: float, shape: tuple[int, int],
                        tries: int = 10) -> np.ndarray:
    """Where a narrow view's hand lies: a point along a finger (its metacarpal to its middle phalanx) at the view's
    centre, drawn again (up to `tries` times, checked at a coarser resolution) until the hand covers 30-75% of the
    view (else the nearest to half of it): a close-up of a finger or of the hand's edge shows some background."""
    h, w = shape
    mirror = -1.0 if anatomy["left"] else 1.0
    coarse = max(1.0, min(h, w) / 32)  # the check's pixels: 32 across the view's short side
    best, best_miss = None, np.inf
    for _ in range(tries):
        target = np.array(_MC_BASE[str(rng.choice(_FINGERS))]) + [rng.uniform(-0.04, 0.04), rng.uniform(0.05, 0.35)]
        center = np.array([w / 2, h / 2]) - _hand_to_px(mirror, pose["squeeze"], theta, scale, np.zeros(2))(target)
        to_coarse = _hand_to_px(mirror, pose["squeeze"], theta, scale / coarse, center / coarse)
        layer = np.zeros((int(h / coarse) + 1, int(w / coarse) + 1), np.float32)
        for p0, p1, radius in _skeleton(anatomy, pose, to_coarse, scale / coarse)[2]:
            _draw_soft(layer, p0, p1, radius)
        share = float((layer > 0.1).mean())
        miss = max(0.3 - share, share - 0.75, 0.0) or -abs(share - 0.5)
        if miss < best_miss:
            best, best_miss = center, miss
        if miss <= 0:
            break
    return best


def _draw_hands(rng: np.random.Generator, finding_rng: np.random.Generator, view: str, anatomy: dict,
                finding: dict | None, ring: str | None, n_hands: int, narrow: bool, landscape: bool,
                shape: tuple[int, int]) -> tuple[tuple[np.ndarray, ...], list[int] | None, float, float]:
    """Each hand's soft tissue, bones and metal (the planted finding and a ring on the first hand) drawn into
    their own layers; return the (soft, bone, metal) layers, the finding's box, a typical bone's density (px) and
    the first hand's squeeze."""
    h, w = shape
    long_side = max(h, w)
    soft_layer, bone_layer, metal_layer = (np.zeros((h, w), np.float32) for _ in range(3))
    box, bone_unit, squeeze = None, 1.0, 1.0
    for hand in range(n_hands):  # two hands: PA, side by side, the second one mirrored
        pose = _phantom_pose(rng, view)
        if narrow:  # along the view, zoomed in on a finger or the hand's edge
            theta = math.radians(rng.normal(0, 6) + (rng.choice([-90, 90]) if landscape else 0))
            scale = long_side * rng.uniform(0.85, 1.8)
            center = _narrow_view_center(rng, anatomy, pose, theta, scale, (h, w))
        elif n_hands == 1:
            theta = math.radians(rng.normal(0, 14) + (rng.choice([-90, 90]) if landscape else 0))
            scale = min(h, w) * (rng.uniform(0.8, 1.0) if landscape else rng.uniform(0.85, 1.1))
            center = np.array([w / 2 + rng.normal(0, 0.05) * w, h / 2 + rng.normal(0, 0.04) * h])
        else:
            theta = math.radians(rng.normal(0, 6))
            scale = h * rng.uniform(0.7, 0.82)
            center = np.array([w * (0.5 + (hand - 0.5) * rng.uniform(0.46, 0.52)), h * rng.uniform(0.45, 0.55)])
        mirror = (-1.0 if anatomy["left"] else 1.0) * (1.0 if hand == 0 else -1.0)
        to_px = _hand_to_px(mirror, pose["squeeze"], theta, scale, center)
        bones, carpals, soft = _skeleton(anatomy, pose, to_px, scale)
        for p0, p1, radius in soft:
            _draw_soft(soft_layer, p0, p1, radius)
        for bone in bones:
            _draw_tube(bone_layer, bone, 1.0)
        for c, radii, turn in carpals:
            _draw_ellipsoid(bone_layer, c, radii, theta + turn, 1.0)
        if hand == 0:
            bone_unit, squeeze = 0.045 * scale, pose["squeeze"]  # density of a typical bone, to normalise
            if finding is not None:
                corners = _plant_finding(finding, bones, bone_layer, metal_layer, soft_layer, finding_rng)
                box = _finding_box((h, w), *corners)
            if ring is not None:
                _draw_ring(metal_layer, bones, ring)
    return (soft_layer, bone_layer, metal_layer), box, bone_unit, squeeze


def _plate_and_field(rng: np.random.Generator, image: np.ndarray, background: float, low_contrast: bool,
                     xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, list, np.ndarray, list, np.ndarray]:
    """The detector plate (often tilted, not filling the frame) and the collimated field inside it (its
    unexposed borders light); return the plate's pixels and corners, the field's, and the image with its borders."""
    h, w = image.shape
    plate, plate_corners = np.ones((h, w), bool), []
    if low_contrast or rng.random() < 0.6:  # the detector plate, often tilted, does not fill the frame
        tilt = math.radians(rng.uniform(-12, 12))
        pc = np.array([w / 2, h / 2]) + rng.normal(0, 0.03, 2) * [w, h]
        psize = (w * rng.uniform(0.78, 0.98), h * rng.uniform(0.8, 0.98))
        plate, plate_corners = _rotated_box(pc, psize, tilt, xx, yy)
    else:
        tilt, pc, psize = 0.0, np.array([w / 2, h / 2]), (float(w), float(h))
    field, field_corners = plate, []
    if rng.random() < 0.35:  # collimation: unexposed borders inside the plate look light
        m = rng.uniform(0.02, 0.1, size=4) * [psize[0], psize[1], psize[0], psize[1]]
        ca, sa = math.cos(tilt), math.sin(tilt)
        offset = np.array([(m[0] - m[2]) / 2, (m[1] - m[3]) / 2])
        fc = pc + [ca * offset[0] - sa * offset[1], sa * offset[0] + ca * offset[1]]
        fsize = (psize[0] - m[0] - m[2], psize[1] - m[1] - m[3])
        field, field_corners = _rotated_box(fc, fsize, tilt + math.radians(rng.normal(0, 1.5)), xx, yy)
        field &= plate
        image = np.where(field, image, background + (0.97 - background) * rng.uniform(0.12, 0.4))
    return plate, plate_corners, field, field_corners, image


def _draw_lead_tags(rng: np.random.Generator, image: np.ndarray, tissue: np.ndarray, field: np.ndarray,
                    background: float, bone_unit: float, dim: bool, left: bool) -> tuple[list, np.ndarray]:
    """Lead tags (one, sometimes two; always on a dim view) drawn into the image, in the field and off the hand;
    return their boxes and their pixels."""
    h, w = image.shape
    tags, tag_pixels = [], np.zeros((h, w), bool)
    if dim or rng.random() < 0.85:  # lead tags: one, sometimes two, in the field and off the hand
        finger = 2 * 1.7 * _RADIUS["middle"] * bone_unit / 0.045  # a finger's width (its soft tissue), px
        tags = _place_tags(rng, tissue, field, 2 if rng.random() < 0.12 else 1, min(h, w), finger)
        for tag in tags:
            lead = rng.uniform(0.75, 0.95) if dim else rng.uniform(0.85, 1.0)
            darker = background > 0.15 and rng.random() < 0.4  # a holder darker than the field, where there is room
            holder = background * rng.uniform(0.3, 0.7) if darker else (
                background + (lead - background) * rng.uniform(0.25, 0.6))  # lighter, the lead lighter still
            tag_pixels |= _draw_tag(image, rng, "L" if left else "R", tag, holder, lead)
    return tags, tag_pixels


def _render_view(seed: Sequence[int], view: str, anatomy: dict, finding: dict | None, ring: str | None,
                 long_side: int, n_hands: int = 1, polarity: str = "normal", low_contrast: bool = False,
                 narrow: bool = False, dim: bool = False,
                 film_noise: bool = True) -> tuple[np.ndarray, list[int] | None, dict]:
    """Render one radiograph view; return the 8-bit image, the planted finding's box (or None) and the view's
    truth (hand mask, plate and field corners, lead tags' corners, polarity, hands, pose, contrast, lead tag).
    `narrow`: a close-up of a finger or of the hand's edge, three to four and a half times as tall as wide;
    `dim`: a faint hand, with a bright lead tag the brightest thing in the field; `film_noise` False: the same
    view without its noise, grain and mottle (every draw as with them: the same hand, plate, tags and truth)."""
    noise_gain = 1.0 if film_noise else 0.0
    rng = np.random.default_rng(list(seed))
    finding_rng = np.random.default_rng([*seed, 1])  # a finding leaves the rest of the view as it was
    short = int(round(long_side * rng.uniform(0.58, 0.95)))
    if narrow:  # (at small sizes no narrower than a view may be: _MIN_VIEW_SIDE)
        short = max(int(round(long_side / rng.uniform(3.0, 4.5))), _MIN_VIEW_SIDE)
    landscape = n_hands > 1 or rng.random() < 0.15
    h, w = (short, long_side) if landscape else (long_side, short)
    layers, box, bone_unit, squeeze = _draw_hands(rng, finding_rng, view, anatomy, finding, ring, n_hands, narrow,
                                                  landscape, (h, w))
    soft_layer, bone_layer, metal_layer = layers
    soft = ndimage.gaussian_filter(soft_layer, 0.12 * bone_unit, truncate=2.5)  # a faint, graded halo
    film = np.random.default_rng([*seed, 2])  # a real film's margin and mottle: a stream of their own (v6), so
    wide_margin = bool(film.random() < PHANTOM_WIDE_MARGIN_SHARE)  # every other draw of the view is as before
    if wide_margin:  # part of the soft tissue's density spread into a wide, graded margin
        spread = film.uniform(*_WIDE_MARGIN_SPREAD)
        skirt = ndimage.gaussian_filter(soft_layer, film.uniform(*_WIDE_MARGIN_WIDTH) * bone_unit, truncate=2.5)
        soft = (1 - spread) * soft + spread * skirt
    mottle = bool(film.random() < PHANTOM_MOTTLE_SHARE)
    tissue = (soft > 0.12) | (bone_layer > 0.02 * bone_unit)  # the truth: where the hand shows

    ys, xs = np.nonzero(bone_layer.any(axis=1))[0], np.nonzero(bone_layer.any(axis=0))[0]
    grain = max(0.6, 0.0022 * bone_unit / 0.045)  # trabecular texture: band-pass noise modulating the bone
    noise = rng.standard_normal((h, w), dtype=np.float32)
    if len(ys):
        sl = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        texture = ndimage.gaussian_filter(noise[sl], grain, truncate=2.5)
        texture -= ndimage.gaussian_filter(texture, 3 * grain, truncate=2.5)
        texture *= rng.uniform(0.12, 0.22) / max(float(texture.std()), 1e-6)
        bone_layer[sl] *= np.clip(1 + texture, 0.3, None)
    attenuation = rng.uniform(0.28, 0.42) / squeeze**0.5 * soft + 0.95 * bone_layer / bone_unit
    signal = 1.0 - np.exp(-attenuation * rng.uniform(0.8, 1.25))

    if polarity == "light_grey":  # a light-grey background, bones still brighter than soft tissue
        background = rng.uniform(0.51, 0.7)
    elif polarity == "inverted":  # stored as a negative: mid-grey (112-127) or white background after inversion
        background = rng.choice([rng.uniform(0.5, 0.56), rng.uniform(0.0, 0.05)], p=[0.6, 0.4])
    else:
        background = rng.uniform(0.01, 0.1)
    if dim:  # a faint hand (real: "low-contrast, dim views"): a share of a normal view's contrast, whatever its
        # polarity or plate; not stacked on theirs (stacked, half the hand lay within the grain: invisible)
        span = rng.uniform(0.48, 0.7) * rng.uniform(0.25, 0.45)
    else:
        span = (rng.uniform(0.48, 0.7) if polarity == "normal" else (0.97 - background) * rng.uniform(0.8, 1.0))
        span *= rng.uniform(0.35, 0.55) if low_contrast else 1.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    heel = 1 + rng.uniform(-0.25, 0.25) * (yy / h - 0.5) + rng.uniform(-0.15, 0.15) * (xx / w - 0.5)
    image = background * heel + span * signal
    image += (rng.uniform(0.85, 1.0) - image) * np.clip(metal_layer, 0, 1)  # metal: near white

    plate, plate_corners, field, field_corners, image = _plate_and_field(rng, image, background, low_contrast, xx, yy)
    tags, tag_pixels = _draw_lead_tags(rng, image, tissue, field, background, bone_unit, dim, anatomy["left"])
    image = ndimage.gaussian_filter(image.astype(np.float32), rng.uniform(0.5, 1.2), truncate=2.5)
    image += noise_gain * noise * rng.uniform(0.006, 0.025)  # the texture's noise: a cheap, fresh-looking grain
    # film grain (quantum mottle): noise correlated over 1-3 px (of 512), which averaging down does not take away:
    # what makes a right mask's edge read as "cut" (checked against a wider soft-tissue margin, and tags beside the
    # hand: neither does; see benchmarks/mask_quality.py and the session's note)
    grain = ndimage.gaussian_filter(rng.standard_normal((h, w), dtype=np.float32),
                                    rng.uniform(1.0, 3.0) * long_side / 512, truncate=2.5)
    image += noise_gain * grain * (rng.uniform(0.005, 0.03) / max(float(grain.std()), 1e-6))
    if mottle:  # coarse mottle: noise correlated over several px, which survives the mask's working size
        coarse = ndimage.gaussian_filter(film.standard_normal((h, w), dtype=np.float32),
                                         film.uniform(*_MOTTLE_WIDTH) * long_side / 512, truncate=2.5)
        image += noise_gain * coarse * (film.uniform(*_MOTTLE_LEVEL) / max(float(coarse.std()), 1e-6))
    if polarity == "inverted":
        image = 1 - image
    shown = background if polarity != "inverted" else 1 - background
    if low_contrast:  # the surround barely differs from the plate
        surround = shown + rng.choice([-1, 1]) * rng.uniform(0.02, 0.06)
    else:  # mostly black, sometimes mid or light grey
        surround = rng.choice([rng.uniform(0.0, 0.05), rng.uniform(0.3, 0.45), rng.uniform(0.8, 1.0)],
                              p=[0.8, 0.15, 0.05])
    image = np.where(plate, image, surround + noise[::-1] * 0.004)
    pil = Image.fromarray(np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
    lead = int(rng.uniform(5, 40)) if polarity == "inverted" else int(rng.uniform(215, 250))
    marker = {0: "", 1: "tag"}.get(len(tags), f"{len(tags)} tags") + _draw_annotations(pil, rng, lead)
    tag_corners = [_rotated_box(c, s, a, np.zeros(1), np.zeros(1))[1] for c, s, a in tags]
    truth = {"pose": view, "n_hands": n_hands, "polarity": polarity, "low_contrast": low_contrast,
             "narrow": narrow, "dim": dim, "wide_margin": wide_margin, "mottle": mottle, "marker": marker,
             "plate": plate_corners, "field": field_corners, "tags": tag_corners, "mask": tissue & field & ~tag_pixels}
    return np.asarray(pil), box, truth


def _phantom_image_task(task: dict) -> dict:
    """Render and save one phantom view and its true hand mask (runs in a worker process)."""
    pixels, box, truth = _render_view(task["seed"], task["view"], task["anatomy"], task["finding"], task["ring"],
                                      task["long_side"], task["n_hands"], task["polarity"], task["low_contrast"],
                                      task["narrow"], task["dim"], task["film_noise"])
    contrast = task["finding"]["contrast"] if task["finding"] else 1.0
    if contrast != 1.0:  # the finding's difference from the same view without it, scaled, inside its box
        without = _render_view(task["seed"], task["view"], task["anatomy"], None, task["ring"], task["long_side"],
                               task["n_hands"], task["polarity"], task["low_contrast"], task["narrow"],
                               task["dim"], task["film_noise"])[0].astype(np.float32)
        x0, y0, x1, y1 = box or (0, 0, pixels.shape[1], pixels.shape[0])
        inside = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        pixels = pixels.copy()
        pixels[inside] = np.clip(without[inside] + contrast * (pixels[inside] - without[inside]) + 0.5, 0, 255)
    image = Image.fromarray(pixels, mode="L")
    if task["rgb"]:
        image = image.convert("RGB")
    path = Path(task["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=6)
    mask_path = Path(task["mask_path"])
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(truth.pop("mask")).save(mask_path, format="PNG", optimize=False, compress_level=6)
    return {"box": box, "width": image.width, "height": image.height, **truth}


def _abnormal_studies(n_studies: Sequence[int], split_of: Sequence[str], positive_rate: float,
                      rng: np.random.Generator) -> set[tuple[int, int]]:
    """Which (patient, study) slots are abnormal: in each split exactly round(positive_rate x its studies), drawn
    at random, and at least one of each class in a split of 2+ studies (so every split's AUROC is defined)."""
    abnormal = set()
    for split in SPLITS:
        slots = [(i, s) for i, n in enumerate(n_studies) if split_of[i] == split for s in range(1, n + 1)]
        k = int(round(positive_rate * len(slots)))
        if len(slots) >= 2 and 0 < positive_rate < 1:
            k = min(max(k, 1), len(slots) - 1)
        abnormal |= {slots[j] for j in rng.permutation(len(slots))[:k]}
    return abnormal


def _plan_finding(rng: np.random.Generator, finding_kinds: Sequence[str], finding_scale: float,
                  finding_contrast: float) -> dict:
    """An abnormal study's planted finding: its kind (PHANTOM_FINDING_MIX's shares among `finding_kinds`), its
    bone (_FINDING_BONES: fractures and lesions on the bones wide enough to show them at the training sizes),
    where along it, and each kind's draws (tilt, displacement, size, hardware)."""
    mix = np.array([PHANTOM_FINDING_MIX[k] for k in finding_kinds])
    kind = str(rng.choice(list(finding_kinds), p=mix / mix.sum()))
    bones = _FINDING_BONES["hardware" if kind == "hardware" else "bone"]
    bone = str(rng.choice(list(bones), p=list(bones.values())))
    return {
        "kind": kind, "bone": bone,
        "t": rng.uniform(0.7, 0.9) if bone == "radius" else rng.uniform(0.3, 0.7),  # the distal radius
        "tilt": rng.uniform(-35, 35),
        "displacement": rng.uniform(*_FRACTURE_DISPLACEMENT) * rng.choice([-1, 1]), "size": rng.uniform(*_LESION_SIZE),
        "hardware": str(rng.choice(["plate", "wires"], p=[0.6, 0.4])), "screws": int(rng.integers(2, 5)),
        "scale": finding_scale, "contrast": finding_contrast,
    }


def _plan_phantom(n_patients: int, seed: int, valid_fraction: float, positive_rate: float,
                  body_parts: Sequence[str], long_side: int, finding_kinds: Sequence[str] = PHANTOM_FINDINGS,
                  finding_scale: float = 1.0, finding_contrast: float = 1.0,
                  film_noise: bool = True) -> tuple[list[dict], list[dict]]:
    """Decide every patient, study, label, view and planted finding; return (studies, image tasks)."""
    rng = np.random.default_rng(seed)
    n_valid = max(1, int(round(n_patients * valid_fraction))) if n_patients > 1 else 0
    studies, tasks = [], []
    split_of = ["valid" if i >= n_patients - n_valid else "train" for i in range(n_patients)]
    plan_rng = np.random.default_rng([seed, 1])  # studies and labels first: each split's abnormal share is exact
    n_studies_of = plan_rng.choice([1, 2, 3], size=n_patients, p=[0.75, 0.18, 0.07]).tolist()
    abnormal = _abnormal_studies(n_studies_of, split_of, positive_rate, plan_rng)
    for i in range(n_patients):
        split = split_of[i]
        patient = f"patient{i + 1:05d}" if split == "train" else f"patient{11185 + i:05d}"
        body_part = body_parts[(i if split == "train" else i - (n_patients - n_valid)) % len(body_parts)]
        anatomy = {
            "size": rng.uniform(0.9, 1.1), "left": bool(rng.random() < 0.45),
            "lengths": {f: rng.uniform(0.94, 1.06) for f in _FINGERS},
        }
        ring = str(rng.choice(["ring", "middle", "little"])) if rng.random() < 0.2 else None
        for s in range(1, n_studies_of[i] + 1):
            label = int((i, s) in abnormal)
            n_views = int(rng.choice([1, 2, 3, 4, 5], p=[0.03, 0.22, 0.68, 0.05, 0.02]))
            finding = None
            if label:
                finding = _plan_finding(rng, finding_kinds, finding_scale, finding_contrast)
                shows = rng.random(n_views) < 0.8
                shows[rng.integers(n_views)] = True  # at least one view shows it
            study = f"study{s}_{'positive' if label else 'negative'}"
            rel = (split, body_part, patient, study)
            studies.append({"key": rel, "label": label})
            for v in range(n_views):
                view = str(rng.choice(PHANTOM_POSES, p=[0.32, 0.18, 0.28, 0.22]))  # half lateral or flexed
                tasks.append({
                    "key": rel, "image": f"image{v + 1}.png", "view": view, "anatomy": anatomy,
                    "n_hands": 2 if view == "pa" and rng.random() < 0.16 else 1,  # about 5% of the views
                    "polarity": str(rng.choice(PHANTOM_POLARITIES, p=[0.82, 0.1, 0.08])),
                    "low_contrast": bool(rng.random() < 0.1),  # the plate barely differs from its surround
                    "finding": finding if label and shows[v] else None, "finding_kind": finding and finding["kind"],
                    "ring": ring if (ring and rng.random() < 0.9) else None, "rgb": bool(rng.random() < 0.45),
                    "seed": (seed, i, s, v), "long_side": long_side, "film_noise": film_noise,
                })
    for t in tasks:  # harder kinds of real view, each view drawn from a generator of its own (the plan above as before)
        kinds = np.random.default_rng([*t["seed"], 24])
        t["narrow"] = t["n_hands"] == 1 and bool(kinds.random() < 0.06)  # a close-up, 3-4.5 times as tall as wide
        t["dim"] = bool(kinds.random() < 0.07)  # a faint hand, a bright lead tag
    return studies, tasks


def make_phantom_mura(
    root: str | os.PathLike,
    n_patients: int = PHANTOM_PATIENTS,
    seed: int = 0,
    valid_fraction: float = 0.15,
    positive_rate: float = 0.26,
    body_parts: Sequence[str] = ("XR_HAND",),
    image_size: int = 512,
    workers: int | None = None,
    progress: bool = True,
    finding_kinds: Sequence[str] = PHANTOM_FINDINGS,
    finding_scale: float = 1.0,
    finding_contrast: float = 1.0,
    film_noise: bool = True,
) -> Path:
    """Write a synthetic hand-radiograph dataset in MURA-v1.1's exact layout under `root`; return its path.

    Same arguments, same bytes. Each split holds exactly round(positive_rate x its studies) abnormal studies (at
    least one of each class in a split of 2+ studies). An abnormal study shows one planted finding, of a kind drawn
    from `finding_kinds` (fracture, hardware, lesion; PHANTOM_FINDING_MIX's shares), in most of its views;
    `finding_scale` multiplies its size (the fracture's gap and displacement, the lesion's diameter, the metal's
    width) and `finding_contrast` (0-1] its difference from the same view without it. `film_noise` False draws
    every view without its noise, film grain and mottle, all else as with them (a control: what the noise costs a
    method, e.g. the hand masks in benchmarks/mask_quality.py). Besides the four official
    CSVs it writes `phantom_findings.csv`: one row per view that shows a planted abnormality with its box in
    pixels, and the per-view truth (`phantom_truth.csv` and one hand-mask PNG per view under `phantom_truth/`;
    see load_phantom_truth).
    """

    _check_phantom_settings(body_parts, finding_kinds, finding_scale, finding_contrast)
    if not isinstance(film_noise, bool):
        raise ValueError(f"film_noise must be True or False, got {film_noise!r}")
    mura = Path(root) / MURA_DIRNAME
    if mura.exists():
        _remove_own_phantom(mura)  # only a phantom this code made; anything else is refused, never overwritten
    settings = {"made_by": PHANTOM_MADE_BY, "version": PHANTOM_VERSION, "n_patients": n_patients, "seed": seed,
                "valid_fraction": valid_fraction, "positive_rate": positive_rate, "body_parts": list(body_parts),
                "image_size": image_size, "finding_kinds": list(finding_kinds), "finding_scale": finding_scale,
                "finding_contrast": finding_contrast, "film_noise": film_noise}
    _write_json_atomic({**settings, "complete": False}, mura / PHANTOM_MANIFEST)  # marks the folder as ours
    studies, tasks = _plan_phantom(n_patients, seed, valid_fraction, positive_rate, body_parts, image_size,
                                   finding_kinds, finding_scale, finding_contrast, film_noise)
    for t in tasks:
        t["path"] = str(mura.joinpath(*t["key"], t["image"]))
        t["mask_path"] = str(mura / _truth_mask_name(t["key"], t["image"]))
    results = _run_tasks(_phantom_image_task, tasks, "phantom images", progress, workers)
    _write_phantom_csvs(mura, studies, tasks)
    _write_phantom_truth(mura, tasks, results)
    manifest = {**settings, "n_studies": len(studies), "n_images": len(tasks),
                "files": sorted({p.name for p in mura.iterdir()} | {PHANTOM_MANIFEST}), "complete": True}
    _write_json_atomic(manifest, mura / PHANTOM_MANIFEST)  # complete: rewritten last
    return mura


def _check_phantom_settings(body_parts: Sequence[str], finding_kinds: Sequence[str], finding_scale: float,
                            finding_contrast: float) -> None:
    """Refuse a phantom's settings that name an unknown body part or finding kind, or scale a finding to nothing."""
    unknown = [p for p in body_parts if p not in BODY_PARTS]
    if unknown:
        raise MuraDataError(f"unknown body part(s) {unknown}: choose from {list(BODY_PARTS)}")
    if not finding_kinds or set(finding_kinds) - set(PHANTOM_FINDINGS):
        raise ValueError(f"finding_kinds must be some of {PHANTOM_FINDINGS}, got {finding_kinds!r}")
    if not finding_scale > 0 or not 0 < finding_contrast <= 1:
        raise ValueError(f"finding_scale must be > 0 and finding_contrast in (0, 1], got {finding_scale!r} and "
                         f"{finding_contrast!r}")


def _write_phantom_csvs(mura: Path, studies: list[dict], tasks: list[dict]) -> None:
    """MURA's four official CSVs for a phantom: each split's labelled studies and its image paths."""
    for split in SPLITS:
        rel = [s for s in studies if s["key"][0] == split]
        lines = [f"{MURA_DIRNAME}/{'/'.join(s['key'])}/,{s['label']}" for s in rel]
        (mura / f"{split}_labeled_studies.csv").write_text("".join(line + "\n" for line in lines))
        images = [f"{MURA_DIRNAME}/{'/'.join(t['key'])}/{t['image']}" for t in tasks if t["key"][0] == split]
        (mura / f"{split}_image_paths.csv").write_text("".join(p + "\n" for p in images))


def _write_phantom_truth(mura: Path, tasks: list[dict], results: list[dict]) -> None:
    """The phantom's truth tables: phantom_findings.csv (each view showing a finding, its box) and
    phantom_truth.csv (each view's pose, hands, polarity, plate, field, tags and mask file)."""
    findings = [
        {"split": t["key"][0], "body_part": t["key"][1], "patient": t["key"][2], "study": t["key"][3],
         "image_path": f"{MURA_DIRNAME}/{'/'.join(t['key'])}/{t['image']}", "view_type": t["view"],
         "finding": t["finding"]["kind"], "bone": t["finding"]["bone"],
         "x0": r["box"][0], "y0": r["box"][1], "x1": r["box"][2], "y1": r["box"][3],
         "width": r["width"], "height": r["height"]}
        for t, r in zip(tasks, results) if t["finding"] is not None and r["box"] is not None
    ]
    columns = ["split", "body_part", "patient", "study", "image_path", "view_type", "finding", "bone",
               "x0", "y0", "x1", "y1", "width", "height"]
    pd.DataFrame(findings, columns=columns).to_csv(mura / PHANTOM_FINDINGS_CSV, index=False)
    truth = pd.DataFrame([
        {"split": t["key"][0], "body_part": t["key"][1], "patient": t["key"][2], "study": t["key"][3],
         "image_path": f"{MURA_DIRNAME}/{'/'.join(t['key'])}/{t['image']}", "view_type": r["pose"],
         "n_hands": r["n_hands"], "polarity": r["polarity"], "low_contrast": r["low_contrast"],
         "narrow": r["narrow"], "dim": r["dim"], "wide_margin": r["wide_margin"], "mottle": r["mottle"],
         "marker": r["marker"], "plate": json.dumps(r["plate"]),
         "field": json.dumps(r["field"]), "tags": json.dumps(r["tags"]),
         "mask_path": _truth_mask_name(t["key"], t["image"]), "width": r["width"], "height": r["height"]}
        for t, r in zip(tasks, results)])
    truth.to_csv(mura / PHANTOM_TRUTH_CSV, index=False)


def ensure_phantom(root: str | os.PathLike = "data/phantom", **kwargs) -> Path:
    """Return the phantom MURA-v1.1 under `root`, generating it only when missing, incomplete or made otherwise;
    a folder that is not a phantom this code made is never deleted (MuraDataError)."""
    mura = Path(root) / MURA_DIRNAME
    params = inspect.signature(make_phantom_mura).parameters
    settings = {k: kwargs.get(k, params[k].default) for k in _PHANTOM_SETTINGS}
    settings = {"version": PHANTOM_VERSION, **settings, "body_parts": list(settings["body_parts"]),
                "finding_kinds": list(settings["finding_kinds"])}
    made = _phantom_manifest(mura)
    if made is not None and made.get("complete", True):
        # a setting added after the phantom was made (film_noise) is its default there: the views drawn as now
        recorded = {k: made.get(k, params[k].default if k in params else None) for k in settings}
        if recorded == settings:
            return mura
    return make_phantom_mura(root, **kwargs)  # removes an older or unfinished phantom of ours first


def _phantom_manifest(mura: Path) -> dict | None:
    """The phantom manifest in `mura` when this code wrote it (marked, or a version-1/2 manifest); else None."""
    path = mura / PHANTOM_MANIFEST
    try:
        made = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(made, dict):
        return None
    legacy = {"version", "n_patients", "seed", "image_size", "n_images"} <= set(made)  # before the marker
    return made if made.get("made_by") == PHANTOM_MADE_BY or legacy else None


def _foreign_phantom_entries(mura: Path, made: dict) -> list[str]:
    """What in `mura` a phantom does not write (beside its own files: split/XR_*/patientN/studyN_*/imageN.png)."""
    own = set(made.get("files", ())) | set(_PHANTOM_FILES)
    foreign = []
    for entry in mura.iterdir():
        if entry.name not in SPLITS or not entry.is_dir():
            if entry.name not in own and not entry.name.startswith("phantom_"):
                foreign.append(str(entry))
            continue
        for path in entry.rglob("*"):
            parts = path.relative_to(entry).parts
            expected = [lambda n: n in BODY_PARTS, _PATIENT_DIR_RE.match, _STUDY_DIR_RE.match,
                        lambda n: re.fullmatch(r"image\d+\.png", n)]
            if len(parts) > 4 or not expected[len(parts) - 1](parts[-1]) or path.is_dir() == (len(parts) == 4):
                foreign.append(str(path))
    return sorted(foreign)


def _remove_own_phantom(mura: Path) -> None:
    """Delete `mura` when it is a phantom this code made and holds nothing else; otherwise raise, deleting nothing."""
    entries = sorted(p.name for p in mura.iterdir()) if mura.is_dir() else [mura.name]
    if not entries:
        mura.rmdir()
        return
    made = _phantom_manifest(mura) if mura.is_dir() else None
    if made is None:
        raise MuraDataError(
            f"{mura}: not a phantom made by this suite (no {PHANTOM_MANIFEST} of ours; it holds "
            f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}), so it is left alone, never deleted or "
            f"overwritten. To use this data set data_dir to it; for the phantom, choose an empty or new phantom_dir.")
    foreign = _foreign_phantom_entries(mura, made)
    if foreign:
        raise MuraDataError(
            f"{mura}: a phantom folder that also holds {len(foreign)} file(s) the phantom did not write "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); nothing was deleted. Move them out "
            f"(or the phantom folder away) and run again to remake the phantom.")
    shutil.rmtree(mura)


def load_phantom_findings(data_dir: str | os.PathLike) -> pd.DataFrame:
    """Return the phantom's ground truth (one row per view showing a planted finding, with its box)."""
    root = find_mura_root(data_dir)
    path = root / PHANTOM_FINDINGS_CSV
    if not path.is_file():
        raise MuraDataError(f"{path}: no phantom ground truth here (only phantom datasets carry one)")
    findings = pd.read_csv(path)
    findings["image_file"] = [str(root.joinpath(*_relative_key(p))) for p in findings["image_path"]]
    return findings


def _truth_mask_name(key: Sequence[str], image: str) -> str:
    """A view's hand-mask file, relative to the MURA root: phantom_truth/<split>_<part>_<patient>_<study>_<image>."""
    return f"{_PHANTOM_TRUTH_DIR}/{'_'.join(key)}_{image}"


def load_phantom_truth(data_dir: str | os.PathLike) -> pd.DataFrame:
    """Return the phantom's per-view truth: one row per view, keyed by image_path as load_phantom_findings.

    Columns: split, body_part, patient, study, image_path (official relative form), image_file (absolute),
    view_type (pa, oblique, lateral, flexed), n_hands, polarity (normal, light_grey: a light background not
    inverted, inverted), low_contrast, narrow (a close-up 3-4.5 times as tall as wide), dim (a faint hand, a
    bright lead tag), wide_margin (a wide, graded soft-tissue margin) and mottle (coarse film mottle; both v6+),
    marker ("tag", "2 tags", "+strip" with a marker strip, "" for none), plate and field (4 [x, y] corners in the
    view's pixels, [] when the plate fills the view / no collimation), tags (a list of the lead tags' 4 corners:
    not hand), n_tags, mask_path (relative), mask_file (absolute: read it with
    phantom_hand_mask), width, height, and a column per kind of view (PHANTOM_VIEW_KINDS; see _phantom_view_kinds).
    Version 3 phantoms have no tags in their truth (their glyphs count as hand), narrow or dim views.
    """
    root = find_mura_root(data_dir)
    path = root / PHANTOM_TRUTH_CSV
    if not path.is_file():
        raise MuraDataError(f"{path}: no phantom truth here (only phantom datasets of version 3 or later carry one)")
    truth = pd.read_csv(path, keep_default_na=False)
    truth["image_file"] = [str(root.joinpath(*_relative_key(p))) for p in truth["image_path"]]
    truth["mask_file"] = [str(root / p) for p in truth["mask_path"]]
    for column, default in (("tags", "[]"), ("narrow", False), ("dim", False),  # (absent in version 3)
                            ("wide_margin", False), ("mottle", False)):  # (absent before version 6)
        if column not in truth:
            truth[column] = default
    for column in ("plate", "field", "tags"):
        truth[column] = [json.loads(v) for v in truth[column]]
    for column in ("low_contrast", "narrow", "dim", "wide_margin", "mottle"):
        truth[column] = truth[column].astype(str).str.lower() == "true"
    truth["n_tags"] = truth["tags"].map(len)
    return truth.join(_phantom_view_kinds(truth))


# the kinds of view a mask check is split by (a view may be of several kinds; "plain" is of none)
PHANTOM_VIEW_KINDS = ("tags", "narrow", "light_grey", "inverted", "low_contrast", "dim", "two_hands", "plain")


def _phantom_view_kinds(truth: pd.DataFrame) -> pd.DataFrame:
    """One boolean column per kind of view (PHANTOM_VIEW_KINDS, prefixed "kind_") for a truth table's rows: lead
    tags in the field, narrow (3+ times as tall as wide), a light-grey or an inverted background, a low-contrast
    plate, a dim hand, two hands; plain: none of these."""
    kinds = pd.DataFrame({
        "kind_tags": truth["n_tags"] > 0, "kind_narrow": truth["narrow"].astype(bool),
        "kind_light_grey": truth["polarity"] == "light_grey", "kind_inverted": truth["polarity"] == "inverted",
        "kind_low_contrast": truth["low_contrast"].astype(bool), "kind_dim": truth["dim"].astype(bool),
        "kind_two_hands": truth["n_hands"] == 2}, index=truth.index)
    kinds["kind_plain"] = ~kinds.any(axis=1)
    return kinds


def phantom_hand_mask(view) -> np.ndarray:
    """The true hand mask (bone and soft tissue of every hand, where exposed) in the original view's pixels, as
    bool (H, W): of a load_phantom_truth row (Series, itertuples row or dict) or of a mask file's path."""
    path = view if isinstance(view, (str, os.PathLike)) else getattr(view, "mask_file", None)
    if path is None:
        path = view["mask_file"]
    with Image.open(path) as im:
        return np.asarray(im.convert("1"), dtype=bool)


def phantom_boxes(data_dir: str | os.PathLike) -> pd.DataFrame | None:
    """The phantom's ground truth when the dataset is a phantom; None for real MURA (which has no boxes)."""
    root = find_mura_root(data_dir)
    return load_phantom_findings(root) if (root / PHANTOM_FINDINGS_CSV).is_file() else None


# ---------------------------------------------------------------- learning controls: checks that can fail

def permuted_labels_copy(data_dir: str | os.PathLike, dest: str | os.PathLike, seed: int = 0,
                         split: str = "train") -> Path:
    """A copy of a MURA folder (images hard-linked where the file system allows) whose `split` studies carry
    labels permuted by patient: each patient takes the study labels of another patient with as many studies
    (seeded), so the split's abnormal share and every patient's study count stay. A negative control: a model
    trained on it has nothing to learn that holds on the other split."""
    root = find_mura_root(data_dir)
    mura = Path(dest) / MURA_DIRNAME
    if mura.exists():
        raise MuraDataError(f"{mura}: already exists; choose an empty dest for the permuted copy")
    rng = np.random.default_rng(seed)
    new_suffix = {}
    for part in BODY_PARTS:
        studies = load_studies(root, split, part, verify_images=False) if (root / split / part).is_dir() else None
        if studies is None or studies.empty:
            continue
        by_patient = studies.groupby("patient", sort=True)
        patients = pd.DataFrame({"labels": by_patient["label"].apply(list), "study_paths": by_patient["study_path"]
                                 .apply(list)})
        for _, group in patients.groupby(patients["labels"].str.len(), sort=True):
            donors = group["labels"].to_numpy()[rng.permutation(len(group))]
            for paths, labels in zip(group["study_paths"], donors):
                new_suffix.update({_relative_key(path)[:4]: "positive" if label else "negative"
                                   for path, label in zip(paths, labels)})

    def renamed(relative: str) -> str:  # a CSV's path with the study folder's suffix changed
        key = _relative_key(relative)
        if key[:4] not in new_suffix:
            return relative
        name = _STUDY_DIR_RE.sub(lambda m: f"study{m.group(1)}_{new_suffix[key[:4]]}", key[3])
        return "/".join((MURA_DIRNAME, *key[:3], name, *key[4:])) + ("/" if relative.endswith("/") else "")

    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] in SPLITS):
        target = mura / renamed("/".join((MURA_DIRNAME, *path.relative_to(root).parts))).split("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    for s in SPLITS:
        for kind in ("labeled_studies", "image_paths"):
            csv = root / f"{s}_{kind}.csv"
            if not csv.is_file():
                continue
            lines = []
            for line in csv.read_text().splitlines():
                path, *rest = line.split(",")
                new = renamed(path) if path.strip() else path
                if rest and new != path:  # a labelled study: its label follows its folder's suffix
                    rest = [str(_LABEL_OF_SUFFIX[_STUDY_DIR_RE.match(_relative_key(new)[3]).group(2)])]
                lines.append(",".join([new, *rest]))
            (mura / csv.name).write_text("".join(line + "\n" for line in lines))
    return mura


CAM_MIN_HARDWARE_HITS = 0.5  # a learned model's CAM peak lies on the hardware in at least this share of the
#   hardware views it catches (issue 22: "CAMs that point at hardware in at least half of the caught hardware views")


def cam_hardware_hits(localisation: pd.DataFrame, threshold: float = 0.5) -> tuple[int, int]:
    """Of the hardware views a model catches (view probability > `threshold`), how many have their CAM's peak on
    the planted hardware (heatmap_localisation's pointing game): (hits, caught)."""
    caught = localisation[(localisation["finding"] == "hardware") & (localisation["prob"] > threshold)]
    return int(caught["pointing_hit"].sum()), len(caught)


COLLAPSED_IQR = 0.01  # test studies' probabilities whose quartiles lie closer than this: the model gives nearly
#   every study one answer (phantom v7, lesions only, 64 px, DenseNet-121 from scratch, 403 test studies: a run
#   whose training loss stayed at a constant answer's spread them 0.0017 apart at best.pt; one that memorised its
#   training views, not the lesions (training AUROC 0.72, test 0.45), 0.045 at best.pt and 0.079 at its last epoch)


def probability_spread(probs: Sequence[float]) -> float:
    """The interquartile range of a model's study probabilities."""
    return float(np.subtract(*np.percentile(probs, [75, 25])))  # (75, 25: the quartiles)


def probabilities_collapsed(probs: Sequence[float]) -> float | None:
    """probability_spread when it is under COLLAPSED_IQR (the model gives nearly every study the same answer: it
    found nothing to tell them apart by), else None."""
    spread = probability_spread(probs)
    return spread if spread < COLLAPSED_IQR else None


def learning_verdict(headline: pd.DataFrame, localisation: pd.DataFrame | None = None,
                     probs: Sequence[float] | None = None) -> tuple[bool, str]:
    """Whether the model of a headline_table learned: its test AUROC's 95% interval above chance (0.5) and above
    every model-free floor's test AUROC (phantom; max(AUROC, 1 - AUROC)) and, given the CAMs' `localisation`
    (phantom), its CAMs on the hardware in CAM_MIN_HARDWARE_HITS of the hardware views it catches; with the one line
    that says so or not. Given the test studies' `probs`, a model that did not learn and gives nearly every study
    one answer (probabilities_collapsed) is said to."""
    auroc = headline.loc["auroc"]
    floors = {name.split(": ", 1)[1]: max(row["test"], 1 - row["test"]) for name, row in headline.iterrows()
              if name.startswith("auroc, no model: ")}  # a floor below 0.5 runs the other way: as good turned
    floor_name, floor = max(floors.items(), key=lambda kv: kv[1]) if floors else (None, 0.5)
    bar = max(0.5, floor)
    shown = f"test AUROC {auroc['test']:.3f} [{auroc['test_ci_low']:.3f}, {auroc['test_ci_high']:.3f}]"
    against = "chance (0.5)" + (f" and the model-free floor ({floor_name}: {floor:.3f})" if floor_name else "")
    if auroc["test_ci_low"] <= bar:
        spread = None if probs is None else probabilities_collapsed(probs)
        collapsed = ("" if spread is None else f"; its test probabilities lie within {spread:.4f} of each other "
                     f"(interquartile range): it gives nearly every study one answer, having found nothing to "
                     f"tell them apart by")
        return False, (f"NOT SHOWN TO LEARN: {shown}; its 95% interval does not clear {against}, so these "
                       f"numbers are no better than a model-blind rule{collapsed}")
    hits, caught = (0, 0) if localisation is None else cam_hardware_hits(localisation)
    if not caught:
        looked = "" if localisation is None else "; it catches no hardware view, so where its CAMs point is unchecked"
        return True, f"LEARNED: {shown}; its 95% interval lies above {against}{looked}."
    cams = f"its CAMs point at the hardware in {hits} of the {caught} hardware views it catches"
    if hits < CAM_MIN_HARDWARE_HITS * caught:
        return False, (f"NOT SHOWN TO LEARN: {shown} clears {against}, but {cams}: it may be reading something "
                       f"other than the findings")
    return True, f"LEARNED: {shown}; its 95% interval lies above {against}, and {cams}."


# The supervised control: a phantom whose only finding is enlarged hardware, half of each split abnormal (the
# test: 30% of the patients, 20 abnormal studies of 39), a from-scratch DenseNet-121 at 32 px, a quarter of the
# training patients for selection; settings measured on a 2-core CPU (tests/test_learning.py says why each)
SUPERVISED_CONTROL = {
    "phantom": {"n_patients": 100, "seed": 0, "image_size": 128, "valid_fraction": 0.3, "positive_rate": 0.5,
                "finding_kinds": ("hardware",), "finding_scale": 3.0},
    "train": {"arch": "densenet121", "image_size": 32, "epochs": 5, "lr": 1e-3, "batch_size": 16,
              "tune_fraction": 0.25, "pretrained": False},
    "min_auroc": 0.90, "max_permuted_auroc": 0.65,
}


def supervised_control(workdir: str | os.PathLike, permuted: bool = False, seed: int = 0, progress: bool = False,
                       **overrides) -> dict:
    """Run the supervised learning control in `workdir` through the suite's own path: the control phantom
    (SUPERVISED_CONTROL) -> train -> predict_studies on MURA's validation split (the test) -> study_metrics; with
    `permuted`, the same run on a copy whose training labels are permuted by patient (permuted_labels_copy, seeded
    by `seed`). `overrides`: TrainConfig fields. Returns the test AUROC, its 95% interval (by patient), the test's
    study counts, the run's history and its folder."""
    workdir = Path(workdir)
    root = ensure_phantom(workdir / "phantom", progress=progress, **SUPERVISED_CONTROL["phantom"])
    name = f"{'permuted' if permuted else 'labels'}_seed{seed}"
    if permuted:
        shutil.rmtree(workdir / name, ignore_errors=True)
        root = permuted_labels_copy(root, workdir / name, seed)
    cfg = TrainConfig(**{"data_dir": str(root), "output_dir": str(workdir / "runs" / name),
                         "cache_dir": str(workdir / "cache"), "num_workers": 0, "keep_top_k": 0, "seed": seed,
                         **SUPERVISED_CONTROL["train"], **overrides})
    history = train(cfg, progress=progress)
    test = run_studies(cfg)["test"]
    model, _ = load_checkpoint(Path(cfg.output_dir) / "checkpoints" / "best.pt")
    preds = predict_studies(model, test, cfg.image_size, cfg.resize, cfg.cache_dir, device=cfg.device,
                            upright=cfg.upright)
    preds = preds.merge(test[["study_path", "patient"]], on="study_path")
    low, high = auroc_interval(preds["label"], preds["prob"], patients=preds["patient"])
    return {"test_auroc": study_metrics(preds["label"], preds["prob"])["auroc"], "ci_low": low, "ci_high": high,
            "test_studies": len(preds), "test_abnormal": int(preds["label"].sum()), "permuted": permuted,
            "seed": seed, "history": history, "run_dir": cfg.output_dir}


# The unsupervised control: a phantom whose only finding is enlarged hardware, a quarter of the studies abnormal
# (the paper's split needs more normal-only patients than others), the suite's CAE at 64 px; its views that show
# the hardware against the normal studies' views of its test subset (29 and 56 views). Measured on a shared 2-core
# CPU (one thread, load 5-7; a run took 45-180 s), test image AUROC of "mse_top200" for training seeds 0-4:
# phantom v6, pipeline 13 (6 epochs): 0.947, 0.945, 0.951, 0.946, 0.951; pipeline 12: 0.948, 0.964, 0.955,
# 0.945, 0.953; phantom v5, pipeline 11 (6 epochs): 0.947, 0.946, 0.950, 0.943, 0.949; with 12 epochs, pipeline
# 10: 0.947, 0.935, 0.950, 0.943, 0.949; pipeline 9: 0.944, 0.943, 0.959, 0.955, 0.952; pipeline 8: 0.933,
# 0.937, 0.933, 0.917, 0.937. Broken on purpose (seed 0, pipeline 9): a fresh, untrained CAE scored instead of
# best.pt 0.835 (its error follows the brightest pixels alone). Why each setting:
# - variant "full" (hand mask, no histogram equalisation): equalisation spreads every view's grey levels evenly,
#   so bright bone ends up as white as the metal (our reading; seed 0, scale 2, mse: "full+HE" 0.57 after 30
#   epochs, "full" 0.83 after 20);
# - finding_scale 8: wider metal, which the 64-px views keep; at scale 5 the worst of seeds 0-4 fell to 0.82
#   (mse, pipeline 9) or 0.90 (mse_top200), as the normal views the CAE reconstructs worst (light-grey and
#   inverted ones, 18% of views) outscored hardware in low-contrast views;
# - "mse_top200", for selecting best.pt and for the test: the hardware is a few hundred of a view's 4096 pixels;
#   the whole view's mse also follows how well the rest of the hand is rebuilt, and selecting by it the worst of
#   seeds 0-4 was 0.93 (pipeline 8) but 0.84 (pipeline 9): it rides on which epoch the noisy validation picks;
# - 6 epochs (132 normal training views): the validation AUROC swings from epoch to epoch and peaks early; with
#   8 epochs best.pt came from the first 4 for every seed 0-4 (pipeline 11), and 6 epochs give the same AUROCs
#   to the last digit (seed 0 with 12 epochs too) in half the time; an epoch took 1.5 s (2 threads) to 5.5 s
#   (1 thread, CPU shared).
# The views keep their markings (lead tags, annotation text scaled with the view): leaving them out
# (measured with a control-only switch, since removed) moved the AUROC by under 0.02
UNSUPERVISED_CONTROL = {
    "phantom": {"n_patients": 90, "seed": 0, "image_size": 128, "valid_fraction": 0.05, "positive_rate": 0.25,
                "finding_kinds": ("hardware",), "finding_scale": 8.0},
    "train": {"model": "cae", "recipe": "suite", "variant": "full", "image_size": 64, "epochs": 6,
              "batch_size": 16, "select_score": "mse_top200"},
    "score": "mse_top200", "min_auroc": 0.90,
}


def unsupervised_control(workdir: str | os.PathLike, seed: int = 0, progress: bool = False, **overrides) -> dict:
    """Run the unsupervised learning control in `workdir`: the suite's CAE trained (train_anomaly) on the normal
    views of the control phantom (UNSUPERVISED_CONTROL), then every score of its best.pt on the test subset, as
    image-level AUROCs of the views that show the hardware against the normal studies' views. `overrides`:
    AnomalyConfig fields. Returns {score: AUROC}, the view counts, the run's history and its folder."""
    workdir = Path(workdir)
    root = ensure_phantom(workdir / "phantom", progress=progress, **UNSUPERVISED_CONTROL["phantom"])
    cfg = AnomalyConfig(**{"data_dir": str(root), "output_dir": str(workdir / "runs" / f"cae_seed{seed}"),
                           "cache_dir": str(workdir / "cache"), "num_workers": 0, "seed": seed,
                           **UNSUPERVISED_CONTROL["train"], **overrides})
    history = train_anomaly(cfg, progress=progress)
    data = prepare_anomaly_data(cfg, progress=False)
    model, _ = load_anomaly_model(Path(cfg.output_dir) / "checkpoints" / "best.pt")
    test = data["images"][data["images"]["subset"] == "test"]
    scores = evaluate_anomaly(model, data["cache"], test, cfg, resolve_device(cfg.device))
    shows = scores["image_path"].isin(set(load_phantom_findings(root)["image_file"]))
    views = scores[shows | (scores["label"] == 0)]
    names = [c for c in views.columns if c not in _SCORE_ID_COLUMNS]
    return {"image_auroc": {n: float(roc_auc_score(shows[views.index], views[n])) for n in names},
            "hardware_views": int(shows.sum()), "normal_views": int((scores["label"] == 0).sum()),
            "history": history, "run_dir": cfg.output_dir}


# ---------------------------------------------------------------- command line: python -m mura_helpers

_REPO_URL_LINE = re.compile(r"^REPO_URL = .*$", re.MULTILINE)  # the setup cell's form field


def _repository_url(root: Path) -> str:
    """The git URL in pyproject.toml's [project.urls] Repository ("" while it is not set); needs Python 3.11+."""
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return project.get("urls", {}).get("Repository", "")


def _stamp_colab_url(root: Path) -> list[Path]:
    """Set REPO_URL in each notebook's setup cell (its first code cell) to _repository_url(root), so a notebook
    opened from GitHub in Colab clones this repository; return the notebooks that changed."""
    import nbformat

    line = f'REPO_URL = {json.dumps(_repository_url(root))}  # @param {{type:"string"}}'
    changed = []
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        setup = next(c for c in nb.cells if c.cell_type == "code")
        source, found = _REPO_URL_LINE.subn(lambda _: line, setup.source)
        if found != 1:
            raise SystemExit(f"{path}: its setup cell has {found} REPO_URL lines, not one")
        if source != setup.source:
            setup.source = source
            nbformat.write(nb, path)
            changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mura_helpers train --config run.json`: train the run a JSON TrainConfig describes (a run's own
    config.json resumes it); `train-anomaly` the same for an AnomalyConfig (an autoencoder or a GAN); under
    `torchrun --nproc_per_node=N` it trains on N processes (the GANs: one). `colab-url` (maintainers, `make
    colab-url`) writes pyproject.toml's [project.urls] Repository into the notebooks' setup cells."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mura_helpers", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stamper = commands.add_parser("colab-url", help="write pyproject.toml's repository URL into the notebooks' "
                                                    "setup cells (their REPO_URL field, which Colab shows)")
    stamper.add_argument("--root", type=Path, default=Path(__file__).resolve().parent,
                         help="the repository (default: this module's folder)")
    runners = {"train": (TrainConfig, train, "train (or resume) the supervised DenseNet of a TrainConfig"),
               "train-anomaly": (AnomalyConfig, train_anomaly, "train (or resume) the unsupervised model of an "
                                                               "AnomalyConfig")}
    for name, (config_class, _, help_text) in runners.items():
        trainer = commands.add_parser(name, help=help_text)
        trainer.add_argument("--config", required=True, help=f"a JSON object of {config_class.__name__} fields")
        trainer.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines only)")
    args = parser.parse_args(argv)
    if args.command == "colab-url":
        changed = _stamp_colab_url(args.root)
        print(f"REPO_URL = {_repository_url(args.root)!r} in the setup cells; changed: "
              f"{', '.join(p.name for p in changed) or 'none'}")
        return 0
    config_class, runner, _ = runners[args.command]
    path = Path(args.config)
    try:
        fields = json.loads(path.read_bytes())  # UTF-8, -16 or -32, with or without a byte-order mark
    except UnicodeDecodeError as e:
        parser.error(f"{path}: not UTF-8 text (nor UTF-16 or UTF-32): {e.reason} at byte {e.start}; save it as UTF-8")
    except (OSError, json.JSONDecodeError) as e:
        parser.error(f"{path}: cannot read a JSON config ({e})")
    known = config_class.__dataclass_fields__
    unknown = sorted(set(fields) - set(known)) if isinstance(fields, dict) else None
    if unknown is None or unknown:
        parser.error(f"{path}: not a {config_class.__name__}: " + (
            f"unknown fields {unknown}; known: {sorted(known)}" if unknown else "the file holds no JSON object"))
    try:
        runner(config_class(**fields), progress=not args.no_progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
