"""Shared helpers for the MURA hand-radiograph notebook suite.

Reads top to bottom as the pipeline does: data -> phantom -> images & cache -> augmentation -> model & loss ->
training -> evaluation & metrics -> heatmaps -> prediction -> plots -> anomaly detection (Davletshina et al. 2020).
Every notebook imports this one module; the notebooks themselves stay thin.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
import torchvision
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.stats import rankdata
from skimage import exposure
from skimage.filters import threshold_multiotsu, threshold_otsu
from sklearn.metrics import average_precision_score, cohen_kappa_score, confusion_matrix, roc_auc_score, roc_curve
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

# ---------------------------------------------------------------- data: MURA layout, CSVs, validation

BODY_PARTS = (
    "XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST",
)
SPLITS = ("train", "valid")
MURA_DIRNAME = "MURA-v1.1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
STUDY_DIR_RE = re.compile(r"^study(\d+)_(positive|negative)$")
PATIENT_DIR_RE = re.compile(r"^patient\d+$")
LABEL_OF_SUFFIX = {"positive": 1, "negative": 0}
GET_MURA_HELP = (
    "Get MURA v1.1 from https://stanfordmlgroup.github.io/competitions/mura/ (free registration), "
    "or the hand subset used by the reference report from Kaggle "
    "(kagglehub.dataset_download('bogomililiev2308/mura-hand-xray')), and point data_dir at the "
    "MURA-v1.1 folder or any folder above it. Without the data, use the phantom: "
    "make_phantom_mura('data/phantom')."
)


class MuraDataError(ValueError):
    """Every data problem this module detects: a bad path, layout, CSV row or image file."""


@dataclass(frozen=True)
class DataProblem:
    """One problem found while reading the dataset: the file, what is wrong, and what was done."""
    path: str
    problem: str
    detail: str = ""


def _looks_like_mura_root(path: Path) -> bool:
    """True when `path` holds MURA's split folders with body-part folders, or its official CSVs."""
    if any((path / f"{split}_labeled_studies.csv").is_file() for split in SPLITS):
        return True
    return any(
        (path / split).is_dir() and any(p.is_dir() and p.name.startswith("XR_") for p in (path / split).iterdir())
        for split in SPLITS
    )


def find_mura_root(path: str | os.PathLike, max_depth: int = 6) -> Path:
    """Return the MURA-v1.1 folder given it, its parent, or a download folder holding it below."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MuraDataError(f"{path}: no such folder. {GET_MURA_HELP}")
    if not path.is_dir():
        raise MuraDataError(f"{path}: is a file, not a dataset folder. {GET_MURA_HELP}")
    if _looks_like_mura_root(path):
        return path
    queue = [(path, 0)]
    while queue:  # breadth first, so the shallowest match wins; MURA-v1.1 by name before other matches
        folder, depth = queue.pop(0)
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        for child in sorted(children, key=lambda p: p.name != MURA_DIRNAME):
            if _looks_like_mura_root(child):
                return child
        if depth + 1 < max_depth:
            queue.extend((child, depth + 1) for child in children)
    raise MuraDataError(
        f"{path}: no MURA dataset found here or up to {max_depth} folders below (looked for a folder holding "
        f"train/ or valid/ with XR_* body-part folders, or train_labeled_studies.csv). {GET_MURA_HELP}"
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
    for n, line in enumerate(studies_csv.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rsplit(",", 1)
        if len(fields) != 2 or fields[1].strip() not in ("0", "1"):
            raise MuraDataError(f"{studies_csv}, line {n}: expected 'study_path/,label' (label 0 or 1), got {line!r}")
        rows.append((fields[0].strip(), int(fields[1])))
    images = [ln.strip() for ln in images_csv.read_text().splitlines() if ln.strip()]
    return pd.DataFrame(rows, columns=["csv_study_path", "csv_label"]), images


def _natural_image_order(path: Path) -> tuple:
    """Sort image1, image2, ..., image10 by number rather than as text."""
    m = re.search(r"(\d+)", path.stem)
    return (int(m.group(1)) if m else math.inf, path.name)


def check_image_file(path: str | os.PathLike, full_decode: bool = False) -> str | None:
    """Return None for a readable image, else a short description of what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        return "missing file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as im:
            if full_decode:
                im.load()
            else:
                im.verify()  # checks the structure and PNG chunk CRCs without a full decode
    except Exception as e:  # PIL raises several types for corrupt data
        return f"unreadable or truncated image ({type(e).__name__}: {e})"
    return None


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
    Problems (bad folder names, stray/empty/truncated files, CSV vs folder disagreements) raise one
    MuraDataError listing each file, or with on_bad="skip" the affected images/studies are dropped, counted,
    warned about and listed by `data_problems(df)`.
    """
    if split not in SPLITS:
        raise MuraDataError(f"split must be one of {SPLITS}, got {split!r}")
    if on_bad not in ("raise", "skip"):
        raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
    root = find_mura_root(data_dir)
    parts = _body_parts(root, body_part)
    problems: list[DataProblem] = []

    # 1. walk the folders: the ground truth of what exists on disk
    found: dict[tuple[str, ...], dict] = {}
    for part in parts:
        part_dir = root / split / part
        if not part_dir.is_dir():
            continue
        for patient_dir in sorted(part_dir.iterdir()):
            if not patient_dir.is_dir():
                problems.append(DataProblem(str(patient_dir), "stray file", "a file where patient folders belong"))
                continue
            if not PATIENT_DIR_RE.match(patient_dir.name):
                problems.append(DataProblem(str(patient_dir), "bad folder name", "expected patientNNNNN"))
                continue
            for study_dir in sorted(patient_dir.iterdir()):
                if not study_dir.is_dir():
                    problems.append(DataProblem(str(study_dir), "stray file", "a file where study folders belong"))
                    continue
                m = STUDY_DIR_RE.match(study_dir.name)
                if not m:
                    problems.append(DataProblem(
                        str(study_dir), "bad folder name", "expected studyN_positive or studyN_negative"))
                    continue
                images = []
                for f in sorted(study_dir.iterdir(), key=_natural_image_order):
                    if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                        images.append(f)
                    else:
                        hidden = f.name.startswith(".")
                        problems.append(DataProblem(str(f), "stray file", "a hidden file (macOS's ._*, .DS_Store)"
                                                    if hidden else "not a .png/.jpg image"))
                found[(split, part, patient_dir.name, study_dir.name)] = {
                    "study_dir": study_dir, "label": LABEL_OF_SUFFIX[m.group(2)], "images": images,
                }
    if not found and not any((root / split / p).is_dir() for p in parts):
        raise MuraDataError(f"{root / split}: no {', '.join(parts)} folder for split {split!r}. {GET_MURA_HELP}")

    # 2. reconcile with the official CSVs, when present
    csvs = _read_official_csvs(root, split)
    if csvs is not None:
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
            m = STUDY_DIR_RE.match(key[3])
            if m and LABEL_OF_SUFFIX[m.group(2)] != row.csv_label:
                problems.append(DataProblem(
                    where, "label mismatch", f"CSV label {row.csv_label} but folder suffix '{m.group(2)}'"))
                found.pop(key, None)
                continue
            if key not in found:
                problems.append(DataProblem(where, "missing study", "listed in the CSV but not on disk"))
                continue
            on_disk = {img.name for img in found[key]["images"]}
            in_csv = {k[4] for k in csv_images_by_study.get(key, [])}
            for name in sorted(in_csv - on_disk):
                problems.append(DataProblem(str(root.joinpath(*key, name)), "missing file", "listed in the CSV"))
            for name in sorted(on_disk - in_csv):
                problems.append(DataProblem(str(root.joinpath(*key, name)), "unlisted image", "on disk, in no CSV"))
            found[key]["images"] = [img for img in found[key]["images"] if img.name in in_csv]
        for key in sorted(set(found) - listed):
            problems.append(DataProblem(str(found[key]["study_dir"]), "unlisted study", "on disk, in no CSV"))
            found.pop(key)

    # 3. check every image file, then drop what is unusable
    for info in found.values():
        good = []
        for img in info["images"]:
            issue = check_image_file(img) if verify_images else None
            if issue:
                problems.append(DataProblem(str(img), "bad image", issue))
            else:
                good.append(img)
        info["images"] = good
        if not good:
            problems.append(DataProblem(str(info["study_dir"]), "empty study", "no readable image in the folder"))

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


def data_problems(studies: pd.DataFrame) -> pd.DataFrame:
    """Return the problems found (and skipped) while loading `studies`, one row per file."""
    return pd.DataFrame([p.__dict__ for p in studies.attrs.get("problems", ())], columns=["path", "problem", "detail"])


def _report_problems(problems: list[DataProblem], on_bad: str, where: str, shown: int = 20) -> None:
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
    32-bit images (I;16, I, F) are scaled linearly from their own min..max to 0..255 rather than clipped.
    """
    path = Path(path)
    issue = check_image_file(path, full_decode=True)
    if issue:
        raise MuraDataError(f"{path}: {issue}")
    with Image.open(path) as im:
        im.load()
        if im.mode == "L":
            return im.copy()
        if im.mode == "LA":
            return im.getchannel("L")
        if im.mode.startswith("I") or im.mode == "F":
            a = np.asarray(im, dtype=np.float64)
            lo, hi = float(a.min()), float(a.max())
            scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
            return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
        if im.mode in ("RGBA", "PA"):
            return im.convert("RGB").convert("L")
        return im.convert("L")


# ---------------------------------------------------------------- phantom: a synthetic MURA in the exact layout

