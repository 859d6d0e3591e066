"""Shared fixtures: a tiny phantom made once per test session, and a helper to write small PNGs; notebook tests
are marked slow."""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mura_helpers as mh  # noqa: E402

# pytest-xdist (`make test` runs `-n auto`): the cores are shared among its workers, so each worker's torch takes
# its share of them instead of every core (on CI's 2 cores: one thread each, not two), and so do the processes a
# worker starts (notebook kernels, phantom and cache pools): OMP_NUM_THREADS, unless set already. Without it each
# kernel's torch took every core beside the other worker: the suite ran 451 s, not 397 (docs/testing.md)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    WORKER_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(WORKER_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(WORKER_THREADS))

TINY = {"n_patients": 14, "seed": 3, "image_size": 128, "positive_rate": 0.4}
# The engine's tests train DenseNet-121, the smallest of mh.ARCHS: the engine does the same for each, and a 2-epoch
# run at 48 px takes 5.4-5.9 s against DenseNet-169's 9.5 s (its checkpoints, with Adam's state, 84 MB against
# 151 MB). The paper's DenseNet-169 is built, overfit and explained in its own tests and trained by notebook 03's.
TEST_ARCH = "densenet121"


@pytest.hookimpl(tryfirst=True)  # before -m reads the marks
def pytest_collection_modifyitems(items):
    """A test that runs a notebook is slow as well: `pytest -m "not slow"` (make test-fast) leaves every one out."""
    for item in items:
        if item.get_closest_marker("notebook"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """A 14-patient phantom with 128-px images; read-only for the tests (copy it to modify)."""
    return mh.make_phantom_mura(tmp_path_factory.mktemp("phantom"), progress=False, **TINY)


@pytest.fixture
def phantom_copy(tiny_phantom, tmp_path) -> Path:
    """A private, modifiable copy of the tiny phantom."""
    return Path(shutil.copytree(tiny_phantom, tmp_path / "download" / mh.MURA_DIRNAME))


def write_png(path: Path, mode: str = "L", size=(40, 32), value: int = 100) -> Path:
    """Write a small valid PNG in the given mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8), "L").convert(mode).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_phantom, tmp_path_factory) -> Path:
    """A 2-epoch DenseNet-121 run from scratch on the tiny phantom at 48 px (keeps its 2 best epochs)."""
    out = tmp_path_factory.mktemp("run")
    cfg = mh.TrainConfig(data_dir=str(tiny_phantom), output_dir=str(out / "run"), cache_dir=str(out / "cache"),
                         image_size=48, batch_size=8, epochs=2, pretrained=False, num_workers=0, keep_top_k=2,
                         arch=TEST_ARCH)
    mh.train(cfg, progress=False)
    return out / "run"


@pytest.fixture(scope="session")
def normal_heavy_phantom(tmp_path_factory) -> Path:
    """A 30-patient phantom with few positives (the unsupervised split needs more normal patients than positive)."""
    return mh.make_phantom_mura(tmp_path_factory.mktemp("phantom_normal"), n_patients=30, seed=5, image_size=128,
                                positive_rate=0.2, progress=False)
