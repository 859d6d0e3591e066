"""The MURA data layer: finding the dataset, the study tables, the CSV format, validation and image reading."""

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import write_png
from PIL import Image

import mura_helpers as mh

COLUMNS = {"split", "body_part", "patient", "study", "study_path", "label", "n_views", "image_paths"}


# ---------------------------------------------------------------- finding the dataset


def test_find_mura_root_accepts_the_folder_its_parent_and_a_nested_download(phantom_copy):
    download = phantom_copy.parent
    assert mh.find_mura_root(phantom_copy) == phantom_copy
    assert mh.find_mura_root(download) == phantom_copy
    nested = download.parent / "kagglehub" / "datasets" / "owner" / "mura-hand-xray" / "versions" / "1"
    nested.mkdir(parents=True)
    shutil.move(str(download), nested / "download")
    assert mh.find_mura_root(download.parent / "kagglehub" / "datasets") == nested / "download" / mh.MURA_DIRNAME


def test_find_mura_root_accepts_a_renamed_top_folder(phantom_copy):
    renamed = phantom_copy.rename(phantom_copy.parent / "mura-hand")
    assert mh.find_mura_root(renamed.parent) == renamed
    studies = mh.load_studies(renamed, "train")
    assert len(studies) > 0 and studies["study_path"].str.startswith("mura-hand/train/XR_HAND/").all()


@pytest.mark.parametrize("make", ["missing", "file", "empty_dir"])
def test_find_mura_root_explains_what_it_looked_for(tmp_path, make):
    target = tmp_path / "nothing_here"
    if make == "file":
        target.write_text("not a dataset")
    elif make == "empty_dir":
        (target / "some" / "folder").mkdir(parents=True)
    with pytest.raises(mh.MuraDataError) as err:
        mh.find_mura_root(target)
    assert str(target) in str(err.value) and "MURA" in str(err.value)


# ---------------------------------------------------------------- the study tables and the CSV format


def test_load_studies_on_the_phantom_matches_its_csvs(tiny_phantom):
    for split in mh.SPLITS:
        studies = mh.load_studies(tiny_phantom, split)
        assert set(studies.columns) >= COLUMNS
        assert (studies["split"] == split).all() and (studies["body_part"] == "XR_HAND").all()
        suffix_label = studies["study"].str.endswith("_positive").astype(int)
        assert (studies["label"] == suffix_label).all()
        assert (studies["n_views"] == studies["image_paths"].map(len)).all()
        assert studies["n_views"].between(1, 5).all()
        for paths in studies["image_paths"]:
            names = [p.rsplit("/", 1)[1] for p in paths]
            assert names == [f"image{i}.png" for i in range(1, len(paths) + 1)]
        csv_rows = (tiny_phantom / f"{split}_labeled_studies.csv").read_text().splitlines()
        assert sorted(csv_rows) == sorted(f"{p},{lab}" for p, lab in zip(studies["study_path"], studies["label"]))
        assert len(mh.data_problems(studies)) == 0


def test_official_csv_format(tiny_phantom):
    for split in mh.SPLITS:
        studies_csv = (tiny_phantom / f"{split}_labeled_studies.csv").read_text().splitlines()
        images_csv = (tiny_phantom / f"{split}_image_paths.csv").read_text().splitlines()
        assert studies_csv and images_csv
        for line in studies_csv:  # no header, trailing slash, label 0/1 that matches the folder suffix
            path, label = line.rsplit(",", 1)
            assert path.startswith(f"MURA-v1.1/{split}/XR_HAND/patient") and path.endswith("/")
            assert label == ("1" if path.endswith("_positive/") else "0")
        for line in images_csv:
            assert line.startswith(f"MURA-v1.1/{split}/XR_HAND/") and line.endswith(".png")
            assert (tiny_phantom.parent / line).is_file()


def test_folder_walk_without_csvs_gives_the_same_table(tiny_phantom, phantom_copy):
    for f in phantom_copy.glob("*_*.csv"):
        if f.name != mh.PHANTOM_FINDINGS_CSV:
            f.unlink()
    for split in mh.SPLITS:
        with_csv = mh.load_studies(tiny_phantom, split)
        walked = mh.load_studies(phantom_copy, split)
        assert list(walked["study_path"]) == list(with_csv["study_path"])
        assert list(walked["label"]) == list(with_csv["label"])
        assert list(walked["n_views"]) == list(with_csv["n_views"])


