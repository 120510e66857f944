export PYTHONPATH=$PWD
T="--config configs/tiny-cpu.yaml --device cuda --set train.precision=fp16 --set data.synthetic_count=256 --set train.log_every=1 --set train.save_every=1000"
timeout 90 python -m pipeline.cli.train_diffusion $T --set train.max_steps=60 --out /tmp/a > $OUT/fp16.txt 2>&1; echo "fp16 run exit $?"
python -c "import json; s=json.load(open('/tmp/a/summary.json')); print({k: s[k] for k in ('overflow_steps','bad_steps','best_loss','gpu_peak_gib')})"
python - <<'PY'
import csv; rows=list(csv.DictReader(open('/tmp/a/log.csv'))); print('overflow by step', [(r['step'], r['overflow_steps']) for r in rows[:12]])
PY
python -m pipeline.cli.train_diffusion $T --set train.max_steps=400 --out /tmp/b > $OUT/sigterm.txt 2>&1 &
PID=$!
for i in $(seq 1 300); do n=$(($(wc -l < /tmp/b/log.csv 2>/dev/null || echo 0))); [ "$n" -ge 30 ] && break; sleep 0.1; done
kill -TERM $PID; wait $PID; echo "sigterm exit $?"; grep -a "interrupted" $OUT/sigterm.txt | tail -1
timeout 90 python -m pipeline.cli.train_diffusion --resume /tmp/b --device cuda --set train.max_steps=60 > $OUT/resume.txt 2>&1; echo "resume exit $?"; tail -c 400 $OUT/resume.txt
