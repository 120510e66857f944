"""Signals `train-diffusion` meets: SIGINT/SIGTERM stop it after the step they come in, with a
checkpoint of that step and exit 130/143, and the resumed run ends bit-identical to an
uninterrupted one; a second signal aborts a save without harm; SIGKILL at any moment loses nothing
that was checkpointed. Real signals to real subprocesses (one torch thread each), timed by the rows
of log.csv (one per step, written as it goes); the second-signal test runs in process.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fault_runs import (
    ENV,
    REPO,
    STEPS,
    assert_same_training,
    finish,
    in_process,
    latest,
    leftovers,
    logged_steps,
    run_to_end,
    start,
    wait_for_step,
    write_config,
)

from guided_diffusion.training import checkpoint, loop
from guided_diffusion.training.checkpoint import load_training_checkpoint


def interrupt(run_dir: Path, proc: subprocess.Popen, signum: int, at: int) -> int:
    """Send `signum` once the run has logged step `at`; check the clean stop; return its step."""
    wait_for_step(proc, run_dir, at)
    before = logged_steps(run_dir)
    proc.send_signal(signum)
    after = logged_steps(run_dir)
    code, err = finish(proc)
    name = signal.Signals(signum).name
    assert code == 128 + signum, err[-3000:]
    found = re.fullmatch(rf"interrupted by {name} after step (\d+): checkpoint (\S+); resume with "
                         rf"train-diffusion --resume {re.escape(str(run_dir))}", err.strip().splitlines()[-1])
    assert found, err[-2000:]
    stopped = int(found[1])
    assert before <= stopped <= after + 1  # the step the signal came in, finished
    assert found[2] == str(run_dir / "checkpoints" / f"step_{stopped:07d}")
    assert latest(run_dir) == f"step_{stopped:07d}" and logged_steps(run_dir) == stopped  # nothing after it
    assert leftovers(run_dir) == []
    return stopped


def test_sigint_then_sigterm_stop_after_the_step_save_and_resume_bit_exact(tmp_path):
    """Ctrl-C at one random step, `kill` at another after resuming: each stops after the step it came
    in, checkpointed; the run resumed to the end is the uninterrupted one, bit for bit."""
    rng, cfg = random.Random(0), write_config(tmp_path)
    reference, run_dir = tmp_path / "straight", tmp_path / "run"
    straight = start("--config", str(cfg), "--out", str(reference))  # alongside, one thread each
    first = interrupt(run_dir, start("--config", str(cfg), "--out", str(run_dir)), signal.SIGINT, rng.randint(2, 6))
    second = interrupt(run_dir, start("--resume", str(run_dir)), signal.SIGTERM, rng.randint(first + 1, STEPS - 8))
    assert first < second < STEPS
    run_to_end("--resume", str(run_dir))
    code, err = finish(straight)
    assert code == 0, err[-3000:]
    assert_same_training(reference, run_dir, STEPS)


@pytest.mark.slow
def test_six_signals_at_random_steps_then_bit_exact(tmp_path):
    """SIGINT or SIGTERM at six random steps of one run (the step just saved, or not), resumed each time."""
    steps, rng = 40, random.Random(6)
    cfg = write_config(tmp_path, max_steps=steps, save_every=4)
    reference, run_dir = tmp_path / "straight", tmp_path / "run"
    run_to_end("--config", str(cfg), "--out", str(reference))
    proc, stops = start("--config", str(cfg), "--out", str(run_dir)), []
    for left in range(5, -1, -1):  # signals still to come after this one
        first = stops[-1] + 1 if stops else 2
        at = rng.randint(first, max(first, steps - 8 - 4 * left))
        stops.append(interrupt(run_dir, proc, rng.choice([signal.SIGINT, signal.SIGTERM]), at))
        proc = start("--resume", str(run_dir))
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert len(set(stops)) == 6, stops
    assert_same_training(reference, run_dir, steps)


def _kill_and_resume(cfg: Path, run_dir: Path, reference: Path, steps: int, seed: int) -> str:
    """One run killed at a random moment, resumed (or, with no checkpoint yet, restarted) to the end
    and compared with `reference`. Returns where the kill landed."""
    rng = random.Random(seed)
    proc = start("--config", str(cfg), "--out", str(run_dir))
    wait_for_step(proc, run_dir, rng.randint(1, steps - 1))
    time.sleep(rng.uniform(0.0, 0.4))
    proc.kill()
    if finish(proc)[0] == 0:
        return "after the end"
    landed = "in a save" if leftovers(run_dir) else "between saves"
    if (run_dir / "checkpoints" / "latest").exists():
        run_to_end("--resume", str(run_dir))
    else:  # killed before its first checkpoint was complete: nothing to resume
        landed = "before the first checkpoint"
        run_to_end("--config", str(cfg), "--out", str(run_dir), "--overwrite")
    assert_same_training(reference, run_dir, steps)
    assert leftovers(run_dir) == []
    return landed


@pytest.mark.slow
def test_twenty_runs_killed_at_random_moments_resume_bit_exact(tmp_path):
    """SIGKILL at a random moment (in a step, a save, its fsync or the `latest` swap) of 20 runs that
    save every step, two at a time; each resumed to the end must match the uninterrupted run bit
    for bit."""
    steps = 6
    cfg = write_config(tmp_path, max_steps=steps, save_every=1)
    reference = tmp_path / "straight"
    run_to_end("--config", str(cfg), "--out", str(reference))
    with ThreadPoolExecutor(2) as pool:
        landed = list(pool.map(lambda i: _kill_and_resume(cfg, tmp_path / f"run{i}", reference, steps, i), range(20)))
    counts = Counter(landed)
    print("20 runs killed:", dict(counts))
    assert counts["after the end"] <= 3 and counts["before the first checkpoint"] <= 5, counts


# ------------------------------------------------------------------------- DDP: one rank signalled


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes in /proc")
def test_ddp_ranks_stop_after_the_same_step_when_one_is_signalled(tmp_path):
    run_dir = tmp_path / "ddp"
    cfg = write_config(tmp_path, max_steps=40)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.cli.train_diffusion", "--device", "cpu", "--config", str(cfg), "--out", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, run_dir, 3)
    rank1 = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
    os.kill(rank1, signal.SIGTERM)  # rank 1 only: rank 0, which saves, learns of it from the all-reduce
    _, err = finish(proc)
    stops = re.findall(r"interrupted by SIGTERM after step (\d+): checkpoint (\S+);", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]
    stopped = int(stops[0][0])
    assert 3 <= stopped < 40 and latest(run_dir) == f"step_{stopped:07d}"
    assert logged_steps(run_dir) == stopped
    load_training_checkpoint(run_dir / "checkpoints" / latest(run_dir))


# ------------------------------------------------------------- a second signal during the save


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_during_the_save_leaves_the_last_checkpoint(tmp_path, monkeypatch, signum, code):
    cfg = write_config(tmp_path, max_steps=8, save_every=3)
    reference, run_dir = tmp_path / "straight", tmp_path / "run"
    assert in_process("--config", str(cfg), "--out", str(reference)) == 0

    draw, write = loop.draw_batch, checkpoint.save_file

    def first_signal(s, dist, step):
        if step == 4:  # in step 5: the run stops after it and saves step 5
            os.kill(os.getpid(), signum)
        return draw(s, dist, step)

    def slow_write(tensors, path, metadata=None):
        write(tensors, path, metadata=metadata)
        if "step_0000005" in path:  # the stop's save, half written: the user presses again
            os.kill(os.getpid(), signum)
            time.sleep(30)
            raise AssertionError("the second signal did not abort the save")

    monkeypatch.setattr(loop, "draw_batch", first_signal)
    monkeypatch.setattr(checkpoint, "save_file", slow_write)
    assert in_process("--config", str(cfg), "--out", str(run_dir)) == code
    monkeypatch.undo()
    assert latest(run_dir) == "step_0000003" and leftovers(run_dir) == []
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_0000003"]
    load_training_checkpoint(run_dir / "checkpoints" / "step_0000003")  # complete: every hash matches

    # Had the process died outright, the next save clears what it left.
    stale = run_dir / "checkpoints" / ".step_0000005.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert in_process("--resume", str(run_dir)) == 0
    assert leftovers(run_dir) == []
    assert_same_training(reference, run_dir, 8)
