"""Learnability of a phantom's planted findings: a DenseNet from scratch, scored on the held-out test.

Trains `mura_helpers.train` (pretrained=False; a tuning split of --tune-fraction of the training patients selects
best.pt) on a phantom folder, then scores best.pt once on MURA's validation split (the test) with study-level AUROC
and a 95% interval resampled by patient, overall and per finding kind (fracture, hardware, lesion: that kind's
abnormal studies against every normal one), beside the per-epoch training, tuning and test AUROC, the last epoch's
test AUROC (per kind too, from last.pt: a kind may be learned late, after the tuning loss picked an early epoch) and
the spread of best.pt's test probabilities (their interquartile range; under mh.COLLAPSED_IQR, test_collapsed: it
gives nearly every study one answer). Without --data-dir it makes this version's phantom with the
given finding settings (--kinds, --scale, --contrast) and split (--valid-fraction, --positive-rate). Run it with the
same settings on two phantom versions to compare them (make the older version's folder with that version's
mura_helpers, or run this file from a copy of the older checkout). Views are made upright as TrainConfig's default
says (--no-upright: as stored, how the table's rows before 2026-12-06 ran). --permute-labels SEED is the negative
control: the same run on a copy whose training labels are permuted by patient, scored on the same test. Writes
<out>/learnability.json. The table in docs/data-and-phantom.md ran, per kind (--kinds fracture, hardware, lesion, or
all three) and size (--size 64 with --phantom-size 128, --size 128 with --phantom-size 256), with --no-upright:

  python benchmarks/learnability.py --out OUT --patients 100 --phantom-size 128 --valid-fraction 0.3 \
      --positive-rate 0.5 --kinds fracture --size 64 --epochs 12 --batch-size 16 --arch densenet121 \
      --plateau-patience 3 --tune-fraction 0.25 --threads 1 --seed 0
  python benchmarks/learnability.py --data-dir /path/to/phantom_v3 --out outputs/learnability_v3 ...
"""

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mura_helpers as mh  # noqa: E402


def score_checkpoint(path: Path, test, cfg) -> pd.DataFrame:
    """A checkpoint's study probabilities on the test studies, with each study's patient."""
    model, _ = mh.load_checkpoint(path)
    preds = mh.predict_studies(model, test, cfg.image_size, cache_dir=cfg.cache_dir, upright=cfg.upright)
    return preds.merge(test[["study_path", "patient"]], on="study_path")


def auroc_by_kind(preds, boxes) -> dict:
    """Each planted kind's abnormal test studies against every normal one (mh.metrics_by_finding): AUROC, its
    interval by patient, and how many abnormal studies ({} without the phantom's boxes)."""
    if boxes is None:
        return {}
    table = mh.metrics_by_finding(preds, boxes, intervals=True).drop(index=["all", "(none listed)"], errors="ignore")
    return {kind: {"auroc": round(float(row.auroc_prob), 3),
                   "ci95_by_patient": [round(float(row.auroc_prob_ci_low), 3), round(float(row.auroc_prob_ci_high), 3)],
                   "abnormal_studies": int(row.n_abnormal)} for kind, row in table.iterrows()}


