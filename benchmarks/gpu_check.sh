#!/usr/bin/env bash
# The GPU check within a time budget: the training-throughput benchmark and GPU runs of notebooks 03 (DenseNet-169
# from scratch on a phantom of a few thousand views), 04 (the paper's 5-checkpoint ensemble), 06 (the paper's five
# models, CAE, VAE and DCGAN at 512 px, BiGAN and alpha-GAN at 128, on its best two preprocessing variants; the
# other four: ANOMALY_VARIANTS="[raw, raw+HE, crop, crop+HE]"), then while time is left the benchmark under
# torch.compile's CUDA graphs, 05, an fp16 benchmark (the T4's path) and 02. Each step runs under its own timeout;
# a failed step does not stop the next.
# Everything lands in outputs/gpu/: figures, CSV/JSON, executed notebooks, gpu_check.log, steps.csv.
#
#   SMALL=1 bash benchmarks/gpu_check.sh    # the same steps at tiny sizes: a CPU smoke run of this script
#   bash benchmarks/gpu_check.sh            # everything: about 15 min on an H200, more than one 10-min call, so
#                                           # with a 15-min lease run it as two calls:
#   STEPS="phantoms 03_training 04_results benchmark" BUDGET=380 bash benchmarks/gpu_check.sh   # ~6 min
#   STEPS="phantoms 06_anomaly_detection" BUDGET=420 bash benchmarks/gpu_check.sh               # ~7 min
#   STEPS="phantoms benchmark_compile" BUDGET=300 bash benchmarks/gpu_check.sh                  # when time is left
#   STEPS="phantoms 06_anomaly_paper" BUDGET=420 bash benchmarks/gpu_check.sh   # their recipe (not yet measured)
# 06_anomaly_paper: notebook 06 with recipes [paper] (their code's networks, losses, batch sizes, learning rates,
# hand crops and min-max scaling; ANOMALY_PAPER_EPOCHS epochs, not their 500-1000), into outputs/gpu/paper/.
#
# Measured on an H200 (2026-11-26): phantoms ~30 s; 03 ~45 s of cuDNN autotuning in its first epoch, then ~5 s an
# epoch at batch 64 (the step is bound by the host's kernel launches, so batch 64 is nearly twice as fast as 32);
# 04 ~25 s; the benchmark ~50 s at one batch size (three now: ~100 s, not yet measured); 06 ~60 s of
# preprocessing (run in the background during 03/04) and ~2 s an epoch per autoencoder, ~30 s a run with scoring
# (the GANs: not yet measured on a GPU).
# Knobs (environment): PYTHON, BUDGET (seconds for the whole script), OUTDIR, STEPS (the steps to run; default
# all), LIMIT_<step> (seconds for one step, overriding its share of the budget), and the sizes below.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
OUTDIR=${OUTDIR:-$REPO/outputs/gpu}
BUDGET=${BUDGET:-900}  # everything; a single device call allows 600 s: see the two-call recipe above
if [ "${SMALL:-0}" = 1 ]; then
  : "${PATIENTS:=16}" "${PHANTOM_SIZE:=128}" "${IMAGE_SIZE:=64}" "${EPOCHS:=2}" "${BATCH:=8}"
  : "${ANOMALY_PATIENTS:=30}" "${ANOMALY_SIZE:=64}" "${GAN_SIZE:=32}" "${ANOMALY_EPOCHS:=1}" "${ANOMALY_BATCH:=8}"
  : "${ANOMALY_PAPER_EPOCHS:=1}"
  BENCH_ARGS="--image-size 64 --steps 3 --seed-steps 3 --warmup 1"
  : "${BENCH_BATCHES:=8}" "${COMPILE_BATCHES:=8}"
else
  BENCH_ARGS=${BENCH_ARGS:-}
