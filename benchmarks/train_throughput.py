"""Training throughput, images per second, in one process on one device:

  (a) a seed-style loop: one study per step, fp32, PNG decode + torchvision transforms per image, 4 workers
      (how the reference report's 2018 code trained);
  (b) this project's end-to-end loop (mura_helpers.train_one_epoch: uint8 cache, on-device augmentation,
      mixed precision, channels-last) with 2 data workers;
  (c) the compute bound: forward + backward + step of the same model, batch and precision on random tensors
      already on the device.

(b) and (c) are measured for every batch size in --batch-size and every torch.compile mode in --compile ("none":
eager; "reduce-overhead": CUDA graphs, which remove the per-kernel launch cost that bounds a DenseNet step on a
fast GPU with a slow host). It prints the rates and the ratios b/a and b/c of each setting (targets on a GPU:
b/c >= 0.9, b/a >= 100), and writes them as JSON. On a CPU use small sizes, as a smoke test:

  python benchmarks/train_throughput.py --image-size 64 --batch-size 8 --steps 3 --seed-steps 3 \
      --n-patients 12 --phantom-image-size 128
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mura_helpers as mh  # noqa: E402


class SeedStyleStudies(Dataset):
    """One item per study: every view decoded from PNG and transformed with PIL/torchvision on the CPU."""

    def __init__(self, studies, image_size, rotation_degrees):
        self.studies = studies.reset_index(drop=True)
        self.transform = v2.Compose([
            v2.ToImage(), v2.Resize((image_size, image_size)), v2.RandomHorizontalFlip(),
            v2.RandomRotation(rotation_degrees), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mh.IMAGENET_MEAN, mh.IMAGENET_STD),
        ])

    def __len__(self):
        return len(self.studies)

    def __getitem__(self, i):
        row = self.studies.iloc[i]
        views = [self.transform(mh.Image.open(p).convert("RGB")) for p in row["image_paths"]]
        return torch.stack(views), torch.tensor(float(row["label"]))


def seed_style_rate(model, studies, args, device, weights) -> float:
    """(a) images/s of one study per step in fp32 with per-image decode and CPU transforms."""
    loader = DataLoader(SeedStyleStudies(studies, args.image_size, args.rotation_degrees), batch_size=1,
                        shuffle=True, num_workers=args.seed_workers, generator=torch.Generator().manual_seed(0))
    model = model.to(device, memory_format=torch.contiguous_format).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    views, started = 0, None
    for step, (x, y) in enumerate(loader):
        if step == args.warmup:
            _sync(device)
            views, started = 0, time.perf_counter()
        if step >= args.warmup + args.seed_steps:
            break
        x, y = x[0].to(device), y.to(device)
        p = torch.sigmoid(model(x)).mean()
        loss = -(weights[1] * y * torch.log(p) + weights[0] * (1 - y) * torch.log(1 - p)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        views += len(x)
    _sync(device)
    return views / (time.perf_counter() - started)


def project_rate(model, cache, images, args, device, weights, batch_size) -> float:
    """(b) images/s of mura_helpers.train_one_epoch with 2 workers, after one warm-up epoch."""
    cfg = mh.TrainConfig(batch_size=batch_size, amp=args.amp, num_workers=args.workers,
                         max_steps_per_epoch=args.steps, rotation_degrees=args.rotation_degrees)
    optimizer = mh.build_optimizer(model.parameters(), 1e-4, device)
    scaler = torch.amp.GradScaler(device.type, enabled=mh.amp_dtype(args.amp, device) == torch.float16)
    loader = mh.make_view_loader(cache, images, batch_size, True, 0, args.workers, device.type == "cuda")
    rates = []
    for epoch in range(2):  # the first epoch warms up workers, compilation, cuDNN autotuning and the allocator
        loader.sampler.batches = mh.epoch_batches(len(images), batch_size, True, 0, epoch)
        _sync(device)
        started = time.perf_counter()
        result = mh.train_one_epoch(model, loader, optimizer, scaler, device, weights, cfg, epoch, progress=False)
        _sync(device)
        rates.append(len(result["probs"]) / (time.perf_counter() - started))
    return rates[-1]


def compute_bound_rate(model, args, device, weights, batch_size) -> float:
    """(c) images/s of forward + backward + step on random tensors already on the device."""
    model.train()
    optimizer = mh.build_optimizer(model.parameters(), 1e-4, device)
    dtype = mh.amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch_size, device=device) < 0.3).float()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            started = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x).squeeze(1)
        mh.amp_step(mh.weighted_bce_with_logits(logits, y, *weights), optimizer, scaler)
    _sync(device)
    return args.steps * batch_size / (time.perf_counter() - started)


def _csv(kind):
    """An argparse type: a comma-separated list of `kind`."""
    return lambda text: [kind(v) for v in text.split(",")]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _significant(value: float) -> float:
    """A rate or ratio to 4 significant digits (rounding to a fixed decimal broke the ratios of slow CPU rates)."""
    return float(f"{value:.4g}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="MURA folder; default: a phantom under --phantom-dir")
    parser.add_argument("--phantom-dir", default="data/phantom-bench")
    parser.add_argument("--n-patients", type=int, default=400)
    parser.add_argument("--phantom-image-size", type=int, default=512)
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=_csv(int), default=[32], help="views per step of (b) and (c); "
                        "a comma-separated list is a sweep, e.g. 32,64,128")
    parser.add_argument("--compile", type=_csv(str), default=["none"], help="torch.compile modes of (b) and (c), "
                        "comma-separated: none, default, reduce-overhead, max-autotune-no-cudagraphs")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of (b) and (c)")
    parser.add_argument("--seed-steps", type=int, default=30, help="timed steps (studies) of (a)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed-workers", type=int, default=4)
    parser.add_argument("--rotation-degrees", type=float, default=10.0)
    parser.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "off"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default="outputs/benchmark_train_throughput.json")
    args = parser.parse_args(argv)

    device = mh.resolve_device(args.device)
    root = mh.resolve_data_dir(args.data_dir, args.phantom_dir, n_patients=args.n_patients,
                               image_size=args.phantom_image_size)
    studies = mh.load_studies(root, "train")
    images = mh.studies_to_images(studies)
    cache = mh.build_image_cache(images["image_path"], args.image_size, args.cache_dir, progress=False)
    weights = mh.class_weights(images["label"])
    torch.manual_seed(0)
    model = mh.build_model(pretrained=False)
    torch.backends.cudnn.benchmark = False  # (a) as in 2018: with a new view count per study, autotuning never ends
    seed_style = seed_style_rate(model, studies, args, device, weights)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    model = model.to(memory_format=torch.channels_last)
    settings = []
    for mode in args.compile:
        compiled = mh.compile_model(model, False if mode == "none" else mode)
        for batch_size in args.batch_size:
            started = time.perf_counter()
            b = project_rate(compiled, cache, images, args, device, weights, batch_size)
            c = compute_bound_rate(compiled, args, device, weights, batch_size)
            settings.append({"compile": mode, "batch_size": batch_size, "b_project": _significant(b),
                             "c_compute_bound": _significant(c), "b_over_a": _significant(b / seed_style),
                             "b_over_c": _significant(b / c), "seconds": round(time.perf_counter() - started, 1)})
            print(settings[-1], flush=True)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__, "autocast": str(mh.amp_dtype(args.amp, device)), "image_size": args.image_size,
        "workers": args.workers, "views": len(images), "a_seed_style": _significant(seed_style), "settings": settings,
    }
    print(json.dumps(report, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
