"""Closed-loop geometry (issue 23, pipeline/geometry_feedback.py): images that miss their geometry
target are re-made under a corrected condition with the same ε and noise streams, each keeping its
nearest try; K = 0 is today's open loop; bad feedback options are one-line errors.

The geometry VAE here is a constructed one: an untrained CVAE file (so `generate` loads and checks a
real one) whose decoder is replaced by a drawing of an eye that does what diffusion does to our
priors, only more: the drawn pupil ratio regresses toward 0.45 (0.45 + 0.6 · (c − 0.45)), so the open
loop misses and feedback has something to correct. The diffusion model is the untrained 32 px
`tiny_run` at a low strength, so the results are the drawings plus each image's own noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cli import generate as gen_cli
from pipeline.common.config import CircularityConfig, load_config
from pipeline.data.geometry import GEOMETRY_KEYS
from pipeline.generate import generate
from pipeline.geometry_feedback import close_loop, condition_bounds, corrected, feedback_keys, miss
from pipeline.geometry_targets import GeometryRequest, measure
from vae.model import IrisVAE

SIZE = 32
BANK = np.array([[r, q, 0.0, 0.0] for r in np.linspace(0.2, 0.7, 6) for q in (0.3, 0.4)], np.float32)
BLANK_ABOVE = 0.64  # the drawing shows no eye for a requested pupil ratio above this: never measured
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def drawn_ratio(c: float) -> float:
    """The pupil ratio the constructed decoder draws for condition c: regressed toward 0.45."""
    return 0.45 + 0.6 * (c - 0.45)


def draw_eyes(vae, eps: np.ndarray, batch_size: int = 64, conditions: np.ndarray | None = None) -> np.ndarray:
    """A stand-in for vae.priors.decode_draws: anti-aliased eyes (iris radius c[1] · side, pupil ratio
    `drawn_ratio(c[0])`, centre shifted by ε), 4× supersampled; a blank frame above BLANK_ABOVE."""
    fine = SIZE * 4
    yy, xx = (np.mgrid[0:fine, 0:fine] + 0.5) / 4
    out = []
    for e, c in zip(np.asarray(eps), np.asarray(conditions), strict=True):
        img = np.full((fine, fine), 0.5)
        if c[0] <= BLANK_ABOVE:
            cx, cy = SIZE / 2 + 0.6 * e[0], SIZE / 2 + 0.6 * e[1]
            radius = np.hypot(xx - cx, yy - cy)
            iris = c[1] * SIZE
            img[radius <= iris] = -0.1
            img[radius <= drawn_ratio(c[0]) * iris] = -0.9
        out.append(img.reshape(SIZE, 4, SIZE, 4).mean(axis=(1, 3))[None])
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def geometry_vae(tmp_path_factory):
    """An untrained geometry VAE file (32 px) whose training geometry is BANK."""
    vae = IrisVAE(image_size=SIZE, channels=1, latent_dim=4, base_channels=4, channel_mult=[1, 2],
                  condition="geometry", condition_mean=[0.45, 0.35, 0, 0], condition_std=[0.14, 0.04, 0.03, 0.03],
                  condition_bank_size=len(BANK))
    vae.condition_bank.assign(BANK)
    path = tmp_path_factory.mktemp("geometry_vae") / "vae.keras"
    vae.save(path)
    return path


@pytest.fixture
def drawn(monkeypatch):
    monkeypatch.setattr("vae.priors.decode_draws", draw_eyes)


def run(tiny_run, vae_path, feedback: int, request: GeometryRequest | None = None, n: int = 6, **extra):
    cfg = load_config(None, [f"generate.n={n}", "generate.steps=10", "generate.strength=0.04",
                             "generate.batch_size=4", f"generate.geometry_feedback={feedback}",
                             *(f"generate.{k}={v}" for k, v in extra.items())])
    request = request or GeometryRequest(pupil_ratio=(0.25, 0.65), iris_radius=(0.35, 0.35), offset=(0.0, 0.0),
                                         source="test sweep")
    return generate(cfg, tiny_run, source="vae", vae_path=vae_path, device="cpu", progress=False, geometry=request)


def errors(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """An independent recomputation of each image's miss: circularity-check's measurement, then the
    larger of |pupil ratio − target| and |iris radius − target| (NaN: not measured)."""
    measured = measure(images, CircularityConfig())
    got = np.array([[m["pupil_ratio"], m["iris_radius"]] for m in measured])
    return np.abs(got - np.asarray(targets)[:, :2]).max(axis=1)


# --- the loop on its own ---------------------------------------------------------------------------

def test_corrections_clip_and_skip_what_was_not_measured():
    bounds = condition_bounds(BANK, ("pupil_ratio", "iris_radius"))
    assert bounds["pupil_ratio"] == pytest.approx((0.15, 0.75)) and bounds["iris_radius"] == pytest.approx((0.29, 0.41))
    tried = np.array([[0.3, 0.35, 0, 0], [0.7, 0.35, 0, 0], [0.5, 0.35, 0, 0]], np.float32)
    targets = np.array([[0.3, 0.35, 0, 0], [0.7, 0.4, 0, 0], [0.5, 0.35, 0, 0]], np.float32)
    measured = [{"pupil_ratio": 0.33, "iris_radius": 0.34}, {"pupil_ratio": 0.6, "iris_radius": 0.4},
                {"pupil_ratio": float("nan"), "iris_radius": float("nan")}]
    step = corrected(tried, targets, measured, ("pupil_ratio", "iris_radius"), bounds)
    np.testing.assert_allclose(step, [[0.27, 0.36, 0, 0], [0.75, 0.35, 0, 0], [0.5, 0.35, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(miss(targets, measured, ("pupil_ratio",)), [0.03, 0.1, np.nan], atol=1e-6)
    assert feedback_keys(GeometryRequest(pupil_ratio=(0.3, 0.3))) == ("pupil_ratio",)
    assert feedback_keys(GeometryRequest(rows={"iris_radius": np.array([0.3])})) == ("pupil_ratio", "iris_radius")


def test_close_loop_keeps_the_nearest_try_and_counts_its_passes():
    targets = np.array([[t, 0.35, 0, 0] for t in (0.3, 0.4, 0.45, 0.6, 0.3)], np.float32)
    gain = np.array([0.6, 0.6, 0.6, 0.6, -1.0])  # the last image answers the wrong way: never kept

    def respond(conditions: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ratio = 0.45 + gain[rows] * (conditions[:, 0] - 0.45)
        images = np.stack([np.full((1, 2, 2), r) for r in ratio]).astype(np.float32)
        images[rows == 3] = np.nan  # image 3 can never be measured
        return images, images

    def measure_(images: np.ndarray) -> list[dict]:
        return [{"pupil_ratio": float(img[0, 0, 0]), "iris_radius": 0.35, "round_pupil": True} for img in images]

    priors, images = respond(targets, np.arange(5))
    loop = close_loop(targets, priors, images, measure_(images), respond, measure_, rounds=3, tolerance=0.005,
                      keys=("pupil_ratio",), bounds=condition_bounds(BANK, ("pupil_ratio",)))
    first = miss(targets, measure_(images), ("pupil_ratio",))
    kept = miss(targets, loop.measured, ("pupil_ratio",))
    tries = [p["tries"] for p in loop.record["per_image"]]
    # error × 0.4 a round: every round, until within tolerance; on target; not measured; wrong way: one
    # retry, worse, then the clipped correction would repeat it
    assert tries == [4, 3, 1, 1, 2]
    assert kept[0] < 0.1 * first[0] and kept[1] < 0.005 < first[1] and kept[2] == first[2] < 1e-6
    np.testing.assert_array_equal(loop.images[3:], images[3:])  # unmeasured and worse tries keep the first
    assert loop.record["extra_diffusion_passes"] == 6 and loop.record["images_regenerated"] == 3
    assert [r["regenerated"] for r in loop.record["per_round"]] == [3, 2, 1]
    np.testing.assert_allclose(loop.conditions[0, 0], 0.45 + (targets[0, 0] - 0.45) * (1 - 0.4**4) / 0.6, atol=1e-5)
    np.testing.assert_array_equal(loop.conditions[4], targets[4])


def test_a_round_pupil_is_never_traded_for_geometry():
    targets = np.array([[0.3, 0.35, 0, 0], [0.3, 0.35, 0, 0]], np.float32)

    def respond(conditions: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = (0.45 + 0.6 * (conditions[:, :1, None, None] - 0.45)).astype(np.float32)
        return images, images

    def measure_(images: np.ndarray, first: bool = False) -> list[dict]:  # retries: never round
        return [{"pupil_ratio": img.item(), "iris_radius": 0.35, "round_pupil": first and i == 0}
                for i, img in enumerate(images)]

    priors, images = respond(targets, np.arange(2))
    loop = close_loop(targets, priors, images, measure_(images, first=True), respond, measure_, rounds=2,
                      tolerance=0.005, keys=("pupil_ratio",), bounds=condition_bounds(BANK, ("pupil_ratio",)))
    assert [p["kept_try"] for p in loop.record["per_image"]] == [0, 2]  # round first try kept; the other improves
    assert [p["tries"] for p in loop.record["per_image"]] == [3, 3]
    assert loop.record["nearer_but_not_round"] == 2 and loop.measured[0]["round_pupil"]


# --- through generate ------------------------------------------------------------------------------

def test_feedback_beats_the_open_loop_and_never_keeps_a_worse_try(tiny_run, geometry_vae, drawn):
    open_loop = run(tiny_run, geometry_vae, feedback=0)
    closed = run(tiny_run, geometry_vae, feedback=2)
    targets = np.array(closed.metadata["prior"]["geometry"]["targets"])
    e_open, e_closed = errors(open_loop.images, targets), errors(closed.images, targets)
    assert np.isnan(e_open[-1]) and np.isnan(e_closed[-1])  # the blank frame: never measured
    assert np.all(e_closed[:-1] <= e_open[:-1] + 1e-9)
    assert np.mean(e_closed[:-1]) < 0.5 * np.mean(e_open[:-1]) and np.mean(e_open[:-1]) > 0.03
    loop = closed.metadata["prior"]["geometry"]["feedback"]
    tries = np.array([p["tries"] for p in loop["per_image"]])
    assert tries[-1] == 1 and loop["not_measured_first_try"] == 1
    assert loop["images_regenerated"] == int(np.sum(tries > 1)) >= 3
    assert loop["extra_diffusion_passes"] == int(np.sum(tries - 1))
    assert loop["keys"] == ["pupil_ratio", "iris_radius"]
    np.testing.assert_array_equal(closed.images[tries == 1], open_loop.images[tries == 1])
    geometry = closed.metadata["prior"]["geometry"]
    assert geometry["measured_open_loop"] == open_loop.metadata["prior"]["geometry"]["measured_result"]
    measured = geometry["measured_result"]
    np.testing.assert_allclose([m["pupil_ratio"] for m in measured[:-1]],
                               [m["pupil_ratio"] for m in measure(closed.images[:-1], CircularityConfig())])
    assert "feedback" not in open_loop.metadata["prior"]["geometry"]


def test_only_the_condition_changes_between_tries(tiny_run, geometry_vae, drawn):
    closed = run(tiny_run, geometry_vae, feedback=2)
    used = np.array([p["condition"] for p in closed.metadata["prior"]["geometry"]["feedback"]["per_image"]])
    again = run(tiny_run, geometry_vae, feedback=0, request=GeometryRequest(
        rows={"pupil_ratio": used[:, 0], "iris_radius": used[:, 1]}, offset=(0.0, 0.0), source="kept conditions"))
    np.testing.assert_allclose(again.images, closed.images, atol=1e-5)  # same ε, same noise: the same images


def test_same_seed_and_options_give_the_same_images_and_metadata(tiny_run, geometry_vae, drawn):
    a, b = (run(tiny_run, geometry_vae, feedback=2, seed=3) for _ in range(2))
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.priors, b.priors)

    def stable(meta: dict) -> str:
        return json.dumps({k: v for k, v in meta.items() if k != "timings_s"}, default=str, sort_keys=True)

    assert stable(a.metadata) == stable(b.metadata)
    assert a.metadata["config"]["generate"]["geometry_feedback"] == 2


def test_cli_writes_the_loop_into_metadata(tiny_run, geometry_vae, drawn, tmp_path, capsys):
    out = tmp_path / "out"
    gen_cli.main.__wrapped__(["--from-vae", str(geometry_vae), "--diffusion", str(tiny_run), "--device", "cpu",
                              "--out", str(out), "--n", "4", "--steps", "10", "--strength", "0.04",
                              "--pupil-ratio", "0.25:0.6", "--iris-radius", "0.35", "--geometry-feedback", "1",
                              "--geometry-tolerance", "0.02"])
    geometry = json.loads((out / "metadata.json").read_text())["prior"]["geometry"]
    loop = geometry["feedback"]
    assert loop["rounds"] == 1 and loop["tolerance"] == 0.02 and len(loop["per_image"]) == 4
    assert all(set(p) == {"tries", "kept_try", "condition", "errors"} for p in loop["per_image"])
    assert len(geometry["measured_result"]) == len(geometry["measured_open_loop"]) == 4
    assert "geometry feedback:" in capsys.readouterr().out
    assert len(GEOMETRY_KEYS) == len(loop["per_image"][0]["condition"])


# --- one-line errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--pupil-ratio", "0.4", "--geometry-feedback", "-1"], "--geometry-feedback must be a whole number"),
    (["--pupil-ratio", "0.4", "--geometry-tolerance", "0"], "--geometry-tolerance must be in (0, 1)"),
    (["--pupil-ratio", "0.4", "--geometry-tolerance", "1"], "--geometry-tolerance must be in (0, 1)"),
    (["--pupil-ratio", "0.4", "--set", "generate.geometry_feedback=-2"], "--geometry-feedback must be"),
    (["--geometry-feedback", "2"], "need geometry targets"),
    (["--geometry-tolerance", "0.02"], "need geometry targets"),
])
def test_bad_feedback_options_exit_2_and_write_nothing(geometry_vae, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:  # the diffusion dir is never read: the checks come first
        gen_cli.main(["--from-vae", str(geometry_vae), "--diffusion", str(tmp_path / "no-diffusion"), "--device", "cpu",
                      "--out", str(out), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()
