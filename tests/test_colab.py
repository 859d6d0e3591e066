"""Colab's first run: the notebooks' setup cell (run as Colab runs it: a fake google.colab, a local git repository as
the remote, a folder standing in for Drive), local copies of data kept on Drive, cache stamps that read no file,
and worker processes that are not forked from the (threaded) kernel."""

import os
from pathlib import Path

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
