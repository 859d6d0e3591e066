"""Write docs/gallery.md and docs/gallery/*.png from the figures of a `make demo` run (`make gallery`), so a reader
sees the notebooks' results without running anything while the notebooks stay committed without outputs.

Every figure is of the phantom, the suite's synthetic data, and is labelled so. Figures are downscaled and stored
with a palette, so the committed PNGs stay small (GALLERY_BUDGET in all)."""

import argparse
import math
import sys
from datetime import date
from pathlib import Path

from PIL import Image

DOCS = Path(__file__).resolve().parent
GALLERY_WIDTH = 960  # px: a figure is shrunk to at most this wide (GitHub shows about 880 px of it) ...
GALLERY_PIXELS = 1_000_000  # ... and at most this many pixels (a tall grid of views keeps its aspect, narrower)
GALLERY_COLORS = 256  # a palette of this many colours (fast octree: a plot's colour maps keep their hues)
GALLERY_BUDGET = 1_500_000  # bytes: what the committed gallery may weigh in all

# (figure name as the notebook saves it, notebook, caption): the figures shown, in the notebooks' order
GALLERY = [
    ("eda_fig15_random_views_train", "01_eda", "Random training views (the report's Figure 15)."),
    ("eda_fig16_random_views_abnormal", "01_eda", "Random views of abnormal studies (Figure 16)."),
    ("eda_phantom_findings", "01_eda", "Views with planted abnormalities; red boxes: the ground truth."),
    ("pipeline_raw_cached_augmented", "02_pipeline_check", "Views raw, as cached, and twice as augmented."),
    ("training_fig32_curves", "03_training", "Loss, accuracy and kappa per epoch (the report's Figure 32)."),
    ("results_roc", "04_results", "ROC of the study-level predictions on the held-out test."),
    ("results_headline", "04_results", "Tuning and test metrics with 95% intervals, beside baselines and the "
                                       "model-free floor."),
    ("results_activation_maps", "04_results", "Class activation maps on abnormal test views; white boxes: the "
                                              "planted findings."),
    ("anomaly_fig01_preprocessing_steps", "06_anomaly_detection", "The unsupervised path's preprocessing: carrier "
                                                                  "crop, hand mask, equalisation (Figure 1)."),
    ("anomaly_mask_iou", "06_anomaly_detection", "The hand masks against the phantom's true masks (IoU)."),
    ("anomaly_fig11_auroc_study", "06_anomaly_detection", "Every model's and score's study-level ROC-AUC with its "
                                                          "interval, beside the floor (Figure 11's layout)."),
    ("anomaly_fig12_reconstructions", "06_anomaly_detection", "Each model's inputs, reconstructions and error maps, "
                                                              "and each GAN's samples (Figure 12)."),
    ("anomaly_error_heatmaps", "06_anomaly_detection", "Reconstruction error of the run chosen on validation, on "
                                                       "abnormal test views; white boxes: the planted findings."),
]


def shrink(source: Path, target: Path) -> int:
    """Save `source` at most GALLERY_WIDTH wide and GALLERY_PIXELS large with a GALLERY_COLORS palette as `target`;
    return its size."""
    with Image.open(source) as image:
        image = image.convert("RGB")
        scale = min(GALLERY_WIDTH / image.width, math.sqrt(GALLERY_PIXELS / (image.width * image.height)))
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        image.quantize(GALLERY_COLORS, method=Image.Quantize.FASTOCTREE).save(target, optimize=True)
    return target.stat().st_size


def write_gallery(figures: Path, docs: Path, settings: str) -> int:
    """Write docs/gallery/<name>.png and docs/gallery.md from `figures` (a demo run's outputs/figures); return the
    PNGs' total size. Raises SystemExit naming any missing figure, or when the PNGs exceed GALLERY_BUDGET."""
    missing = [name for name, _, _ in GALLERY if not (figures / f"{name}.png").is_file()]
    if missing:
        raise SystemExit(f"{figures}: no {', '.join(missing)} (.png): run `make demo` first")
    (docs / "gallery").mkdir(exist_ok=True)
    for stale in (docs / "gallery").glob("*.png"):
        stale.unlink()
    total = sum(shrink(figures / f"{name}.png", docs / "gallery" / f"{name}.png") for name, _, _ in GALLERY)
    if total > GALLERY_BUDGET:
        raise SystemExit(f"the gallery's PNGs weigh {total:,} bytes, over GALLERY_BUDGET ({GALLERY_BUDGET:,})")
    lines = ["# Gallery: the demo's figures (phantom data)", "",
             "**Phantom data, not real radiographs.** Every figure below comes from `make demo` on the suite's "
             "synthetic phantom, with " + settings + ". They show what each notebook draws, not how well a model "
             "does on real MURA (see [evaluation](evaluation.md)). `make gallery` remakes this page "
             f"(last: {date.today().isoformat()}).", ""]
    notebook = None
    for name, source, caption in GALLERY:
        if source != notebook:
            lines += [f"## {source}", ""]
            notebook = source
        lines += [f"![{caption} Phantom data.](gallery/{name}.png)", "",
                  f"*Phantom data.* {caption} `outputs/figures/{name}.png`", ""]
    (docs / "gallery.md").write_text("\n".join(lines))
    return total


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figures", type=Path, help="a demo run's figures folder (outputs/figures)")
    parser.add_argument("--settings", help="how the demo was run, as the page says it",
                        default="the demo's CPU settings (DEMO=quick: models from scratch at 128 px, GANs at 64 px, "
                                "2 epochs)")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where gallery.md and gallery/ go (default: docs/)")
    args = parser.parse_args()
    size = write_gallery(args.figures, args.docs, args.settings)
    print(f"{args.docs / 'gallery.md'}: {len(GALLERY)} figures, {size:,} bytes of PNG", file=sys.stderr)
