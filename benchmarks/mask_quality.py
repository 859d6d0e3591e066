"""Hand-mask quality on a phantom, per kind of view and size, through the module's own path:

build_anomaly_cache -> mask_iou_table -> mask_iou_summary per kind of view (PHANTOM_VIEW_KINDS: tags, narrow,
light-grey, inverted, low-contrast, dim, two hands, plain), beside the score of the truth itself moved in or out by
one of the mask's working pixels (MaskRules.work_size), how often a lead tag stays in the mask, and
how many views would reach 0.85 with the mask's disagreements within one working pixel of the true edge forgiven
(the rest fail grossly: a finger lost, background taken in), and
suspect_masks' recall (views with IoU < 0.5 it flags) beside the share of good views (IoU >= 0.85) it flags, with
the signals that flag them. Prints the tables (markdown) and writes them as JSON; --csv keeps the per-view rows.

--one-level adds, per kind, how many views any one grey level could mask at IoU >= 0.85 (mask_one_level_table:
the best level for each view, chosen knowing its truth; an upper bound for a mask that is one threshold of the
view) and how many the mask or that level reach: where the masks fall short of the bound, the rules chose a
level badly; where the bound itself falls short of the target, no choice of one level meets it.

  python benchmarks/mask_quality.py --data-dir data/phantom/MURA-v1.1 --sizes 512 128

--pipeline FILE runs the preprocessing (build_anomaly_cache, suspect_masks) of another mura_helpers.py (an older
commit's: `git show 86a3c95:mura_helpers.py > /tmp/old/mura_helpers.py`) on the same phantom, its truth read by
this one: the before and after of a change, on the same views.

A phantom made with make_phantom_mura(..., film_noise=False) holds the same views without their noise, grain and
mottle (the same truth): measured on it, the masks show what the noise costs them and what fails without it.
"""

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mura_helpers as mh  # noqa: E402

GOOD, BAD = 0.85, 0.5  # a good mask's IoU (the target) and a failed one's (what suspect_masks must catch)
TAG_KEPT = 0.02  # a tag "in the mask": more than this share of its pixels (its blurred edge beside a hand aside)


def load_pipeline(path: str | None):
    """The module whose preprocessing is measured: this repository's, or another mura_helpers.py (imported as
    `mura_pipeline` from a copy on sys.path and PYTHONPATH, so that worker processes import it too)."""
    if path is None:
        return mh
    folder = Path(tempfile.mkdtemp(prefix="mask_quality_"))
    shutil.copy(path, folder / "mura_pipeline.py")
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return importlib.import_module("mura_pipeline")


def kind_table(table: pd.DataFrame) -> list[dict]:
    """mask_iou_by_kind: all views and each kind of view, one row each."""
    rows = mh.mask_iou_by_kind(table, GOOD, BAD, TAG_KEPT).reset_index().to_dict("records")
    return [{k: v for k, v in row.items() if v == v} for row in rows]  # (NaN: no such views, no tags)


def tag_table(table: pd.DataFrame) -> dict:
    """Of the views with a lead tag: how many masks hold its pixels (more than TAG_KEPT of them; any), and how
    many of those lost the hand (IoU < BAD)."""
    tagged = table[table["n_tags"] > 0]
    kept = tagged["tag_in_mask"] > TAG_KEPT
    return {"views_with_tags": int(len(tagged)), "tag_in_mask": int(kept.sum()),
            "share_tag_in_mask": float(kept.mean()) if len(tagged) else float("nan"),
            "any_tag_pixel_in_mask": int((tagged["tag_in_mask"] > 0).sum()),
            "tag_in_mask_and_hand_lost": int((kept & (tagged["iou"] < BAD)).sum())}