def main(argv=None) -> dict:
    """Train, score best.pt on the test split and write the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the run, its cache and learnability.json")
    ap.add_argument("--data-dir", help="an existing phantom (or MURA) folder; default: make this version's phantom")
    ap.add_argument("--patients", type=int, default=300, help="patients of the phantom made without --data-dir")
    ap.add_argument("--phantom-size", type=int, default=512, help="the made phantom's long side in pixels")
    ap.add_argument("--phantom-seed", type=int, default=0)
    ap.add_argument("--valid-fraction", type=float, default=0.15, help="the made phantom's share of test patients")
    ap.add_argument("--positive-rate", type=float, default=0.26, help="the made phantom's share of abnormal studies")
    ap.add_argument("--kinds", default=",".join(mh.PHANTOM_FINDINGS), help="the made phantom's finding kinds")
    ap.add_argument("--scale", type=float, default=None, help="finding_scale (default: the phantom's)")
    ap.add_argument("--contrast", type=float, default=1.0, help="finding_contrast")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--plateau-patience", type=int, default=mh.TrainConfig.plateau_patience,
                    help="epochs without a lower tuning loss before the rate is divided by 10 (on a small, noisy "
                         "tuning split 1 takes it to 1e-8 within 15 epochs; 3 keeps it learning)")
    ap.add_argument("--tune-fraction", type=float, default=mh.TrainConfig.tune_fraction,
                    help="share of the training patients that selects best.pt")
    ap.add_argument("--select-metric", default=mh.TrainConfig.select_metric,
                    choices=[m for m in mh.SELECT_METRICS if m.startswith("tune_")],
                    help="what picks best.pt (the tuning loss, the default, picked epoch 8, test AUROC 0.541, of a "
                         "run that reached 0.654 by epoch 30; the tuning AUROC's best, epoch 26, scored 0.656)")
    ap.add_argument("--arch", default="densenet169", choices=mh.ARCHS)
    ap.add_argument("--upright", action=argparse.BooleanOptionalAction, default=mh.TrainConfig.upright,
                    help="invert views stored inverted back before the model sees them (TrainConfig.upright)")
    ap.add_argument("--permute-labels", type=int, default=None, metavar="SEED",
                    help="the negative control: train on a copy whose training studies' labels are permuted by "
                         "patient with this seed (mh.permuted_labels_copy); the test split keeps its labels")
    ap.add_argument("--seed", type=int, default=0, help="the training seed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    started, cpu_started = time.perf_counter(), time.process_time()
    findings = {"finding_kinds": tuple(args.kinds.split(",")), "finding_contrast": args.contrast,
                **({} if args.scale is None else {"finding_scale": args.scale})}
    root = (mh.find_mura_root(args.data_dir) if args.data_dir else
            mh.ensure_phantom(out / "phantom", n_patients=args.patients, seed=args.phantom_seed,
                              image_size=args.phantom_size, valid_fraction=args.valid_fraction,
                              positive_rate=args.positive_rate, progress=False, **findings))
    truth_root = root  # the phantom's truth names each test study's finding kind; a permuted copy's test is the same
    if args.permute_labels is not None:
        permuted = out / f"permuted_s{args.permute_labels}"
        shutil.rmtree(permuted, ignore_errors=True)  # remade from this run's data (hard links: cheap)
        root = mh.permuted_labels_copy(root, permuted, seed=args.permute_labels)
    cfg = mh.TrainConfig(data_dir=str(root), output_dir=str(out / "run"), cache_dir=str(out / "cache"),
                         image_size=args.size, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                         arch=args.arch, pretrained=False, num_workers=0, keep_top_k=0, seed=args.seed,
                         plateau_patience=args.plateau_patience, tune_fraction=args.tune_fraction,
                         upright=args.upright, select_metric=args.select_metric)
    history = mh.train(cfg, progress=False)
    trained_s = time.perf_counter() - started
    sets = mh.run_studies(cfg)
    preds = score_checkpoint(out / "run" / "checkpoints" / "best.pt", sets["test"], cfg)
    auroc = mh.study_metrics(preds["label"], preds["prob"])["auroc"]  # NaN (with a warning) for one class
    lo, hi = mh.auroc_interval(preds["label"], preds["prob"], patients=preds["patient"])
    picked = history[cfg.select_metric]
    best_epoch = int(history.loc[picked.idxmin() if mh.SELECT_METRICS[cfg.select_metric] == "min" else picked.idxmax(),
                                 "epoch"])
    boxes = mh.phantom_boxes(truth_root)
    by_kind = auroc_by_kind(preds, boxes)
    last_by_kind = auroc_by_kind(score_checkpoint(out / "run" / "checkpoints" / "last.pt", sets["test"], cfg), boxes)
    manifest = mh._phantom_manifest(truth_root) or {}
    result = {
        "phantom_version": manifest.get("version"),  # None: not a phantom
        "phantom": {k: manifest.get(k) for k in ("n_patients", "seed", "image_size", "valid_fraction",
                                                 "positive_rate", "finding_kinds", "finding_scale",
                                                 "finding_contrast")},
        "data_dir": str(root), "labels_permuted_seed": args.permute_labels, "arch": args.arch, "pretrained": False,
        "upright": cfg.upright,
        "image_size": args.size, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "plateau_patience": cfg.plateau_patience,
        "tune_fraction": cfg.tune_fraction, "select_metric": cfg.select_metric, "best_epoch": best_epoch,
        "train_views": int(sum(len(p) for p in sets["train"]["image_paths"])),
        "test_studies": len(preds), "test_abnormal": int(preds["label"].sum()),
        "test_patients": int(preds["patient"].nunique()),
        "test_auroc_best": round(float(auroc), 3), "test_auroc_ci95_by_patient": [round(lo, 3), round(hi, 3)],
        "test_auroc_last": round(float(history["valid_auroc"].iloc[-1]), 3),
        "test_auroc_by_kind": by_kind, "test_auroc_last_by_kind": last_by_kind, "seed": args.seed,
        "test_prob_iqr": round(mh.probability_spread(preds["prob"]), 4),
        "test_collapsed": mh.probabilities_collapsed(preds["prob"]) is not None,
        "tune_auroc_by_epoch": [round(float(v), 3) for v in history["tune_auroc"]],
        "test_auroc_by_epoch": [round(float(v), 3) for v in history["valid_auroc"]],
        "train_auroc_by_epoch": [round(float(v), 3) for v in history["train_auroc"]],
        "train_s": round(trained_s, 1), "total_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(time.process_time() - cpu_started, 1),
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    (out / "learnability.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
