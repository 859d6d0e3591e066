"""Notebooks: committed clean, one setup cell shared by all six that declares what later cells take from it, and
executed headless with papermill on the tiny phantom (those runs are slow: `pytest -m "not slow"` skips them)."""

import ast
import dataclasses
import json
import re

import nbformat
import numpy as np
import pandas as pd
import pytest
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# Every figure each notebook saves (outputs/figures/NAME.png), kept stable once published: a name says what the figure
# shows, with the reference report's figure number where it reproduces one (figNN); predict_<study> per study.
FIGURES = {
    "01_eda.ipynb": ["eda_fig15_random_views_train", "eda_fig16_random_views_abnormal", "eda_fig17_patients_per_split",
                     "eda_fig18_studies_per_patient", "eda_fig19_views_per_study", "eda_label_balance",
                     "eda_image_sizes_modes", "eda_intensity_histograms", "eda_phantom_findings"],
    "02_pipeline_check.ipynb": ["pipeline_raw_cached_augmented"],
    "03_training.ipynb": ["training_fig32_curves"],
    "04_results.ipynb": ["results_headline", "results_control_curves", "results_fig32_curves", "results_roc",
                         "results_confusion", "results_confident_cases", "results_activation_maps"],
    "05_predict.ipynb": ["predict_{name}"],
    "06_anomaly_detection.ipynb": ["anomaly_fig01_preprocessing_steps", "anomaly_suspect_masks", "anomaly_mask_iou",
                                   "anomaly_fig11_auroc_study", "anomaly_fig11_auroc_image", "anomaly_gan_samples",
                                   "anomaly_fig12_reconstructions", "anomaly_error_heatmaps"],
}


def run_notebook(name, workdir, **parameters):
    """Execute notebooks/<name> with papermill into workdir and return the executed notebook."""
    import papermill

    out = workdir / name
    papermill.execute_notebook(str(REPO / "notebooks" / name), str(out), parameters=parameters,
                               cwd=str(REPO / "notebooks"), kernel_name="python3", progress_bar=False)
    return nbformat.read(out, as_version=4)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_clean_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)



def saved_figure_names(path):
    """The names a notebook's cells pass to mh.save_figure, in order (an f-string as written: predict_{name})."""
    names = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "mh.save_figure":
                    name = node.args[1]
                    names.append(name.value if isinstance(name, ast.Constant) else ast.unparse(name)[2:-1])
    return names


def test_the_notebooks_save_their_figures_under_stable_names():
    assert {path.name: saved_figure_names(path) for path in NOTEBOOKS} == FIGURES

# ---------------------------------------------------------------- the module's public surface

# Public, used by none of the notebooks, tests, benchmarks and docs, but renamed only after other branches that edit
# the code around them (the phantom's drawing, the hand mask) have landed: this set only shrinks.
PENDING_PRIVATE: set[str] = set()