fi
BENCH_BATCHES=${BENCH_BATCHES:-32,64,128}  # the benchmark's batch sizes (eager; the fp16 run uses the first)
COMPILE_BATCHES=${COMPILE_BATCHES:-128}  # ... and under torch.compile(mode="reduce-overhead"): one compile a size
PATIENTS=${PATIENTS:-1000}            # about 3,560 views
PHANTOM_SIZE=${PHANTOM_SIZE:-512}
IMAGE_SIZE=${IMAGE_SIZE:-224}
EPOCHS=${EPOCHS:-25}
BATCH=${BATCH:-64}
LR=${LR:-5e-4}
PATIENCE=${PATIENCE:-3}
ANOMALY_PATIENTS=${ANOMALY_PATIENTS:-500}
ANOMALY_SIZE=${ANOMALY_SIZE:-512}
ANOMALY_EPOCHS=${ANOMALY_EPOCHS:-10}
ANOMALY_BATCH=${ANOMALY_BATCH:-16}
GAN_SIZE=${GAN_SIZE:-128}  # BiGAN and alpha-GAN (the paper); the autoencoders and DCGAN use ANOMALY_SIZE
ANOMALY_MODELS=${ANOMALY_MODELS:-"[cae, vae, dcgan, bigan, alphagan]"}
ANOMALY_VARIANTS=${ANOMALY_VARIANTS:-"[full+HE, full]"}  # the paper's best two; all six are 30 runs (~15 min)
ANOMALY_PAPER_EPOCHS=${ANOMALY_PAPER_EPOCHS:-5}  # the paper recipe's step: their batch sizes and rates, few epochs

PHANTOM=$REPO/data/phantom-gpu
ANOMALY_PHANTOM=$REPO/data/phantom-gpu-anomaly
CACHE=$REPO/data/cache
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu_check.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
echo "step,seconds,exit_code" > "$OUTDIR/steps.csv"

# the steps in order, with the seconds each needs on an H200 at the sizes above; a step may use the time left
# minus what the wanted core steps after it need (the optional ones, benchmark_compile, 05, benchmark_fp16 and 02,
# only take what is left)
ORDER=(phantoms 03_training 04_results benchmark 06_anomaly_detection 06_anomaly_paper benchmark_compile 05_predict
       benchmark_fp16 02_pipeline_check)
declare -A NEEDS=([phantoms]=35 [03_training]=190 [04_results]=30 [benchmark]=100 [06_anomaly_detection]=330
                  [06_anomaly_paper]=330)
[ "${SMALL:-0}" = 1 ] && NEEDS=([phantoms]=10 [03_training]=30 [04_results]=15 [benchmark]=20 [06_anomaly_detection]=60
                                [06_anomaly_paper]=90)
wants() {  # is step $1 in STEPS? SMALL=1 runs benchmark_compile only when named (~5 min compiling on 2 CPU cores)
  case " ${STEPS:-all} " in *" $1 "*) return 0 ;; *" all "*) ;; *) return 1 ;; esac
  [ "${SMALL:-0}" != 1 ] || [ "$1" != benchmark_compile ]
}
reserve_after() {  # seconds the wanted core steps after $1 need
  local after=0 total=0 s
  for s in "${ORDER[@]}"; do
    [ "$after" = 1 ] && wants "$s" && total=$((total + ${NEEDS[$s]:-0}))
    [ "$s" = "$1" ] && after=1
  done
  echo "$total"
}
# step NAME MAX_SECONDS command...: run under min(MAX or LIMIT_<NAME>, time left - reserve_after NAME); record its
# time and exit code. Steps not in STEPS are left out.
step() {
  local name=$1 max=$2; shift 2
  wants "$name" || return 0
  local override="LIMIT_$name"; max=${!override:-$max}
  local limit=$(( $(left) - $(reserve_after "$name") )); [ "$limit" -gt "$max" ] && limit=$max
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped, $(left) s left"; echo "$name,0,skipped" >> "$OUTDIR/steps.csv"; return; fi
  echo "== $name (limit ${limit} s, $(left) s left)"
  local t0=$(date +%s); timeout -k 10 "$limit" "$@"; local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"; echo "$name,$(( $(date +%s) - t0 )),$rc" >> "$OUTDIR/steps.csv"
}
PAPERMILL=("$PY" -m papermill --cwd notebooks -k python3 --log-level WARNING -p output_dir "$OUTDIR")