def suspect_table(table: pd.DataFrame, suspects: pd.DataFrame, doubts: dict) -> dict:
    """suspect_masks' recall (of views with IoU < BAD, how many it flags), how many of the gross failures it flags
    (under GOOD even with the edge forgiven: iou_edge_forgiven), the share of good views (IoU >= GOOD) it flags,
    and the views each of its reasons flags among the good and the failed."""
    problem = dict(zip(suspects["image_path"], suspects["problem"]))
    flagged = table["image_file"].map(lambda f: f in problem)
    bad, good = table["iou"] < BAD, table["iou"] >= GOOD
    gross = table["iou_edge_forgiven"] < GOOD
    reasons = {name: text for name, text in doubts.items()} | {"share": "of the square"}
    by_reason = {}
    for name, text in reasons.items():
        hit = table["image_file"].map(lambda f, t=text: t in problem.get(f, ""))
        by_reason[name] = {"good_flagged": int((hit & good).sum()), "bad_flagged": int((hit & bad).sum())}
    return {"bad_views": int(bad.sum()), "bad_flagged": int((flagged & bad).sum()),
            "recall": float((flagged & bad).sum() / bad.sum()) if bad.any() else float("nan"),
            "gross_views": int(gross.sum()), "gross_flagged": int((flagged & gross).sum()),
            "good_views": int(good.sum()), "good_flagged": int((flagged & good).sum()),
            "share_good_flagged": float((flagged & good).sum() / good.sum()) if good.any() else float("nan"),
            "flagged": int(flagged.sum()), "by_reason": by_reason}


def one_level_table(table: pd.DataFrame) -> list[dict]:
    """Per kind: views, the masks at IoU >= GOOD, the best one level at IoU >= GOOD (iou_one_level), and the
    better of the two at IoU >= GOOD."""
    rows = []
    for kind in ("all", *mh.PHANTOM_VIEW_KINDS):
        part = table if kind == "all" else table[table[f"kind_{kind}"]]
        either = np.maximum(part["iou"], part["iou_one_level"])
        rows.append({"kind": kind, "views": int(len(part)), "masks": float((part["iou"] >= GOOD).mean()),
                     "one_level": float((part["iou_one_level"] >= GOOD).mean()),
                     "either": float((either >= GOOD).mean())} if len(part) else {"kind": kind, "views": 0})
    return rows


def measure(data_dir: str, size: int, variant: str, pipeline, cache_dir: str, workers: int | None,
            one_level: pd.DataFrame | None = None) -> tuple:
    """One size: the per-view table and its summaries (with `one_level`, mask_one_level_table's bound beside)."""
    truth = mh.load_phantom_truth(data_dir)
    cfg = pipeline.preprocess_variants(size, [variant])[variant]
    start = time.perf_counter()
    cache = pipeline.build_anomaly_cache(list(truth["image_file"]), cfg, cache_dir, workers=workers, progress=False)
    built = time.perf_counter() - start
    table = mh.mask_iou_table(data_dir, cache, workers=workers, progress=False)
    suspects = pipeline.suspect_masks(cache)
    doubts = cache.doubts.set_axis(cache.image_paths).add_prefix("doubt_")  # each view's signals
    table = table.join(doubts, on="image_file")
    good = table[table["iou"] >= GOOD]
    summary = {"size": size, "variant": variant, "cache_seconds": round(built, 1), "kinds": kind_table(table),
               "tags": tag_table(table), "suspects": suspect_table(table, suspects, pipeline.MASK_DOUBTS),
               "doubts_p99_of_good": {k: float(good[f"doubt_{k}"].quantile(0.99)) for k in pipeline.MASK_DOUBTS},
               "limits": dict(pipeline.MASK_DOUBT_LIMITS)}
    if one_level is not None:
        table = table.merge(one_level, on="image_path")
        summary["one_level"] = one_level_table(table)
    return table.assign(suspect=table["image_file"].isin(suspects["image_path"])), summary