PHANTOM_FINDINGS_CSV = "phantom_findings.csv"
PHANTOM_TRUTH_CSV = "phantom_truth.csv"  # one row per view: pose, hands, polarity, plate, field, hand-mask file
PHANTOM_TRUTH_DIR = "phantom_truth"  # the true hand masks, one PNG per view (outside the study folders)
PHANTOM_MANIFEST = "phantom_manifest.json"
# version 3: real XR_HAND views' intensities, textured bones, lateral/flexed/two-hand poses, polarities, truth
PHANTOM_VERSION = 3
PHANTOM_POSES = ("pa", "oblique", "lateral", "flexed")
PHANTOM_POLARITIES = ("normal", "light_grey", "inverted")  # light_grey: a light background, not inverted
_PHANTOM_SETTINGS = ("n_patients", "seed", "valid_fraction", "positive_rate", "body_parts", "image_size")
FINGERS = ("thumb", "index", "middle", "ring", "little")
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
    """Add a tube's density to `layer`; with `fracture`, cut it along a line and shift the distal part."""
    pad = bone.radius * 1.3 + (np.abs(fracture["shift"]).max() if fracture else 0)
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
    xs, ys = xx - shift[0], yy - shift[1]
    distal = _tube_density(xs, ys, bone) * (((xs - c[0]) * n[0] + (ys - c[1]) * n[1]) > gap / 2)
    layer[sl] += weight * (proximal + distal)


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
    for f in FINGERS:
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
    curled = rng.random(len(FINGERS)) < 0.8
    for f, curl in zip(FINGERS, curled):
        if view == "flexed" and curl:  # fingers curled towards the palm, over it and each other
            joints = [rng.uniform(0.2, 1.0), rng.uniform(0.6, 1.6), rng.uniform(0.2, 0.9)]
        elif view in ("lateral", "flexed"):
            joints = rng.uniform(0.0, 0.35, 3).tolist()
        else:
            joints = rng.uniform(-0.05, 0.1, 3).tolist()
        flex[f] = [side * j * (-1 if f == "thumb" and view == "flexed" else 1) for j in joints]
    return {
        "spread": spread, "squeeze": squeeze,
        "finger_angle": {f: rng.normal(0, 3.0 if view not in ("lateral", "flexed") else 1.0) for f in FINGERS},
        "foreshorten": {f: rng.uniform(*curl_range) for f in FINGERS},
        "curl": {f: rng.uniform(-1, 1) for f in FINGERS},
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
    r = bone.radius
    if finding["kind"] == "fracture":
        tilt = math.radians(finding["tilt"])
        line_normal = axis * math.cos(tilt) + normal * math.sin(tilt)
        shift = normal * finding["displacement"] * r + axis * 0.3 * r
        spec = {"point": at, "normal": line_normal, "gap": max(4.0, 0.7 * r), "shift": shift}
        _draw_tube(bone_layer, bone, -1.0)  # replace the intact bone by the broken one
        _draw_tube(bone_layer, bone, 1.0, spec)
        _draw_soft(soft_layer, at - axis * 3.0 * r, at + axis * 3.0 * r, 3.6 * r)  # fusiform soft-tissue swelling
        return [at - 3.2 * r, at + 3.2 * r]  # the fragments and the swelling's bulge
    if finding["kind"] == "lesion":
        size = finding["size"] * r  # expansile: wider than the bone, thinning and ballooning its cortex
        reg = _region(bone_layer.shape, at - 1.3 * size, at + 1.3 * size)
        if reg is not None:
            sl, yy, xx = reg
            rho = np.sqrt((xx - at[0]) ** 2 + (yy - at[1]) ** 2) / size
            bone_layer[sl] *= np.where(rho < 1, 0.05 + 0.3 * rho**4, 1.0)
            bone_layer[sl] += 0.7 * r * np.exp(-(((rho - 1.0) / 0.15) ** 2))
        return [at - 1.15 * size, at + 1.15 * size]
    angle = math.atan2(axis[1], axis[0])
    corners = []
    if finding["hardware"] == "plate":
        length = np.linalg.norm(bone.p1 - bone.p0) * 0.7
        plate_at = at + normal * r * 0.95
        corners += _draw_rect(metal_layer, plate_at, length, max(5.0, 1.0 * r), angle, 1.0)
        for s in np.linspace(-0.38, 0.38, finding["screws"]):
            screw_at = at + axis * s * length + normal * r * 0.25
            corners += _draw_rect(metal_layer, screw_at, max(3.0, 0.45 * r), 3.2 * r, angle, 1.0)
            for k in np.linspace(-1.1, 1.1, 6):  # threads
                _draw_rect(metal_layer, screw_at + normal * k * r, max(3.0, 0.5 * r), max(1.0, 0.1 * r), angle, 1.0)
    else:
        for k in range(finding["screws"] if finding["screws"] <= 2 else 2):
            wire_angle = angle + math.radians(rng.uniform(-12, 12))
            wire_at = at + normal * (k - 0.5) * 0.6 * r
            length = np.linalg.norm(bone.p1 - bone.p0) * rng.uniform(0.9, 1.3)
            corners += _draw_rect(metal_layer, wire_at, length, max(3.0, 0.3 * r), wire_angle, 1.0)
    return [np.min(corners, axis=0), np.max(corners, axis=0)]


def _draw_ring(metal_layer, bones: list[_Bone], finger: str):
    """Draw a wedding ring around a finger's proximal phalanx (a metal confounder, not an abnormality)."""
    bone = next(b for b in bones if b.name == f"{finger}_proximal")
    axis = _unit(bone.p1 - bone.p0)
    at = bone.p0 + (bone.p1 - bone.p0) * 0.4
    _draw_rect(metal_layer, at, max(2.0, 0.35 * bone.radius), 3.3 * bone.radius, math.atan2(axis[1], axis[0]), 0.8)


def _draw_marker(image: Image.Image, rng, letter: str, lead: int, avoid: np.ndarray) -> str:
    """Burn a large lead tag (the side's letter, initials or a circle) beside the hand, sometimes a marker strip
    along an edge, and a few lines of annotation text blobs into the displayed image; return the tag's kind."""
    w, h = image.size
    draw = ImageDraw.Draw(image)
    kind = str(rng.choice(["letter", "initials", "circle"], p=[0.55, 0.25, 0.2]))
    size = int(min(h, w) * (rng.uniform(0.1, 0.16) if kind == "letter" else rng.uniform(0.06, 0.1)))
    text = letter if kind == "letter" else "".join(rng.choice(list("ABCDEHKLMNPRST"), int(rng.integers(2, 4))))
    font = ImageFont.load_default(size=max(size, 6))
    extent = (size * (0.7 * len(text) if kind != "circle" else 1.0), size * 1.1)
    candidates = [(rng.uniform(0.03, 0.97) * w - extent[0] / 2, rng.choice([rng.uniform(0.02, 0.2),
                  rng.uniform(0.7, 0.9)]) * h) for _ in range(6)]
    x, y = min(candidates, key=lambda c: avoid[max(int(c[1]), 0):max(int(c[1] + extent[1]), 0),
                                                    max(int(c[0]), 0):max(int(c[0] + extent[0]), 0)].sum())
    if kind == "circle":
        stroke = max(1, size // 7)
        draw.ellipse([x, y, x + size, y + size], outline=lead, width=stroke)
        if rng.random() < 0.5:
            draw.text((x + size * 0.3, y + size * 0.1), letter, fill=lead, font=ImageFont.load_default(
                size=max(int(size * 0.6), 6)))
    else:
        draw.text((x, y), text, fill=lead, font=font)
    if rng.random() < 0.08:  # a marker strip along an edge, with its lettering
        depth = int(min(h, w) * rng.uniform(0.03, 0.06))
        edge = int(rng.integers(4))
        strip = [[0, 0, w, depth], [0, h - depth, w, h], [0, 0, depth, h], [w - depth, 0, w, h]][edge]
        draw.rectangle(strip, fill=lead)
        if edge < 2:
            draw.text((strip[0] + depth, strip[1] + depth * 0.15), "A  B  C  D", fill=255 - lead,
                      font=ImageFont.load_default(size=max(int(depth * 0.7), 6)))
        kind += "+strip"
    for line in range(int(rng.integers(0, 4))):  # annotation text as blocks of "words"
        tx, ty = int(rng.uniform(0.02, 0.5) * w), int(rng.uniform(0.02, 0.95) * h)
        for _ in range(int(rng.integers(2, 6))):
            word = int(rng.integers(6, 28))
            draw.rectangle([tx, ty + line, tx + word, ty + line + 5], fill=lead)
            tx += word + 4
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


def _render_view(seed: Sequence[int], view: str, anatomy: dict, finding: dict | None, ring: str | None,
                 long_side: int, n_hands: int = 1, polarity: str = "normal", low_contrast: bool = False,
                 ) -> tuple[np.ndarray, list[int] | None, dict]:
    """Render one radiograph view; return the 8-bit image, the planted finding's box (or None) and the view's
    truth (hand mask, plate and field corners, polarity, hands, pose, contrast, lead tag)."""
    rng = np.random.default_rng(list(seed))
    finding_rng = np.random.default_rng([*seed, 1])  # a finding leaves the rest of the view as it was
    short = int(round(long_side * rng.uniform(0.58, 0.95)))
    landscape = n_hands > 1 or rng.random() < 0.15
    h, w = (short, long_side) if landscape else (long_side, short)
    soft_layer, bone_layer, metal_layer = (np.zeros((h, w), np.float32) for _ in range(3))
    box, bone_unit, squeeze = None, 1.0, 1.0
    for hand in range(n_hands):  # two hands: PA, side by side, the second one mirrored
        pose = _phantom_pose(rng, view)
        if n_hands == 1:
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
    soft = ndimage.gaussian_filter(soft_layer, 0.12 * bone_unit, truncate=2.5)  # a faint, graded halo
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
    span = (rng.uniform(0.48, 0.7) if polarity == "normal" else (0.97 - background) * rng.uniform(0.8, 1.0))
    span *= rng.uniform(0.35, 0.55) if low_contrast else 1.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    heel = 1 + rng.uniform(-0.25, 0.25) * (yy / h - 0.5) + rng.uniform(-0.15, 0.15) * (xx / w - 0.5)
    image = background * heel + span * signal
    image += (rng.uniform(0.85, 1.0) - image) * np.clip(metal_layer, 0, 1)  # metal: near white

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
    image = ndimage.gaussian_filter(image.astype(np.float32), rng.uniform(0.5, 1.2), truncate=2.5)
    image += noise * rng.uniform(0.006, 0.025)  # the texture's noise: a cheap, fresh-looking grain
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
    marker = _draw_marker(pil, rng, "L" if anatomy["left"] else "R", lead, tissue) if rng.random() < 0.85 else ""
    truth = {"pose": view, "n_hands": n_hands, "polarity": polarity, "low_contrast": low_contrast,
             "marker": marker, "plate": plate_corners, "field": field_corners, "mask": tissue & field}
    return np.asarray(pil), box, truth


def _phantom_image_task(task: dict) -> dict:
    """Render and save one phantom view and its true hand mask (runs in a worker process)."""
    pixels, box, truth = _render_view(task["seed"], task["view"], task["anatomy"], task["finding"], task["ring"],
                                      task["long_side"], task["n_hands"], task["polarity"], task["low_contrast"])
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


def _plan_phantom(n_patients: int, seed: int, valid_fraction: float, positive_rate: float,
                  body_parts: Sequence[str], long_side: int) -> tuple[list[dict], list[dict]]:
    """Decide every patient, study, label, view and planted finding; return (studies, image tasks)."""
    rng = np.random.default_rng(seed)
    n_valid = max(1, int(round(n_patients * valid_fraction))) if n_patients > 1 else 0
    studies, tasks = [], []
    finger_bones = [f"{f}_{p}" for f in FINGERS[1:] for p in ("proximal", "middle")] + ["thumb_proximal"]
    large_bones = ["index_metacarpal", "middle_metacarpal", "ring_metacarpal", "little_metacarpal", "radius"]
    split_labels = {split: set() for split in SPLITS}
    for i in range(n_patients):
        split = "valid" if i >= n_patients - n_valid else "train"
        patient = f"patient{i + 1:05d}" if split == "train" else f"patient{11185 + i:05d}"
        body_part = body_parts[(i if split == "train" else i - (n_patients - n_valid)) % len(body_parts)]
        anatomy = {
            "size": rng.uniform(0.9, 1.1), "left": bool(rng.random() < 0.45),
            "lengths": {f: rng.uniform(0.94, 1.06) for f in FINGERS},
        }
        ring = str(rng.choice(["ring", "middle", "little"])) if rng.random() < 0.2 else None
        n_studies = int(rng.choice([1, 2, 3], p=[0.75, 0.18, 0.07]))
        for s in range(1, n_studies + 1):
            label = int(rng.random() < positive_rate)
            last_of_split = s == n_studies and i in (n_patients - n_valid - 1, n_patients - 1)
            if last_of_split and len(split_labels[split]) == 1 and 0 < positive_rate < 1:
                label = 1 - next(iter(split_labels[split]))  # a split of 2+ studies always holds both classes
            split_labels[split].add(label)
            n_views = int(rng.choice([1, 2, 3, 4, 5], p=[0.03, 0.22, 0.68, 0.05, 0.02]))
            finding = None
            if label:
                kind = str(rng.choice(["fracture", "hardware", "lesion"], p=[0.45, 0.3, 0.25]))
                bone = str(rng.choice(finger_bones + large_bones,  # half of the findings on the larger bones
                                      p=[0.5 / len(finger_bones)] * len(finger_bones) + [0.1] * len(large_bones)))
                finding = {
                    "kind": kind, "bone": bone, "t": rng.uniform(0.3, 0.7), "tilt": rng.uniform(-35, 35),
                    "displacement": rng.uniform(1.2, 2.0) * rng.choice([-1, 1]), "size": rng.uniform(1.6, 2.2),
                    "hardware": str(rng.choice(["plate", "wires"], p=[0.6, 0.4])), "screws": int(rng.integers(2, 5)),
                }
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
                    "seed": (seed, i, s, v), "long_side": long_side,
                })
    return studies, tasks


