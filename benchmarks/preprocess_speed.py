"""Preprocessing speed of the unsupervised path, milliseconds per view on one core:

mura_helpers.preprocess_view (PNG decode, plate and field search, crop, hand mask, equalisation) for one variant
(default full+HE at 512 px) over N views of a phantom (or of a MURA folder), with torch's and OpenMP's threads set
to 1 before numpy and scipy load. Each view is timed alone after a warm-up; it prints the median and 90th
percentile of wall-clock and CPU (process) time, and writes them as JSON. The issue's target: a median <= 50 ms
per view at 512 px.

  python benchmarks/preprocess_speed.py --views 200 --size 512
"""

import os

if __name__ == "__main__":  # one core, set before numpy, scipy and torch start their thread pools
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mura_helpers as mh  # noqa: E402


def time_views(paths, cfg, warmup: int = 3) -> dict:
    """Wall-clock and CPU milliseconds of preprocess_view for each path (after `warmup` untimed views)."""
    for p in paths[:warmup]:
        mh.preprocess_view(p, cfg)
    wall, cpu = [], []
    for p in paths:
        w, c = time.perf_counter(), time.process_time()
        mh.preprocess_view(p, cfg)
        cpu.append(1000 * (time.process_time() - c))
        wall.append(1000 * (time.perf_counter() - w))
    return {"wall_ms": wall, "cpu_ms": cpu}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="MURA folder; default: a phantom under --phantom-dir")
    parser.add_argument("--phantom-dir", default="data/phantom-bench")
    parser.add_argument("--n-patients", type=int, default=80)
    parser.add_argument("--phantom-image-size", type=int, default=512)
    parser.add_argument("--variant", default="full+HE", help="a preprocessing variant (raw, crop, full, +HE, ...)")
    parser.add_argument("--size", type=int, default=512, help="the preprocessed square's side, pixels")
    parser.add_argument("--views", type=int, default=200, help="views timed (the first N of the train split)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="outputs/benchmark_preprocess_speed.json")
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # as it was (a test calls main in its own process)


def _run(args) -> dict:
    """Time the views and write the report."""
    root = mh.resolve_data_dir(args.data_dir, args.phantom_dir, n_patients=args.n_patients,
                               image_size=args.phantom_image_size)
    paths = list(mh.studies_to_images(mh.load_studies(root, "train"))["image_path"][: args.views])
    cfg = mh.preprocess_variants(args.size, [args.variant])[args.variant]
    times = time_views(paths, cfg, args.warmup)
    report = {"variant": cfg.name, "size": args.size, "views": len(paths), "data": str(root),
              "threads": 1, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    for kind in ("wall_ms", "cpu_ms"):
        report[f"median_{kind}"] = float(np.median(times[kind]))
        report[f"p90_{kind}"] = float(np.percentile(times[kind], 90))
    print(f"preprocess_view {cfg.name} at {args.size} px, {len(paths)} views, 1 thread: "
          f"median {report['median_wall_ms']:.1f} ms/view, p90 {report['p90_wall_ms']:.1f} ms/view "
          f"(CPU time: median {report['median_cpu_ms']:.1f}, p90 {report['p90_cpu_ms']:.1f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
