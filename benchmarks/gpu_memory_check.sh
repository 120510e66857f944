#!/usr/bin/env bash
# Issue 17's checks on a GPU, in one go: bench_memory.py --train-steps 3 (the T4 recipe under
# torch.cuda.set_per_process_memory_fraction(15 GiB) and two reference recipes, each peak,
# torch.cuda.max_memory_allocated, beside the memory plan's estimate), then the CUDA tests of the
# EMA offload and of the saved-bytes count (fake CUDA tensors on a real GPU).
#   OUT=runs/gpu_memory_check bash benchmarks/gpu_memory_check.sh
set -u
OUT=${OUT:-runs/gpu_memory_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/gpu.txt"
timeout "${BENCH_S:-330}" python benchmarks/bench_memory.py --train-steps 3 --out "$OUT/bench_memory_gpu.json" \
    > "$OUT/bench_memory.log" 2>&1
echo "bench exit $?" | tee -a "$OUT/gpu.txt"
python - "$OUT/bench_memory_gpu.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for name, run in r.get("gpu_runs", {}).items():
    print(name, run)
PY
timeout "${PYTEST_S:-100}" python -m pytest -q -p no:cacheprovider tests/test_t4_memory.py \
    tests/test_activation_memory.py -k "cuda or openai" > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?" | tee -a "$OUT/gpu.txt"
tail -3 "$OUT/pytest.txt"