def test_any_body_part_or_all_of_them(tmp_path):
    root = mh.make_phantom_mura(tmp_path, n_patients=14, image_size=64, body_parts=("XR_HAND", "XR_WRIST"),
                                progress=False, workers=1)
    both = mh.load_all_studies(root, body_part="all")
    assert set(both["body_part"]) == {"XR_HAND", "XR_WRIST"}
    wrist = mh.load_all_studies(root, body_part="XR_WRIST")
    assert set(wrist["body_part"]) == {"XR_WRIST"}
    assert len(wrist) + len(mh.load_all_studies(root, body_part="XR_HAND")) == len(both)
    assert len(mh.load_all_studies(root, body_part=["XR_HAND", "XR_WRIST"])) == len(both)
    with pytest.raises(mh.MuraDataError, match="XR_KNEE"):
        mh.load_studies(root, "train", body_part="XR_KNEE")
    with pytest.raises(mh.MuraDataError, match="XR_ELBOW"):  # a valid part that this dataset lacks
        mh.load_studies(root, "train", body_part="XR_ELBOW")


def test_studies_to_images_and_overview(tiny_phantom):
    studies = mh.load_all_studies(tiny_phantom)
    images = mh.studies_to_images(studies)
    assert len(images) == studies["n_views"].sum()
    assert images.groupby("study_path")["view"].max().sort_index().tolist() == \
        studies.set_index("study_path")["n_views"].sort_index().tolist()
    overview = mh.dataset_overview(studies)
    assert overview.loc["train", "studies"] == (studies["split"] == "train").sum()
    assert overview["images"].sum() == len(images)
    assert overview["abnormal_images"].sum() == images["label"].sum()
    assert mh.patients_in_both_splits(studies) == []


def test_patients_in_both_splits_finds_leakage():
    studies = pd.DataFrame({"split": ["train", "valid", "train"], "body_part": ["XR_HAND"] * 3,
                            "patient": ["patient00001", "patient00001", "patient00002"]})
    assert mh.patients_in_both_splits(studies) == ["XR_HAND/patient00001"]


# ---------------------------------------------------------------- bad input: named in the error, or skipped and counted