def print_summary(summary: dict) -> None:
    """The tables, in markdown."""
    print(f"\n### {summary['variant']} at {summary['size']} px\n")
    print(f"| kind | views | IoU >= {GOOD} | median | 5th pct | IoU < {BAD} | tag in mask | the truth 1 px in / out "
          f"| edge forgiven |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in summary["kinds"]:
        tags = f"{row['share_tag_in_mask']:.1%}" if "share_tag_in_mask" in row else "-"
        if row["views"]:
            moved = f"{row[f'share_truth_eroded_ge_{GOOD}']:.1%} / {row[f'share_truth_dilated_ge_{GOOD}']:.1%}"
            print(f"| {row['kind']} | {row['views']} | {row[f'share_iou_ge_{GOOD}']:.1%} | {row['median_iou']:.3f} "
                  f"| {row['p5_iou']:.3f} | {int(row[f'n_iou_lt_{BAD}'])} | {tags} | {moved} "
                  f"| {row[f'share_edge_forgiven_ge_{GOOD}']:.1%} |")
        else:
            print(f"| {row['kind']} | 0 | - | - | - | - | - | - | - |")
    print(f"\n(the truth 1 px in / out: the share of views where the true mask itself, moved in or out by one of the "
          f"mask's working pixels, keeps IoU >= {GOOD}: how much room {GOOD} leaves at this kind of view; edge "
          f"forgiven: the share of masks at IoU >= {GOOD} once their disagreements within one working pixel of the "
          f"true edge are forgiven: what an edge a pixel off costs, the rest of the failures gross)")
    t = summary["tags"]
    print(f"\nlead tags: {t['views_with_tags']} views with one; a tag in the mask (> {TAG_KEPT:.0%} of its pixels) "
          f"in {t['tag_in_mask']} ({t['share_tag_in_mask']:.1%}), any of its pixels in {t['any_tag_pixel_in_mask']}; "
          f"tag kept and hand lost (IoU < {BAD}) in {t['tag_in_mask_and_hand_lost']}")
    s = summary["suspects"]
    print(f"suspect_masks: {s['flagged']} flagged; recall {s['bad_flagged']}/{s['bad_views']} views with IoU < {BAD} "
          f"({s['recall']:.0%}); good views (IoU >= {GOOD}) flagged {s['good_flagged']}/{s['good_views']} "
          f"({s['share_good_flagged']:.1%}); gross failures (under {GOOD} with the edge forgiven) flagged "
          f"{s['gross_flagged']}/{s['gross_views']}")
    print("  by reason (good / failed views flagged): " + ", ".join(
        f"{k} {v['good_flagged']}/{v['bad_flagged']}" for k, v in s["by_reason"].items()))
    print("  99th percentile of each signal over the good views, beside its limit (MASK_DOUBT_LIMITS): "
          + ", ".join(f"{k} {v:.3f} (limit {summary['limits'][k]})" for k, v in summary["doubts_p99_of_good"].items()))
    if "one_level" in summary:
        print(f"\n| kind | views | masks at IoU >= {GOOD} | the best one level | the mask or that level |\n"
              f"| --- | --- | --- | --- | --- |")
        for row in summary["one_level"]:
            if row["views"]:
                print(f"| {row['kind']} | {row['views']} | {row['masks']:.1%} | {row['one_level']:.1%} "
                      f"| {row['either']:.1%} |")
        print(f"\n(the best one level: the share of views that some one grey level of the view, chosen knowing its "
              f"truth, masks at IoU >= {GOOD} (mask_one_level_table, at the working size): a bound for a mask that is "
              f"one threshold; the mask or that level: the share where either reaches it)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="a phantom's folder (version 3 or later)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--variant", default="full+HE")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--pipeline", default=None, help="another mura_helpers.py whose preprocessing to measure")
    parser.add_argument("--json", default="outputs/mask_quality.json")
    parser.add_argument("--csv", default=None, help="write the per-view rows (all sizes) here")
    parser.add_argument("--one-level", action="store_true",
                        help="the bound of one grey level per view beside the masks (mask_one_level_table)")
    args = parser.parse_args(argv)

    pipeline = load_pipeline(args.pipeline)
    manifest = json.loads((mh.find_mura_root(args.data_dir) / mh.PHANTOM_MANIFEST).read_text())
    report = {"data": str(args.data_dir), "phantom": {k: manifest.get(k) for k in ("version", "seed", "n_patients",
                                                                                   "image_size", "n_images")},
              "pipeline": args.pipeline or "this repository", "machine": platform.processor() or platform.machine(),
              "sizes": []}
    if hasattr(pipeline, "ANOMALY_PIPELINE_VERSION"):
        report["pipeline_version"] = pipeline.ANOMALY_PIPELINE_VERSION
    print(f"phantom {report['phantom']}, preprocessing of {report['pipeline']}")
    tables = []
    one_level = mh.mask_one_level_table(args.data_dir, args.workers, progress=False) if args.one_level else None
    for size in args.sizes:
        table, summary = measure(args.data_dir, size, args.variant, pipeline, args.cache_dir, args.workers,
                                 one_level)
        print_summary(summary)
        report["sizes"].append(summary)
        tables.append(table)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        pd.concat(tables).drop(columns=["mask_file"]).to_csv(args.csv, index=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    return report


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