def make_phantom_mura(
    root: str | os.PathLike,
    n_patients: int = 240,
    seed: int = 0,
    valid_fraction: float = 0.15,
    positive_rate: float = 0.26,
    body_parts: Sequence[str] = ("XR_HAND",),
    image_size: int = 512,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a synthetic hand-radiograph dataset in MURA-v1.1's exact layout under `root`; return its path.

    Same arguments, same bytes. Besides the four official CSVs it writes `phantom_findings.csv`: one row
    per view that shows a planted abnormality (fracture, hardware or lesion) with its box in pixels, and the
    per-view truth (`phantom_truth.csv` and one hand-mask PNG per view under `phantom_truth/`; see
    load_phantom_truth).
    """

    unknown = [p for p in body_parts if p not in BODY_PARTS]
    if unknown:
        raise MuraDataError(f"unknown body part(s) {unknown}: choose from {list(BODY_PARTS)}")
    mura = Path(root) / MURA_DIRNAME
    studies, tasks = _plan_phantom(n_patients, seed, valid_fraction, positive_rate, body_parts, image_size)
    for t in tasks:
        t["path"] = str(mura.joinpath(*t["key"], t["image"]))
        t["mask_path"] = str(mura / _truth_mask_name(t["key"], t["image"]))
    results = _run_tasks(_phantom_image_task, tasks, "phantom images", progress, workers)

    for split in SPLITS:
        rel = [s for s in studies if s["key"][0] == split]
        lines = [f"{MURA_DIRNAME}/{'/'.join(s['key'])}/,{s['label']}" for s in rel]
        (mura / f"{split}_labeled_studies.csv").write_text("".join(line + "\n" for line in lines))
        images = [f"{MURA_DIRNAME}/{'/'.join(t['key'])}/{t['image']}" for t in tasks if t["key"][0] == split]
        (mura / f"{split}_image_paths.csv").write_text("".join(p + "\n" for p in images))
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
         "marker": r["marker"], "plate": json.dumps(r["plate"]), "field": json.dumps(r["field"]),
         "mask_path": _truth_mask_name(t["key"], t["image"]), "width": r["width"], "height": r["height"]}
        for t, r in zip(tasks, results)])
    truth.to_csv(mura / PHANTOM_TRUTH_CSV, index=False)
    manifest = {"version": PHANTOM_VERSION, "n_patients": n_patients, "seed": seed, "valid_fraction": valid_fraction,
                "positive_rate": positive_rate, "body_parts": list(body_parts), "image_size": image_size,
                "n_studies": len(studies), "n_images": len(tasks)}
    (mura / PHANTOM_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return mura


def ensure_phantom(root: str | os.PathLike = "data/phantom", **kwargs) -> Path:
    """Return the phantom MURA-v1.1 under `root`, generating it only when missing, incomplete or made otherwise."""
    mura = Path(root) / MURA_DIRNAME
    params = inspect.signature(make_phantom_mura).parameters
    settings = {k: kwargs.get(k, params[k].default) for k in _PHANTOM_SETTINGS}
    settings = {"version": PHANTOM_VERSION, **settings, "body_parts": list(settings["body_parts"])}
    manifest = mura / PHANTOM_MANIFEST  # written last, so its presence means a complete dataset
    if manifest.is_file():
        made = json.loads(manifest.read_text())
        if {k: made.get(k) for k in settings} == settings:
            return mura
    if mura.exists():
        shutil.rmtree(mura)
    return make_phantom_mura(root, **kwargs)


def resolve_data_dir(data_dir: str | os.PathLike | None, phantom_root: str | os.PathLike = "data/phantom",
                     **phantom_kwargs) -> Path:
    """Return the MURA root to use: `data_dir` when given, else the embedded phantom (made if needed)."""
    if data_dir:
        return find_mura_root(data_dir)
    return ensure_phantom(phantom_root, **phantom_kwargs)


def config_data_root(cfg, data_dir: str | os.PathLike | None = None) -> Path:
    """The MURA root a TrainConfig or AnomalyConfig reads: `data_dir`, else its own, else its phantom (made if
    needed)."""
    return resolve_data_dir(data_dir or cfg.data_dir, cfg.phantom_dir, n_patients=cfg.phantom_patients,
                            image_size=cfg.phantom_image_size, seed=cfg.phantom_seed)


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
    return f"{PHANTOM_TRUTH_DIR}/{'_'.join(key)}_{image}"


def load_phantom_truth(data_dir: str | os.PathLike) -> pd.DataFrame:
    """Return the phantom's per-view truth: one row per view, keyed by image_path as load_phantom_findings.

    Columns: split, body_part, patient, study, image_path (official relative form), image_file (absolute),
    view_type (pa, oblique, lateral, flexed), n_hands, polarity (normal, light_grey: a light background not
    inverted, inverted), low_contrast, marker (lead tag kind, "+strip" with a marker strip, "" for none),
    plate and field (4 [x, y] corners in the view's pixels, [] when the plate fills the view / no collimation),
    mask_path (relative), mask_file (absolute: read it with phantom_hand_mask), width, height.
    """
    root = find_mura_root(data_dir)
    path = root / PHANTOM_TRUTH_CSV
    if not path.is_file():
        raise MuraDataError(f"{path}: no phantom truth here (only phantom datasets of version 3 or later carry one)")
    truth = pd.read_csv(path, keep_default_na=False)
    truth["image_file"] = [str(root.joinpath(*_relative_key(p))) for p in truth["image_path"]]
    truth["mask_file"] = [str(root / p) for p in truth["mask_path"]]
    for column in ("plate", "field"):
        truth[column] = [json.loads(v) for v in truth[column]]
    return truth


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


# ---------------------------------------------------------------- images & cache: decode and resize once, uint8 on disk

def _files_stamp(paths: Sequence[str], *settings) -> str:
    """A key for a cache: the settings and every file's path, size and modification time."""
    stamp = hashlib.sha1(json.dumps([CACHE_VERSION, *settings]).encode())
    for p in paths:
        st = Path(p).stat()
        stamp.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return stamp.hexdigest()[:16]


def _run_tasks(func, tasks: list, desc: str, progress: bool = True, workers: int | None = None,
               sizes: Sequence[int] | None = None) -> list:
    """Run func over tasks in a process pool (inline for one worker or one task), with a progress bar of items."""
    sizes = sizes or [1] * len(tasks)
    workers = workers or min(os.cpu_count() or 1, 8)
    results = []
    with tqdm(total=sum(sizes), desc=desc, disable=not progress) as bar:
        if workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(workers) as pool:
                for result, n in zip(pool.map(func, tasks), sizes):
                    results.append(result)
                    bar.update(n)
        else:
            for task, n in zip(tasks, sizes):
                results.append(func(task))
                bar.update(n)
    return results


CACHE_VERSION = 1
RESIZE_MODES = ("squash", "pad")


def resize_view(image: Image.Image, size: int, mode: str = "squash") -> Image.Image:
    """Resize a grey view to size x size: stretched ('squash', as the report and paper) or letterboxed ('pad')."""
    if mode == "squash":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    if mode != "pad":
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(image.resize((w, h), Image.Resampling.BILINEAR), ((size - w) // 2, (size - h) // 2))
    return canvas


@dataclass
class ImageCache:
    """Views decoded and resized once into a memory-mapped uint8 array (N, size, size) on disk."""
    path: Path
    image_paths: list[str]
    size: int
    resize: str

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
    """Decode, convert and resize a chunk of views into the cache file (runs in a worker process)."""
    npy, start, paths, size, resize = task
    out = np.load(npy, mmap_mode="r+")
    for i, p in enumerate(paths):
        out[start + i] = np.asarray(resize_view(load_image(p), size, resize))
    out.flush()
    return len(paths)


def build_image_cache(image_paths: Sequence[str], size: int = 224, cache_dir: str | os.PathLike = "data/cache",
                      resize: str = "squash", workers: int | None = None, progress: bool = True) -> ImageCache:
    """Return the cache of these views at this size, building it once (keyed by paths, file stamps, size, mode)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    paths = [str(p) for p in image_paths]
    npy = Path(cache_dir) / f"views_{size}px_{resize}_{_files_stamp(paths, size, resize)}.npy"
    cache = ImageCache(npy, paths, size, resize)
    if npy.is_file():
        return cache
    npy.parent.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_suffix(f".tmp{os.getpid()}.npy")
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size)).flush()
    tasks = [(str(tmp), i, paths[i:i + 64], size, resize) for i in range(0, len(paths), 64)]
    try:
        _run_tasks(_cache_chunk, tasks, f"caching views at {size}px", progress, workers, [len(t[2]) for t in tasks])
    except BaseException:  # an undecodable image (named in the error) or an interrupt: leave no partial file
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, npy)  # complete caches only ever appear under their final name
    return cache


class CachedViewBatches:
    """A dataset whose items are whole batches: view indices -> (uint8 views, labels, indices, study of each view).

    The study ids are renumbered 0..k-1 within the batch, so the device never has to find them (no sync).
    """

    def __init__(self, cache: ImageCache, rows: np.ndarray, labels: np.ndarray, studies: np.ndarray):
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


class EpochBatches:
    """Batch sampler whose batches are set per epoch (seeded shuffles), so persistent workers can be reused."""
    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def epoch_batches(n: int, batch_size: int, shuffle: bool, seed: int, epoch: int,
                  groups: Sequence[np.ndarray] | None = None) -> list[list[int]]:
    """Split n views (or whole groups of views, e.g. studies) into batches, shuffled by (seed, epoch); in a shuffled
    (training) epoch a last batch of one view joins the batch before it (batch norm needs two values a channel)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if groups is None:
        order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    else:
        order = torch.randperm(len(groups), generator=generator).tolist() if shuffle else list(range(len(groups)))
        batches = [[int(v) for g in order[i:i + batch_size] for v in groups[g]]
                   for i in range(0, len(order), batch_size)]
    if shuffle and len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] = batches[-1] + last
    return batches


# ---------------------------------------------------------------- augmentation: on the device, per sample, batched

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def gpu_augment(views, generator=None, rotation_degrees: float = 0.0, hflip: bool = False,
                scale_range: tuple[float, float] = (1.0, 1.0)):
    """Flip, rotate (and zoom) each image of a float batch (B, C, H, W) by its own random draw, in one grid_sample."""
    if not hflip and not rotation_degrees and scale_range[0] == scale_range[1] == 1.0:
        return views
    b = views.shape[0]
    angle = (torch.rand(b, generator=generator, device=views.device) * 2 - 1) * math.radians(rotation_degrees)
    flip = torch.ones(b, device=views.device)
    if hflip:
        flip = torch.where(torch.rand(b, generator=generator, device=views.device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    if tuple(scale_range) != (1.0, 1.0):  # equal ends: a fixed zoom
        zoom = scale_range[0] + (scale_range[1] - scale_range[0]) * torch.rand(b, generator=generator,
                                                                                device=views.device)
        cos, sin = cos / zoom, sin / zoom
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos * flip, -sin, zero], 1), torch.stack([sin * flip, cos, zero], 1)], 1)
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


# ---------------------------------------------------------------- model & loss

def build_model(pretrained: bool = True, arch: str = "densenet169"):
    """torchvision DenseNet (169 by default) with its classifier replaced by one abnormality logit."""
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


def weighted_bce_with_logits(logits, targets, w0: float, w1: float):
    """Mean of -w1*y*log(p) - w0*(1-y)*log(1-p) with p = sigmoid(logits), computed stably from logits."""
    weight = w1 * targets + w0 * (1 - targets)
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), weight=weight)


def study_log_probs(logits, study: torch.Tensor, n_studies: int):
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


def study_weighted_bce(logits, targets, study: torch.Tensor, n_studies: int, w0: float, w1: float):
    """The report's variant: weighted BCE on each study's mean view probability (one term per study)."""
    log_p, log_q = study_log_probs(logits, study, n_studies)
    y = torch.zeros(n_studies, device=logits.device).scatter_reduce(0, study, targets.float(), "amax")
    return -(w1 * y * log_p + w0 * (1 - y) * log_q).mean()


# ---------------------------------------------------------------- training: config, one epoch, checkpoints, resume

SELECT_METRICS = {"valid_loss": "min", "valid_auroc": "max", "valid_kappa": "max", "valid_accuracy": "max"}
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Every knob of a training run; the reference report's run is image_size=224, batch_size=8, epochs=5,
    rotation_degrees=10, select_metric='valid_accuracy', loss_level='study'."""

    data_dir: str | None = None  # None: the embedded phantom
    body_part: str = "XR_HAND"
    output_dir: str = "outputs/run"
    cache_dir: str = "data/cache"
    phantom_dir: str = "data/phantom"  # where the phantom is made when data_dir is None ...
    phantom_patients: int = 240  # ... with this many patients
    phantom_image_size: int = 512
    phantom_seed: int = 0  # the phantom's own seed (not the training seed: runs of several seeds share the data)
    image_size: int = 224  # the report; the MURA paper used 320
    resize: str = "squash"  # "squash" (report, paper) or "pad" (keeps the aspect ratio)
    arch: str = "densenet169"
    pretrained: bool = True  # ImageNet weights (the paper and the report)
    batch_size: int = 32  # views per step (the report: 8); with loss_level="study": studies per step
    valid_batch_size: int = 64
    epochs: int = 5
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    plateau_factor: float = 0.1  # the learning rate is divided by 10 ...
    plateau_patience: int = 1  # ... when the validation loss has not improved for this many epochs
    rotation_degrees: float = 10.0  # the report; the MURA paper used 30
    hflip: bool = True
    loss_level: str = "image"  # "image": per-view weighted BCE (the paper); "study": on the study mean (report)
    select_metric: str = "valid_loss"  # best.pt is kept by this (the paper: validation loss)
    keep_top_k: int = 5  # also keep the weights of the k best epochs, for an ensemble (the paper averaged 5)
    amp: str = "auto"  # "auto": fp16 + GradScaler on GPUs without fast bf16 (T4), bf16 on Ampere+; "off" on CPU
    channels_last: bool = True
    compile: bool | str = False  # torch.compile: True or a mode ("reduce-overhead": CUDA graphs, launch-bound GPUs)
    num_workers: int = 2
    device: str = "auto"
    seed: int = 0
    on_bad: str = "raise"  # "skip": leave bad files out, counted in a warning (mh.data_problems lists them)
    resume: bool = True
    max_steps_per_epoch: int | None = None  # for smoke tests

    def __post_init__(self):
        self.betas = tuple(self.betas)
        checks = {"resize": (self.resize, RESIZE_MODES), "loss_level": (self.loss_level, ("image", "study")),
                  "select_metric": (self.select_metric, tuple(SELECT_METRICS)),
                  "amp": (self.amp, ("auto", "fp16", "bf16", "off"))}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {value!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"TrainConfig.compile must be one of {COMPILE_MODES}, got {self.compile!r}")


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


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and CUDA); the suite's NumPy code takes explicit seeds."""
    random.seed(seed)
    torch.manual_seed(seed)


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, flushed to disk, then rename: a crash never leaves a half-written
    checkpoint, and a failed write (a full disk) leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_view_loader(cache: ImageCache, images: pd.DataFrame, batch_size: int, shuffle: bool = False, seed: int = 0,
                     num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader of whole batches of cached views; set `loader.sampler.batches` to re-shuffle per epoch."""
    dataset = CachedViewBatches(cache, cache.rows(images["image_path"]), images["label"].to_numpy(),
                                pd.factorize(images["study_path"])[0])
    sampler = EpochBatches()
    sampler.batches = epoch_batches(len(images), batch_size, shuffle, seed, 0)
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
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


def train_one_epoch(model, loader, optimizer, scaler, device, weights: tuple[float, float], cfg: TrainConfig,
                    epoch: int, progress: bool = True) -> dict:
    """One pass over the training views; returns the mean loss and every view's probability."""
    model.train()
    dtype = amp_dtype(cfg.amp, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
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
            loss = study_weighted_bce(logits, y, study.to(device, non_blocking=True), n_items, *weights)
        else:
            n_items = len(y)
            loss = weighted_bce_with_logits(logits, y, *weights)
        amp_step(loss, optimizer, scaler)
        loss_sum += loss.detach() * n_items  # the epoch's loss: a mean over its views (or studies)
        n_seen += n_items
        probs.append(torch.sigmoid(logits.detach().float()))
        indices.append(index)
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return {"loss": float(loss_sum) / max(n_seen, 1), "probs": torch.cat(probs).cpu().numpy(),
            "index": torch.cat(indices).numpy()}


def evaluate_views(model, loader, device, weights: tuple[float, float], amp: str = "auto", channels_last: bool = True,
                   desc: str = "valid", progress: bool = True) -> dict:
    """Predict every view of `loader` without augmentation; returns the weighted loss and the view probabilities."""
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
            loss_sum += weighted_bce_with_logits(logits, y, *weights) * len(y)
            n_seen += len(y)
            probs.append(torch.sigmoid(logits.float()))
            indices.append(index)
    return {"loss": float(loss_sum) / max(n_seen, 1), "probs": torch.cat(probs).cpu().numpy(),
            "index": torch.cat(indices).numpy()}


def _prepare_run(cfg: TrainConfig, progress: bool = True) -> dict:
    """Load the studies, build the view cache and the per-view tables that training and evaluation use."""
    root = config_data_root(cfg)
    run = {"root": root}
    for split in SPLITS:
        studies = load_studies(root, split, cfg.body_part, on_bad=cfg.on_bad)
        if studies.empty:
            raise MuraDataError(f"{root}: no {cfg.body_part} studies in the {split} split")
        run[split] = studies_to_images(studies)
    all_paths = list(run["train"]["image_path"]) + list(run["valid"]["image_path"])
    run["cache"] = build_image_cache(all_paths, cfg.image_size, cfg.cache_dir, cfg.resize, progress=progress)
    return run


def _epoch_metrics(prefix: str, images: pd.DataFrame, result: dict) -> dict:
    """Study-level metrics of one epoch's view probabilities, with the loss, prefixed train_/valid_."""
    views = images.iloc[result["index"]].assign(prob=result["probs"])
    studies = views.groupby("study_path", sort=False).agg(label=("label", "first"), prob=("prob", "mean"))
    metrics = study_metrics(studies["label"], studies["prob"])
    return {f"{prefix}_loss": result["loss"], **{f"{prefix}_{k}": v for k, v in metrics.items()}}


def _checkpoint(model, optimizer, scheduler, scaler, epoch, history, cfg, best) -> dict:
    """The resumable state: model, optimiser (or a dict of them), scheduler (or None), scaler, epoch, history, RNG
    states, config."""
    return {
        "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        "optimizer": {k: o.state_dict() for k, o in optimizer.items()} if isinstance(optimizer, dict)
        else optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": scaler.state_dict(), "epoch": epoch, "history": history, "best": best, "config": _config_dict(cfg),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


def _resumable_state(cfg, must_match: Sequence[str]) -> dict | None:
    """The state in cfg.output_dir/checkpoints/last.pt to resume from (None: start afresh); refuses a run that was
    saved with other settings."""
    last_path = Path(cfg.output_dir) / "checkpoints" / "last.pt"
    if not cfg.resume or not last_path.is_file():
        return None
    state = torch.load(last_path, map_location="cpu", weights_only=True)
    changed = {k: (state["config"][k], v) for k, v in _config_dict(cfg).items()  # a field newer than the run
               if k in must_match and k in state["config"] and state["config"][k] != v}  # had none to differ
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


def _config_dict(cfg: TrainConfig) -> dict:
    """The config as plain types (loadable with weights_only=True)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def _unwrap(model):
    """The underlying module of a torch.compile'd model."""
    return getattr(model, "_orig_mod", model)


RESUME_MUST_MATCH = ("body_part", "image_size", "resize", "arch", "batch_size", "lr", "betas", "weight_decay",
                     "plateau_factor", "plateau_patience", "rotation_degrees", "hflip", "loss_level", "select_metric",
                     "seed")  # (the scheduler's settings are restored with its state: a change would be ignored)


def train(cfg: TrainConfig, progress: bool = True) -> pd.DataFrame:
    """Train (or resume) a run in cfg.output_dir: checkpoints/last.pt every epoch, best.pt, history.csv."""
    out = Path(cfg.output_dir)
    state = _resumable_state(cfg, RESUME_MUST_MATCH)
    run = _prepare_run(cfg, progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2))
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: let cuDNN pick the fastest kernels
    seed_everything(cfg.seed)
    model = build_model(cfg.pretrained and state is None, cfg.arch).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = class_weights(run["train"]["label"])
    optimizer = build_optimizer(model.parameters(), cfg.lr, device, cfg.betas, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    history, best, start_epoch = [], None, 0
    if state is not None:
        history, best, start_epoch = _restore(state, model, optimizer, scheduler, scaler)
        print(f"resuming {out / 'checkpoints' / 'last.pt'} after epoch {start_epoch} of {cfg.epochs}")
    else:  # starting afresh: an earlier run's epoch weights must not join this run's ensemble
        for path in (out / "checkpoints").glob("epoch_*.pt"):
            path.unlink()
    model = compile_model(model, cfg.compile)

    train_images, valid_images = run["train"], run["valid"]
    groups = list(train_images.groupby("study_path", sort=False).indices.values())
    pin = device.type == "cuda"
    train_loader = make_view_loader(run["cache"], train_images, cfg.batch_size, True, cfg.seed, cfg.num_workers, pin)
    valid_loader = make_view_loader(run["cache"], valid_images, cfg.valid_batch_size, False, cfg.seed,
                                    cfg.num_workers, pin)
    direction = SELECT_METRICS[cfg.select_metric]
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.sampler.batches = epoch_batches(len(train_images), cfg.batch_size, True, cfg.seed, epoch,
                                                     groups if cfg.loss_level == "study" else None)
        started = time.perf_counter()
        trained = train_one_epoch(model, train_loader, optimizer, scaler, device, weights, cfg, epoch, progress)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - started
        validated = evaluate_views(model, valid_loader, device, weights, cfg.amp, cfg.channels_last, progress=progress)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               **_epoch_metrics("train", train_images, trained), **_epoch_metrics("valid", valid_images, validated),
               "epoch_time_s": time.perf_counter() - started, "train_images_per_s": len(trained["probs"]) / train_time}
        scheduler.step(row["valid_loss"])
        history.append(row)
        score = row[cfg.select_metric]
        improved = best is None or (score < best if direction == "min" else score > best) or math.isnan(best)
        if improved:
            best = score
        if cfg.keep_top_k > 0:
            _keep_top_k_weights(model, cfg, history, epoch, out / "checkpoints")
        _save_epoch(_checkpoint(model, optimizer, scheduler, scaler, epoch, history, cfg, best), improved, out)
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f}  valid loss "
                  f"{row['valid_loss']:.4f}  valid kappa {row['valid_kappa']:.3f}  valid AUROC {row['valid_auroc']:.3f}"
                  f"  {row['train_images_per_s']:.0f} img/s" + ("  (best)" if improved else ""))
    return pd.DataFrame(history)


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