def _corrupt(root, case):
    """Damage a copy of the phantom in one way; return (the path the error must name, the problem)."""
    study = sorted((root / "train" / "XR_HAND").glob("patient*/study*"))[0]
    first = study / "image1.png"
    if case == "missing image":
        first.unlink()
        return first, "missing file"
    if case == "empty image":
        first.write_bytes(b"")
        return first, "empty file"
    if case == "truncated image":
        data = first.read_bytes()
        first.write_bytes(data[: len(data) // 2])
        return first, "truncated"
    if case == "empty study":
        empty = study.parent / "study9_negative"
        empty.mkdir()
        csv = root / "train_labeled_studies.csv"
        csv.write_text(csv.read_text() + f"MURA-v1.1/train/XR_HAND/{study.parent.name}/study9_negative/,0\n")
        return empty, "empty study"
    if case in (".DS_Store", "Thumbs.db"):
        stray = study / case
        stray.write_bytes(b"\x00\x01junk")
        return stray, "stray file"
    if case == "bad study folder name":
        bad = study.parent / "study1_maybe"
        write_png(bad / "image1.png")
        return bad, "bad folder name"
    if case == "label mismatch":
        csv = root / "train_labeled_studies.csv"
        rel = f"MURA-v1.1/train/XR_HAND/{study.parent.name}/{study.name}/"
        label = "1" if study.name.endswith("negative") else "0"
        csv.write_text("".join(f"{rel},{label}\n" if line.startswith(rel) else line + "\n"
                               for line in csv.read_text().splitlines()))
        return study, "label mismatch"
    if case == "unlisted image":
        extra = write_png(study / "image9.png")
        return extra, "unlisted image"
    raise AssertionError(case)


BAD_CASES = ["missing image", "empty image", "truncated image", "empty study", ".DS_Store", "Thumbs.db",
             "bad study folder name", "label mismatch", "unlisted image"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_an_error_naming_the_file(phantom_copy, case):
    path, problem = _corrupt(phantom_copy, case)
    with pytest.raises(mh.MuraDataError) as err:
        mh.load_studies(phantom_copy, "train")
    message = str(err.value)
    assert str(path) in message and problem in message
    assert "on_bad='skip'" in message


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_skipped_counted_and_reported_on_request(tiny_phantom, phantom_copy, case):
    path, problem = _corrupt(phantom_copy, case)
    with pytest.warns(UserWarning, match="skipped"):
        studies = mh.load_studies(phantom_copy, "train", on_bad="skip")
    problems = mh.data_problems(studies)
    assert len(problems) >= 1 and str(path) in set(problems["path"])
    assert (problems["problem"] + " " + problems["detail"]).str.contains(problem).any()
    clean = mh.load_studies(tiny_phantom, "train")
    assert 0 < len(studies) <= len(clean)
    used = {p for paths in studies["image_paths"] for p in paths}
    assert str(path) not in used  # nothing bad reaches training
    suffix_label = studies["study"].str.endswith("_positive").astype(int)
    assert (studies["label"] == suffix_label).all()  # and no silently wrong label


def test_csv_rows_for_missing_studies_are_reported(phantom_copy):
    csv = phantom_copy / "train_labeled_studies.csv"
    csv.write_text(csv.read_text() + "MURA-v1.1/train/XR_HAND/patient99999/study1_negative/,0\n")
    with pytest.raises(mh.MuraDataError, match="patient99999.*missing study"):
        mh.load_studies(phantom_copy, "train")


def test_malformed_csv_names_the_file_and_line(phantom_copy):
    csv = phantom_copy / "train_labeled_studies.csv"
    csv.write_text("path,label\n" + csv.read_text())
    with pytest.raises(mh.MuraDataError, match=r"train_labeled_studies.csv, line 1"):
        mh.load_studies(phantom_copy, "train")


def test_errors_are_raised_before_any_work_on_the_other_split(phantom_copy):
    _corrupt(phantom_copy, "truncated image")
    assert len(mh.load_studies(phantom_copy, "valid")) > 0  # the valid split is unaffected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(mh.MuraDataError):
            mh.load_all_studies(phantom_copy)


# ---------------------------------------------------------------- load_image: every PNG mode to 8-bit grey


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "1"])
def test_load_image_reads_8bit_modes_as_grey(tmp_path, mode):
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (40, 1))  # 32 x 40 px: the smallest sides a view may have
    source = Image.fromarray(grey, "L")
    image = {"P": lambda: source.convert("RGB").quantize(256), "1": lambda: source.point(lambda v: 255 * (v > 127))
             .convert("1")}.get(mode, lambda: source.convert(mode))()
    path = tmp_path / f"view_{mode}.png"
    image.save(path)
    assert Image.open(path).mode == mode
    out = mh.load_image(path)
    assert out.mode == "L" and out.size == (grey.shape[1], grey.shape[0])
    expected = grey if mode != "1" else np.where(grey > 127, 255, 0)
    assert np.abs(np.asarray(out, int) - expected).max() <= (8 if mode == "P" else 1)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_load_image_scales_16bit_to_8bit_without_clipping(tmp_path, mode):
    values = np.linspace(1000, 4000, 64 * 32).reshape(32, 64)  # a 12-bit detector range inside 16 bits
    array = values.astype(np.uint16) if mode == "I;16" else values.astype(np.int32)
    path = tmp_path / ("view16.png" if mode == "I;16" else "view32.tif")  # PNG holds no 32-bit grey
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(mh.load_image(path))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200  # the full range is kept, not clipped to a few values
    assert (np.diff(out.astype(int), axis=1) >= 0).all()  # monotone like the input


@pytest.mark.parametrize("case", ["missing image", "empty image", "truncated image"])
def test_load_image_errors_name_the_file(phantom_copy, case):
    path, problem = _corrupt(phantom_copy, case)
    with pytest.raises(mh.MuraDataError) as err:
        mh.load_image(path)
    assert str(path) in str(err.value) and problem in str(err.value)
