"""Distributed training throughput: training images per second of mura_helpers.train under torchrun for each
process count in --processes (one GPU a process; on a CPU, gloo processes, as a smoke test only), with the
scaling efficiency against one process: rate(N) / (N x rate(1)).

Each count trains `--epochs` epochs of at most `--steps` steps a process on the same phantom (or --data-dir) from
scratch; the first epoch pays for start-up and cuDNN's autotuning, so the rate is the last epoch's. On a machine
with 4 GPUs:

  python benchmarks/distributed_throughput.py --processes 1,2,4 --image-size 320 --batch-size 8 --n-patients 400

On a CPU (smoke):  python benchmarks/distributed_throughput.py --processes 1,2 --image-size 32 --batch-size 4 \
                       --steps 3 --epochs 2 --n-patients 14 --phantom-image-size 128
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mura_helpers as mh  # noqa: E402


def main(argv=None) -> dict:
    """Run the sweep, print a table and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--data-dir", default=None, help="a MURA folder (default: a phantom)")
    parser.add_argument("--n-patients", type=int, default=240)
    parser.add_argument("--phantom-image-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--steps", type=int, default=50, help="at most this many steps an epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="phantom, cache and runs (default: a temporary folder)")
    parser.add_argument("--json", default="outputs/distributed_throughput.json")
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mura-ddp-bench-"))
    data = args.data_dir or str(mh.ensure_phantom(work / "phantom", n_patients=args.n_patients,
                                                  image_size=args.phantom_image_size, progress=False))
    rows = []
    for n in [int(p) for p in args.processes.split(",")]:
        cfg = mh.TrainConfig(data_dir=data, output_dir=str(work / f"run_{n}"), cache_dir=str(work / "cache"),
                             image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
                             pretrained=False, keep_top_k=0, resume=False, max_steps_per_epoch=args.steps)
        history = mh.launch_training(cfg, devices=n, progress=False)
        rows.append({"processes": n, "global_batch": n * args.batch_size,
                     "images_per_s": float(history["train_images_per_s"].iloc[-1])})
    base = next((r["images_per_s"] for r in rows if r["processes"] == 1), None)
    for row in rows:
        row["scaling_efficiency"] = row["images_per_s"] / (row["processes"] * base) if base else None
    report = {"device": "cuda" if mh.torch.cuda.is_available() else "cpu", "image_size": args.image_size,
              "batch_size_per_process": args.batch_size, "steps": args.steps, "rows": rows}
    print(mh.pd.DataFrame(rows).to_string(index=False))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
