"""Would Winograd F(4x4, 3x3) with bf16 products beat oneDNN's direct bf16 convolutions on this CPU?

    python benchmarks/bench_winograd_bf16.py [--quick] [--out FILE]

The bf16 U-Net (bench_unet) spends ~80 % of its step in oneDNN's direct bf16 convolutions, which
run at about this CPU's bf16 matmul rate; below that only fewer multiplications help. Winograd
F(4x4, 3x3) does a 3x3 layer's work in a quarter of the products, but bf16 products need the
transformed tiles and weights rounded to bf16. This benchmark measures both sides, for the HP1 3x3
layers where the float32 Winograd kernels apply (maps of 32 px and more; on smaller ones the
transforms of the weights alone cost more than the layer):

  speed     forward + backward, batch 4, in turns (ABBA, medians): oneDNN's direct bf16 convolution;
            the project's float32 Winograd layer (guided_diffusion.winograd); its three batched
            products (forward, weight gradient, input gradient) in float32 and in bf16. A Winograd
            layer with bf16 products is estimated as the float32 layer with its float32 products
            swapped for bf16 ones (its transforms and bookkeeping as measured);
  accuracy  the forward's relative RMS error against the exact (float64) convolution of the same
            bf16-rounded inputs: oneDNN's direct bf16; Winograd with its transformed tiles and
            weights rounded to bf16 (and the output, as under autocast), for several choices of
            interpolation points (`toom_cook`); the float32 Winograd kernels for reference;
  the step  the share of the HP1 bf16 training step (forward + backward, batch 4, profiled) spent in
            the 3x3 convolutions such a layer would take (>= 64 channels in and out, maps >= 32 px),
            and that step's time were they all to run at the best layer's estimate (arithmetic on
            the two measurements: the other shapes, e.g. 256 channels on 64 px, are not timed).

JSON to stdout and to benchmarks/results/bench_winograd_bf16.json (context rows for `make bench`).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_unet import bench_config, convolution_share, train_step
from results_io import headline, machine_facts, write_result
from step_timing import time_steps
from torch import Tensor

from guided_diffusion import winograd
from guided_diffusion.training.factory import create_model

RESULTS = Path(__file__).parent / "results" / "bench_winograd_bf16.json"
LAYERS = ((128, 64), (256, 32))  # HP1's 3x3 layers on maps >= winograd.MIN_SIZE: channels in = out, map size
BATCH = 4
# five finite interpolation points of F(4, 3) (the sixth is infinity); the first is the usual choice
POINTS = ((0, 1, -1, 2, -2), (0, 1, -1, 1 / 2, -1 / 2), (0, 1 / 2, -1 / 2, 2, -2), (0, 1, -1, 1 / 2, -2))


def toom_cook(points: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """(A^T [4, 6], G [6, 3], B^T [6, 6]) of F(4, 3) on five distinct finite points and infinity:
    y = A^T ((G g) ⊙ (B^T d)) is the 4-output correlation of a 6-sample d with a 3-tap g. A^T and G
    are Vandermonde rows (G's scaled by 1 / ∏(p_i − p_j)); B^T is solved from that identity."""
    if len(points) != 5 or len(set(points)) != 5:
        raise ValueError(f"F(4, 3) needs 5 distinct finite points, got {points}")
    at, g = np.zeros((4, 6)), np.zeros((6, 3))
    for i, p in enumerate(points):
        at[:, i] = [p**j for j in range(4)]
        g[i] = [p**k / np.prod([p - q for q in points if q != p]) for k in range(3)]
    at[3, 5], g[5, 2] = 1, 1
    # sum_i A^T[j, i] G[i, k] B^T[i, l] = [l == j + k] for every output j, tap k and sample l
    system = np.einsum("ji,ik,lm->jklim", at, g, np.eye(6)).reshape(72, 36)
    wanted = np.array([float(ll == j + k) for j in range(4) for k in range(3) for ll in range(6)])
    bt = np.linalg.lstsq(system, wanted, rcond=None)[0]
    if not np.allclose(system @ bt, wanted, atol=1e-9):
        raise ValueError(f"no exact F(4, 3) transform on the points {points}")
    return tuple(torch.tensor(m, dtype=torch.float64) for m in (at, g, bt.reshape(6, 6)))


def winograd_float64(x: Tensor, w: Tensor, points: tuple[float, ...], rounded: bool) -> Tensor:
    """conv2d(x, w, padding=1) of float64 tensors by F(4x4, 3x3) on `points`, the transformed tiles
    and weights rounded to bf16 and the output too where `rounded` (bf16 products, fp32 sums)."""
    at, g, bt = toom_cook(points)
    n, _, h, wd = x.shape
    tiles = F.pad(x, (1, 1 + (-wd) % 4, 1, 1 + (-h) % 4)).unfold(2, 6, 4).unfold(3, 6, 4)  # n c ty tx 6 6
    v = torch.einsum("ai,ncyxij,bj->ncyxab", bt, tiles, bt)
    u = torch.einsum("ai,ocij,bj->ocab", g, w, g)
    bf16 = (lambda t: t.bfloat16().double()) if rounded else (lambda t: t)
    y = torch.einsum("ia,noyxab,jb->noyixj", at, torch.einsum("ncyxab,ocab->noyxab", bf16(v), bf16(u)), at)
    return bf16(y.reshape(n, w.shape[0], y.shape[2] * 4, y.shape[4] * 4)[:, :, :h, :wd])


def relative_rms(a: Tensor, ref: Tensor) -> float:
    return ((a.double() - ref).square().mean() / ref.square().mean()).sqrt().item()


def layer_accuracy(c: int, size: int, seed: int = 0) -> dict:
    """Forward errors (relative RMS) of one c → c layer on size x size maps, batch 2, against the
    exact convolution of the same bf16-rounded inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, size, size, generator=gen, dtype=torch.float64).bfloat16().double()
    w = (torch.randn(c, c, 3, 3, generator=gen, dtype=torch.float64) / (3 * c**0.5)).bfloat16().double()
    exact = F.conv2d(x, w, padding=1)
    out = {"direct bf16": relative_rms(F.conv2d(x.bfloat16(), w.bfloat16(), padding=1), exact)}
    if winograd.available()[0]:
        out["winograd float32"] = relative_rms(winograd.winograd_conv3x3(x.float(), w.float()), exact)
    for points in POINTS:
        out[f"winograd bf16 {points_label(points)}"] = relative_rms(winograd_float64(x, w, points, True), exact)
    return {k: float(f"{v:.3g}") for k, v in out.items()}


def points_label(points: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{p:g}" for p in points) + ", ∞)"


def layer_speed(c: int, size: int, repeats: int) -> dict:
    """Median milliseconds of each variant's forward + backward (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    x, w, passes = winograd.layer_passes(BATCH, c, c, size, gen)
    xb, wb = (t.detach().bfloat16().requires_grad_() for t in (x, w))
    dy = torch.randn(BATCH, c, size, size, generator=gen).bfloat16()

    def direct_bf16() -> None:
        xb.grad = wb.grad = None
        F.conv2d(xb, wb, padding=1).backward(dy)

    tiles = BATCH * winograd.tiling(size, size)[1]
    steps = {"direct bf16": direct_bf16, "winograd float32": passes["winograd"]}
    for dtype, name in ((torch.float32, "products float32"), (torch.bfloat16, "products bf16")):
        v, u = torch.randn(36, tiles, c, generator=gen).to(dtype), torch.randn(36, c, c, generator=gen).to(dtype)
        m, du, dv = torch.empty_like(v), torch.empty_like(u), torch.empty_like(v)
        steps[name] = lambda v=v, u=u, m=m, du=du, dv=dv: (torch.bmm(v, u, out=m), torch.bmm(v.transpose(1, 2), m, out=du),
                                                           torch.bmm(m, u.transpose(1, 2), out=dv))
    _, timed = time_steps(steps, repeats, warmup=1)
    ms = {k: round(statistics.median(t) * 1e3, 2) for k, t in timed.items()}
    ms["winograd bf16 (estimate)"] = round(ms["winograd float32"] - ms["products float32"] + ms["products bf16"], 2)
    return ms


def takes_winograd(shapes: list) -> bool:
    """Whether a profiled convolution with these input shapes is a 3x3 layer Winograd would take."""
    tensors = [s for s in shapes if isinstance(s, list) and len(s) == 4]
    weights = [s for s in tensors if s[2:] == [3, 3]]
    maps = [s for s in tensors if s[2:] != [3, 3]]
    return bool(weights and maps) and min(weights[0][:2]) >= winograd.MIN_CHANNELS \
        and min(maps[0][2:]) >= winograd.MIN_SIZE


def step_share(seed: int = 0) -> float:
    """The share of one HP1 bf16 forward + backward's operator time (batch BATCH, profiler self
    times) in the convolutions `takes_winograd` accepts."""
    torch.manual_seed(seed)
    model = create_model(bench_config("HP1", conv_algorithm="direct"))
    x, target = torch.randn(2, BATCH, 1, 64, 64)
    step = train_step(model, x, torch.randint(0, 4000, (BATCH,)), target, "bf16")
    step()  # warm-up
    return convolution_share(step, takes_winograd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed passes per variant instead of 7")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file (default {RESULTS})")
    args = parser.parse_args()
    built, why = winograd.available()
    if not built:
        parser.exit(2, f"error: the Winograd kernels cannot be built here: {why}\n")
    machine = machine_facts()
    layers = [{"in": c, "size": size, "ms": layer_speed(c, size, 3 if args.quick else 7),
               "relative_rms_error": layer_accuracy(c, size)} for c, size in LAYERS]
    speed = "; ".join(f"{r['in']} ch {r['size']} px {r['ms']['winograd bf16 (estimate)'] / r['ms']['direct bf16']:.2f}x"
                      f" ({r['ms']['products bf16'] / r['ms']['direct bf16']:.2f}x in products)" for r in layers)
    accuracy = []
    for r in layers:
        err = r["relative_rms_error"]
        best_points = min((k for k in err if k.startswith("winograd bf16")), key=err.get)
        accuracy.append(f"{r['in']} ch {r['size']} px {err['direct bf16']:.2%} / {err[best_points]:.2%} "
                        f"({err[best_points] / err['direct bf16']:.1f}x, points {best_points.removeprefix('winograd bf16 ')})")
    share = step_share()
    best_ratio = min(r["ms"]["winograd bf16 (estimate)"] / r["ms"]["direct bf16"] for r in layers)
    machine["load_average_1min_after"] = machine_facts()["load_average_1min"]
    write_result(args.out, {
        "benchmark": "bench_winograd_bf16", "machine": machine, "batch": BATCH, "layers": layers,
        "hp1_bf16_step_share_in_such_layers": round(share, 3), "best_layer_estimate": round(best_ratio, 3),
        "headline": [
            headline(f"HP1 3x3 layers fwd+bwd, batch {BATCH}, cpu: Winograd F(4x4, 3x3) with bf16 products "
                     "(estimate) / oneDNN direct bf16 (same run, ABBA, medians)", speed, "context"),
            headline("the same layers' forward, relative RMS error against the exact convolution of the same bf16 "
                     "inputs: oneDNN direct bf16 / Winograd with bf16 products (best of "
                     f"{len(POINTS)} point sets)", "; ".join(accuracy),
                     "context: why precision auto keeps direct bf16 convolutions"),
            headline(f"HP1 bf16 fwd+bwd, batch {BATCH}, cpu: share of the step in the 3x3 convolutions Winograd would "
                     "take (profiled); the step were all of them at the best layer's estimate (arithmetic)",
                     f"{share:.0%}; {1 - share * (1 - best_ratio):.2f}x today's bf16 step", "context"),
        ]})


if __name__ == "__main__":
    main()