def module_public_names():
    """The module's top-level names without a leading underscore, in the order it defines them."""
    names = []
    for node in ast.parse((REPO / "mura_helpers.py").read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            names += [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                      if isinstance(t, ast.Name)]
    return [n for n in dict.fromkeys(names) if not n.startswith("_")]


def test_all_lists_every_public_name_in_section_order():
    import mura_helpers as mh

    assert mh.__all__ == module_public_names()


def test_the_notebooks_use_only_the_public_api():
    import mura_helpers as mh

    used = {path.name: {ast.unparse(node) for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"
                        for node in ast.walk(ast.parse(c.source))
                        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "mh"}
            for path in NOTEBOOKS}
    assert {name: sorted(n for n in names if n[3:] not in mh.__all__) for name, names in used.items()} == \
        {name: [] for name in used}  # not mh.pd, mh._private: a notebook imports its own libraries


def test_every_public_name_is_used_by_a_notebook_a_test_a_benchmark_or_the_docs():
    texts = [c.source for path in NOTEBOOKS for c in nbformat.read(path, as_version=4).cells]
    for pattern in ("tests/*.py", "benchmarks/*", "docs/*.md", "README.md"):
        texts += [path.read_text() for path in sorted(REPO.glob(pattern)) if path.is_file()]
    text = re.sub(r"\nPENDING_PRIVATE = \{.*?\}\n", "\n", "\n".join(texts), flags=re.DOTALL)  # not a use
    unused = {n for n in module_public_names() if not re.search(rf"(\bmh\.|[\"'])({n})\b", text)}
    assert unused == PENDING_PRIVATE  # a new public name needs a user (mh.NAME); an unused one becomes _NAME


# ---------------------------------------------------------------- the gallery: the demo's figures, in docs/


def gallery_module():
    """docs/make_gallery.py, imported."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_gallery", REPO / "docs" / "make_gallery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gallery_shows_figures_that_the_notebooks_save():
    saved = {f"{name.removesuffix('.ipynb')}:{figure}" for name, figures in FIGURES.items() for figure in figures}
    shown = {f"{notebook}:{name}" for name, notebook, _ in gallery_module().GALLERY}
    assert shown - saved == set()


def test_make_gallery_writes_small_pngs_labelled_as_phantom_data(tmp_path):
    from PIL import Image

    gallery = gallery_module()
    figures, docs = tmp_path / "figures", tmp_path / "docs"
    figures.mkdir()
    docs.mkdir()
    names = [name for name, _, _ in gallery.GALLERY]
    wide = np.broadcast_to(np.linspace(0, 255, 2000, dtype=np.uint8)[None, :, None], (300, 2000, 3))  # a figure
    for name in names[1:]:
        Image.fromarray(np.ascontiguousarray(wide)).save(figures / f"{name}.png")
    with pytest.raises(SystemExit, match=names[0]):  # a figure missing: named, nothing written
        gallery.write_gallery(figures, docs, "test settings")
    assert not (docs / "gallery.md").exists()
    Image.fromarray(np.full((100, 400, 3), 200, np.uint8)).save(figures / f"{names[0]}.png")
    total = gallery.write_gallery(figures, docs, "test settings")
    pngs = sorted((docs / "gallery").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(names) and total == sum(p.stat().st_size for p in pngs)
    assert all(Image.open(p).width <= gallery.GALLERY_WIDTH for p in pngs)
    assert Image.open(docs / "gallery" / f"{names[0]}.png").width == 400  # a small figure is not enlarged
    page = (docs / "gallery.md").read_text()
    assert "test settings" in page and page.count("*Phantom data.*") == len(names)


def test_the_committed_gallery_is_labelled_and_small():
    gallery = gallery_module()
    page = (REPO / "docs" / "gallery.md").read_text()
    shown = re.findall(r"!\[([^]]*)\]\((gallery/[^)]+\.png)\)", page)
    assert [path for _, path in shown] == [f"gallery/{name}.png" for name, _, _ in gallery.GALLERY]
    assert all("Phantom data" in alt for alt, _ in shown) and page.count("*Phantom data.*") == len(shown)
    pngs = list((REPO / "docs" / "gallery").glob("*.png"))
    assert len(pngs) == len(shown) and sum(p.stat().st_size for p in pngs) <= gallery.GALLERY_BUDGET


def test_the_readme_names_every_figure_each_notebook_saves():
    rows = {line.split("|")[1].strip(" `"): line for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("| `0")}
    assert set(rows) == {name.removesuffix(".ipynb") for name in FIGURES}
    missing = {name: [f for f in figures if f"`{f.replace('{name}', '<study>')}`" not in rows[name[:-6]]]
               for name, figures in FIGURES.items()}
    assert missing == {name: [] for name in FIGURES}


def setup_and_later_cells(path):
    """The notebook's first code cell (the setup cell) and the sources of the code cells after it."""
    code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    return code[0], code[1:]


def test_the_setup_cells_are_identical():
    setups = {path.name: setup_and_later_cells(path)[0] for path in NOTEBOOKS}
    assert len(setups) == 6
    first = next(iter(setups.values()))
    assert {name for name, setup in setups.items() if setup != first} == set()  # edit all six alike


def names_bound(statements):
    """Names the statements bind in their own scope: assignments, imports, defs, loop, with and except targets (not
    those inside functions, classes, lambdas or comprehensions, which have scopes of their own)."""
    bound = set()
    for statement in statements:
        for node in _same_scope(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
                bound.add(node.id)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.ExceptHandler):
                bound |= {node.name} - {None}  # a bare `except:` binds nothing
    return bound


NEW_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp, ast.SetComp,
              ast.DictComp, ast.GeneratorExp)


