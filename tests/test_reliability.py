"""Reliability (issues 13 and 25): nothing lost, nothing silently wrong, every bad setting named before work starts."""

import errno
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, TEST_ARCH, write_png
from PIL import Image

import mura_helpers as mh


def _train_config(root, out, cache, **kw):
    settings = {"image_size": 32, "batch_size": 8, "pretrained": False, "num_workers": 0, "seed": 1, "epochs": 1,
                "keep_top_k": 1, "max_steps_per_epoch": 2, "arch": TEST_ARCH, **kw}
    return mh.TrainConfig(data_dir=str(root), output_dir=str(out), cache_dir=str(cache), **settings)


def _anomaly_config(root, out, cache, **kw):
    settings = {"model": "cae", "variant": "full", "image_size": 32, "batch_size": 4, "epochs": 1,
                "max_steps_per_epoch": 1, "num_workers": 0, "device": "cpu", **kw}
    return mh.AnomalyConfig(data_dir=str(root), output_dir=str(out), cache_dir=str(cache), **settings)


# ---------------------------------------------------------------- 1. only what the phantom made is ever deleted


def _fake_mura(folder: Path) -> Path:
    mura = folder / mh.MURA_DIRNAME
    write_png(mura / "train" / "XR_HAND" / "patient00001" / "study1_negative" / "image1.png")
    (mura / "train_labeled_studies.csv").write_text("MURA-v1.1/train/XR_HAND/patient00001/study1_negative/,0\n")
    (mura / "my_notes.txt").write_text("a user's notes")
    (folder / "notes_beside.txt").write_text("more notes")
    return mura


def _all_files(folder: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_the_phantom_did_not_make_is_never_deleted(tmp_path):
    mura = _fake_mura(tmp_path / "phantom")
    before = _all_files(tmp_path)
    for make in (mh.ensure_phantom, mh.make_phantom_mura):
        with pytest.raises(mh.MuraDataError, match="not a phantom made by this suite") as err:
            make(tmp_path / "phantom", n_patients=3, image_size=64, progress=False)
        assert str(mura) in str(err.value) and "my_notes.txt" in str(err.value)
        assert _all_files(tmp_path) == before  # nothing deleted, nothing overwritten
    with pytest.raises(mh.MuraDataError):  # the notebooks' path (data_dir=None) too
        mh.config_data_root(mh.TrainConfig(phantom_dir=str(tmp_path / "phantom"), phantom_patients=3,
                                           phantom_image_size=64))
    assert _all_files(tmp_path) == before


def test_a_phantom_holding_a_users_file_is_not_deleted_and_an_old_version_is_remade(tmp_path):
    root = mh.ensure_phantom(tmp_path, n_patients=3, image_size=64, progress=False)
    made = json.loads((root / mh.PHANTOM_MANIFEST).read_text())
    assert made["made_by"] == mh.PHANTOM_MADE_BY and made["complete"] and "train_image_paths.csv" in made["files"]
    notes = root / "train" / "XR_HAND" / "my_notes.txt"
    notes.write_text("keep me")
    with pytest.raises(mh.MuraDataError, match="did not write") as err:
        mh.ensure_phantom(tmp_path, n_patients=4, image_size=64, progress=False)
    assert str(notes) in str(err.value) and notes.read_text() == "keep me"
    notes.unlink()
    legacy = {k: v for k, v in made.items() if k not in ("made_by", "files", "complete")}
    (root / mh.PHANTOM_MANIFEST).write_text(json.dumps({**legacy, "version": 1}))  # made by an older version
    mh.ensure_phantom(tmp_path, n_patients=3, image_size=64, progress=False)
    assert json.loads((root / mh.PHANTOM_MANIFEST).read_text())["version"] == mh.PHANTOM_VERSION


# ---------------------------------------------------------------- 2. resume=False keeps the earlier run


def test_a_fresh_run_moves_the_earlier_run_aside(tiny_phantom, normal_heavy_phantom, tmp_path):
    runs = {"train": (mh.train, _train_config(tiny_phantom, tmp_path / "sup", tmp_path / "cache", keep_top_k=1)),
            "anomaly": (mh.train_anomaly, _anomaly_config(normal_heavy_phantom, tmp_path / "ano", tmp_path / "cache"))}
    for fit, cfg in runs.values():
        fit(cfg, progress=False)
        out = Path(cfg.output_dir)
        before = _all_files(out)
        with pytest.warns(UserWarning, match="moved to") as caught:
            fit(mh.AnomalyConfig(**{**mh._config_dict(cfg), "resume": False}) if fit is mh.train_anomaly
                else mh.TrainConfig(**{**mh._config_dict(cfg), "resume": False}), progress=False)
        [aside] = list(tmp_path.glob(f"{out.name}.previous-*"))
        message = str(next(w.message for w in caught if "moved to" in str(w.message)))
        assert str(out) in message and str(aside) in message
        kept = {k.replace(str(aside), str(out)): v for k, v in _all_files(aside).items()}
        assert kept == {k: v for k, v in before.items() if not k.endswith(mh.RUN_LOCK)}  # byte for byte
        assert (out / "checkpoints" / "last.pt").is_file() and not (out / mh.RUN_LOCK).exists()


# ---------------------------------------------------------------- 3. no views is an error


def test_a_study_without_views_is_an_error(tiny_run):
    with pytest.raises(mh.MuraDataError, match="no views"):
        mh.predict_new_study(tiny_run / "checkpoints" / "best.pt", [], device="cpu")


@pytest.mark.notebook
def test_predict_notebook_with_an_empty_study_fails_clearly(tiny_run, tmp_path):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="no views"):
        papermill.execute_notebook(str(REPO / "notebooks" / "05_predict.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"study": [], "output_dir": str(tmp_path), "device": "cpu",
                                               "checkpoints": str(tiny_run / "checkpoints" / "best.pt")},
                                   cwd=str(REPO / "notebooks"), kernel_name="python3", progress_bar=False)
    assert not list(tmp_path.glob("predict_*.json"))


