#!/usr/bin/env bash
# A strength sweep on one GPU (issue 22). By default the reduced 128 px sweep, sized to finish within
# 9 minutes on one H100 or H200:
#   1. a 128 px VAE (Keras on its torch backend) and a 26 M-parameter 128 px U-Net
#      (configs/sweep-128-gpu.yaml: 64 channels, 2 res blocks, HP2's 4000-step linear schedule, bf16)
#      train side by side on the GPU; the U-Net stops at train.max_steps or after TRAIN_S seconds,
#      whichever comes first (SIGTERM: it checkpoints the step in progress and the sweep uses that
#      checkpoint; the steps reached are in the run log);
#   2. benchmarks/strength_sweep.py: N = 100 per point, the same seeds at every point, from noise
#      (DDIM 50) and from VAE priors at s = 0, 0.2, 0.4, 0.6, 1.0, scored by circularity-check, bleed,
#      proxy KID against held-out images and diversity;
#   3. into $OUT: run.log (GPU, versions, every step's summary and the tables), training.tar.gz
#      (each run's log.csv, loss.png and summary; the sweep's config.yaml, sweep.md and paired.md) and
#      sweep/ with sweep.json, paired.json (paired tests between points), strength_sweep.png,
#      strength_grid*.png and images.npz (every point's images).
# Settings (environment): CONFIG, N, STRENGTHS, TRAIN_S (default 450), CONTROL (fraction of
# defective pupils for a control model trained beside the main one; default 0 = none), DDPM_STEPS
# (a from-noise DDPM point over that many steps; default 0 = none). Needs a CUDA PyTorch, NumPy,
# OpenCV, scikit-image, PyYAML, safetensors, matplotlib and tqdm; no TensorFlow and no network.
# Keras comes from the environment, or from the pure-Python wheels (keras, namex, optree) in
# $WHEELS (default .whl/), installed into /tmp/site.
#   OUT=runs/gpu_sweep bash benchmarks/gpu_sweep.sh             # the 128 px run, on a GPU
#   OUT=/tmp/gpu_smoke bash benchmarks/gpu_sweep.sh --smoke     # tiny sizes: CPU or GPU, about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_sweep}
WHEELS=${WHEELS:-.whl}
TRAIN_S=${TRAIN_S:-450}
CONFIG=${CONFIG:-configs/sweep-128-gpu.yaml}
CONTROL=${CONTROL:-0}
DDPM_STEPS=${DDPM_STEPS:-0}
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "error: unknown argument ${1} (use --smoke or nothing)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} KERAS_BACKEND=torch PYTHONUNBUFFERED=1
if ! "$PY" -c "import keras" 2>/dev/null; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "error: Keras is not installed and $WHEELS holds no wheels" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG=$OUT/run.log
CFG=$CONFIG
SETS=()
SWEEP=(--n "${N:-100}" --strengths "${STRENGTHS:-0,0.2,0.4,0.6,1.0}" --ddpm-steps "$DDPM_STEPS")
if [ "$SMOKE" = 1 ]; then
  TRAIN_S=${SMOKE_TRAIN_S:-120}
  SETS=(--set data.image_size=32 --set data.synthetic_count=96 --set model.model_channels=16
        --set model.channel_mult=[1,2,2] --set model.num_head_channels=16 --set train.batch_size=8
        --set train.max_steps=4 --set train.warmup_steps=0 --set train.log_every=1 --set train.save_every=4
        --set train.sample_every=4 --set train.stats_every=4 --set train.sample_count=4
        --set train.sample_steps=4 --set vae.channel_mult=[1,2,4] --set vae.epochs=1 --set vae.batch_size=16)
  SWEEP=(--n 6 --strengths 0,0.6,1.0 --steps 5 --batch-size 6 --ddpm-steps "$((DDPM_STEPS > 0 ? 8 : 0))")
fi
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
{ date -u; echo "device $DEVICE smoke $SMOKE train cap ${TRAIN_S}s"
  if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  "$PY" -c "import torch, keras, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'keras', keras.__version__, keras.backend.backend(), 'numpy', numpy.__version__)"
} 2>&1 | tee "$LOG"

t0=$SECONDS
# The VAE (and the control model) train beside the U-Net; each needs only a share of the GPU.
"$PY" -m pipeline.cli.train_vae --config "$CFG" "${SETS[@]}" --out "$WORK/vae" --overwrite > "$WORK/vae.log" 2>&1 &
VAE_PID=$!
train_unet() {  # train_unet NAME [--set ...]: one U-Net, capped at TRAIN_S seconds; its exit status
  local rc=0
  timeout -s TERM "$TRAIN_S" "$PY" -m pipeline.cli.train_diffusion --config "$CFG" "${SETS[@]}" "${@:2}" \
    --device "$DEVICE" --out "$WORK/$1" --overwrite > "$WORK/$1.log" 2>&1 || rc=$?
  return "$rc"
}
CONTROL_PID=
if [ "$CONTROL" != 0 ]; then
  train_unet control --set data.synthetic_defects="$CONTROL" &
  CONTROL_PID=$!
fi
DIFF_RC=0; train_unet diffusion || DIFF_RC=$?
CONTROL_RC=0; if [ -n "$CONTROL_PID" ]; then wait "$CONTROL_PID" || CONTROL_RC=$?; fi
VAE_RC=0; wait $VAE_PID || VAE_RC=$?
for run in vae diffusion control; do
  [ -f "$WORK/$run.log" ] || continue
  echo "--- $run" >> "$LOG"
  tr '\r' '\n' < "$WORK/$run.log" | grep -vE '^\s*$|━|%\|' | tail -n 12 >> "$LOG" || true
done
echo "training: diffusion exit $DIFF_RC, control exit $CONTROL_RC (124 = stopped at the ${TRAIN_S}s cap," \
     "checkpointed), vae exit $VAE_RC, $((SECONDS - t0)) s" | tee -a "$LOG"
for rc in "$DIFF_RC" "$CONTROL_RC" "$VAE_RC"; do
  if [ "$rc" != 0 ] && [ "$rc" != 124 ]; then echo "error: training failed (see $LOG)" >&2; exit 1; fi
done
CONTROL_ARGS=(--control-defects 0)
if [ -n "$CONTROL_PID" ]; then CONTROL_ARGS=(--control "$WORK/control" --control-defects "$CONTROL"); fi

t1=$SECONDS
"$PY" benchmarks/strength_sweep.py --vae "$WORK/vae/vae.keras" --diffusion "$WORK/diffusion" "${CONTROL_ARGS[@]}" \
  --device "$DEVICE" "${SWEEP[@]}" --config "$CFG" "${SETS[@]}" --out "$OUT/sweep" --overwrite \
  2>&1 | tr '\r' '\n' | grep -v '^\s*$' | grep -v 'sweep:' | tee -a "$LOG"
echo "sweep: $((SECONDS - t1)) s; total $((SECONDS - t0)) s" | tee -a "$LOG"
# At most 8 files come back from a lent GPU machine: the Markdown tables and the config travel packed.
mv "$OUT/sweep/config.yaml" "$OUT/sweep/sweep.md" "$OUT/sweep/paired.md" "$WORK/"
(cd "$WORK" && tar -czf training.tar.gz config.yaml sweep.md paired.md ./*/log.csv ./*/loss.png ./*/summary.json \
  2>/dev/null) || true
mv "$WORK/training.tar.gz" "$OUT/" 2>/dev/null || true
rm -rf "$WORK"