def _write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write a CSV through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """Load a checkpoint (weights_only) and return (model in eval mode, its TrainConfig)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = TrainConfig(**state["config"])
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
                    amp: str = "auto", num_workers: int = 0) -> pd.DataFrame:
    """Each study's abnormality probability: the mean of its views' probabilities (abnormal when > 0.5)."""
    images = studies_to_images(studies)
    cache = build_image_cache(images["image_path"], image_size, cache_dir, resize, progress=False)
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


def _auroc_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """AUROC of each row of labels `y` and scores `p` (Mann-Whitney; ties share their average rank; NaN when a
    row has one class only)."""
    n_pos, n_neg = y.sum(1), (1 - y).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((rankdata(p, axis=1) * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auroc_interval(labels, scores, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """A (1 - alpha) percentile bootstrap interval of the AUROC, resampling the rows (studies) with replacement."""
    labels, scores = np.asarray(labels, int), np.asarray(scores, float)
    idx = np.random.default_rng(seed).integers(0, len(labels), (n_boot, len(labels)))
    draws = _auroc_rows(labels[idx], scores[idx])
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return np.nan, np.nan
    lo, hi = np.percentile(draws, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_metrics(labels, probs, threshold: float = 0.5, n_boot: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> pd.DataFrame:
    """Each study metric with a (1 - alpha) percentile bootstrap interval, resampling studies with replacement.

    Vectorised over resamples; resamples with one class only (AUROC undefined) are left out of the AUROC interval.
    """
    labels, probs = np.asarray(labels, int), np.asarray(probs, float)
    point = study_metrics(labels, probs, threshold)
    idx = np.random.default_rng(seed).integers(0, len(labels), (n_boot, len(labels)))
    y, p = labels[idx], probs[idx]
    pred = (p > threshold).astype(int)
    tp, tn = (pred & y).sum(1), ((1 - pred) & (1 - y)).sum(1)
    fp, fn = (pred & (1 - y)).sum(1), ((1 - pred) & y).sum(1)
    n = len(labels)
    with np.errstate(divide="ignore", invalid="ignore"):
        po = (tp + tn) / n
        pe = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
        draws = {"accuracy": po, "kappa": np.where(pe < 1, (po - pe) / (1 - pe), np.nan), "auroc": _auroc_rows(y, p),
                 "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp)}
    rows = []
    for name in CI_METRICS:
        values = draws[name][np.isfinite(draws[name])]
        lo, hi = (np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(values)
                  else (np.nan, np.nan))
        rows.append({"metric": name, "estimate": point[name], "ci_low": lo, "ci_high": hi,
                     "n_boot_used": len(values)})
    return pd.DataFrame(rows).set_index("metric")


def evaluation_report(preds: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Study metrics with 95% bootstrap CIs at the paper's 0.5 threshold and at Youden's threshold."""
    youden = youden_threshold(preds["label"], preds["prob"])
    tables = []
    for name, threshold in (("0.5 (MURA paper)", 0.5), (f"{youden:.3f} (Youden, chosen on this set)", youden)):
        table = bootstrap_metrics(preds["label"], preds["prob"], threshold, n_boot, seed)
        tables.append(table.assign(threshold=name, threshold_value=threshold))
    return pd.concat(tables).reset_index().set_index(["threshold", "metric"])


REFERENCE_RESULTS = pd.DataFrame([
    {"source": "Reference report (2023), DenseNet-169, MURA hand, validation", "metric": "accuracy",
     "value": 0.611, "note": "best validation accuracy, its Figure 31"},
    {"source": "Rajpurkar et al. 2017 (MURA paper), DenseNet-169, hand, hidden test set", "metric": "kappa",
     "value": 0.851, "note": "Cohen's kappa vs radiologists' gold standard"},
    {"source": "Rajpurkar et al. 2017 (MURA paper), DenseNet-169, all body parts, hidden test set",
     "metric": "auroc", "value": 0.929, "note": "overall AUROC"},
    {"source": "Davletshina et al. 2020, best unsupervised (alpha-GAN), MURA hand, test", "metric": "auroc",
     "value": 0.607, "note": "ROC-AUC from the discriminator"},
])


def comparison_table(report: pd.DataFrame, label: str = "this model (validation studies)") -> pd.DataFrame:
    """Our estimates with CIs at 0.5 beside the cited reference numbers (cited, not recomputed)."""
    ours = report.xs(report.index.get_level_values(0)[0], level=0)
    rows = [{"source": label, "metric": m, "value": ours.loc[m, "estimate"],
             "note": f"95% CI {ours.loc[m, 'ci_low']:.3f}-{ours.loc[m, 'ci_high']:.3f}"}
            for m in ("accuracy", "kappa", "auroc")]
    return pd.concat([pd.DataFrame(rows), REFERENCE_RESULTS], ignore_index=True)


def findings_by_study(findings: pd.DataFrame) -> pd.Series:
    """Phantom only: the planted finding type of each abnormal study, indexed by (split, body part, patient, study)."""
    keys = [_relative_key(p)[:-1] for p in findings["image_path"]]
    return pd.Series(list(findings["finding"]), index=pd.MultiIndex.from_tuples(keys)).groupby(level=[0, 1, 2, 3]) \
        .first()


def metrics_by_finding(studies: pd.DataFrame, findings: pd.DataFrame, scores: Sequence[str] = ("prob",),
                       threshold: float | None = None) -> pd.DataFrame:
    """Phantom only: per planted finding type (and all), its abnormal studies' count and each score's AUROC against
    all normal studies; with `threshold`, also the share of them scored above it (the sensitivity)."""
    kinds = findings_by_study(findings)
    finding = [kinds.get(_relative_key(p), "(none listed)") if label else None
               for p, label in zip(studies["study_path"], studies["label"])]
    studies = studies.assign(finding=finding)
    normal = studies[studies["label"] == 0]
    rows = []
    for kind in [*sorted(studies["finding"].dropna().unique()), "all"]:
        abnormal = studies[studies["label"] == 1] if kind == "all" else studies[studies["finding"] == kind]
        both = pd.concat([normal, abnormal])
        row = {"finding": kind, "n_abnormal": len(abnormal), "n_normal": len(normal)}
        for score in scores:
            row[f"auroc_{score}"] = (roc_auc_score(both["label"], both[score]) if len(normal) and len(abnormal)
                                     else np.nan)
            if threshold is not None:
                row[f"sensitivity_{score}"] = float((abnormal[score] > threshold).mean()) if len(abnormal) else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("finding")


def load_ensemble(checkpoints: str | os.PathLike | Sequence[str | os.PathLike], device: str = "auto"):
    """Load one or several checkpoints; return (models, the first one's TrainConfig)."""
    paths = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    if not paths:
        raise FileNotFoundError("no checkpoints given")
    loaded = [load_checkpoint(p, device) for p in paths]
    sizes = {(cfg.image_size, cfg.resize) for _, cfg in loaded}
    if len(sizes) > 1:
        raise ValueError(f"the checkpoints were trained at different input settings {sizes}; ensemble like with like")
    return [m for m, _ in loaded], loaded[0][1]


def ensemble_predict(models, studies: pd.DataFrame, image_size: int, resize: str = "squash",
                     cache_dir: str | os.PathLike = "data/cache", device: str = "auto") -> pd.DataFrame:
    """Study predictions averaged over models (the MURA paper: the 5 best checkpoints); one model works too."""
    runs = [predict_studies(m, studies, image_size, resize, cache_dir, device) for m in models]
    out = runs[0].copy()
    out["prob"] = np.mean([r["prob"].to_numpy() for r in runs], axis=0)
    out["view_probs"] = [list(np.mean(v, axis=0)) for v in zip(*[r["view_probs"] for r in runs])]
    out["model_probs"] = [list(v) for v in zip(*[r["prob"] for r in runs])]
    return out.merge(studies[["study_path", "image_paths"]], on="study_path")


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
                  device: str = "auto", batch_size: int = 32) -> list[dict]:
    """For each view: the grey image, its CAM in [0, 1] on the image's own pixel grid (averaged over models), and
    its abnormality probability (averaged over models). Runs in batches of `batch_size` views."""
    if len(image_paths) == 0:
        return []
    if len(image_paths) > batch_size:
        return [h for i in range(0, len(image_paths), batch_size)
                for h in view_heatmaps(models, image_paths[i:i + batch_size], image_size, resize, device, batch_size)]
    models = models if isinstance(models, (list, tuple)) else [models]
    dev = resolve_device(device)
    images = [load_image(p) for p in image_paths]
    views = torch.from_numpy(np.stack([np.asarray(resize_view(im, image_size, resize)) for im in images]))[:, None]
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
                     device: str = "auto") -> pd.DataFrame:
    """Score the CAMs of every view of `studies` that has a ground-truth box (see heatmap_localisation)."""
    views = studies_to_images(studies)
    scored = list(views.loc[views["image_path"].isin(boxes["image_file"]), "image_path"])
    return heatmap_localisation(view_heatmaps(models, scored, image_size, resize, device), boxes)


