"""Timing helpers of benchmarks/bench_unet.py: variants timed in turns (palindromic order), their
min/median summaries, and the matmul throughputs recorded beside them as context."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def abba_order(names: list[str], repeats: int) -> list[str]:
    """Each name `repeats` times, in palindromic rounds: A B C, C B A, A B C …"""
    return [n for r in range(repeats) for n in (names if r % 2 == 0 else names[::-1])]


def time_steps(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
               clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(warm-up seconds, timed seconds) per name: `warmup` steps each in turn, then `repeats` each in
    `abba_order`."""
    warm: dict[str, list[float]] = {n: [] for n in steps}
    timed: dict[str, list[float]] = {n: [] for n in steps}
    for out, order in ((warm, [n for n in steps for _ in range(warmup)]), (timed, abba_order(list(steps), repeats))):
        for name in order:
            t0 = clock()
            steps[name]()
            out[name].append(clock() - t0)
    return warm, timed


def summarize(times: list[float]) -> dict:
    return {"min_s": round(min(times), 4), "median_s": round(statistics.median(times), 4),
            "times_s": [round(s, 4) for s in times]}


def _best_matmul_seconds(device: str, dtype: torch.dtype, n: int, repeats: int, warmup: bool) -> float:
    """The fastest of `repeats` n³ matrix products in `dtype` on `device` (synchronised on a GPU),
    after one untimed product if `warmup`."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    if warmup:
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflop_per_s(device: str, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """Best matmul throughput of three n³ products in `dtype`: what the cores give right now."""
    return 2 * n**3 / _best_matmul_seconds(device, dtype, n, repeats=3, warmup=False) / 1e9


def matmul_bf16_tflop_per_s(n: int = 8192) -> float:
    """Best bf16 matmul throughput of five n³ products on the GPU (after one warm-up): the attainable
    peak this run's shares of peak are taken of."""
    return 2 * n**3 / _best_matmul_seconds("cuda", torch.bfloat16, n, repeats=5, warmup=True) / 1e12
