"""Colab's first run: the notebooks' setup cell (run as Colab runs it: a fake google.colab, a local git repository as
the remote, a folder standing in for Drive), local copies of data kept on Drive, cache stamps that read no file,
and worker processes that are not forked from the (threaded) kernel."""

import os
import sys
import threading
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import write_png

import mura_helpers as mh

# ---------------------------------------------------------------- data on Drive: a local copy, once


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip `folder` (as MURA is shipped: its folder inside) with each file's modification time."""
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, Path(folder.name) / p.relative_to(folder))
    return archive


def test_a_mura_zip_is_extracted_to_local_disk_once(tiny_phantom, tmp_path, monkeypatch):
    (tmp_path / "drive").mkdir()
    archive = zip_folder(tiny_phantom, tmp_path / "drive" / "MURA-v1.1.zip")
    root = mh.prepare_local_copy(archive, tmp_path / "local" / "MURA-v1.1", progress=False)
    assert root == tmp_path / "local" / "MURA-v1.1" / "MURA-v1.1"
    studies = mh.load_all_studies(root)
    assert len(studies) == len(mh.load_all_studies(tiny_phantom))
    first = next(root.rglob("*.png"))
    original = tiny_phantom / first.relative_to(root)
    assert abs(first.stat().st_mtime - original.stat().st_mtime) <= 2  # the zip's times (2 s resolution)
    first.unlink()  # a second call copies nothing
    assert mh.prepare_local_copy(archive, tmp_path / "local" / "MURA-v1.1", progress=False) == root
    assert not first.exists()
    interrupted = tmp_path / "local" / ".MURA-v1.1.tmp99999999"  # left by a copy whose process is gone
    (interrupted / "MURA-v1.1").mkdir(parents=True)
    os.utime(archive, (1, 1))  # a changed zip is extracted again
    assert mh.prepare_local_copy(archive, tmp_path / "local" / "MURA-v1.1", progress=False) == root
    assert first.exists() and not list((tmp_path / "local").glob(".*tmp*"))
    monkeypatch.setattr(mh, "LOCAL_DATA_DIR", tmp_path / "data")
    assert mh.resolve_data_dir(str(archive)) == tmp_path / "data" / "MURA-v1.1" / "MURA-v1.1"  # data_dir: the zip


def test_a_folder_on_drive_is_copied_to_local_disk_in_colab(phantom_copy, tmp_path, monkeypatch):
    drive = tmp_path / "content" / "drive"
    above = Path(phantom_copy).parent  # a folder above MURA: only MURA is copied
    (above / "unrelated.bin").write_bytes(b"x" * 1000)
    monkeypatch.setattr(mh, "DRIVE_DIR", drive)
    monkeypatch.setattr(mh, "LOCAL_DATA_DIR", tmp_path / "local")
    drive.mkdir(parents=True)
    on_drive = drive / "MyDrive"
    os.rename(above, on_drive)
    assert mh.resolve_data_dir(on_drive) == on_drive / mh.MURA_DIRNAME  # outside Colab: read in place
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    root = mh.resolve_data_dir(on_drive)
    assert root == tmp_path / "local" / mh.MURA_DIRNAME and not (root.parent / "unrelated.bin").exists()
    copied = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name != mh.LOCAL_COPY_MARK)
    assert copied == sorted(p.relative_to(on_drive / mh.MURA_DIRNAME) for p in (on_drive / mh.MURA_DIRNAME).rglob("*")
                            if p.is_file())
    view = next(root.rglob("*.png"))
    assert view.stat().st_mtime_ns == (on_drive / mh.MURA_DIRNAME / view.relative_to(root)).stat().st_mtime_ns
    monkeypatch.setattr(mh, "DRIVE_DIR", tmp_path / "unmounted")
    with pytest.raises(mh.MuraDataError, match="Drive is not mounted: tick USE_DRIVE in the setup cell"):
        mh.prepare_local_copy(tmp_path / "unmounted" / "MyDrive" / "MURA-v1.1.zip")


def test_a_local_copy_refuses_what_it_cannot_do(tiny_phantom, tmp_path, monkeypatch):
    not_zip = tmp_path / "MURA-v1.1.zip"
    not_zip.write_text("not a zip")
    with pytest.raises(mh.MuraDataError, match="not a zip archive"):
        mh.prepare_local_copy(not_zip, tmp_path / "local")
    (tmp_path / "mine").mkdir()
    with pytest.raises(mh.MuraDataError, match="exists and is not a copy made by prepare_local_copy"):
        mh.prepare_local_copy(tiny_phantom, tmp_path / "mine")
    monkeypatch.setattr(mh.shutil, "disk_usage", lambda _: types.SimpleNamespace(free=1000))
    with pytest.raises(mh.MuraDataError, match=r"GB to copy but 0\.0 GB free"):
        mh.prepare_local_copy(tiny_phantom, tmp_path / "local")
    assert not (tmp_path / "local").exists()


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