echo "== machine"; date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'cpus', __import__('os').cpu_count())"

PHANTOMS=()
for s in 03_training 04_results benchmark benchmark_compile 05_predict benchmark_fp16 02_pipeline_check; do
  wants "$s" && { PHANTOMS=("$PHANTOM" "$PATIENTS"); break; }
done
{ wants 06_anomaly_detection || wants 06_anomaly_paper; } && PHANTOMS+=("$ANOMALY_PHANTOM" "$ANOMALY_PATIENTS")
step phantoms 120 "$PY" -c "import os, sys, mura_helpers as mh
for root, n in zip(sys.argv[2::2], sys.argv[3::2]):
    print(mh.ensure_phantom(root, n_patients=int(n), image_size=int(sys.argv[1]), workers=os.cpu_count(), progress=False))" \
  "$PHANTOM_SIZE" "${PHANTOMS[@]}"

# the unsupervised path's preprocessing is CPU work: cache all six variants in the background while 03 and 04
# use the GPU (same settings as notebook 06 below, so it finds them)
PREPROCESS=
if wants 06_anomaly_detection || wants 06_anomaly_paper; then
  "$PY" - "$ANOMALY_PHANTOM" "$ANOMALY_PATIENTS" "$CACHE" "$PHANTOM_SIZE" "$ANOMALY_VARIANTS" "$ANOMALY_SIZE" \
    "$GAN_SIZE" > "$OUTDIR/anomaly_cache.log" 2>&1 <<'EOF' &
import sys, time
import mura_helpers as mh
root, patients, cache, phantom_size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
for variant in sys.argv[5].strip("[]").replace(" ", "").split(","):
    for size in dict.fromkeys(int(s) for s in sys.argv[6:]):
        t0 = time.perf_counter()
        mh.prepare_anomaly_data(mh.AnomalyConfig(variant=variant, image_size=size, cache_dir=cache, phantom_dir=root,
                                                 phantom_patients=patients, phantom_image_size=phantom_size),
                                progress=False)
        print(f"{variant} at {size} px: cached in {time.perf_counter() - t0:.1f} s", flush=True)
EOF
  PREPROCESS=$!
fi

step 03_training 400 "${PAPERMILL[@]}" notebooks/03_training.ipynb "$OUTDIR/03_training.ipynb" \
  -p phantom_dir "$PHANTOM" -p phantom_patients "$PATIENTS" \
  -p phantom_image_size "$PHANTOM_SIZE" -p image_size "$IMAGE_SIZE" -p batch_size "$BATCH" -p epochs "$EPOCHS" \
  -p lr "$LR" -p plateau_patience "$PATIENCE" -p pretrained False -p cache_dir "$CACHE"
step 04_results 90 "${PAPERMILL[@]}" notebooks/04_results.ipynb "$OUTDIR/04_results.ipynb" -p ensemble_k 5
if [ -n "$PREPROCESS" ]; then  # wait for it while the budget allows (06 would otherwise build what is missing)
  echo "== waiting for the anomaly preprocessing ($(left) s left)"
  while kill -0 "$PREPROCESS" 2>/dev/null && [ "$(left)" -gt 60 ]; do sleep 2; done
  kill "$PREPROCESS" 2>/dev/null; cat "$OUTDIR/anomaly_cache.log"
fi
step benchmark 160 "$PY" benchmarks/train_throughput.py --data-dir "$PHANTOM" --cache-dir "$CACHE" \
  --json "$OUTDIR/benchmark_train_throughput.json" $BENCH_ARGS --batch-size "$BENCH_BATCHES"