def _same_scope(node):
    """The node and what lies below it in its scope: a def's or class's name is bound here, its body is not."""
    yield node
    if not isinstance(node, NEW_SCOPES):
        for child in ast.iter_child_nodes(node):
            yield from _same_scope(child)


def names_taken_from_before(cells):
    """Names the cells read (anywhere, functions included) before they bind them themselves, statement by
    statement in order: what they take from an earlier cell."""
    taken, bound = set(), set()
    for source in cells:
        for statement in ast.parse(source).body:
            read = {n.id for n in ast.walk(statement) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            taken |= read - bound
            bound |= names_bound([statement])
    return taken


SETUP_DECLARES = re.compile(r"^# For later cells: ([A-Za-z_]\w*(?:, [A-Za-z_]\w*)*);", re.MULTILINE)


def declared_names(setup):
    """The names the setup cell's comment says later cells may use from it."""
    declared = SETUP_DECLARES.search(setup)
    assert declared, "the setup cell names what later cells may use: '# For later cells: NAME, NAME; ...'"
    return set(declared.group(1).split(", "))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_later_cells_take_from_the_setup_cell_only_what_it_declares(path):
    setup, later = setup_and_later_cells(path)
    declared = declared_names(setup)
    bound = names_bound(ast.parse(setup).body)
    assert declared <= bound  # it declares only names it defines
    assert names_taken_from_before(later) & bound <= declared  # later cells use nothing else it defines


def test_the_setup_cells_declare_no_name_that_no_later_cell_uses():
    declared = declared_names(setup_and_later_cells(NOTEBOOKS[0])[0])
    used = set().union(*(names_taken_from_before(setup_and_later_cells(path)[1]) for path in NOTEBOOKS))
    assert declared <= used  # a name no notebook needs any more leaves the list


CONFIG_CELLS = {"03_training.ipynb": "TrainConfig", "06_anomaly_detection.ipynb": "AnomalyConfig"}


@pytest.mark.parametrize(("name", "config_class"), CONFIG_CELLS.items())
def test_the_config_is_built_from_the_parameters_by_field_name(name, config_class):
    import mura_helpers as mh

    code = [c for c in nbformat.read(REPO / "notebooks" / name, as_version=4).cells if c.cell_type == "code"]
    at = next(i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", []))
    later = [c.source for c in code[at + 1:]]
    fields = {f.name for f in dataclasses.fields(getattr(mh, config_class))}
    calls = [n for source in later for n in ast.walk(ast.parse(source))
             if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "config_from"]
    assert len(calls) == 1 and calls[0].args[0].attr == config_class and ast.unparse(calls[0].args[1]) == "globals()"
    overrides = {k.arg for k in calls[0].keywords}
    parameters = names_bound(ast.parse(code[at].source).body)
    assert len(parameters & fields) >= 15  # the knobs carry their field's name
    assert overrides <= fields  # (config_from refuses others too)
    rebound = names_bound([s for source in later for s in ast.parse(source).body]) & fields
    assert rebound <= overrides  # a later cell rebinding a field's name would change what config_from reads
    assert not (parameters - fields) - names_taken_from_before(later)  # every other knob is used by some cell


@pytest.mark.notebook
def test_eda_notebook_runs_headless_and_writes_its_figures(tiny_phantom, tmp_path):
    nb = run_notebook("01_eda.ipynb", tmp_path, data_dir=str(tiny_phantom), output_dir=str(tmp_path),
                      n_grid_images=4)
    for name in FIGURES["01_eda.ipynb"]:
        figure = tmp_path / "figures" / f"{name}.png"
        assert figure.is_file() and figure.stat().st_size > 5_000, name
    summary = json.loads((tmp_path / "eda_summary.json").read_text())
    studies = sum(len((tiny_phantom / f"{s}_labeled_studies.csv").read_text().splitlines()) for s in ("train", "valid"))
    assert summary["studies"] == studies
    assert summary["patients_in_both_splits"] == []
    assert set(summary["modes"]) == {"L", "RGB"}
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.notebook
def test_pipeline_check_notebook_runs_headless(tiny_phantom, tmp_path):
    run_notebook("02_pipeline_check.ipynb", tmp_path, data_dir=str(tiny_phantom), output_dir=str(tmp_path),
                 cache_dir=str(tmp_path / "cache"), image_size=48, batch_size=8, n_views_shown=2,
                 throughput_batches=3)
    assert (tmp_path / "figures" / "pipeline_raw_cached_augmented.png").stat().st_size > 5_000
    check = json.loads((tmp_path / "pipeline_check.json").read_text())
    assert check["batch_shape"] == [8, 3, 48, 48]
    assert sum(check["class_weights"]) == pytest.approx(1.0) and check["loader_views_per_second"] > 0


@pytest.mark.notebook
def test_training_notebook_runs_headless_and_resumes(tiny_phantom, tmp_path):
    params = {"data_dir": str(tiny_phantom), "output_dir": str(tmp_path), "cache_dir": str(tmp_path / "cache"),
              "image_size": 48, "batch_size": 8, "epochs": 1, "pretrained": False, "num_workers": 0}
    run_notebook("03_training.ipynb", tmp_path, **params)
    run = tmp_path / "runs" / "densenet169"
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "figures" / "training_fig32_curves.png").stat().st_size > 5_000
    nb = run_notebook("03_training.ipynb", tmp_path, **{**params, "epochs": 2})  # a later session resumes
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "resuming" in text
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["epochs_run"] == 2 and 0 <= summary["valid_accuracy"] <= 1
    assert summary["select_metric"] == "tune_loss" and 0 <= summary["tune_accuracy"] <= 1


@pytest.mark.notebook
def test_results_notebook_runs_headless_with_an_ensemble(tiny_run, tmp_path):
    nb = run_notebook("04_results.ipynb", tmp_path, run_dir=str(tiny_run), output_dir=str(tmp_path), ensemble_k=2,
                      n_boot=200, n_heatmaps=2, device="cpu", show_control=False)  # (the control: test_learning.py)
    printed = [o["text"] for c in nb.cells if not c.source.startswith("# Setup")  # (it prints where the repo is)
               for o in c.get("outputs", []) if o.get("name") == "stdout"]
    assert printed[0].startswith(("LEARNED: ", "NOT SHOWN TO LEARN: ")), printed[:2]  # the verdict comes first
    assert "test studies (MURA's validation split)" in printed[0] and "tuning split: " in printed[0]  # then the run
    for name in FIGURES["04_results.ipynb"]:
        if name == "results_control_curves":  # only when the control runs
            assert not (tmp_path / "figures" / f"{name}.png").exists()
            continue
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 5_000, name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["checkpoints"]) == 2
    for name in ("accuracy", "kappa", "auroc"):
        m = metrics["threshold_0.5"][name]
        assert m["ci_low"] <= m["estimate"] <= m["ci_high"]  # the phantom's valid split holds both classes
    assert 0 <= metrics["heatmap_pointing_game"] <= 1 and 0 <= metrics["heatmap_heat_in_box"] <= 1
    by_finding = {row["finding"]: row for row in metrics["by_finding"]}  # the phantom's planted findings
    assert by_finding["all"]["n_abnormal"] == sum(row["n_abnormal"] for k, row in by_finding.items() if k != "all")
    assert (tmp_path / "valid_predictions.csv").is_file() and (tmp_path / "tune_predictions.csv").is_file()
    assert metrics["tune_fraction"] == 0.1 and "2 best epochs by tune_loss" in metrics["models"]
    headline = metrics["headline"]  # tuning and test side by side, each beside its baseline; the floor (phantom)
    assert {"tune", "tune_baseline", "test", "test_baseline"} <= set(headline["accuracy"])
    assert headline["auroc"]["test_baseline"] == 0.5 and any(k.startswith("auroc, no model") for k in headline)
    assert metrics["learning_verdict"].startswith("LEARNED" if metrics["learned"] else "NOT SHOWN TO LEARN")
    hits, caught = metrics["cam_hardware_hits_caught"]  # the verdict's CAM check, on the phantom's hardware views
    assert 0 <= hits <= caught
    comparison = pd.read_csv(tmp_path / "results_comparison.csv")
    assert comparison["baseline"].notna().all() and (comparison["value"] == 0.611).any()


