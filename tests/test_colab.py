"""Colab's first run: the notebooks' setup cell (run as Colab runs it: a fake google.colab, a local git repository as
the remote, a folder standing in for Drive), local copies of data kept on Drive, cache stamps that read no file,
and worker processes that are not forked from the (threaded) kernel."""

import os
import re
import subprocess
import sys
import threading
import types
import warnings
import zipfile
from pathlib import Path

import nbformat
import numpy as np
import pytest
from conftest import REPO, write_png

import mura_helpers as mh

NOTEBOOK = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))[0]  # the six setup cells are the same

# ---------------------------------------------------------------- the setup cell, as Colab runs it


def setup_cell() -> str:
    """The notebooks' setup cell (their first code cell)."""
    return next(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")


def git(*args, cwd: Path) -> str:
    """Run git in `cwd` (with an identity for commits) and return what it printed."""
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


def make_upstream(tmp_path: Path) -> Path:
    """A git repository standing in for the suite's on GitHub: mura_helpers.py, requirements.txt, notebooks/."""
    upstream = tmp_path / "upstream" / "mura-suite"
    (upstream / "notebooks").mkdir(parents=True)
    (upstream / "mura_helpers.py").write_text("VERSION = 1\n")
    (upstream / "requirements.txt").write_text("papermill\n")
    (upstream / "notebooks" / "01_eda.ipynb").write_text("{}\n")
    git("init", "-q", cwd=upstream)
    git("add", ".", cwd=upstream)
    git("commit", "-q", "-m", "first", cwd=upstream)
    return upstream


def commit_version(repo: Path, version: int) -> None:
    """Commit a new mura_helpers.py (VERSION = version) to `repo`."""
    (repo / "mura_helpers.py").write_text(f"VERSION = {version}\n")
    git("commit", "-q", "-am", f"version {version}", cwd=repo)


class Colab:
    """Runs the setup cell as Colab would: the form's fields set (Colab writes them into the cell's source),
    /content at tmp_path/content, google.colab importable with drive.mount mounting tmp_path/my_drive as MyDrive,
    and pip's install recorded rather than run. `colab=False`: the same cell on a machine that is not Colab."""

    def __init__(self, tmp_path: Path, monkeypatch, colab: bool = True):
        self.content, self.my_drive = tmp_path / "content", tmp_path / "my_drive"
        self.content.mkdir(parents=True)
        self.my_drive.mkdir()
        self.mounts, self.pip = [], []
        monkeypatch.chdir(self.content)  # Colab starts here
        monkeypatch.setattr(sys, "path", list(sys.path))  # the cell puts the repository first
        real_run = subprocess.run

        def run(cmd, *args, **kwargs):
            if cmd[1:4] == ["-m", "pip", "install"]:
                self.pip.append(cmd)
                return subprocess.CompletedProcess(cmd, 0)
            return real_run(cmd, *args, **kwargs)

        monkeypatch.setattr(subprocess, "run", run)
        if colab:
            drive = types.ModuleType("google.colab.drive")
            drive.mount = self.mount
            colab_module = types.ModuleType("google.colab")
            colab_module.drive = drive
            monkeypatch.setitem(sys.modules, "google.colab", colab_module)
            monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
        else:
            monkeypatch.delitem(sys.modules, "google.colab", raising=False)

    def mount(self, mountpoint: str) -> None:
        """google.colab.drive.mount: the user's Drive appears as <mountpoint>/MyDrive."""
        self.mounts.append(mountpoint)
        Path(mountpoint).mkdir(exist_ok=True)
        if not (Path(mountpoint) / "MyDrive").exists():
            (Path(mountpoint) / "MyDrive").symlink_to(self.my_drive)

    def run(self, url: str = "", use_drive: bool = False) -> dict:
        """Run the setup cell with these form values; return its variables."""
        source = setup_cell()
        for pattern, value in ((r"^REPO_URL = .*$", f"REPO_URL = {url!r}"),
                               (r"^USE_DRIVE = .*$", f"USE_DRIVE = {use_drive!r}"),
                               (r'Path\("/content"\)', f"Path({str(self.content)!r})")):
            source, found = re.subn(pattern, lambda _, value=value: value, source, flags=re.MULTILINE)
            assert found == 1, pattern
        namespace = {}
        exec(compile(source, "setup cell", "exec"), namespace)
        return namespace


@pytest.fixture
def upstream(tmp_path) -> Path:
    return make_upstream(tmp_path)


def test_outside_colab_the_setup_cell_uses_the_checkout_and_nothing_else(upstream, tmp_path, monkeypatch):
    colab = Colab(tmp_path, monkeypatch, colab=False)
    monkeypatch.chdir(upstream / "notebooks")
    cell = colab.run(url=upstream.as_uri(), use_drive=True)
    assert cell["REPO"] == upstream and sys.path[0] == str(upstream)
    assert colab.mounts == [] and colab.pip == [] and list(colab.content.iterdir()) == []  # no mount, clone, pip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="open this notebook from the repository's notebooks/ folder"):
        colab.run(url=upstream.as_uri(), use_drive=True)


def test_in_colab_without_a_url_the_error_says_the_one_thing_to_do(tmp_path, monkeypatch):
    colab = Colab(tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match=r"^Paste the repository's git URL into REPO_URL in this cell's form "
                                           r"and run the cell again\.$"):
        colab.run()
    assert colab.mounts == []  # Drive is mounted only when asked
    with pytest.raises(RuntimeError, match=r"form \(no copy of it on Drive, up to 5 folders below MyDrive\)"):
        colab.run(use_drive=True)
    assert colab.mounts == [str(colab.content / "drive")]


def test_in_colab_the_url_is_cloned_and_a_stale_clone_is_updated(upstream, tmp_path, monkeypatch, capsys):
    colab = Colab(tmp_path, monkeypatch)
    cell = colab.run(url=upstream.as_uri())
    clone = colab.content / "mura-suite"
    assert cell["REPO"] == clone and (clone / "mura_helpers.py").read_text() == "VERSION = 1\n"
    assert sys.path[0] == str(clone)
    assert colab.pip == [[sys.executable, "-m", "pip", "install", "-q", "-r", str(clone / "requirements.txt")]]
    commit_version(upstream, 2)  # a later session of the same runtime, after a push
    assert colab.run(url=upstream.as_uri())["REPO"] == clone
    assert (clone / "mura_helpers.py").read_text() == "VERSION = 2\n"
    commit_version(upstream, 3)
    (clone / "mura_helpers.py").write_text("VERSION = 'edited here'\n")  # an edit the update would overwrite
    capsys.readouterr()
    assert colab.run(url=upstream.as_uri())["REPO"] == clone
    assert f"could not update {clone}, so it is used as it is" in capsys.readouterr().out
    assert (clone / "mura_helpers.py").read_text() == "VERSION = 'edited here'\n"  # kept
    with pytest.raises(RuntimeError, match="Correct REPO_URL in this cell's form"):
        colab.run(url=(tmp_path / "no-such-repository").as_uri())


def test_in_colab_a_copy_deep_on_drive_is_found_and_its_data_stays_local(upstream, tmp_path, monkeypatch):
    colab = Colab(tmp_path, monkeypatch)
    deep = colab.my_drive / "Colab Notebooks" / "courses" / "2026" / "mura-suite"  # 4 folders below MyDrive
    deep.parent.mkdir(parents=True)
    (upstream / "data" / "phantom").mkdir(parents=True)
    os.rename(upstream, deep)
    for decoy in ("MURA-v1.1/train/XR_HAND", "notes/.trash/mura-suite"):  # shallower, but not searched
        (colab.my_drive / decoy).mkdir(parents=True)
        (colab.my_drive / decoy / "mura_helpers.py").write_text("a decoy\n")
    cell = colab.run(url="", use_drive=True)
    drive = colab.content / "drive" / "MyDrive"
    assert colab.mounts == [str(colab.content / "drive")]
    repo = cell["REPO"]
    assert repo.parent == colab.content and sys.path[0] == str(repo)  # on this disk ...
    assert (repo / "mura_helpers.py").resolve() == (deep / "mura_helpers.py").resolve()  # ... with Drive's code
    assert (drive / deep.relative_to(colab.my_drive) / "mura_helpers.py").is_file()
    assert (repo / "outputs").resolve() == (deep / "outputs").resolve()  # outputs go to Drive
    assert not (repo / "data").exists()  # the phantom and caches are made here, not on Drive
    assert cell["REPO"] == colab.run(url="", use_drive=True)["REPO"]  # run again: the same
    too_deep = colab.my_drive / "a" / "b" / "c" / "d" / "e"
    too_deep.mkdir(parents=True)
    os.rename(deep, too_deep / "mura-suite")  # 6 folders below MyDrive
    with pytest.raises(RuntimeError, match="no copy of it on Drive, up to 5 folders below MyDrive"):
        Colab(tmp_path / "later", monkeypatch).run(url="", use_drive=True)


def test_the_setup_cells_carry_the_url_that_pyproject_names(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    url = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("urls", {}).get("Repository", "")
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        setup = next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert re.search(r'^REPO_URL = (".*")  # @param \{type:"string"\}$', setup, re.MULTILINE).group(1) \
            == f'"{url}"', path.name  # make colab-url writes it


def test_make_colab_url_writes_the_url_into_every_setup_cell(tmp_path):
    pytest.importorskip("tomllib")
    (tmp_path / "notebooks").mkdir()
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        (tmp_path / "notebooks" / path.name).write_bytes(path.read_bytes())
    url = "https://github.com/someone/mura-suite.git"
    pyproject = (REPO / "pyproject.toml").read_text()
    pyproject = pyproject.replace("[project.urls]\n", f'[project.urls]\nRepository = "{url}"\n')
    (tmp_path / "pyproject.toml").write_text(pyproject)
    subprocess.run([sys.executable, "-m", "mura_helpers", "colab-url", "--root", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    for path in sorted((tmp_path / "notebooks").glob("*.ipynb")):
        before = nbformat.read(REPO / "notebooks" / path.name, as_version=4)
        after = nbformat.read(path, as_version=4)
        setup = next(c for c in after.cells if c.cell_type == "code")
        assert f'REPO_URL = "{url}"  # @param {{type:"string"}}\n' in setup.source
        assert [c.source for c in after.cells] == [c.source.replace('REPO_URL = ""', f'REPO_URL = "{url}"')
                                                    for c in before.cells]  # nothing else changed


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
    with warnings.catch_warnings(record=True) as caught:  # (the warning is issued after the fork: never an error)
        warnings.simplefilter("always")
        cache = mh.build_image_cache(paths, 8, tmp_path / "cache", progress=False, workers=2)
        images = mh.pd.DataFrame({"image_path": paths, "label": [0] * 8, "study_path": paths})
        assert sum(len(batch[0]) for batch in mh.make_view_loader(cache, images, 4, num_workers=2)) == 8
    assert [str(w.message) for w in caught if "fork" in str(w.message)] == []
