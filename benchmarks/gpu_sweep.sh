#!/usr/bin/env bash
# The reduced 128 px strength sweep on one GPU (issue 22), sized to finish within 9 minutes on one
# H100 or H200:
#   1. a 128 px VAE (Keras on its torch backend) and a 26 M-parameter 128 px U-Net
#      (configs/sweep-128-gpu.yaml: 64 channels, 2 res blocks, HP2's 4000-step linear schedule, bf16)
#      train side by side on the GPU; the U-Net stops at train.max_steps (3000) or after TRAIN_S
#      seconds, whichever comes first (SIGTERM: it checkpoints the step in progress and the sweep
#      uses that checkpoint; the steps reached are in train_log.csv and the run log);
#   2. benchmarks/strength_sweep.py: N = 100 per point, the same seeds at every point, from noise
#      (DDIM 50) and from VAE priors at s = 0, 0.2, 0.4, 0.6, 1.0, scored by circularity-check, bleed,
#      proxy KID against held-out images and diversity;
#   3. into $OUT: run.log (GPU, versions, every step's output), train_log.csv, and sweep/ with
#      sweep.json, sweep.md, strength_sweep.png, strength_grid.png, images.npz, config.yaml.
# Needs a CUDA PyTorch, NumPy, OpenCV, scikit-image, PyYAML, safetensors, matplotlib and tqdm; no
# TensorFlow and no network. Keras comes from the environment, or from the pure-Python wheels
# (keras, namex, optree) in $WHEELS (default .whl/), installed into /tmp/site.
#   OUT=runs/gpu_sweep bash benchmarks/gpu_sweep.sh             # the real run, on a GPU
#   OUT=/tmp/gpu_smoke bash benchmarks/gpu_sweep.sh --smoke     # tiny sizes: CPU or GPU, about 2 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_sweep}
WHEELS=${WHEELS:-.whl}
TRAIN_S=${TRAIN_S:-330}
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
CFG=configs/sweep-128-gpu.yaml
SETS=()
SWEEP=(--n 100 --strengths 0,0.2,0.4,0.6,1.0)
if [ "$SMOKE" = 1 ]; then
  TRAIN_S=${SMOKE_TRAIN_S:-120}
  SETS=(--set data.image_size=32 --set data.synthetic_count=96 --set model.model_channels=16
        --set model.channel_mult=[1,2,2] --set model.num_head_channels=16 --set train.batch_size=8
        --set train.max_steps=4 --set train.warmup_steps=0 --set train.log_every=1 --set train.save_every=4
        --set train.sample_every=4 --set train.stats_every=4 --set train.sample_count=4
        --set train.sample_steps=4 --set vae.channel_mult=[1,2,4] --set vae.epochs=1 --set vae.batch_size=16)
  SWEEP=(--n 6 --strengths 0,0.6,1.0 --steps 5 --batch-size 6)
fi
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
{ date -u; echo "device $DEVICE smoke $SMOKE train cap ${TRAIN_S}s"
  if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  "$PY" -c "import torch, keras, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'keras', keras.__version__, keras.backend.backend(), 'numpy', numpy.__version__)"
} 2>&1 | tee "$LOG"

t0=$SECONDS
# The VAE trains beside the U-Net (it needs a small share of the GPU).
"$PY" -m pipeline.cli.train_vae --config "$CFG" "${SETS[@]}" --out "$WORK/vae" --overwrite > "$WORK/vae.log" 2>&1 &
VAE_PID=$!
set +e
timeout -s TERM "$TRAIN_S" "$PY" -m pipeline.cli.train_diffusion --config "$CFG" "${SETS[@]}" --device "$DEVICE" \
  --out "$WORK/diffusion" --overwrite > "$WORK/diffusion.log" 2>&1
DIFF_RC=$?
wait $VAE_PID
VAE_RC=$?
set -e
tr '\r' '\n' < "$WORK/vae.log" | grep -v '^\s*$' | tail -n 15 >> "$LOG" || true
tr '\r' '\n' < "$WORK/diffusion.log" | grep -v '^\s*$' | grep -v 'train:' | tail -n 25 >> "$LOG" || true
cp "$WORK/diffusion/log.csv" "$OUT/train_log.csv" 2>/dev/null || true
echo "training: diffusion exit $DIFF_RC (124 = stopped at the ${TRAIN_S}s cap, checkpointed), vae exit $VAE_RC," \
     "$((SECONDS - t0)) s" | tee -a "$LOG"
if [ "$VAE_RC" != 0 ] || { [ "$DIFF_RC" != 0 ] && [ "$DIFF_RC" != 124 ]; }; then
  echo "error: training failed (see $LOG)" >&2; exit 1
fi

t1=$SECONDS
"$PY" benchmarks/strength_sweep.py --vae "$WORK/vae/vae.keras" --diffusion "$WORK/diffusion" --control-defects 0 \
  --ddpm-steps 0 --device "$DEVICE" "${SWEEP[@]}" --config "$CFG" "${SETS[@]}" --out "$OUT/sweep" --overwrite \
  2>&1 | tr '\r' '\n' | grep -v '^\s*$' | grep -v 'sweep:' | tee -a "$LOG"
echo "sweep: $((SECONDS - t1)) s; total $((SECONDS - t0)) s" | tee -a "$LOG"
rm -rf "$WORK"