# ---------------------------------------------------------------- prediction on a new study

def study_image_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The image files of one study: a folder's PNG/JPEG files (natural order) or a given list; all checked first."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source)
        files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
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
    bad = [f"  {p}: {issue}" for p in files if (issue := check_image_file(p, full_decode=True))]
    if bad:
        raise MuraDataError(f"{len(bad)} unreadable image(s):\n" + "\n".join(bad))
    return files


def predict_new_study(checkpoints, source, device: str = "auto") -> dict:
    """Predict one new study (a folder of views or a list of files) with one checkpoint or an ensemble.

    Returns {"study_prob", "abnormal", "views" (DataFrame: image_path, prob), "heatmaps" (per view)}.
    """
    files = study_image_files(source)
    models, cfg = load_ensemble(checkpoints, device)
    heatmaps = view_heatmaps(models, [str(f) for f in files], cfg.image_size, cfg.resize, device)
    views = pd.DataFrame({"image_path": [h["image_path"] for h in heatmaps], "prob": [h["prob"] for h in heatmaps]})
    study_prob = float(views["prob"].mean())
    return {"study_prob": study_prob, "abnormal": study_prob > 0.5, "views": views, "heatmaps": heatmaps,
            "n_models": len(models), "image_size": cfg.image_size}


# ---------------------------------------------------------------- plots: data, pipeline, training, results, heatmaps


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
    """Per-epoch table in the layout of the report's Figure 31: confusion rates, losses and accuracies."""
    columns = {"epoch": "Epoch"}
    for split, name in (("train", "Training"), ("valid", "Validation")):
        for k, label in (("tn", "True Negative"), ("fp", "False Positive"), ("fn", "False Negative"),
                         ("tp", "True Positive")):
            columns[f"{split}_{k}_rate"] = f"{label} ({name})"
    columns.update({"train_loss": "Training Loss", "train_accuracy": "Training Accuracy",
                    "valid_loss": "Validation Loss", "valid_accuracy": "Validation Accuracy",
                    "valid_kappa": "Validation Kappa", "valid_auroc": "Validation AUROC", "lr": "Learning Rate"})
    return history[list(columns)].rename(columns=columns).set_index("Epoch").round(4)


