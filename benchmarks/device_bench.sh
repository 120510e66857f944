#!/usr/bin/env bash
# Issue 20's measurements that this project's CPU VM cannot make, in one go on a GPU machine:
#   1. bench_unet.py on the machine's CPU (HP1, batch 4, all its threads): where the CPU has
#      AMX-BF16 or AVX512-BF16, `precision: auto` picks bf16 (after its timed self-check) and the
#      defaults row is judged against the bf16 target (≤ 0.30x diffusers fp32, same run); bf16 with
#      channels_last is timed beside it;
#   2. bench_unet.py on the GPU (HP2, batch $GPU_BATCH): fp32, bf16 autocast and channels_last, then
#      again with torch.compile (bf16) beside them, each as a share of a bf16 8192³ matmul timed in
#      the same run (goal ≥ 45 %);
#   2b. gpu_step_profile.py on the GPU (HP2): eager bf16 in both layouts at batch $GPU_BATCH and at
#      twice it, each step's kernels by kind (where the time goes that keeps the share of peak low;
#      compiled variants take minutes to compile: `--phase "16:compiled bf16"` by hand);
#   3. bench_circularity.py --quick pinned to two of the machine's cores (taskset), as context for
#      the ≥ 300 images/s target on another CPU than the VM's.
# Each step has its own time limit (CPU_S, PROFILE_S, GPU_S, GPU_COMPILE_S, CIRC_S; 0 leaves the step
# out), so one that runs long leaves the others their time. Into $OUT:
# machine.txt (lscpu, nvidia-smi, versions, each step's exit status), the JSON results and
# logs.tar.gz (each step's output).
# diffusers (with importlib_metadata) comes from the environment or from wheels in $WHEELS
# (default .whl/), installed into /tmp/site. On a machine without CUDA step 2 is skipped.
#   OUT=runs/device_bench bash benchmarks/device_bench.sh
#   OUT=/tmp/device_smoke SMOKE=1 bash benchmarks/device_bench.sh     # a minute on a CPU: plumbing only
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_bench}
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 IRIS_DIFFUSION_CACHE=${IRIS_DIFFUSION_CACHE:-/tmp/iris-cache}
if ! "$PY" -c "import diffusers, importlib_metadata" 2>/dev/null; then
  ls "$WHEELS"/diffusers-*.whl >/dev/null 2>&1 || { echo "error: diffusers is not installed and $WHEELS holds no wheel" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/diffusers-*.whl "$WHEELS"/importlib_metadata-*.whl || exit 2
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
UNET_CPU=(--configs HP1 --repeats "${CPU_REPEATS:-4}")
UNET_GPU=(--configs HP2 --batch "${GPU_BATCH:-16}" --repeats "${GPU_REPEATS:-6}")
if [ "${SMOKE:-0}" = 1 ]; then  # the plumbing on any machine: one timed step, nothing slow
  UNET_CPU=(--quick --configs HP1 --repeats 1)
  UNET_GPU=(--quick --configs HP1 --repeats 1)
fi
{ date -u; lscpu; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
        'diffusers', diffusers.__version__, 'threads', torch.get_num_threads())"
  "$PY" -c "from guided_diffusion.training import cpu_bf16; print('CPU precision auto:', *cpu_bf16.auto_cpu_precision())"
} > "$OUT/machine.txt" 2>&1
grep -E "Model name|^CPU\(s\)" "$OUT/machine.txt"
grep -o -w -E "amx_bf16|avx512_bf16|avx512f|avx2" "$OUT/machine.txt" | sort -u | tr '\n' ' '; echo

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, note its exit status
  local name=$1 limit=$2; shift 2
  [ "$limit" = 0 ] && return  # NAME_S=0 leaves a step out
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/machine.txt"
  grep -E '"(measured|value|target|met)"' "$LOGS/$name.log" | sed -n '1,80p' | paste - - - - 2>/dev/null | cut -c1-400
}
step unet_cpu "${CPU_S:-180}" "$PY" benchmarks/bench_unet.py --device cpu --no-compile "${UNET_CPU[@]}" \
    --out "$OUT/bench_unet_cpu.json"
if [ "$CUDA" = 1 ]; then  # where the step's GPU time goes, by variant and kernel kind
  step gpu_profile "${PROFILE_S:-150}" "$PY" benchmarks/gpu_step_profile.py --config HP2 \
      --phase "${GPU_BATCH:-16}:eager bf16,eager bf16 channels_last" "$((2 * ${GPU_BATCH:-16})):eager bf16" \
      --out "$OUT/gpu_step_profile.json"
fi
if [ "$CUDA" = 1 ]; then  # eager first, so a compile that runs long loses only the compiled variant
  step unet_cuda "${GPU_S:-120}" "$PY" benchmarks/bench_unet.py --device cuda --no-compile "${UNET_GPU[@]}" \
      --out "$OUT/bench_unet_cuda.json"
  step unet_cuda_compiled "${GPU_COMPILE_S:-190}" "$PY" benchmarks/bench_unet.py --device cuda "${UNET_GPU[@]}" \
      --repeats 3 --out "$OUT/bench_unet_cuda_compiled.json"
fi
CIRC=(--quick)
[ "${SMOKE:-0}" = 1 ] && CIRC=(--quick --count 100)
step circularity_2cores "${CIRC_S:-80}" taskset -c 0,1 "$PY" benchmarks/bench_circularity.py "${CIRC[@]}" \
    --out "$OUT/bench_circularity_2cores.json"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