@pytest.mark.notebook
def test_predict_notebook_runs_headless(tiny_run, tmp_path):
    run_notebook("05_predict.ipynb", tmp_path, checkpoints=str(tiny_run / "checkpoints" / "best.pt"),
                 output_dir=str(tmp_path), device="cpu")
    [summary] = list(tmp_path.glob("predict_*.json"))
    result = json.loads(summary.read_text())
    assert 0 <= result["study_prob"] <= 1 and len(result["views"]) >= 1
    assert list((tmp_path / "figures").glob("predict_*.png"))


@pytest.mark.notebook
def test_anomaly_notebook_runs_headless(normal_heavy_phantom, tmp_path):
    run_notebook("06_anomaly_detection.ipynb", tmp_path, data_dir=str(normal_heavy_phantom), output_dir=str(tmp_path),
                 cache_dir=str(tmp_path / "cache"), image_size=64, gan_image_size=32, epochs=1, batch_size=8,
                 num_workers=0, models=["cae", "alphagan"], variants=["full+HE"], n_heatmaps=2)  # an autoencoder and
    # a GAN that reconstructs, so every figure has a model; each model's scores: test_anomaly_scores, test_learning
    for name in ("anomaly_fig01_preprocessing_steps", "anomaly_fig11_auroc_study", "anomaly_fig11_auroc_image",
                 "anomaly_gan_samples", "anomaly_fig12_reconstructions", "anomaly_error_heatmaps"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 5_000, name
    results = json.loads((tmp_path / "anomaly_metrics.json").read_text())
    grid = {(r["model"], r["score"]) for r in results["grid"]}
    assert {("CAE", "mse"), ("CAE", "mse_top200"), ("alpha-GAN", "c+d"), ("alpha-GAN", "mse")} <= grid
    assert all(0 <= r["roc_auc"] <= 1 for r in results["grid"] if r["roc_auc"] == r["roc_auc"])
    assert results["heatmap_pointing_game"] is not None
    assert ("no model", "template_mse") in grid  # the model-free floor
    assert isinstance(results["suspect_masks"], int)  # counted before training
    assert results["mask_iou"]["views"] > 0 and 0 <= results["mask_iou"]["median_iou"] <= 1  # against the truth
    assert (tmp_path / "figures" / "anomaly_mask_iou.png").stat().st_size > 5_000
    assert all(r["roc_auc_ci_low"] <= r["roc_auc"] <= r["roc_auc_ci_high"] for r in results["grid"]
               if r["roc_auc"] == r["roc_auc"])
    assert {(r["model"], r["score"]) for r in results["roc_auc_by_finding"]} == grid  # one variant: every row
    assert results["n_abnormal_by_finding"]["all"] == results["grid"][0]["n_abnormal"]
    assert (tmp_path / "anomaly" / "cae_full+HE" / "checkpoints" / "best.pt").is_file()