step 06_anomaly_detection 600 "${PAPERMILL[@]}" notebooks/06_anomaly_detection.ipynb "$OUTDIR/06_anomaly_detection.ipynb" \
  -y "models: $ANOMALY_MODELS" -y "variants: $ANOMALY_VARIANTS" -p gan_image_size "$GAN_SIZE" \
  -p phantom_dir "$ANOMALY_PHANTOM" -p phantom_patients "$ANOMALY_PATIENTS" -p phantom_image_size "$PHANTOM_SIZE" \
  -p image_size "$ANOMALY_SIZE" -p epochs "$ANOMALY_EPOCHS" -p batch_size "$ANOMALY_BATCH" -p cache_dir "$CACHE"
step 06_anomaly_paper 600 "${PAPERMILL[@]}" notebooks/06_anomaly_detection.ipynb "$OUTDIR/06_anomaly_paper.ipynb" \
  -p output_dir "$OUTDIR/paper" -y "recipes: [paper]" -y "models: $ANOMALY_MODELS" -y "variants: $ANOMALY_VARIANTS" \
  -p gan_image_size "$GAN_SIZE" -p phantom_dir "$ANOMALY_PHANTOM" -p phantom_patients "$ANOMALY_PATIENTS" \
  -p phantom_image_size "$PHANTOM_SIZE" -p image_size "$ANOMALY_SIZE" -p epochs "$ANOMALY_PAPER_EPOCHS" \
  -p cache_dir "$CACHE"
step benchmark_compile 300 "$PY" benchmarks/train_throughput.py --data-dir "$PHANTOM" --cache-dir "$CACHE" \
  --compile reduce-overhead --seed-steps 10 --json "$OUTDIR/benchmark_train_throughput_compiled.json" $BENCH_ARGS \
  --batch-size "$COMPILE_BATCHES"
step 05_predict 40 "${PAPERMILL[@]}" notebooks/05_predict.ipynb "$OUTDIR/05_predict.ipynb"
step benchmark_fp16 60 "$PY" benchmarks/train_throughput.py --data-dir "$PHANTOM" --cache-dir "$CACHE" \
  --amp fp16 --seed-steps 10 --json "$OUTDIR/benchmark_train_throughput_fp16.json" $BENCH_ARGS \
  --batch-size "${BENCH_BATCHES%%,*}"
step 02_pipeline_check 40 "${PAPERMILL[@]}" notebooks/02_pipeline_check.ipynb "$OUTDIR/02_pipeline_check.ipynb" \
  -p phantom_dir "$PHANTOM" -p phantom_patients "$PATIENTS" \
  -p phantom_image_size "$PHANTOM_SIZE" -p image_size "$IMAGE_SIZE" -p cache_dir "$CACHE"

echo "== steps"; cat "$OUTDIR/steps.csv"; echo "total $(( $(date +%s) - START )) s"
for f in training_summary.json metrics.json anomaly_metrics.json paper/anomaly_metrics.json \
         benchmark_train_throughput*.json; do
  [ -f "$OUTDIR/$f" ] && { echo "== $f"; head -c 1500 "$OUTDIR/$f"; echo; }
done
if [ -n "${OUT:-}" ]; then  # the device tool's result folder: two archives, the log, best.pt's weights in parts
  best=$OUTDIR/runs/densenet169/checkpoints/best.pt
  [ -f "$best" ] && "$PY" -c "import sys, torch; s = torch.load(sys.argv[1], weights_only=True)
torch.save({k: s[k] for k in ('model', 'config', 'epoch')}, sys.argv[2])" "$best" "$OUTDIR/best_weights.pt" \
    && split -b 15M -d "$OUTDIR/best_weights.pt" "$OUT/best_weights.pt.part"
  tar czf "$OUT/outputs.tar.gz" -C "$OUTDIR" --exclude '*.pt' --exclude '*.ipynb' .
  (cd "$OUTDIR" && ls ./*.ipynb >/dev/null 2>&1 && tar czf "$OUT/notebooks.tar.gz" ./*.ipynb)
  sleep 1; cp "$LOG" "$OUT/"  # after tee has written the last lines
fi
