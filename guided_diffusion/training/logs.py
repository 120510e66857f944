"""What a training run writes as it goes: `log.csv`, `stats.csv`, TensorBoard, `loss.png`.

`log.csv` has one row per `log_every` steps; each row summarises the steps since the previous one:
mean per-image loss (all steps that were not skipped), the same by timestep quartile
(q0: t < T/4 … q3: t ≥ 3T/4), the learning rate of the row's last step, mean pre-clip gradient
norm, optimizer steps per second, the total of skipped (non-finite) steps so far, and the total of
fp16 overflow steps (skipped while the loss scale settles; not counted as bad). Rows are written to
disk as they are logged.
`stats.csv` is long format: one row per (step, block) with that block's gradient norm and its
near-zero / dead activation fractions (see `train_stats`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path

import numpy as np

from pipeline.common.files import save_figure_atomic

log = logging.getLogger(__name__)

LOG_FIELDS = ("step", "epoch", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "grad_norm",
              "it_s", "bad_steps", "overflow_steps")
STATS_FIELDS = ("step", "block", "grad_norm", "near_zero", "dead")


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


class CsvLog:
    """An append-only CSV file, a line written at a time. Resuming at step s drops rows logged after
    s (never checkpointed) and carries a file of an older version over to today's columns."""

    def __init__(self, path: Path, fields: tuple[str, ...], resume_step: int | None = None):
        self.path, self.fields = path, fields
        if resume_step is not None and path.exists():
            self._truncate(resume_step)
        new = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", newline="", buffering=1)  # noqa: SIM115 (kept open for the whole run)
        self._writer = csv.DictWriter(self._file, fieldnames=fields)
        if new:
            self._writer.writeheader()

    def _truncate(self, resume_step: int) -> None:
        lines = self.path.read_text().splitlines(keepends=True)
        kept = lines[:1]
        for line in lines[1:]:
            step = line.split(",", 1)[0]
            if line.endswith("\n") and step.isdigit() and int(step) <= resume_step:
                kept.append(line)
        text = "".join(kept)
        if next(csv.reader(kept[:1]), None) != list(self.fields):  # an older version's columns
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(csv.DictReader(io.StringIO(text)))
            text = out.getvalue()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        self._writer.writerow({k: _fmt(v) for k, v in row.items()})

    def write_rows(self, rows: list[dict]) -> None:
        for row in rows:
            self.write(row)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class LossWindow:
    """Losses, timesteps and gradient norms accumulated between two log rows."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps
        self.reset()

    def reset(self) -> None:
        self.sums = np.zeros(4)
        self.counts = np.zeros(4, dtype=np.int64)
        self.grad_norms: list[float] = []

    def add(self, t: np.ndarray, losses: np.ndarray, grad_norm: float) -> None:
        """Add one good step's per-image losses at timesteps t."""
        quartile = np.minimum(t.astype(np.int64) * 4 // self.num_timesteps, 3)
        self.sums += np.bincount(quartile, weights=losses.astype(np.float64), minlength=4)
        self.counts += np.bincount(quartile, minlength=4)
        self.grad_norms.append(grad_norm)

    def means(self) -> dict[str, float]:
        """loss, loss_q0..q3 and grad_norm of the window (NaN where there is nothing)."""
        nan = float("nan")
        total = self.counts.sum()
        row = {"loss": float(self.sums.sum() / total) if total else nan}
        for q in range(4):
            row[f"loss_q{q}"] = float(self.sums[q] / self.counts[q]) if self.counts[q] else nan
        row["grad_norm"] = float(np.mean(self.grad_norms)) if self.grad_norms else nan
        return row


class TensorBoard:
    """Scalars to `RUN_DIR/tensorboard` when `torch.utils.tensorboard` and tensorboard are installed."""

    def __init__(self, log_dir: Path, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._writer = None
            log.info("tensorboard is not installed; logging to CSV only")
            return
        self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            if isinstance(value, float) and not math.isnan(value):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_log(path: Path) -> dict[str, np.ndarray]:
    """The numeric columns of a `log.csv` (empty cells → NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r.get(k) else np.nan for r in rows]) for k in LOG_FIELDS}


def plot_losses(log_csv: Path, out_png: Path) -> None:
    """Draw loss (total and by timestep quartile) and learning rate against step, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_log(log_csv)
    if not len(data["step"]):
        return
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    for q in range(4):
        ax_loss.plot(data["step"], data[f"loss_q{q}"], lw=0.8, alpha=0.7, label=f"t quartile {q}")
    ax_loss.plot(data["step"], data["loss"], color="black", lw=1.5, label="all")
    if np.nanmin(data["loss"], initial=np.inf) > 0:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(data["step"], data["lr"], color="tab:red")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, out_png, dpi=100)
    plt.close(fig)