def plot_training_curves(history: pd.DataFrame, select_metric: str = "valid_loss"):
    """Loss, accuracy and Cohen's kappa per epoch for train and valid (the report's Figure 32), best epoch marked."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    best = history[select_metric].idxmin() if SELECT_METRICS[select_metric] == "min" else \
        history[select_metric].idxmax()
    for ax, metric in zip(axes, ("loss", "accuracy", "kappa")):
        for split, style in (("train", "o-"), ("valid", "s-")):
            ax.plot(history["epoch"], history[f"{split}_{metric}"], style, label=split)
        ax.axvline(history.loc[best, "epoch"], color="grey", ls="--", lw=1, label=f"best ({select_metric})")
        ax.set(title=metric.capitalize() + (" (weighted BCE)" if metric == "loss" else " (study level)"),
               xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_pipeline_views(images: pd.DataFrame, cache: ImageCache, n: int = 4, seed: int = 0,
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


def plot_roc(preds: pd.DataFrame, title: str = "ROC, validation studies"):
    """ROC curve with its AUROC, the 0.5 operating point and Youden's point."""
    fpr, tpr, _ = roc_curve(preds["label"], preds["prob"])
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {roc_auc_score(preds['label'], preds['prob']):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for threshold, marker, name in ((0.5, "o", "threshold 0.5"),
                                    (youden_threshold(preds["label"], preds["prob"]), "s", "Youden")):
        m = study_metrics(preds["label"], preds["prob"], threshold)
        ax.plot(1 - m["specificity"], m["sensitivity"], marker, ms=8, label=f"{name} ({threshold:.2f})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_confusion(labels, probs, threshold: float = 0.5):
    """Confusion matrix at a threshold: counts and row-normalised rates side by side."""
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
    rows = max(1, math.ceil(len(heatmaps) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.3 * rows), squeeze=False)
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
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- anomaly detection (Davletshina 2020): preprocessing

@dataclass(frozen=True)
class PreprocessConfig:
    """Their Figure 1 pipeline; every step can be switched off: 'raw', 'crop' or 'full', each with or without HE."""

    crop: bool = True  # carrier crop: Otsu + the detector plate's minimum-area rotated rectangle (else whole image)
    segment: bool = True  # foreground segmentation: a hand mask, and the background set to 0
    equalize: str | None = "he"  # histogram equalisation: "he", "clahe" or None
    size: int = 512  # aspect-preserving resize and padding to a square (512: autoencoders; 128: the GAN family)

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


def min_area_rect(points: np.ndarray) -> tuple[np.ndarray, tuple[float, float], float]:
    """Minimum-area enclosing rectangle of 2-D points (x, y), by rotating calipers: (center, (w, h), angle rad)."""
    hull = points[ConvexHull(points).vertices]
    edges = np.diff(np.vstack([hull, hull[:1]]), axis=0)
    angles = np.unique(np.mod(np.arctan2(edges[:, 1], edges[:, 0]), np.pi / 2))
    cos, sin = np.cos(angles), np.sin(angles)
    u = hull[:, 0, None] * cos + hull[:, 1, None] * sin  # every edge's frame at once: (points, angles)
    v = -hull[:, 0, None] * sin + hull[:, 1, None] * cos
    lo, hi = np.stack([u.min(0), v.min(0)]), np.stack([u.max(0), v.max(0)])
    best = int(np.argmin(np.prod(hi - lo, axis=0)))  # the first of equal areas, as a loop would keep
    a = float(angles[best])
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    center = rot.T @ ((lo[:, best] + hi[:, best]) / 2)
    w, h = float(hi[0, best] - lo[0, best]), float(hi[1, best] - lo[1, best])
    if a > np.pi / 4:  # keep the rectangle close to upright: angle in (-45, 45] degrees
        a, w, h = a - np.pi / 2, h, w
    return center, (w, h), a


def rect_mask(shape: tuple[int, int], rect) -> np.ndarray:
    """Pixels (of an image of `shape`) inside a rotated rectangle (center, (w, h), angle)."""
    (cx, cy), (w, h), angle = rect
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)


def _plate_rect(component: np.ndarray, region: np.ndarray, searched: np.ndarray, min_share: float,
                max_share: float, min_fill: float = 0.9):
    """(share, center, (w, h), angle) of a component's minimum-area rectangle when it is plate-like, else None:
    it covers min_share..max_share of the searched pixels, the convex hull fills min_fill of it, and what lies
    outside it is mostly not of the component's class (`region`): a plate stands out from its surround, while
    the background beside a straight finger, a rectangle too, does not."""
    area = int(component.sum())
    ys, xs = np.nonzero(component & ~ndimage.binary_erosion(component))  # its outline has the same hull
    if area < 16 or len(xs) < 3 or np.ptp(xs) < 2 or np.ptp(ys) < 2:  # too small, or a line: no area, not a plate
        return None
    if (np.ptp(xs) + 1) * (np.ptp(ys) + 1) < min_share * searched.sum() or area < 0.45 * min_share * searched.sum():
        return None  # too small to be a plate, whatever its rectangle (cheap checks first)
    points = np.column_stack([xs, ys]).astype(float)
    center, (w, h), angle = min_area_rect(points)
    share = w * h / searched.sum()
    if not (min_share <= share <= max_share and ConvexHull(points).volume / max(w * h, 1e-9) > min_fill
            and area / (w * h) > 0.45):
        return None
    outside = searched & ~rect_mask(searched.shape, (center, (w + 2, h + 2), angle))
    if outside.sum() > 0.01 * searched.sum() and region[outside].mean() > 0.2:
        # ... or framed: a band just around it lies mostly in the view and is not of its class (a field inside a
        # plate's lighter frame, with the surround beyond it as dark as the field)
        ring = rect_mask(searched.shape, (center, (w + 8, h + 8), angle)) & ~rect_mask(searched.shape,
                                                                                        (center, (w + 2, h + 2), angle))
        band = ring & searched
        if band.sum() < 0.6 * (2 * (w + h) * 3) or region[band].mean() > 0.2:
            return None
    return share, center, (w, h), angle


def _holds_the_detail(found, detail: np.ndarray, margin: float = 8.0) -> bool:
    """Whether a plate candidate (share, center, (w, h), angle) holds most of the view's edges (the hand's): a dark
    rectangle beside a light surround that holds the hand is not the plate. (`detail`: strong edges, away from
    the searched area's border; `margin`: the candidate's own edges, left out.)"""
    _, center, (w, h), angle = found
    inner = detail & rect_mask(detail.shape, (center, (w - margin, h - margin), angle))
    outer = detail & ~rect_mask(detail.shape, (center, (w + margin, h + margin), angle))
    return outer.sum() <= 2 * inner.sum() + 0.002 * detail.size


def find_carrier(gray: np.ndarray, min_share: float = 0.25, max_share: float = 0.97, within=None):
    """The detector plate as a rotated rectangle (center, (w, h), angle), or None when no plate stands out.

    Binarised at Otsu's threshold, at Otsu's threshold of each side of it (a plate only a little darker than a
    dark surround) and at the two of a three-class Otsu (a plate between a darker and a brighter surround); for
    each threshold and polarity, the largest component and the union of the large ones (a hand lying across the
    plate can cut its background apart) are candidates, kept when plate-like (see _plate_rect: a plate is a
    rectangle even with a hand across it, and stands out from its surround; a hand does neither). The largest
    wins. `within` (a rectangle like the result) restricts the search to it: the exposed field inside a plate,
    when collimation left bright unexposed borders.
    """
    step = 4 if min(gray.shape) >= 256 else 1  # the plate is large: a quarter resolution will do
    small = gray[::step, ::step]
    searched = np.ones(small.shape, bool) if within is None else \
        rect_mask(small.shape, (np.asarray(within[0]) / step, np.asarray(within[1]) / step, within[2]))
    values = small[searched]
    if values.size < 64 or values.min() == values.max():
        return None
    otsu = threshold_otsu(values)
    thresholds = {otsu, *(threshold_otsu(part) for part in (values[values <= otsu], values[values > otsu])
                          if np.ptp(part) > 0)}  # Otsu again on each side: a plate darker than a dark surround
    if len(np.unique(values)) > 3:
        thresholds |= set(threshold_multiotsu(values, classes=3).tolist())
    commonest = 16 * np.argmax(np.bincount(values // 16)) + 8  # the direct-exposure background, mostly
    grad = np.hypot(*np.gradient(ndimage.gaussian_filter(small.astype(np.float32), 1.0)))
    detail = ndimage.binary_erosion(searched, iterations=3) & (grad > 4 * max(float(np.median(grad[searched])), 0.25))
    best, tried = None, set()
    for threshold in sorted(thresholds):
        above = (small > threshold) & searched
        for region, background in ((above, commonest > threshold), (searched & ~above, commonest <= threshold)):
            if within is not None and not background:  # the field inside a plate is of the background's class
                continue
            labels, n = ndimage.label(region)
            if n == 0:
                continue
            sizes = np.bincount(labels.ravel())[1:]
            largest = labels == np.argmax(sizes) + 1
            large = np.flatnonzero(sizes >= 0.05 * sizes.max()) + 1
            for component in (largest, np.isin(labels, large)) if len(large) > 1 else (largest,):
                key = (background, hash(component.tobytes()))  # close thresholds often give the same component
                if key in tried:
                    continue
                tried.add(key)
                # the background's class may miss a plate's corner (a collimated wedge); a hand's class may not
                found = _plate_rect(component, region, searched, min_share, max_share, 0.85 if background else 0.9)
                if found is not None and _holds_the_detail(found, detail) and (best is None or found[0] > best[0]):
                    best = found
    return None if best is None else (best[1] * step, (best[2][0] * step, best[2][1] * step), best[3])


def find_field(gray: np.ndarray, max_share: float = 0.92):
    """The carrier crop's rectangle: the plate (find_carrier), narrowed to the exposed field inside it when
    collimation left bright unexposed borders (a plate-like region covering at most max_share of the plate)."""
    plate = find_carrier(gray)
    field = find_carrier(gray, max_share=max_share, within=plate) if plate is not None else None
    return field or plate


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


def _class_thresholds(values: np.ndarray) -> list[float]:
    """Candidate thresholds between a view's intensity classes: Otsu's, and those of a three- and a four-class
    Otsu (the four-class one on a 64-bin histogram, for speed), ascending."""
    if np.ptp(values) == 0:
        return []
    thresholds = {float(threshold_otsu(values))}
    if len(np.unique(values)) > 3:
        thresholds |= set(threshold_multiotsu(values, classes=3).tolist())
        counts, edges = np.histogram(values, bins=64)
        if (counts > 0).sum() > 4:
            thresholds |= set(threshold_multiotsu(hist=(counts, (edges[:-1] + edges[1:]) / 2), classes=4).tolist())
    return sorted(thresholds)


def _hand_components(fg: np.ndarray, work: np.ndarray, ring: np.ndarray, content: np.ndarray, flat: float,
                     spread: float) -> np.ndarray:
    """The hand-like components of a foreground: large, thick, textured, not the plate or field (covering much of
    the content's rim or most of the content, or a large filled rectangle), not a marker or plate edge (thin, or
    uniform like the background)."""
    labels, n = ndimage.label(fg)
    if n == 0:
        return fg
    index = np.arange(1, n + 1)
    area = ndimage.sum_labels(fg, labels, index)
    on_rim = ndimage.sum_labels(ring, labels, index)
    total = content.sum()
    keep = (area >= 0.01 * total) & (area <= 0.75 * total) & (on_rim <= 0.3 * ring.sum())
    if keep.any():
        keep &= ndimage.standard_deviation(work, labels, index) >= max(2.5 * flat, 0.06 * spread)
    if keep.any():
        thickness = ndimage.maximum(ndimage.distance_transform_edt(fg), labels, index)
        keep &= thickness >= max(2.0, 0.02 * fg.shape[0])
    for k in np.flatnonzero(keep & (area >= 0.2 * total)):  # a filled rectangle over most of it: the plate
        component = labels == index[k]
        ys, xs = np.nonzero(component & ~ndimage.binary_erosion(component))
        _, (w, h), _ = min_area_rect(np.column_stack([xs, ys]).astype(float))
        keep[k] = area[k] < 0.8 * w * h or w * h < 0.6 * total
    return np.isin(labels, index[keep])


def hand_mask(image: np.ndarray, content: np.ndarray, work_size: int = 128) -> tuple[np.ndarray, bool]:
    """Foreground (hand) mask inside `content` pixels, and whether the view was inverted (see _hand_mask)."""
    mask, inverted, _ = _hand_mask(image, content, work_size)
    return mask, inverted


# signals of a doubtful hand mask (measured at the working resolution), and where suspect_masks flags them
MASK_DOUBTS = {"missed": "foreground left outside the mask (share of its area)",
               "cut": "the mask's edge cuts through foreground (share of a band outside it)",
               "background_inside": "background inside the mask's edge (share of a band inside it)",
               "rim": "the mask covers much of the content's rim (share)"}


def _hand_mask(image: np.ndarray, content: np.ndarray, work_size: int = 128) -> tuple[np.ndarray, bool, dict]:
    """Foreground (hand) mask inside `content` pixels, whether the view was inverted (hand darker than its
    background), and the signals of a doubtful mask (MASK_DOUBTS).

    Classical, as a stand-in for the paper's SSD hand detector and Photoshop masks, at a working resolution of at
    most `work_size` (the mask is upsampled): the background is the level of the content's rim; the hand lies on
    the side of it where the view's extremes lie farthest (bone: brighter, or darker when inverted). Thresholds
    between intensity classes (Otsu, 3- and 4-class Otsu) are tried from the background's side outwards; the
    first that leaves hand-like components (see _hand_components; every one kept: two hands) wins, else the other
    polarity is tried. Uniform bright patches touching the rim (markers, plate edges) are cut out first.
    """
    size = image.shape[0]
    n = min(size, work_size)
    if n < size:
        small = np.asarray(Image.fromarray(image).resize((n, n), Image.Resampling.BOX), np.float32)
        inside = np.asarray(Image.fromarray(content.astype(np.uint8) * 255).resize((n, n), Image.Resampling.BOX)) > 250
    else:
        small, inside = image.astype(np.float32), content.astype(bool)
    whole, inside = inside, ndimage.binary_erosion(inside, border_value=0)  # edge pixels blend with the zero fill
    values = small[inside]
    if values.size < 64 or np.ptp(values) == 0:
        return np.zeros_like(content, bool), False, dict.fromkeys(MASK_DOUBTS, 0.0)
    rim = max(3, n // 20)
    ring = inside & ~ndimage.binary_erosion(inside, iterations=rim, border_value=0)
    if ring.sum() >= 32:  # flatten the background: a plane through the rim (twice, without the hand's pixels)
        ys, xs = np.nonzero(ring)
        design = np.column_stack([np.ones(len(xs)), xs / n - 0.5, ys / n - 0.5])
        fit = np.ones(len(xs), bool)
        for _ in range(2):
            coef = np.linalg.lstsq(design[fit], small[ys, xs][fit], rcond=None)[0]
            residual = small[ys, xs] - design @ coef
            deviation = np.abs(residual - np.median(residual))
            fit = deviation <= 2.5 * 1.4826 * np.median(deviation) + 1
        spread = 1.4826 * np.median(np.abs(residual[fit] - np.median(residual[fit])))
        if abs(coef[1]) + abs(coef[2]) > 4 * spread + 2:  # a real gradient (a heel effect), not noise
            yy, xx = np.mgrid[:n, :n] / n - 0.5
            small = np.where(inside, small - coef[1] * xx - coef[2] * yy, small).astype(np.float32)
            values = small[inside]
    background = float(np.median(small[ring])) if ring.any() else float(np.median(values))
    lo, hi = np.percentile(values, [0.5, 99.5])
    mean = ndimage.uniform_filter(small, 5)
    local = np.sqrt(np.maximum(ndimage.uniform_filter(small * small, 5) - mean * mean, 0))
    noise = max(float(np.percentile(local[inside], 25)), 0.5)  # the flattest quarter: the background's noise
    prior = bool(background - lo > hi - background)

    thresholds = _class_thresholds(values)  # besides the classes: just off the background (a faint soft tissue)
    thresholds += [background + k * noise * (-1 if side else 1) for side in (prior, not prior) for k in (3, 6)]
    found, inverted = np.zeros((n, n), bool), prior
    for inverted, texture in ((prior, 1.0), (not prior, 1.0), (prior, 0.0)):  # last: a hand without texture
        work = 255 - small if inverted else small
        levels = sorted(255 - t for t in thresholds) if inverted else sorted(thresholds)
        top = (255 - lo if inverted else hi) - 3 * noise
        edge = (work > top) & (local <= 1.5 * noise + 0.5) & inside  # the brightest and flat: markers, plate edges
        labels, count = ndimage.label(edge)
        if count:
            touching = np.unique(labels[ring & edge])
            edge = ndimage.binary_dilation(np.isin(labels, touching[touching > 0]), iterations=2)
        base = 255 - background if inverted else background
        for level in (v for v in levels if v > base + 2 * noise):  # below: the background's own noise
            fg = ndimage.binary_opening((work > level) & inside & ~edge)
            found = _hand_components(fg, work, ring, inside, texture * noise, texture * (hi - lo))
            if found.any():
                break
        if found.any():
            break
    if not found.any():
        return np.zeros_like(content, bool), prior, dict.fromkeys(MASK_DOUBTS, 0.0)
    found = ndimage.binary_closing(found, iterations=1, border_value=0)
    filled = ndimage.binary_fill_holes(found)
    holes, count = ndimage.label(filled & ~found)
    if count:  # fill small holes (joint spaces, dark trabeculae); keep large ones (a loop of flexed fingers)
        big = np.flatnonzero(np.bincount(holes.ravel())[1:] > 0.005 * inside.sum()) + 1
        filled &= ~np.isin(holes, big)
    filled |= ndimage.binary_dilation(filled) & whole & ~inside  # back onto the content's edge pixels
    above = work > level
    band_out = ndimage.binary_dilation(filled, iterations=2) & ~filled & inside
    band_in = filled & ~ndimage.binary_erosion(filled, iterations=2) & inside
    doubts = {"missed": float((fg & ~filled).sum() / max(filled.sum(), 1)),
              "cut": float(above[band_out].mean()) if band_out.any() else 0.0,
              "background_inside": float((~above[band_in]).mean()) if band_in.any() else 0.0,
              "rim": float((filled & ring).sum() / max(ring.sum(), 1))}
    if n < size:
        filled = np.asarray(Image.fromarray(filled.astype(np.uint8) * 255).resize((size, size),
                                                                                   Image.Resampling.BILINEAR)) >= 128
    return filled & content, inverted, doubts


def preprocess_view(path: str | os.PathLike, cfg: PreprocessConfig) -> dict:
    """Run the pipeline on one view: {'image' uint8 (S, S), 'mask' uint8 0/1, 'affine' 2x3 input->output, ...}."""
    gray = np.asarray(load_image(path))
    carrier = find_field(gray) if cfg.crop else None
    affine = _square_affine((gray.shape[1], gray.shape[0]), carrier, cfg.size)
    image = _warp(gray, affine, cfg.size)
    content = _warp(np.full(gray.shape, 255, np.uint8), affine, cfg.size, order=0) > 0
    if carrier is not None:  # the plate only: what lies beside a tilted or narrow plate is not part of the view
        half = np.asarray(carrier[1]) * cfg.size / max(carrier[1]) / 2  # the plate's half sides in the square
        centers = np.arange(cfg.size) + 0.5 - cfg.size / 2
        content &= (np.abs(centers)[:, None] <= half[1]) & (np.abs(centers)[None, :] <= half[0])
    inverted, doubts = False, dict.fromkeys(MASK_DOUBTS, 0.0)
    if cfg.segment:
        mask, inverted, doubts = _hand_mask(image, content)
        if inverted:
            image = np.where(content, 255 - image, 0).astype(np.uint8)
    else:
        mask = content
    region = mask if mask.any() else content
    if cfg.equalize == "he":  # skimage's equalize_hist, as a look-up table over the 256 grey levels
        cdf, centers = exposure.cumulative_distribution(image[region], 256)
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
# plates kept out, the mask found at <= 128 px, framed fields, fields that hold the hand)
ANOMALY_PIPELINE_VERSION = 4


def build_anomaly_cache(image_paths: Sequence[str], cfg: PreprocessConfig, cache_dir: str | os.PathLike = "data/cache",
                        workers: int | None = None, progress: bool = True) -> AnomalyCache:
    """Run the offline preprocessing once per (views, settings) and keep it on disk; reuse it afterwards."""
    paths = [str(p) for p in image_paths]
    stamp = _files_stamp(paths, {**asdict(cfg), "pipeline": ANOMALY_PIPELINE_VERSION})
    folder = Path(cache_dir) / f"anomaly_{cfg.name.replace('+', '_')}_{cfg.size}px_{stamp}"
    if (folder / "affines.npy").is_file():
        return AnomalyCache(folder, paths, cfg)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    n, s = len(paths), cfg.size
    for name, shape, dtype in (("images", (n, s, s), np.uint8), ("masks", (n, s, s), np.uint8),
                               ("affines", (n, 2, 3), np.float32), ("doubts", (n, len(MASK_DOUBTS)), np.float32)):
        np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
    tasks = [(tmp, i, paths[i:i + 32], cfg) for i in range(0, n, 32)]
    try:
        _run_tasks(_anomaly_cache_chunk, tasks, f"preprocessing ({cfg.name}, {s}px)", progress, workers,
                   [len(t[2]) for t in tasks])
    except BaseException:  # an undecodable image (named in the error) or an interrupt: leave no partial folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return AnomalyCache(folder, paths, cfg)


# where a doubt signal flags a view (set on phantom v3 at 512 px: its 90th percentile over the views whose mask IoU
# with the truth was >= 0.5)
MASK_DOUBT_LIMITS = {"missed": 0.055, "cut": 0.09, "background_inside": 0.021, "rim": 0.185}


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
    pred = np.asarray(mask, bool)
    union = (pred | warped).sum() + cut_off
    return float((pred & warped).sum() / union) if union > 0 else 1.0


def _mask_iou_rows(task: tuple) -> list[dict]:
    """mask_iou of a chunk of cached views against their true masks (runs in a worker process)."""
    cache, views = task
    rows = []
    for v in views:
        i = cache.row_of[v["image_file"]]
        mask, affine = np.asarray(cache.masks[i], bool), cache.affines[i]
        truth = phantom_hand_mask(v["mask_file"])
        warped, cut_off = _truth_in_square(truth, affine, mask.shape[0])
        union = (mask | warped).sum() + cut_off
        rows.append({"image_path": v["image_path"], "iou": float((mask & warped).sum() / union) if union else 1.0,
                     "truth_share": float(warped.mean()), "mask_share": float(mask.mean()),
                     "cut_off_share": float(cut_off / mask.size)})
    return rows


def mask_iou_table(data_dir: str | os.PathLike, cache: AnomalyCache | PreprocessConfig,
                   cache_dir: str | os.PathLike = "data/cache", workers: int | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Per-view IoU of the hand masks with a phantom's true masks (v3+), one row per view: iou, truth_share and
    mask_share (of the square), cut_off_share (true hand the crop left out), and the truth's view_type, n_hands,
    polarity, low_contrast, marker. Computed in the preprocessed square (mask_iou). `cache`: a built AnomalyCache
    (its views that the phantom knows), or a PreprocessConfig, built for all the phantom's views."""
    truth = load_phantom_truth(data_dir)
    if isinstance(cache, PreprocessConfig):
        cache = build_anomaly_cache(truth["image_file"], cache, cache_dir, workers=workers, progress=progress)
    if not cache.cfg.segment:
        raise ValueError(f"variant {cache.cfg.name} has no hand mask (its mask is the whole view): use a full variant")
    truth = truth[truth["image_file"].isin(cache.row_of)].reset_index(drop=True)
    views = truth[["image_path", "image_file", "mask_file"]].to_dict("records")
    tasks = [(cache, views[i:i + 32]) for i in range(0, len(views), 32)]
    rows = [r for chunk in _run_tasks(_mask_iou_rows, tasks, "mask IoU", progress, workers,
                                      [len(t[1]) for t in tasks]) for r in chunk]
    table = pd.DataFrame(rows, columns=["image_path", "iou", "truth_share", "mask_share", "cut_off_share"])
    keep = ["image_path", "image_file", "mask_file", "view_type", "n_hands", "polarity", "low_contrast", "marker"]
    return truth[keep].merge(table, on="image_path").assign(size=cache.cfg.size, variant=cache.cfg.name)


def mask_iou_summary(table: pd.DataFrame, good: float = 0.85, bad: float = 0.5) -> dict:
    """The IoU distribution in numbers: views, share >= `good`, median, 5th percentile, count < `bad`."""
    iou = table["iou"].to_numpy()
    return {"views": int(len(iou)), f"share_iou_ge_{good}": float(np.mean(iou >= good)),
            "median_iou": float(np.median(iou)), "p5_iou": float(np.percentile(iou, 5)),
            f"n_iou_lt_{bad}": int(np.sum(iou < bad))}


def plot_mask_iou(table: pd.DataFrame, worst: int = 6, good: float = 0.85):
    """The mask IoU's distribution (by polarity) and the worst views: each cropped view with its mask (red) and the
    true one (green; both: yellow) in the preprocessed square."""
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
        axis.set_title(f"IoU {row.iou:.2f}: {row.view_type}, {row.polarity}\n{row.n_hands} hand(s)"
                       f"{', low contrast' if row.low_contrast else ''}", fontsize=8)
        axis.axis("off")
    fig.tight_layout()
    return fig


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
    512x16x16 (any input size divisible by 32 gives size/32), mirrored by a transposed-convolution decoder."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128, 256, 512)):
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
        self.decoder = torch.nn.Sequential(*layers)

    def forward(self, x):
        """Reconstruct x (B, 1, H, W) in [0, 1]."""
        return {"recon": self.decoder(self.encoder(x)), "mu": None, "logvar": None}


class VariationalAutoencoder(torch.nn.Module):
    """The VAE of Davletshina et al.'s Figure 7: unpadded stride-2 4x4 convolutions down to 512x2x2 (seven for a
    512 input), fully connected mu and log-variance of size 1024, reparameterisation, and a mirrored decoder whose
    last transposed convolution restores the exact input size (6x6 for 512)."""

    def __init__(self, image_size: int = 512, latent: int = 1024):
        super().__init__()
        sizes = [image_size]
        while sizes[-1] > 2:
            sizes.append((sizes[-1] - 4) // 2 + 1)
        if sizes[-1] != 2 or len(sizes) < 3:
            raise ValueError(f"image_size {image_size} does not reach 2x2 with stride-2 4x4 convolutions; "
                             f"use 64, 128, 256 or 512")
        n = len(sizes) - 1
        widths = [512 // 2 ** (n - 1 - i) for i in range(n)]  # 8, 16, ..., 512 for seven layers
        self.encoder = torch.nn.Sequential(*[_conv_block(c_in, c_out, 4, 2, 0)
                                             for c_in, c_out in zip([1, *widths[:-1]], widths)])
        self.fc_mu, self.fc_logvar = torch.nn.Linear(512 * 4, latent), torch.nn.Linear(512 * 4, latent)
        self.fc_decode = torch.nn.Linear(latent, 512 * 4)
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
        mu, logvar = self.fc_mu(h), self.fc_logvar(h).clamp(-20, 20)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
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


def reconstruction_scores(x, out: dict, mask, top_k: int = 200, kld_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-image anomaly scores: masked MSE and L1 and their top-k pixel means (where the model reconstructs), for a
    VAE the KLD and the sums, and the scores a GAN computes itself (out['scores'])."""
    scores = dict(out.get("scores") or {})
    if out["recon"] is None:
        return scores
    m = mask.float().flatten(1)
    diff = (x.float() - out["recon"].float()).flatten(1) * m
    n = m.sum(1).clamp_min(1)
    sq, ab = diff**2, diff.abs()
    k = min(top_k, sq.shape[1])
    scores.update({"mse": sq.sum(1) / n, "l1": ab.sum(1) / n, f"mse_top{top_k}": sq.topk(k, 1).values.mean(1),
                   f"l1_top{top_k}": ab.topk(k, 1).values.mean(1)})
    if out["mu"] is not None:
        kld = kl_divergence(out["mu"], out["logvar"])
        per_pixel = kld_weight * kld / sq.shape[1]  # the KLD as weighted in the training loss
        scores.update({"kld": kld, "l1+kld": scores["l1"] + per_pixel, "mse+kld": scores["mse"] + per_pixel})
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


class ImageCritic(torch.nn.Module):
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


class MinibatchDiscrimination(torch.nn.Module):
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


class Generator(torch.nn.Module):
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
        self.generator = Generator(image_size, latent)
        self.critic = ImageCritic(image_size)
        if kind == "bigan":
            self.code_features = torch.nn.Sequential(torch.nn.Linear(latent, 512), torch.nn.LeakyReLU(0.2, True))
            self.head = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.LeakyReLU(0.2, True),
                                            torch.nn.Linear(512, 1))
        else:
            self.minibatch = MinibatchDiscrimination(512)
            self.head = torch.nn.Linear(512 + self.minibatch.out_features, 1)
        if kind != "dcgan":
            self.encoder = torch.nn.Sequential(ImageCritic(image_size), torch.nn.Linear(512, latent))
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
             recon_weight: float = 10.0) -> dict[str, torch.Tensor]:
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
            g_loss = g_loss + recon_weight * masked_l1(x, recon, mask).mean()
    optimizers["generator"].zero_grad(set_to_none=True)
    scaler.scale(g_loss).backward()
    scaler.step(optimizers["generator"])
    scaler.update()
    for p in discriminating:
        p.requires_grad_(True)
    return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}


def build_anomaly_model(model: str, image_size: int, latent: int = 128) -> torch.nn.Module:
    """One of ANOMALY_MODELS for this input size: 'cae', 'vae' or a GAN ('dcgan', 'bigan', 'alphagan')."""
    if model == "cae":
        if image_size % 32:
            raise ValueError(f"the CAE needs an image size divisible by 32, got {image_size}")
        return ConvAutoencoder()
    if model == "vae":
        return VariationalAutoencoder(image_size)
    if model in GAN_MODELS:
        return AdversarialAnomalyModel(model, image_size, latent)
    raise ValueError(f"model must be one of {ANOMALY_MODELS}, got {model!r}")


def anomaly_score_names(model: str, top_k: int = 200) -> list[str]:
    """The scores a model gives (columns of evaluate_anomaly, rows of the results table)."""
    recon = ["mse", "l1", f"mse_top{top_k}", f"l1_top{top_k}"]
    return {"cae": recon, "vae": [*recon, "kld", "l1+kld", "mse+kld"], "dcgan": ["disc"],
            "bigan": ["disc", *recon], "alphagan": ["disc", "code_disc", "c+d", *recon]}[model]


# ---------------------------------------------------------------- anomaly detection: training, scores, heatmaps

ANOMALY_RESUME_MUST_MATCH = ("model", "variant", "body_part", "image_size", "splits", "batch_size", "lr",
                             "kld_weight", "gan_latent", "gan_lr", "recon_weight", "top_k", "hflip",
                             "rotation_degrees", "scale_range", "intensity_range", "select_score", "seed",
                             "split_seed")


@dataclass
class AnomalyConfig:
    """Every knob of an unsupervised run (one model on one preprocessing variant)."""

    model: str = "cae"  # "cae" (their Figure 5), "vae" (Figure 7), or a GAN: "dcgan" (Figure 9), "bigan", "alphagan"
    variant: str = "full+HE"  # raw, raw+HE, crop, crop+HE, full, full+HE
    data_dir: str | None = None  # None: the embedded phantom
    body_part: str = "XR_HAND"
    splits: tuple[str, ...] = ("train",)  # MURA splits pooled before the patient split (the paper: train)
    output_dir: str = "outputs/anomaly/cae_full+HE"
    cache_dir: str = "data/cache"
    phantom_dir: str = "data/phantom"
    phantom_patients: int = 240
    phantom_image_size: int = 512
    phantom_seed: int = 0  # the phantom's own seed (not the training seed: runs of several seeds share the data)
    image_size: int = 512  # the paper: 512 for the autoencoders and DCGAN, 128 for BiGAN and alpha-GAN
    batch_size: int = 16
    epochs: int = 20
    lr: float = 5e-4
    kld_weight: float = 1.0  # VAE: loss = L_M + kld_weight * KLD / pixels
    gan_latent: int = 128  # the GANs' latent code size
    gan_lr: float = 2e-4  # the GANs' Adam learning rate (betas 0.5, 0.999, as DCGAN)
    recon_weight: float = 10.0  # alpha-GAN: weight of the masked L1 reconstruction loss beside the adversarial ones
    top_k: int = 200
    hflip: bool = True
    rotation_degrees: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    intensity_range: tuple[float, float] = (0.9, 1.1)
    select_score: str | None = None  # best.pt by the validation ROC-AUC of this score (None: "mse" for the
    # autoencoders, "disc" for the GANs, whose discriminator gives the paper's GAN scores); the paper chose by ROC-AUC
    amp: str = "auto"
    num_workers: int = 2
    device: str = "auto"
    seed: int = 0
    split_seed: int = 0
    resume: bool = True
    max_steps_per_epoch: int | None = None
    on_bad: str = "raise"  # "skip": leave bad files out, counted in a warning (mh.data_problems lists them)

    def __post_init__(self):
        self.splits, self.scale_range = tuple(self.splits), tuple(self.scale_range)
        self.intensity_range = tuple(self.intensity_range)
        preprocess_variants(self.image_size, [self.variant])  # validates the name
        if self.model not in ANOMALY_MODELS:
            raise ValueError(f"AnomalyConfig.model must be one of {ANOMALY_MODELS}, got {self.model!r}")
        if self.model in GAN_MODELS:
            _gan_depth(self.image_size)  # validates the size
        if self.select_score is not None and self.select_score not in anomaly_score_names(self.model, self.top_k):
            raise ValueError(f"AnomalyConfig.select_score {self.select_score!r} is not a score of {self.model}: "
                             f"{anomaly_score_names(self.model, self.top_k)}")

    @property
    def selection_score(self) -> str:
        """The validation score best.pt is kept by: select_score, or the model's default."""
        return self.select_score or ("disc" if self.model in GAN_MODELS else "mse")


class AnomalyViewBatches:
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


def prepare_anomaly_data(cfg: AnomalyConfig, progress: bool = True) -> dict:
    """Studies with their train/val/test subset (Davletshina et al.'s split), one row per view, and the cache."""
    root = config_data_root(cfg)
    studies = pd.concat([load_studies(root, s, cfg.body_part, on_bad=cfg.on_bad) for s in cfg.splits],
                        ignore_index=True)
    studies = anomaly_split(studies, cfg.split_seed)
    images = studies_to_images(studies)
    pre = preprocess_variants(cfg.image_size, [cfg.variant])[cfg.variant]
    cache = build_anomaly_cache(images["image_path"], pre, cfg.cache_dir, progress=progress)
    return {"root": root, "studies": studies, "images": images, "cache": cache}


def _anomaly_loader(cache: AnomalyCache, images: pd.DataFrame, batch_size: int, num_workers: int, pin: bool):
    """A DataLoader of whole batches of preprocessed views (re-shuffle via loader.sampler.batches)."""
    sampler = EpochBatches()
    sampler.batches = epoch_batches(len(images), batch_size, False, 0, 0)
    return DataLoader(AnomalyViewBatches(cache, cache.rows(images["image_path"])), sampler=sampler, batch_size=None,
                      num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0,
                      generator=torch.Generator())  # its own: starting workers leaves the VAE's noise alone


def augment_views_and_masks(x, m, generator, cfg: AnomalyConfig):
    """The online augmentation, per sample: flip, rotation and scale applied alike to view and mask; intensity."""
    both = gpu_augment(torch.cat([x, m], 1), generator, cfg.rotation_degrees, cfg.hflip, cfg.scale_range)
    x, m = both[:, :1], (both[:, 1:] > 0.5).float()
    lo, hi = cfg.intensity_range
    gain = lo + (hi - lo) * torch.rand(len(x), 1, 1, 1, generator=generator, device=x.device)
    return (x * gain).clamp(0, 1), m


SCORE_ID_COLUMNS = ("image_path", "study_path", "patient", "label", "subset")  # a score table's non-scores


def evaluate_anomaly(model, cache: AnomalyCache, images: pd.DataFrame, cfg: AnomalyConfig, device,
                     progress: bool = False) -> pd.DataFrame:
    """Every score for every view of `images` (no augmentation), with the view's study, label and subset."""
    model.eval()
    dtype = amp_dtype(cfg.amp, device)
    loader = _anomaly_loader(cache, images, cfg.batch_size, 0, False)
    columns, index = {}, []
    with torch.inference_mode():
        for views, masks, idx in tqdm(loader, desc="scoring", leave=False, disable=not progress):
            x, m = views.to(device).float() / 255, masks.to(device).float()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            for k, v in reconstruction_scores(x, out, m, cfg.top_k, cfg.kld_weight).items():
                columns.setdefault(k, []).append(v.float().cpu())
            index.append(idx)
    order = torch.cat(index).numpy()
    scores = pd.DataFrame({k: torch.cat(v).numpy() for k, v in columns.items()})
    keep = [c for c in SCORE_ID_COLUMNS if c in images.columns]
    return pd.concat([images.iloc[order][keep].reset_index(drop=True), scores], axis=1)


def study_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """View scores to study scores (the mean of its views), one row per study with its label."""
    names = [c for c in scores.columns if c not in SCORE_ID_COLUMNS]
    return scores.groupby("study_path").agg({"label": "first", **dict.fromkeys(names, "mean")}).reset_index()


def anomaly_metrics(scores: pd.DataFrame, level: str = "study", n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """ROC-AUC (with a 95% bootstrap interval when n_boot > 0) and average precision of every score, per study
    (mean of its views) or per image."""
    data = study_scores(scores) if level == "study" else scores
    names = [c for c in data.columns if c not in SCORE_ID_COLUMNS]
    rows = []
    for name in names:
        one_class = data["label"].nunique() < 2
        low, high = (np.nan, np.nan) if one_class or n_boot <= 0 else \
            auroc_interval(data["label"], data[name], n_boot, seed)
        rows.append({"score": name, "roc_auc": np.nan if one_class else roc_auc_score(data["label"], data[name]),
                     "roc_auc_ci_low": low, "roc_auc_ci_high": high,
                     "average_precision": np.nan if one_class else average_precision_score(data["label"], data[name]),
                     "n": len(data), "n_abnormal": int(data["label"].sum())})
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
    keep = [c for c in SCORE_ID_COLUMNS if c in images.columns]
    return pd.concat([images[keep].reset_index(drop=True), scores.reset_index(drop=True)], axis=1)


def anomaly_optimizers(model, cfg: AnomalyConfig, device) -> dict:
    """Adam for an autoencoder ({'model'}); for a GAN one per side ({'discriminator', 'generator'}, betas 0.5/0.999)."""
    if cfg.model in GAN_MODELS:
        return {"discriminator": build_optimizer(model.discriminator_parameters(), cfg.gan_lr, device, (0.5, 0.999)),
                "generator": build_optimizer(model.generator_parameters(), cfg.gan_lr, device, (0.5, 0.999))}
    return {"model": build_optimizer(model.parameters(), cfg.lr, device)}


def autoencoder_step(model, x, mask, optimizer, scaler, dtype, kld_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """One training step of an autoencoder: the masked loss L_M (plus kld_weight x KLD / pixels for the VAE)."""
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        result = model(x)
    loss = masked_mse(x, result["recon"], mask).mean()
    if result["mu"] is not None:
        loss = loss + kld_weight * kl_divergence(result["mu"], result["logvar"]).mean() / x[0].numel()
    amp_step(loss, optimizer, scaler)
    return {"loss": loss.detach()}


def train_anomaly(cfg: AnomalyConfig, progress: bool = True) -> pd.DataFrame:
    """Train (or resume) an autoencoder (masked loss) or a GAN on normal training views; returns the history."""
    out = Path(cfg.output_dir)
    state = _resumable_state(cfg, ANOMALY_RESUME_MUST_MATCH)
    data = prepare_anomaly_data(cfg, progress)
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    seed_everything(cfg.seed)
    model = build_anomaly_model(cfg.model, cfg.image_size, cfg.gan_latent).to(device)
    optimizers = anomaly_optimizers(model, cfg, device)
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    history, best, start_epoch = [], None, 0
    if state is not None:
        history, best, start_epoch = _restore(state, model, optimizers, None, scaler)
        if progress:
            print(f"resuming {out / 'checkpoints' / 'last.pt'} after epoch {start_epoch} of {cfg.epochs}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2))
    images = data["images"]
    train_images = images[(images["subset"] == "train") & (images["label"] == 0)]
    val_images = images[images["subset"] == "val"]
    loader = _anomaly_loader(data["cache"], train_images, cfg.batch_size, cfg.num_workers, device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        loader.sampler.batches = epoch_batches(len(train_images), cfg.batch_size, True, cfg.seed, epoch)
        model.train()
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
        steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        loss_sums, n_seen, started = {}, 0, time.perf_counter()
        bar = tqdm(total=steps, desc=f"{cfg.model} {cfg.variant} epoch {epoch + 1}", leave=False, disable=not progress)
        for step, (views, masks, _) in enumerate(loader):
            if step >= steps:
                break
            x = views.to(device, non_blocking=True).float() / 255
            m = masks.to(device, non_blocking=True).float()
            x, m = augment_views_and_masks(x, m, generator, cfg)
            if cfg.model in GAN_MODELS:
                losses = gan_step(model, x, m, optimizers, scaler, dtype, generator, cfg.recon_weight)
            else:
                losses = autoencoder_step(model, x, m, optimizers["model"], scaler, dtype, cfg.kld_weight)
            for name, value in losses.items():
                loss_sums[name] = loss_sums.get(name, 0) + value * len(x)
            n_seen += len(x)
            bar.update()
        bar.close()
        train_time = time.perf_counter() - started
        val_scores = evaluate_anomaly(model, data["cache"], val_images, cfg, device)
        val_metrics = anomaly_metrics(val_scores, n_boot=0)
        losses = {f"train_{name}": float(total) / max(n_seen, 1) for name, total in loss_sums.items()}
        normal = val_scores[val_scores["label"] == 0]
        row = {"epoch": epoch + 1, **losses,
               **({"val_normal_mse": float(normal["mse"].mean())} if "mse" in normal else {}),
               **{f"val_auroc_{k}": v for k, v in val_metrics["roc_auc"].items()},
               "epoch_time_s": time.perf_counter() - started, "train_images_per_s": n_seen / train_time}
        history.append(row)
        score = row[f"val_auroc_{cfg.selection_score}"]
        improved = best is None or (not math.isnan(score) and (math.isnan(best) or score > best))
        if improved:
            best = score
        _save_epoch(_checkpoint(model, optimizers, None, scaler, epoch, history, cfg, best), improved, out)
        if progress:
            shown = ", ".join(f"{k.removeprefix('train_').replace('_', ' ')} {v:.5f}" for k, v in losses.items())
            print(f"{cfg.model} {cfg.variant} epoch {epoch + 1}/{cfg.epochs}: train {shown}, "
                  f"val ROC-AUC ({cfg.selection_score}) {score:.3f}" + ("  (best)" if improved else ""))
    return pd.DataFrame(history)


def load_anomaly_model(path: str | os.PathLike, device: str = "cpu"):
    """Load an unsupervised checkpoint (weights_only): (model in eval mode, its AnomalyConfig)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = AnomalyConfig(**state["config"])
    model = build_anomaly_model(cfg.model, cfg.image_size, cfg.gan_latent)
    model.load_state_dict(state["model"])
    return model.to(resolve_device(device)).eval(), cfg


def anomaly_heatmaps(model, cache: AnomalyCache, image_paths: Sequence[str], device: str = "auto",
                     sigma: float = 2.0, batch_size: int = 16) -> list[dict]:
    """Per view: the preprocessed image, its masked squared reconstruction error (smoothed, scaled to [0, 1]),
    and its masked-MSE score, in the format of plot_heatmaps and heatmap_localisation; in batches."""
    if len(image_paths) == 0:
        return []
    if len(image_paths) > batch_size:
        return [h for i in range(0, len(image_paths), batch_size)
                for h in anomaly_heatmaps(model, cache, image_paths[i:i + batch_size], device, sigma, batch_size)]
    dev = resolve_device(device)
    rows = cache.rows(image_paths)
    x = torch.from_numpy(cache.images[rows][:, None].astype(np.float32) / 255).to(dev)
    m = torch.from_numpy(cache.masks[rows][:, None].astype(np.float32)).to(dev)
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


REFERENCE_MODEL = "no model"  # the grid's rows of model-free scores (reference_anomaly_scores)
PUBLISHED_ANOMALY_AUROC = pd.DataFrame([
    {"model": "CAE", "score": "MSE", "variant": "full+HE", "roc_auc": 0.570},
    {"model": "VAE", "score": "KLD", "variant": "full+HE", "roc_auc": 0.533},
    {"model": "DCGAN", "score": "Disc. (D)", "variant": "full", "roc_auc": 0.530},
    {"model": "BiGAN", "score": "Disc. (D)", "variant": "full", "roc_auc": 0.549},
    {"model": "alpha-GAN", "score": "Disc. (D)", "variant": "full", "roc_auc": 0.607},
]).assign(source="Davletshina et al. 2020, MURA hands, test split (cited)")


def plot_anomaly_table(table: pd.DataFrame, title: str = "Study-level ROC-AUC (rows: model and score)",
                       labels: pd.DataFrame | None = None):
    """Heatmap of ROC-AUCs: rows model x score, columns preprocessing variants (their Figure 11 layout); `labels`
    (same shape, text) annotates the cells instead of the values, e.g. anomaly_results_table(..., "roc_auc_ci")."""
    fig, ax = plt.subplots(figsize=((2.4 if labels is not None else 1.6) * table.shape[1] + 3,
                                    0.45 * table.shape[0] + 1.5))
    annot = True if labels is None else labels.loc[table.index, table.columns].to_numpy()
    sns.heatmap(table.astype(float), annot=annot, fmt=".3f" if labels is None else "", cmap="RdYlGn", vmin=0.3,
                vmax=0.9, center=0.5, ax=ax, cbar_kws={"label": "ROC-AUC"}, annot_kws={"fontsize": 8})
    ax.set(title=title, xlabel="preprocessing", ylabel="")
    fig.tight_layout()
    return fig


def run_anomaly_grid(base: AnomalyConfig, models: Sequence[str], variants: Sequence[str],
                     image_sizes: dict[str, int] | None = None, progress: bool = True) -> pd.DataFrame:
    """Train (or resume) every model on every preprocessing variant and score each best checkpoint on the test
    subset: one row per (model, variant, score) with study-level ROC-AUC (and its 95% bootstrap interval) and
    average precision; per variant also the model-free scores of reference_anomaly_scores (model "no model"), the
    floor a model must beat. Variant by variant, so that a grid cut short has scored every model on the first
    variants. `image_sizes` sets a model's own size (the paper: {'bigan': 128, 'alphagan': 128}); the others take
    base.image_size."""
    if not models or not variants:
        raise ValueError("run_anomaly_grid needs at least one model and one variant")
    rows = []
    for variant in variants:
        for model in models:
            cfg = AnomalyConfig(**{**_config_dict(base), "model": model, "variant": variant,
                                   "image_size": (image_sizes or {}).get(model, base.image_size),
                                   "output_dir": str(Path(base.output_dir) / f"{model}_{variant}")})
            train_anomaly(cfg, progress)
            net, _ = load_anomaly_model(Path(cfg.output_dir) / "checkpoints" / "best.pt", cfg.device)
            data = prepare_anomaly_data(cfg, progress=False)
            test = data["images"][data["images"]["subset"] == "test"]
            scores = evaluate_anomaly(net, data["cache"], test, cfg, resolve_device(cfg.device))
            scores.to_csv(Path(cfg.output_dir) / "test_scores.csv", index=False)
            metrics = anomaly_metrics(scores, seed=cfg.seed).reset_index()
            rows.append(metrics.assign(model=ANOMALY_MODEL_NAMES[model], variant=variant, image_size=cfg.image_size,
                                       run_dir=cfg.output_dir))
        images = data["images"]  # the floor: model-free scores, on the last model's preprocessed views
        scores = reference_anomaly_scores(data["cache"], images[images["subset"] == "test"],
                                          images[(images["subset"] == "train") & (images["label"] == 0)], cfg.top_k)
        reference_dir = Path(base.output_dir) / f"{REFERENCE_MODEL.replace(' ', '_')}_{variant}"
        reference_dir.mkdir(parents=True, exist_ok=True)
        scores.to_csv(reference_dir / "test_scores.csv", index=False)
        rows.append(anomaly_metrics(scores, seed=cfg.seed).reset_index().assign(
            model=REFERENCE_MODEL, variant=variant, image_size=cfg.image_size, run_dir=str(reference_dir)))
    return pd.concat(rows, ignore_index=True)


def anomaly_results_table(results: pd.DataFrame, value: str = "roc_auc") -> pd.DataFrame:
    """Pivot the grid's results: rows model x score, columns preprocessing variants (their Figure 11 layout);
    value "roc_auc_ci" gives each ROC-AUC with its 95% bootstrap interval as text."""
    order = [v for v in preprocess_variants() if v in set(results["variant"])]
    if value == "roc_auc_ci":
        results = results.assign(roc_auc_ci=[f"{a:.3f} [{lo:.2f}, {hi:.2f}]" for a, lo, hi in
                                             results[["roc_auc", "roc_auc_ci_low", "roc_auc_ci_high"]].to_numpy()])
    table = results.pivot_table(index=["model", "score"], columns="variant", values=value, aggfunc="first",
                                sort=False)
    return table[order]


def anomaly_findings_table(results: pd.DataFrame, findings: pd.DataFrame, variant: str | None = None) -> pd.DataFrame:
    """Phantom only: each model x score's test ROC-AUC per planted finding type (its abnormal studies against all
    normal ones), for one preprocessing variant (default: the grid's first); attrs["n_abnormal"]: the count of
    abnormal test studies of each type."""
    variant = variant or results["variant"].iloc[0]
    tables = []
    for run in results[results["variant"] == variant].drop_duplicates("run_dir").itertuples():
        studies = study_scores(pd.read_csv(Path(run.run_dir) / "test_scores.csv"))
        names = [c for c in studies.columns if c not in ("study_path", "label")]
        table = metrics_by_finding(studies, findings, names)
        aurocs = table[[f"auroc_{n}" for n in names]].T.set_axis(names)
        tables.append(aurocs.assign(model=run.model).rename_axis("score").reset_index())
        counts = table["n_abnormal"]
    table = pd.concat(tables).set_index(["model", "score"]).rename_axis(columns="finding")
    table.attrs["n_abnormal"] = {kind: int(n) for kind, n in counts.items()}
    return table


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
            drawn = net.generator(z.to(next(net.parameters()).device))[:, 0].float().cpu().numpy()
        for ax, image in zip(row, drawn):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        row[0].set_title(f"{run.model} on {run.variant}: G(z)", fontsize=9, loc="left")
    fig.tight_layout()
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


def best_run_heatmaps(results: pd.DataFrame, score: str = "mse", n: int = 8, device: str = "auto") -> dict:
    """For the grid's best run by `score`: error heatmaps of abnormal test views (those with ground truth on the
    phantom), the boxes moved into the preprocessed frame, and their localisation scores over all such views."""
    best = results[results["score"] == score].sort_values("roc_auc", ascending=False).iloc[0]
    net, cfg = load_anomaly_model(Path(best["run_dir"]) / "checkpoints" / "best.pt", device)
    data = prepare_anomaly_data(cfg, progress=False)
    images = data["images"]
    abnormal = images[(images["subset"] == "test") & (images["label"] == 1)]
    findings = phantom_boxes(data["root"])
    boxes = transform_boxes(findings, data["cache"]) if findings is not None else None
    if boxes is not None:
        abnormal = abnormal[abnormal["image_path"].isin(boxes["image_file"])]
    heatmaps = anomaly_heatmaps(net, data["cache"], list(abnormal["image_path"]), device) if len(abnormal) else []
    localisation = heatmap_localisation(heatmaps, boxes) if boxes is not None and heatmaps else None
    return {"best": best, "heatmaps": heatmaps[:n], "boxes": boxes, "localisation": localisation}
