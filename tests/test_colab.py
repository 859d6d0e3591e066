"""Colab's first run: the notebooks' setup cell (run as Colab runs it: a fake google.colab, a local git repository as
the remote, a folder standing in for Drive), local copies of data kept on Drive, cache stamps that read no file,
and worker processes that are not forked from the (threaded) kernel."""

import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import write_png

import mura_helpers as mh

# ---------------------------------------------------------------- caches: a stamp that reads no file


def test_a_cache_is_found_again_without_reading_a_file(tmp_path, monkeypatch):
    paths = [str(write_png(tmp_path / f"v{i}.png", value=100 + i)) for i in range(3)]
    cache = mh.build_image_cache(paths, 16, tmp_path / "cache", progress=False, workers=1)

    def no_reading(*_):
        raise AssertionError("a file was read")

    with monkeypatch.context() as m:
        m.setattr(mh.Path, "read_bytes", no_reading)
        m.setattr(mh, "load_image", no_reading)
        assert mh.build_image_cache(paths, 16, tmp_path / "cache", progress=False).path == cache.path
    for p in paths:  # copied again: new times, the same bytes
        os.utime(p, ns=(10**18, 10**18))
    with monkeypatch.context() as m:
        m.setattr(mh, "load_image", no_reading)  # found by content: not built again
        assert mh.build_image_cache(paths, 16, tmp_path / "cache", progress=False).path == cache.path
    Path(paths[1]).write_bytes(write_png(tmp_path / "other.png", value=180).read_bytes())  # changed: a new cache
    again = mh.build_image_cache(paths, 16, tmp_path / "cache", progress=False, workers=1)
    assert again.path != cache.path and int(again.array[1].mean()) == 180 and int(again.array[0].mean()) == 100


def test_the_anomaly_cache_is_found_again_after_its_files_are_copied_again(tiny_phantom, tmp_path, monkeypatch):
    copy = Path(mh.shutil.copytree(tiny_phantom, tmp_path / "a" / mh.MURA_DIRNAME))
    images = mh.studies_to_images(mh.load_all_studies(copy)).head(4)
    cfg = mh.PreprocessConfig(size=32)
    cache = mh.build_anomaly_cache(images["image_path"], cfg, tmp_path / "cache", progress=False, workers=1)
    for p in images["image_path"]:
        os.utime(p, ns=(10**18, 10**18))
    monkeypatch.setattr(mh, "_run_tasks", lambda *a, **k: pytest.fail("built again"))
    assert mh.build_anomaly_cache(images["image_path"], cfg, tmp_path / "cache", progress=False).folder == cache.folder


# ---------------------------------------------------------------- worker processes: never forked from the kernel


def _parent_pid(_) -> int:
    """The parent process's id, seen from a worker process."""
    return os.getppid()


@pytest.fixture
def busy_thread():
    """A thread running beside the test, as a Jupyter kernel's do (forking then may deadlock)."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    yield thread
    stop.set()
    thread.join()


def test_worker_processes_are_not_forked_from_this_process(busy_thread):
    parents = mh._run_tasks(_parent_pid, list(range(4)), "probe", progress=False, workers=2)
    assert os.getpid() not in parents  # started by a server process, not forked from this one


def test_data_loader_workers_are_not_forked_from_this_process(tiny_phantom, tmp_path):
    paths = [str(write_png(tmp_path / f"v{i}.png", value=i)) for i in range(8)]
    cache = mh.build_image_cache(paths, 8, tmp_path / "cache", progress=False, workers=1)
    images = mh.pd.DataFrame({"image_path": paths, "label": [0, 1] * 4, "study_path": [f"s{i // 2}" for i in range(8)]})
    loader = mh.make_view_loader(cache, images, 4, num_workers=2)
    assert loader.multiprocessing_context.get_start_method() in ("forkserver", "spawn")
    views = np.concatenate([batch[0].numpy() for batch in loader])
    assert sorted(views[:, 0, 0, 0].tolist()) == list(range(8))
    views = mh.studies_to_images(mh.load_all_studies(tiny_phantom)).head(4)
    anomaly = mh.build_anomaly_cache(views["image_path"], mh.PreprocessConfig(size=32), tmp_path / "cache",
                                     progress=False, workers=1)
    loader = mh._anomaly_loader(anomaly, views, 2, 2, False)
    assert loader.multiprocessing_context.get_start_method() in ("forkserver", "spawn")
    assert sum(len(batch[0]) for batch in loader) == 4


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Python 3.12+ warns when a threaded process forks")
def test_no_fork_warning_with_threads_running(busy_thread, tmp_path):
    paths = [str(write_png(tmp_path / f"v{i}.png", value=i)) for i in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        cache = mh.build_image_cache(paths, 8, tmp_path / "cache", progress=False, workers=2)
        images = mh.pd.DataFrame({"image_path": paths, "label": [0] * 8, "study_path": paths})
        assert sum(len(batch[0]) for batch in mh.make_view_loader(cache, images, 4, num_workers=2)) == 8