# ---------------------------------------------------------------- 4. one run at a time in a folder


def test_a_second_run_in_a_locked_folder_is_refused_and_a_dead_runs_lock_taken_over(tiny_phantom, tmp_path):
    cfg = _train_config(tiny_phantom, tmp_path / "run", tmp_path / "cache")
    with mh.run_lock(cfg.output_dir) as lock:  # a run in progress (this process)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and {"host", "started", "command"} <= set(holder)
        with pytest.raises(mh.RunLockedError, match=f"pid {os.getpid()}"):
            mh.train(cfg, progress=False)
        assert lock.is_file()  # the refused run left the holder's lock alone
    assert not lock.exists()  # released
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another live process
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": mh.socket.gethostname(), "started": "now",
                                    "command": "python train.py"}))
        with pytest.raises(mh.RunLockedError, match=f"pid {other.pid}.*python train.py"):
            mh.train_anomaly(mh.AnomalyConfig(output_dir=cfg.output_dir), progress=False)
    finally:
        other.kill()
        other.wait()
    with pytest.warns(UserWarning, match="no longer running"), mh.run_lock(cfg.output_dir):  # its process is dead
        assert json.loads(lock.read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------- 5. a corrupt data stream with valid checksums


def _corrupt_idat(path: Path) -> None:
    """Flip bytes of the compressed pixel data and recompute the chunk's CRC: the checksums stay valid."""
    data, out, pos = path.read_bytes(), bytearray(path.read_bytes()[:8]), 8
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IDAT":
            body = body[:2] + bytes(b ^ 0xFF for b in body[2:len(body) // 2]) + body[len(body) // 2:]
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + n
    path.write_bytes(bytes(out))


def test_an_image_with_a_corrupt_data_stream_is_caught_before_work(phantom_copy, tmp_path):
    studies = mh.load_studies(phantom_copy, "train")
    bad = Path(studies[studies["n_views"] >= 2]["image_paths"].iloc[0][0])
    _corrupt_idat(bad)
    with Image.open(bad) as im:
        im.verify()  # the checksums are valid: only a full decode sees the damage
    with pytest.raises(mh.MuraDataError, match="broken data stream") as err:
        mh.load_studies(phantom_copy, "train")
    assert str(bad) in str(err.value)
    with pytest.warns(UserWarning, match="skipped 1 problem"):
        skipped = mh.load_studies(phantom_copy, "train", on_bad="skip")
    assert str(bad) not in set(mh.studies_to_images(skipped)["image_path"])
    assert list(mh.data_problems(skipped)["path"]) == [str(bad)]
    cfg = _train_config(phantom_copy, tmp_path / "run", tmp_path / "cache", on_bad="skip", max_steps_per_epoch=1)
    with pytest.warns(UserWarning, match="skipped 1 problem"):
        assert len(mh.train(cfg, progress=False)) == 1  # the cache build never meets the bad file


# ---------------------------------------------------------------- 6. checkpoint digests


def _flip_bytes_of(path: Path, tensor: torch.Tensor, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes()[:64]) + 64
    assert at > 64
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


def _copy_of_run(tiny_run, tmp_path, **changes) -> mh.TrainConfig:
    """A copy of the session's 2-epoch run, and the config that resumes it there."""
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    return mh.TrainConfig(**{**json.loads((run / "config.json").read_text()), "output_dir": str(run), **changes})


def test_a_corrupt_checkpoint_is_named_and_a_good_one_offered(tiny_run, tmp_path):
    cfg = _copy_of_run(tiny_run, tmp_path, epochs=3, max_steps_per_epoch=1)
    folder = tmp_path / "run" / "checkpoints"
    state = torch.load(folder / "last.pt", weights_only=True)
    assert state[mh.DIGEST_KEY] == mh._state_digest({k: v for k, v in state.items() if k != mh.DIGEST_KEY})
    _flip_bytes_of(folder / "last.pt", state["model"]["features.norm5.weight"])  # 1-D: stored as numpy lays it out
    assert torch.load(folder / "last.pt", weights_only=True)  # torch itself loads it: only the digest tells
    for load in (lambda: mh.load_checkpoint(folder / "last.pt"), lambda: mh.train(cfg, progress=False)):
        with pytest.raises(mh.CheckpointError, match="corrupt") as err:
            load()
        message = str(err.value)
        assert message.startswith(str(folder / "last.pt")) and "weights_only" not in message
        assert "best.pt" in message or "epoch_" in message  # the previous good checkpoint is offered
    best = torch.load(folder / "best.pt", weights_only=True)
    _flip_bytes_of(folder / "best.pt", best["model"]["features.norm5.bias"])
    with pytest.raises(mh.CheckpointError, match="best.pt: corrupt"):
        mh.load_ensemble(folder / "best.pt", "cpu")


def test_a_checkpoint_without_a_digest_loads_with_a_warning(tiny_run, tmp_path):
    state = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    del state[mh.DIGEST_KEY]
    torch.save(state, tmp_path / "old.pt")  # as written before checkpoints carried a digest
    with pytest.warns(UserWarning, match="loaded unverified"):
        model, cfg = mh.load_checkpoint(tmp_path / "old.pt")
    assert cfg.image_size == 48


# ---------------------------------------------------------------- 7. resume checks the data


def test_resume_on_other_data_is_refused(tiny_phantom, tmp_path):
    mh.train(_train_config(tiny_phantom, tmp_path / "run", tmp_path / "cache"), progress=False)
    other = mh.make_phantom_mura(tmp_path / "other", n_patients=14, seed=4, image_size=64, positive_rate=0.4,
                                 progress=False)
    with pytest.raises(mh.MuraDataError, match="trained on") as err:
        mh.train(_train_config(other, tmp_path / "run", tmp_path / "cache", epochs=2), progress=False)
    assert str(tiny_phantom) in str(err.value) and str(other) in str(err.value)
    moved = Path(shutil.copytree(tiny_phantom, tmp_path / "moved" / mh.MURA_DIRNAME))  # the same data elsewhere
    assert len(mh.train(_train_config(moved, tmp_path / "run", tmp_path / "cache", epochs=2), progress=False)) == 2


# ---------------------------------------------------------------- 8. the cache sees changed content


def test_the_cache_sees_a_file_changed_with_the_same_size(tmp_path):
    paths = [write_png(tmp_path / f"v{i}.png", value=100) for i in range(2)]
    cache = mh.build_image_cache([str(p) for p in paths], 16, tmp_path / "cache", progress=False, workers=1)
    stat = paths[1].stat()
    replacement = write_png(tmp_path / "other.png", value=180).read_bytes()
    assert len(replacement) == stat.st_size
    paths[1].write_bytes(replacement)
    assert paths[1].stat().st_mtime_ns != stat.st_mtime_ns  # (with its time put back it is not seen: the stamp
    # that finds a cache reads no file, see _cache_path)
    again = mh.build_image_cache([str(p) for p in paths], 16, tmp_path / "cache", progress=False, workers=1)
    assert again.path != cache.path and int(again.array[1].mean()) == 180 and int(again.array[0].mean()) == 100
    killed = [tmp_path / "cache" / "views_16px_squash_0123.tmp99999999.npy", tmp_path / "cache" / "views_x.tmp1.npy"]
    for p in killed:  # a build killed long ago (its process gone), and one whose process (init) still runs
        p.write_bytes(b"partial")
        os.utime(p, (0, 0))
    with pytest.warns(UserWarning, match="interrupted cache build"):
        mh.build_image_cache([str(p) for p in paths], 16, tmp_path / "cache", progress=False, workers=1)
    assert not killed[0].exists() and killed[1].exists()


# ---------------------------------------------------------------- 9. a view with an empty hand mask is no score


def test_views_with_an_empty_hand_mask_are_left_out_and_counted(tiny_phantom, tmp_path):
    images = mh.studies_to_images(mh.load_all_studies(tiny_phantom)).head(6)
    cache = mh.build_anomaly_cache(images["image_path"], mh.PreprocessConfig(size=32), tmp_path, progress=False,
                                   workers=1)
    masks = np.load(cache.folder / "masks.npy", mmap_mode="r+")
    masks[2] = 0  # the hand was missed in this view
    masks.flush()
    empty = images["image_path"].iloc[2]
    cfg = mh.AnomalyConfig(image_size=32, device="cpu")
    scorers = {"model": lambda: mh.evaluate_anomaly(mh.build_anomaly_model("cae", 32), cache, images, cfg,
                                                    torch.device("cpu")),
               "floor": lambda: mh.reference_anomaly_scores(cache, images, images)}
    for score in scorers.values():
        with pytest.warns(UserWarning, match="1 of 6 view.*empty hand mask"):
            scores = score()
        assert empty not in set(scores["image_path"]) and len(scores) == 5
        assert scores.attrs["empty_masks"] == [empty]


# ---------------------------------------------------------------- 10-11. settings checked when made


@pytest.mark.parametrize("config, bad, allowed", [
    (mh.TrainConfig, {"epochs": 0}, r"\[1, "), (mh.TrainConfig, {"batch_size": 1}, r"\[2, "),
    (mh.TrainConfig, {"batch_size": -4}, "integer"), (mh.TrainConfig, {"batch_size": 0}, "integer"),
    (mh.TrainConfig, {"image_size": 16}, r"\[32, "), (mh.TrainConfig, {"lr": 0}, r"\(0.0, 1.0\]"),
    (mh.TrainConfig, {"lr": float("nan")}, "finite"), (mh.TrainConfig, {"lr": 50.0}, r"\(0.0, 1.0\]"),
    (mh.TrainConfig, {"arch": "resnet50"}, "densenet169"), (mh.TrainConfig, {"epochs": "five"}, "integer"),
    (mh.TrainConfig, {"epochs": 2.5}, "integer"), (mh.TrainConfig, {"pretrained": "maybe"}, "True or False"),
    (mh.TrainConfig, {"data_dir": ""}, "empty string"), (mh.TrainConfig, {"output_dir": " "}, "folder path"),
    (mh.TrainConfig, {"body_part": "XR_KNEE"}, "XR_HAND"), (mh.TrainConfig, {"device": "gpu"}, "cuda"),
    (mh.AnomalyConfig, {"amp": "fp8"}, "bf16"), (mh.AnomalyConfig, {"epochs": 0}, r"\[1, "),
    (mh.AnomalyConfig, {"batch_size": 1}, r"\[2, "), (mh.AnomalyConfig, {"splits": ["train", "test"]}, "valid"),
    (mh.AnomalyConfig, {"image_size": 100, "model": "vae"}, "VAE"), (mh.AnomalyConfig, {"image_size": 48}, "CAE"),
    (mh.AnomalyConfig, {"lr": -1}, r"\(0.0, 1.0\]"), (mh.AnomalyConfig, {"data_dir": ""}, "empty string"),
    (mh.AnomalyConfig, {"scale_range": (1.2, 0.8)}, "low <= high"),
])
def test_a_bad_setting_is_named_with_its_value_and_what_is_allowed(config, bad, allowed):
    name, value = next(iter(bad.items()))  # the setting at fault (any others set the context)
    with pytest.raises(mh.ConfigError, match=f"{config.__name__}.{name}") as err:
        config(**bad)
    assert repr(value) in str(err.value) and __import__("re").search(allowed, str(err.value))


def test_papermill_strings_are_read_as_what_they_say():
    cfg = mh.TrainConfig(pretrained="False", hflip="false", resume="0", channels_last="true", epochs="3",
                         lr="1e-3", batch_size=8.0, compile="False", max_steps_per_epoch="None")
    assert (cfg.pretrained, cfg.hflip, cfg.resume, cfg.channels_last, cfg.compile) == (False, False, False, True, False)
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.max_steps_per_epoch) == (3, 1e-3, 8, None)
    assert type(cfg.epochs) is int and type(cfg.batch_size) is int
    anomaly = mh.AnomalyConfig(splits="train", hflip="False", select_score="None", data_dir=Path("/data"))
    assert anomaly.splits == ("train",) and anomaly.hflip is False and anomaly.select_score is None
    assert anomaly.data_dir == "/data"
    assert mh.anomaly_grid_names("cae", "full+HE") == (("cae",), ("full+HE",))  # a string: a list of one
    with pytest.raises(mh.ConfigError, match="variants.*unknown"):
        mh.anomaly_grid_names(["cae"], "full+EH")
    with pytest.raises(mh.MuraDataError, match="empty path"):
        mh.load_studies("", "train")


def test_a_checkpoints_stored_image_size_is_checked(tiny_run, tmp_path):
    state = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["image_size"] = 4  # edited
    mh.save_atomic(state, tmp_path / "signed.pt")  # even with a fresh digest
    del state[mh.DIGEST_KEY]
    torch.save(state, tmp_path / "legacy.pt")
    for path in (tmp_path / "signed.pt", tmp_path / "legacy.pt"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(mh.CheckpointError, match=r"stored settings.*image_size = 4"):
                mh.load_checkpoint(path)
    edited = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    edited["config"]["image_size"] = 224  # a valid size, but not the one it was trained at: the digest tells
    torch.save(edited, tmp_path / "edited.pt")
    with pytest.raises(mh.CheckpointError, match="corrupt"):
        mh.load_checkpoint(tmp_path / "edited.pt")


# ---------------------------------------------------------------- 12. the wrong file given as a checkpoint


def test_wrong_kind_and_non_checkpoints_get_one_clear_error(tiny_run, tmp_path):
    best = tiny_run / "checkpoints" / "best.pt"
    with pytest.raises(mh.CheckpointError, match="supervised .*load_checkpoint") as err:
        mh.load_anomaly_model(best)
    assert str(err.value).startswith(str(best))
    anomaly = tmp_path / "anomaly.pt"
    mh.save_atomic({"model": {}, "config": mh._config_dict(mh.AnomalyConfig()), "kind": "anomaly"}, anomaly)
    with pytest.raises(mh.CheckpointError, match="anomaly-detection checkpoint.*load_anomaly_model"):
        mh.load_checkpoint(anomaly)
    data = best.read_bytes()
    files = {"truncated.pt": data[:len(data) // 2], "empty.pt": b"", "notes.pt": b"epoch 3 looked good\n",
             "random.pt": np.random.default_rng(0).bytes(4096)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Payload(), "config": {}}, tmp_path / "pickled.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other_program.pt")
    expected = {"truncated.pt": "truncated", "empty.pt": "empty file", "notes.pt": "not a PyTorch checkpoint",
                "random.pt": "not a PyTorch checkpoint", "pickled.pt": "safe load refuses",
                "other_program.pt": "not a checkpoint of this suite"}
    for name, what in expected.items():
        for load in (mh.load_checkpoint, mh.load_anomaly_model):
            with pytest.raises(mh.CheckpointError) as err:
                load(tmp_path / name)
            message = str(err.value)
            assert message.startswith(f"{tmp_path / name}: ") and what in message, message
            assert "weights_only" not in message and "\n" not in message


# ---------------------------------------------------------------- 13. encodings, unreadable folders, full disks


def test_a_csv_that_is_not_utf8_names_the_file_and_line(phantom_copy):
    csv = phantom_copy / "train_labeled_studies.csv"
    lines = csv.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"patient", "pätient".encode("latin-1"))
    csv.write_bytes(b"".join(lines))
    with pytest.raises(mh.MuraDataError, match="line 3: not UTF-8") as err:
        mh.load_studies(phantom_copy, "train")
    assert str(csv) in str(err.value)


def test_find_mura_root_skips_unreadable_folders(phantom_copy, monkeypatch):
    download = phantom_copy.parent
    locked = download / "a_locked"  # searched before the data (alphabetically, breadth first)
    locked.mkdir()
    (download / "b").mkdir()
    shutil.move(phantom_copy, download / "b" / mh.MURA_DIRNAME)
    iterdir = Path.iterdir

    def no_permission(self):
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(mh.Path, "iterdir", no_permission)  # chmod 000 does not stop root, who runs CI here
    assert mh.find_mura_root(download) == download / "b" / mh.MURA_DIRNAME
    shutil.rmtree(download / "b")
    with pytest.raises(mh.MuraDataError, match="Skipped 1 unreadable folder.*a_locked"):
        mh.find_mura_root(download)


def test_a_full_disk_says_so_and_leftover_temporaries_are_cleaned(tiny_run, tmp_path, monkeypatch):
    cfg = _copy_of_run(tiny_run, tmp_path, epochs=3, max_steps_per_epoch=1)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    good = last.read_bytes()

    def full_disk(fd):  # where a file system with delayed allocation (ext4) reports a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mh.os, "fsync", full_disk)
    with pytest.raises(OSError, match="disk full") as err:
        mh.save_atomic({"epoch": 2}, last)
    monkeypatch.undo()
    assert str(last) in str(err.value) and err.value.errno == errno.ENOSPC
    assert last.read_bytes() == good and not list(last.parent.glob(".*tmp*"))
    leftovers = [last.parent / ".last.pt.tmp99999", tmp_path / "run" / ".history.csv.tmp99999"]  # a killed write
    for p in leftovers:
        p.write_bytes(b"half")
    with pytest.warns(UserWarning, match="2 temporary file"):
        assert len(mh.train(cfg, progress=False)) == 3  # and resumed
    assert not any(p.exists() for p in leftovers)


# ---------------------------------------------------------------- 14. a fresh run overwrites nothing it did not write


def test_a_fresh_run_moves_aside_files_it_did_not_write(tiny_phantom, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    mine = {"config.json": '{"my": "own settings"}', "test_scores.csv": "my,scores\n", "val_scores.csv": "x\n"}
    for name, text in mine.items():
        (out / name).write_text(text)
    (out / "notes.txt").write_text("not a name a run writes")
    with pytest.warns(UserWarning, match="moved to") as caught:
        mh.train(_train_config(tiny_phantom, out, tmp_path / "cache"), progress=False)
    [aside] = list(tmp_path.glob("run.previous-*"))
    message = str(next(w.message for w in caught if "moved to" in str(w.message)))
    assert str(aside) in message and "config.json" in message
    assert {name: (aside / name).read_text() for name in mine} == mine  # byte for byte, nothing overwritten
    assert (out / "notes.txt").read_text() == "not a name a run writes"
    assert json.loads((out / "config.json").read_text())["arch"] == TEST_ARCH  # the run's own


def test_a_distributed_launch_writes_no_file_into_the_run_folder_before_the_run(tiny_phantom, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "launch_config.json").write_text("mine")
    seen = {}

    class FakeRun:
        returncode = 0

        def __init__(self, command, **kw):
            config = Path(command[command.index("--config") + 1])
            seen.update(config=config, fields=json.loads(config.read_text()))
            self.stdout = []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(mh.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(mh.pd, "read_csv", lambda path: path)
    mh.launch_training(_train_config(tiny_phantom, out, tmp_path / "cache"), devices=2, progress=False)
    assert (out / "launch_config.json").read_text() == "mine"  # untouched
    assert seen["fields"]["output_dir"] == str(out) and out not in seen["config"].parents
    assert not seen["config"].exists()  # the launch's own temporary file is gone


# ---------------------------------------------------------------- 15. a full disk: the path and the space needed


def _no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_a_checkpoint_write_on_a_full_disk_names_the_space_needed(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    last = tmp_path / "checkpoints" / "last.pt"
    mh.save_atomic({"epoch": 1}, last)
    good = last.read_bytes()
    tmp = last.with_name(f".last.pt.tmp{os.getpid()}")
    tmp.symlink_to("/dev/full")  # the kernel's own ENOSPC, at the write
    with pytest.raises(OSError, match=r"disk full: need \d+(\.\d)? MB at ") as err:
        mh.save_atomic({"epoch": 2, "weights": torch.zeros(300_000)}, last)
    assert str(last) in str(err.value) and err.value.errno == errno.ENOSPC
    assert last.read_bytes() == good and not tmp.exists() and not tmp.is_symlink()


FSIZE_SCRIPT = """
import resource, signal, sys
sys.path.insert(0, {repo!r})
import torch
import mura_helpers as mh
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then answers EFBIG, as a full disk answers ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    {call}
except OSError as e:
    print("OSError", e.errno, e)
except Exception as e:
    print(type(e).__name__, e)
"""


def _under_a_file_size_limit(call: str, limit: int) -> str:
    script = FSIZE_SCRIPT.format(repo=str(REPO), limit=limit, call=call)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # not killed (SIGBUS, SIGXFSZ)
    return done.stdout.strip()


def test_a_write_cut_short_by_the_kernel_says_so_with_the_path_and_size(tmp_path):
    last = tmp_path / "last.pt"
    mh.save_atomic({"epoch": 1}, last)
    good = last.read_bytes()
    said = _under_a_file_size_limit(f"mh.save_atomic({{'epoch': 2, 'w': torch.zeros(200_000)}}, {str(last)!r})",
                                    limit=64_000)  # torch's own writer used to end in a RuntimeError here
    assert said.startswith("OSError") and "need 0.9 MB at" in said and str(last) in said, said
    assert last.read_bytes() == good and _no_temporaries(tmp_path)
    views = [str(write_png(tmp_path / "views" / f"v{i}.png", size=(64, 48))) for i in range(3)]
    said = _under_a_file_size_limit(f"mh.build_image_cache({views!r}, 128, {str(tmp_path / 'cache')!r}, "
                                     f"progress=False, workers=1)", limit=16_000)
    assert said.startswith("OSError") and "need 0.1 MB at" in said and str(tmp_path / "cache") in said, said
    assert _no_temporaries(tmp_path / "cache")


def _tiny_images(phantom: Path, n: int = 6) -> list[str]:
    return list(mh.studies_to_images(mh.load_studies(phantom, "train"))["image_path"][:n])


def test_a_cache_build_reserves_its_space_before_writing(tiny_phantom, tmp_path, monkeypatch):
    paths = _tiny_images(tiny_phantom)
    builds = {"views": lambda: mh.build_image_cache(paths, 64, tmp_path / "cache", progress=False, workers=1),
              "anomaly": lambda: mh.build_anomaly_cache(paths, mh.PreprocessConfig(size=64), tmp_path / "cache",
                                                        progress=False, workers=1)}
    need = {"views": 6 * 64 * 64, "anomaly": 6 * (2 * 64 * 64 + 6 * 4 + len(mh.MASK_DOUBTS) * 4)}
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(mh.shutil, "disk_usage", lambda p: usage._replace(free=10_000))  # 0.01 MB free
    for name, build in builds.items():
        with pytest.raises(OSError, match="disk full: need") as err:
            build()
        message = str(err.value)
        assert f"need {math.ceil(need[name] / 1e5) / 10:g} MB" in message and str(tmp_path / "cache") in message
        assert "0.0 MB free" in message and err.value.errno == errno.ENOSPC
        assert _no_temporaries(tmp_path / "cache")
    monkeypatch.undo()
    calls = []

    def full_at_the_third(fd, offset, length):
        calls.append(length)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mh.os, "posix_fallocate", full_at_the_third, raising=False)
    with pytest.raises(OSError, match="disk full: need"):
        builds["anomaly"]()  # the third of its arrays finds the disk full: the others go too
    left = [p for p in (tmp_path / "cache").glob("anomaly_*") if p.suffix != ".key"]  # (a key names no cache)
    assert len(calls) == 3 and _no_temporaries(tmp_path / "cache") and not left


def test_a_damaged_cache_is_said_and_rebuilt(tiny_phantom, tmp_path):
    paths = _tiny_images(tiny_phantom)
    cache = mh.build_image_cache(paths, 48, tmp_path / "cache", progress=False, workers=1)
    expected = np.array(cache.array)
    data = cache.path.read_bytes()
    for damage in (data[:len(data) // 2], b"\x80\x04garbage" * 10, data + b"\x00" * 100, b""):
        cache.path.write_bytes(damage)
        with pytest.warns(UserWarning, match="cache damaged.*rebuilding") as caught:
            again = mh.build_image_cache(paths, 48, tmp_path / "cache", progress=False, workers=1)
        assert str(cache.path) in str(caught[0].message)
        assert np.array_equal(again.array, expected)
    pre = mh.PreprocessConfig(size=32)
    anomaly = mh.build_anomaly_cache(paths, pre, tmp_path / "cache", progress=False, workers=1)
    masks = np.array(anomaly.masks)
    with open(anomaly.folder / "masks.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.warns(UserWarning, match="masks.npy: cache damaged.*rebuilding"):
        again = mh.build_anomaly_cache(paths, pre, tmp_path / "cache", progress=False, workers=1)
    assert np.array_equal(again.masks, masks)


# ---------------------------------------------------------------- 16. degenerate views: named at load, never silent


def _view_of_a_study_with_two(phantom: Path) -> Path:
    """The first train view of the first study with two or more (so that losing it leaves its study views)."""
    studies = mh.load_studies(phantom, "train")
    return Path(studies[studies["n_views"] >= 2]["image_paths"].iloc[0][0])


def _replace_view(phantom: Path, array: np.ndarray) -> Path:
    """Overwrite that view with `array` (any grey array PIL saves as PNG) and return its path."""
    path = _view_of_a_study_with_two(phantom)
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("shape", [(1, 5000), (5000, 1), (20000, 100), (1, 1)])
def test_a_degenerate_view_shape_is_named_before_preprocessing(phantom_copy, tmp_path, shape):
    ramp = np.linspace(0, 255, shape[0] * shape[1]).reshape(shape).astype(np.uint8)
    bad = _replace_view(phantom_copy, ramp)
    for load in (lambda: mh.load_studies(phantom_copy, "train"),
                 lambda: mh.preprocess_view(bad, mh.PreprocessConfig(size=32)),
                 lambda: mh.build_image_cache([str(bad)], 32, tmp_path / "cache", progress=False, workers=1),
                 lambda: mh.train_anomaly(_anomaly_config(phantom_copy, tmp_path / "ano", tmp_path / "cache"),
                                          progress=False)):
        with pytest.raises(mh.MuraDataError, match=f"{shape[1]} x {shape[0]} px") as err:
            load()
        assert str(bad) in str(err.value)
    assert not list((tmp_path / "cache").glob("anomaly_*"))  # nothing was preprocessed


def _as_16bit(gray: np.ndarray) -> np.ndarray:
    return (gray.astype(np.uint16) * 16 + 1000).astype(np.uint16)  # a 12-bit detector's range


def test_a_16bit_view_is_windowed_on_robust_percentiles(phantom_copy):
    first = _view_of_a_study_with_two(phantom_copy)
    original = np.asarray(mh.load_image(first))
    hot = _as_16bit(original)
    hot[0, 0] = 65535  # one hot pixel
    _replace_view(phantom_copy, hot)
    windowed = np.asarray(mh.load_image(first))
    assert np.percentile(windowed, 99) >= np.percentile(original, 99) - 8  # not squeezed into a few grey levels
    assert np.corrcoef(windowed.ravel(), original.ravel())[0, 1] > 0.99
    full = mh.PreprocessConfig(size=64, equalize=None)
    Image.fromarray(original).save(first.with_name("eight_bit.png"))
    share = mh.preprocess_view(first.with_name("eight_bit.png"), full)["mask"].mean()
    first.with_name("eight_bit.png").unlink()
    assert mh.preprocess_view(first, full)["mask"].mean() == pytest.approx(share, rel=0.1)
    assert len(mh.load_studies(phantom_copy, "train")) > 0  # and loads without a problem


@pytest.mark.parametrize("case", ["constant 8-bit", "black", "16-bit flat with a speck"])
def test_a_view_without_contrast_is_reported_at_load(phantom_copy, case):
    if case == "16-bit flat with a speck":
        flat = np.full((200, 160), 3000, np.uint16)
        flat[:2, :2] = 60000  # 4 of 32000 pixels: the robust window collapses
    else:
        flat = np.full((200, 160), 0 if case == "black" else 117, np.uint8)
    bad = _replace_view(phantom_copy, flat)
    with pytest.raises(mh.MuraDataError, match="no contrast") as err:
        mh.load_studies(phantom_copy, "train")
    assert str(bad) in str(err.value)
    with pytest.warns(UserWarning, match="skipped 1 problem"):
        studies = mh.load_studies(phantom_copy, "train", on_bad="skip")
    assert list(mh.data_problems(studies)["path"]) == [str(bad)]


@pytest.mark.parametrize("value", [0, 128, 255])
def test_equalising_a_constant_view_keeps_its_grey(tmp_path, value):
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((120, 90), value, np.uint8)).save(path)
    for name, cfg in mh.preprocess_variants(64, ["raw+HE", "crop+HE", "raw+CLAHE"]).items():
        out = mh.preprocess_view(path, cfg)
        content = mh.preprocess_view(path, mh.PreprocessConfig(crop=cfg.crop, segment=False, equalize=None, size=64))
        inside = content["mask"].astype(bool)
        assert set(np.unique(out["image"][inside])) == {value}, name  # not white


def test_predict_warns_on_blank_views_and_counts_a_file_once(tiny_run, tiny_phantom, tmp_path):
    best = tiny_run / "checkpoints" / "best.pt"
    views = _tiny_images(tiny_phantom, 2)
    with pytest.warns(UserWarning, match="given 2 times.*counted once") as caught:
        twice = mh.predict_new_study(best, [views[0], views[1], views[0]], "cpu")
    assert views[0] in str(caught[0].message)
    once = mh.predict_new_study(best, views, "cpu")
    assert len(twice["views"]) == 2 and twice["study_prob"] == pytest.approx(once["study_prob"])
    blank = write_png(tmp_path / "study" / "image1.png", size=(96, 128), value=0)
    with pytest.warns(UserWarning, match="no contrast") as caught:
        mh.predict_new_study(best, [views[0], blank], "cpu")
    assert str(blank) in str(caught[0].message)
    tiny = write_png(tmp_path / "study" / "image2.png", size=(1, 1))
    with pytest.raises(mh.MuraDataError, match="1 x 1 px") as err:
        mh.predict_new_study(best, [views[0], tiny], "cpu")
    assert str(tiny) in str(err.value)


# ---------------------------------------------------------------- 17. names matched whole; splits and grids checked


def test_folder_names_are_matched_whole(phantom_copy):
    for csv in phantom_copy.glob("*.csv"):
        csv.unlink()  # a layout without the official CSVs (as the Kaggle hand subset): the folders are the truth
    patient = next((phantom_copy / "train" / "XR_HAND").iterdir())
    copy = Path(shutil.copytree(patient, patient.with_name(patient.name + "\n")))
    study = next(p for p in patient.iterdir() if p.is_dir())
    study_copy = Path(shutil.copytree(study, study.with_name(study.name + "\n")))
    with pytest.raises(mh.MuraDataError, match="bad folder name") as err:
        mh.load_studies(phantom_copy, "train")
    assert str(copy) in str(err.value) and str(study_copy) in str(err.value)


@pytest.mark.parametrize("fraction", [1.5, float("nan"), -0.1, "a tenth"])
def test_tuning_split_checks_its_fraction(tiny_phantom, fraction):
    studies = mh.load_studies(tiny_phantom, "train")
    with pytest.raises(mh.ConfigError, match="tuning_split.fraction"):
        mh.tuning_split(studies, fraction)


def test_grid_seeds_and_recipes_are_lists_of_distinct_names(tmp_path):
    assert mh.anomaly_grid_seeds("0,1") == (0, 1) and mh.anomaly_grid_seeds(3) == (3,)
    assert mh.anomaly_grid_seeds(["2", 5.0]) == (2, 5) and mh.anomaly_grid_seeds(None) is None
    assert mh.anomaly_grid_recipes("paper") == ("paper",)
    base = _anomaly_config(tmp_path, tmp_path / "grid", tmp_path / "cache")
    for bad, match in (({"seeds": [0, 0.0, "0"]}, "seeds.*given more than once"),
                       ({"seeds": [0, 0]}, "seeds.*given more than once"), ({"seeds": "0,x"}, "seeds"),
                       ({"recipes": ["paper", "paper"]}, "recipes.*given more than once"),
                       ({"recipes": "pap"}, "recipes.*unknown")):
        with pytest.raises(mh.ConfigError, match=match):
            mh.run_anomaly_grid(base, "cae", "full", progress=False, **bad)
    assert not (tmp_path / "grid").exists()  # refused before any run
    with pytest.raises(mh.ConfigError, match="models.*given more than once"):
        mh.anomaly_grid_names(["cae", "cae"], "full")


def test_seed_summary_refuses_to_count_one_run_twice():
    row = {"recipe": "suite", "model": "CAE", "variant": "full", "score": "mse", "level": "image", "seed": 0,
           "roc_auc": 0.6, "roc_auc_ci_low": 0.5, "roc_auc_ci_high": 0.7}
    results = pd.DataFrame([row, {**row, "seed": 1, "roc_auc": 0.7}])
    assert mh.seed_summary(results)["n_seeds"].tolist() == [2]
    with pytest.raises(ValueError, match="seed 0.*more than once"):
        mh.seed_summary(pd.concat([results, results.iloc[:1]]))


# ---------------------------------------------------------------- 18. locks, configs, links, checkpoints: wrong shapes


@pytest.mark.parametrize("content", ["[1, 2]", '{"pid": "abc"}', '{"pid": null}', '{"pid": 1099511627776}',
                                     '{"pid": 0}', '{"pid": -1}', '{"pid": true}', '"a string"'])
def test_a_lock_of_the_wrong_shape_is_named(tmp_path, content):
    lock = tmp_path / "run" / mh.RUN_LOCK
    lock.parent.mkdir()
    lock.write_text(content)
    with pytest.raises(mh.RunLockedError, match="not a lock") as err, mh.run_lock(lock.parent):
        pass
    assert str(lock) in str(err.value) and lock.read_text() == content  # fresh: it may be a run starting now
    os.utime(lock, (0, 0))  # old: a dead run's, or a file no run wrote
    with pytest.warns(UserWarning, match="taking over") as caught, mh.run_lock(lock.parent):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert str(lock) in str(caught[0].message)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-32"])
def test_the_command_line_reads_a_config_in_any_unicode_encoding(tmp_path, capsys, encoding):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"epochs": 1, "bogus": 2}), encoding=encoding)
    with pytest.raises(SystemExit) as ended:
        mh.main(["train", "--config", str(config)])
    assert ended.value.code == 2 and "unknown fields ['bogus']" in capsys.readouterr().err  # read, then checked
    config.write_bytes('{"data_dir": "données"}'.encode("cp1252"))
    with pytest.raises(SystemExit) as ended:
        mh.main(["train", "--config", str(config)])
    error = capsys.readouterr().err
    assert ended.value.code == 2 and str(config) in error and "not UTF-8" in error and "Traceback" not in error


def test_a_symlink_loop_is_named_as_one(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    for folder in (loop, a, loop / "run"):
        for config in (mh.TrainConfig, mh.AnomalyConfig):
            for name in ("output_dir", "cache_dir"):
                with pytest.raises(mh.ConfigError, match=f"{config.__name__}.{name} .*symlink loop"):
                    config(**{name: str(folder)})
        with pytest.raises(mh.ConfigError, match="symlink loop") as err:
            mh.build_image_cache([], 32, folder, progress=False)
        assert str(folder) in str(err.value)
        with pytest.raises(mh.ConfigError, match="symlink loop"), mh.run_lock(folder):
            pass


@pytest.mark.parametrize("field, value", [("epoch", "1"), ("epoch", -3), ("epoch", True), ("history", "rows"),
                                          ("best", "0.5"), ("rng", None), ("optimizer", [1]), ("config", "x")])
def test_a_resumable_field_of_the_wrong_type_names_the_file_and_field(tiny_run, tmp_path, field, value):
    cfg = _copy_of_run(tiny_run, tmp_path, epochs=3, max_steps_per_epoch=1)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state[field] = value
    mh.save_atomic(state, last)  # crafted: the digest is valid
    with pytest.raises(mh.CheckpointError, match=f"'{field}'") as err:
        mh.train(cfg, progress=False)
    assert str(err.value).startswith(str(last))
