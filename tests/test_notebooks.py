"""The Colab notebooks: stored without outputs, badge and REPO_URL in place, and each one runs
top to bottom in smoke mode (IRIS_SMOKE=1: tiny CPU models, synthetic data, no install, no Drive).

The smoke runs share one temporary runs folder (IRIS_RUNS), in order: notebook 3 uses the VAE of
notebook 1 and the diffusion run of notebook 2, as it does on Colab. The three runs take about
1.5 minutes on 2 cores (3 to 4.5 when the machine is busy); running notebooks 1 and 2 a second time
(resume after a disconnect, skip a finished run) is `slow`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
COLAB = REPO_ROOT / "colab"
NOTEBOOKS = ("01_train_vae", "02_train_diffusion", "03_generate_and_check")
CELL_TIMEOUT_S = 300
REPO_URL = re.search(r'^Repository = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)[1]  # colab/set_repo.py


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


def sources(nb: nbformat.NotebookNode, kind: str = "code") -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == kind]


# ------------------------------------------------------------------ what is stored in the repository


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], f"{name}: cell {cell.id} has outputs"
        assert cell.execution_count is None, f"{name}: cell {cell.id} has an execution count"
        assert set(cell.metadata) <= {"tags"}, f"{name}: cell {cell.id} has metadata {dict(cell.metadata)}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_badge_and_repo_url(name):
    """The first cell's badge and the REPO_URL line name pyproject's repository (colab/set_repo.py)."""
    nb = read(name)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert "https://colab.research.google.com/assets/colab-badge.svg" in first.source
    owner_name = REPO_URL.removeprefix("https://github.com/")
    assert f"(https://colab.research.google.com/github/{owner_name}/blob/main/colab/{name}.ipynb)" in first.source
    code = sources(nb)
    assert re.search(rf'^REPO_URL = "{re.escape(REPO_URL)}"(\s*#.*)?$', code[0], re.M), "REPO_URL not in the first code cell"
    assert sum(len(re.findall(r"^REPO_URL\s*=", src, re.M)) for src in code) == 1, "REPO_URL defined more than once"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_setup_gpu_and_drive_cells(name):
    nb = read(name)
    by_tag = {tag: cell.source for cell in nb.cells for tag in cell.metadata.get("tags", [])}
    assert {"setup", "gpu", "drive"} <= set(by_tag)
    setup = by_tag["setup"]
    assert 'SMOKE = os.environ.get("IRIS_SMOKE") == "1"' in setup
    assert "pip" in setup and "git" in setup and "check=True" in setup
    assert "nvidia-smi" in by_tag["gpu"] and "configs/hp2-128-t4.yaml" in by_tag["gpu"]
    assert "USE_DRIVE = IN_COLAB and not SMOKE" in by_tag["drive"]
    assert "drive.mount(" in by_tag["drive"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_drive_paths_personal_paths_or_secrets(name):
    nb = read(name)
    for cell in nb.cells:
        is_drive_cell = "drive" in cell.metadata.get("tags", [])
        if cell.cell_type == "code" and not is_drive_cell:
            assert "/content/drive" not in cell.source, f"{name}: Drive path outside the Drive cell ({cell.id})"
        for pattern in (r"/home/\w", r"/Users/\w", r"/root\b", r"/work/", r"/tmp/", r"[A-Z]:\\\\"):
            assert not re.search(pattern, cell.source), f"{name}: personal path {pattern!r} in cell {cell.id}"
        for pattern in (r"ghp_\w{20,}", r"github_pat_\w{20,}", r"hf_\w{20,}", r"AKIA[0-9A-Z]{16}",
                        r"(?i)(api_key|password|secret)\s*=\s*['\"]"):
            assert not re.search(pattern, cell.source), f"{name}: credential-like text in cell {cell.id}"


def cell_by_tag(nb: nbformat.NotebookNode, tag: str) -> str:
    return next(cell.source for cell in nb.cells if tag in cell.metadata.get("tags", []))


def test_training_notebook_shows_tensorboard_in_colab_only():
    """%tensorboard on the run's tensorboard/ folder, guarded so that a kernel without tensorboard (the
    smoke run, a plain Jupyter) skips it; the setup cell installs the `colab` extra that brings it."""
    nb = read("02_train_diffusion")
    cell = next(c.source for c in nb.cells if c.get("id") == "tensorboard")
    assert "%load_ext tensorboard" in cell and '%tensorboard --logdir "{TENSORBOARD_DIR}"' in cell
    assert 'TENSORBOARD_DIR = DIFFUSION_RUN / "tensorboard"' in cell
    assert 'if IN_COLAB and not SMOKE and importlib.util.find_spec("tensorboard") is not None:' in cell
    ids = [c.get("id") for c in nb.cells]
    assert ids.index("plan") < ids.index("tensorboard") < ids.index("train")  # both before training starts
    assert '"-e", ".[colab]"' in cell_by_tag(nb, "setup")
    extras = (REPO_ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1]
    assert re.search(r'^colab = \[.*"tensorboard>=2\.14".*\]', extras, re.M)


def test_shared_cells_identical():
    """Setup, GPU and Drive cells are the same in every notebook (each must run on its own in Colab)."""
    first, *others = (read(name) for name in NOTEBOOKS)
    for tag in ("setup", "gpu", "drive"):
        for nb in others:
            assert cell_by_tag(nb, tag) == cell_by_tag(first, tag), tag


def gpu_choice(monkeypatch, gpu: tuple[str, float, int] | None, commands: list | None = None) -> dict:
    """Run the GPU cell outside smoke mode against a fake torch.cuda reporting `gpu` (name, GiB, major)."""
    cuda = SimpleNamespace(
        is_available=lambda: gpu is not None,
        get_device_properties=lambda index: SimpleNamespace(name=gpu[0], total_memory=gpu[1] * 2**30, major=gpu[2]),
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    record = (commands if commands is not None else []).append
    namespace = {"SMOKE": False, "Path": Path, "subprocess": SimpleNamespace(run=lambda cmd, **kwargs: record(cmd))}
    exec(cell_by_tag(read(NOTEBOOKS[0]), "gpu"), namespace)
    return namespace


@pytest.mark.parametrize(("gpu", "precision"), [
    (("Tesla T4", 15.0, 7), "fp16"),
    (("NVIDIA L4", 22.5, 8), "bf16"),
    (("NVIDIA A100-SXM4-40GB", 39.6, 8), "bf16"),
    (("NVIDIA A100-SXM4-80GB", 79.2, 8), "bf16"),
])
def test_gpu_cell_picks_the_colab_recipe_and_shows_its_memory_plan(monkeypatch, gpu, precision):
    from guided_diffusion.training.memory_plan import plan_for_gpu
    from pipeline.common.config import load_config

    commands = []
    ns = gpu_choice(monkeypatch, gpu, commands)
    assert ns["DIFFUSION_CONFIG"] == "configs/hp2-128-t4.yaml" and ns["IMAGE_SIZE"] == 128
    assert ns["DIFFUSION_OVERRIDES"] == [f"train.precision={precision}"]
    assert ["train-diffusion", "--config", "configs/hp2-128-t4.yaml", "--plan", "--set",
            f"train.precision={precision}"] in commands  # the plan is shown, for this GPU
    cfg = load_config(REPO_ROOT / ns["DIFFUSION_CONFIG"], ns["DIFFUSION_OVERRIDES"])
    assert cfg.train.microbatch == "auto" and cfg.train.ema_device == "auto"
    monkeypatch.undo()  # the real torch again
    assert plan_for_gpu(cfg, torch_cpu(), gpu[1]).fits
    vae_cfg = load_config(REPO_ROOT / ns["VAE_CONFIG"], ns["VAE_OVERRIDES"])
    assert vae_cfg.data.image_size == cfg.data.image_size  # both stages at one size
    assert gpu[0] in ns["WHY"]


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_gpu_cell_without_gpu_uses_tiny_cpu(monkeypatch):
    ns = gpu_choice(monkeypatch, None)
    assert ns["DIFFUSION_CONFIG"] == ns["VAE_CONFIG"] == "configs/tiny-cpu.yaml"
    assert ns["PROFILE"] == "tiny-cpu" and ns["IMAGE_SIZE"] == 32
    assert "no CUDA GPU" in ns["WHY"]


def reference_choice(tmp_path: Path, data_path: str, real_images: str | None) -> tuple[dict, list[list[str]]]:
    """Run notebook 3's reference cell for a model trained on `data_path` (fake `run`): its namespace
    and the commands it ran."""
    run_dir, commands = tmp_path / "diffusion", []
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(json.dumps({"data": {"path": data_path, "seed": 3, "image_size": 32}}))
    namespace = {"Path": Path, "N": 3, "SAMPLES": tmp_path / "samples", "DIFFUSION_RUN": run_dir,
                 "REAL_IMAGES": real_images, "run": lambda *args: commands.append([str(a) for a in args])}
    exec(next(c.source for c in read(NOTEBOOKS[2]).cells if c.get("id") == "reference"), namespace)
    return namespace, commands


def eyes(folder: Path, n: int) -> Path:
    from pipeline.data.synthetic import write_dataset

    return write_dataset(folder, n, size=32, seed=5)  # PNGs and a labels.json (not an image: left out)


def test_notebook_03_compares_with_held_out_eyes_and_says_which(tmp_path):
    ns, commands = reference_choice(tmp_path, "synthetic", None)
    assert ns["REFERENCE"] == ns["HELD_OUT"] and ns["REFERENCE_LABEL"] == "synthetic held-out (seed 1003)"
    assert commands == [["synthetic-irises", str(ns["HELD_OUT"]), "--n", "3", "--size", "32", "--seed", "1003",
                         "--overwrite"]]


def test_notebook_03_compares_with_the_users_real_eyes(tmp_path):
    prepared = tmp_path / "prepared"
    eyes(prepared / "images", 5)
    (prepared / "dataset.npz").write_bytes(b"")  # data.path names the cache; its crops lie beside it
    ns, _ = reference_choice(tmp_path, str(prepared / "dataset.npz"), None)
    assert ns["REFERENCE_LABEL"] == "real (training set, not held out)"
    picked = sorted(ns["REFERENCE"].iterdir())
    originals = {p.read_bytes() for p in (prepared / "images").glob("*.png")}
    assert len(picked) == 3 and {p.read_bytes() for p in picked} <= originals

    kept_aside = eyes(tmp_path / "kept_aside", 2)
    (tmp_path / "diffusion" / "config.yaml").unlink()
    (tmp_path / "diffusion").rmdir()
    ns, _ = reference_choice(tmp_path, str(prepared), str(kept_aside))
    assert ns["REFERENCE_LABEL"] == "real (kept_aside)" and len(list(ns["REFERENCE"].iterdir())) == 2


# ------------------------------------------------------------------ execution in smoke mode


class SmokeRunner:
    """Executes notebooks once each, in a shared runs folder, with the repository root as cwd."""

    def __init__(self, runs: Path):
        self.runs = runs
        self.executed: dict[str, nbformat.NotebookNode] = {}

    def __call__(self, name: str) -> nbformat.NotebookNode:
        """The executed notebook, running it (and the notebooks before it) on first use."""
        if name not in self.executed:
            for earlier in NOTEBOOKS[: NOTEBOOKS.index(name)]:
                self(earlier)
            self.executed[name] = self.execute(name)
        return self.executed[name]

    def execute(self, name: str) -> nbformat.NotebookNode:
        """Run a fresh copy of the notebook top to bottom; CellExecutionError on a failing cell."""
        nb = read(name)
        env = {**os.environ, "IRIS_SMOKE": "1", "IRIS_RUNS": str(self.runs), "CUDA_VISIBLE_DEVICES": "",
               "TF_CPP_MIN_LOG_LEVEL": "3", "MPLBACKEND": "Agg"}
        client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO_ROOT)}})
        start = time.perf_counter()
        client.execute(env=env)
        print(f"{name}: {time.perf_counter() - start:.0f} s")
        return nb


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> SmokeRunner:
    return SmokeRunner(tmp_path_factory.mktemp("runs"))


def images_shown(nb: nbformat.NotebookNode) -> int:
    return sum(
        1 for cell in nb.cells if cell.cell_type == "code"
        for out in cell.outputs if out.output_type == "display_data" and "image/png" in out.data
    )


def output_text(nb: nbformat.NotebookNode, cell_id: str) -> str:
    cell = next(cell for cell in nb.cells if cell.get("id") == cell_id)
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def test_notebook_01_trains_vae(smoke):
    nb = smoke("01_train_vae")
    vae_run = smoke.runs / "vae-32px"
    for name in ("vae.keras", "last.keras", "log.csv", "loss.png", "config.yaml"):
        assert (vae_run / name).is_file(), name
    assert "choice: IRIS_SMOKE=1" in output_text(nb, "gpu")
    assert images_shown(nb) >= 3  # loss, epoch samples, priors


def last_logged_step(run: Path) -> int:
    with open(run / "log.csv", newline="") as fh:
        return int(list(csv.DictReader(fh))[-1]["step"])


def test_notebook_02_trains_diffusion(smoke):
    nb = smoke("02_train_diffusion")
    run = smoke.runs / "diffusion-smoke"
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == ["step_0000008", "step_0000016"]
    assert last_logged_step(run) == 16
    assert (run / "loss.png").is_file() and (run / "samples" / "step_0000016.png").is_file()
    assert "--resume" not in output_text(nb, "train")
    assert images_shown(nb) >= 2  # loss, sample grid
    plan = output_text(nb, "plan")  # the memory plan and the hours at the speed of a timing run
    assert re.search(r"speed: \S+ optimizer steps/s", plan), plan
    assert "peak estimate" in plan and "a checkpoint every 8 steps (train.save_every) = " in plan
    assert "the run: 16 steps = " in plan
    assert "TensorBoard not shown: smoke mode" in output_text(nb, "tensorboard")


@pytest.mark.slow
def test_notebook_01_again_skips_the_finished_run(smoke):
    smoke("01_train_vae")
    before = (smoke.runs / "vae-32px" / "vae.keras").read_bytes()
    nb = smoke.execute("01_train_vae")
    text = output_text(nb, "train")
    assert "resuming it" in text and "the run is complete" in text
    assert (smoke.runs / "vae-32px" / "vae.keras").read_bytes() == before


@pytest.mark.slow
def test_notebook_02_resumes_after_a_disconnect(smoke):
    """A runtime that died between two checkpoints: running the notebook again resumes the run."""
    smoke("02_train_diffusion")
    run = smoke.runs / "diffusion-smoke"
    first, last = sorted((run / "checkpoints").glob("step_*"))
    shutil.rmtree(last)
    (run / "checkpoints" / "latest").write_text(first.name)
    nb = smoke.execute("02_train_diffusion")
    text = output_text(nb, "train")
    assert f"latest {first.name}: resuming" in text
    assert f"--resume {run}" in text
    assert (last / "state.pt").is_file()
    assert last_logged_step(run) == 16


def test_notebook_03_generates_and_checks(smoke):
    nb = smoke("03_generate_and_check")
    samples = smoke.runs / "samples-smoke"
    for sub, source in (("from-vae", "vae"), ("from-noise", "noise")):
        assert len(list((samples / sub).glob("[0-9]*.png"))) == 4, sub
        meta = json.loads((samples / sub / "metadata.json").read_text())
        assert (meta["source"], meta["n"], meta["steps"], meta["sampler"]) == (source, 4, 5, "ddim")
        assert meta["seeds"]["seed"] == 0 and meta["indices"] == [0, 1, 2, 3]
    check = samples / "check"
    for name in ("results.csv", "summary.json", "histograms.png", "comparison.png", "worst.png"):
        assert (check / name).is_file(), name
    summary = json.loads((check / "summary.json").read_text())
    reference = json.loads((check / "comparison.json").read_text())["reference"]
    assert summary["n_analysed"] == 4 and reference["n_analysed"] == 4  # the samples only: no grid, no priors
    # the third column: synthetic eyes the training never drew (trained on seed 0), labelled as such
    held_out = json.loads((samples / "check-real" / "comparison.json").read_text())["reference"]
    assert held_out["n_analysed"] == 4 and Path(held_out["folder"]).name == "held-out-eyes"
    labels = json.loads((samples / "held-out-eyes" / "labels.json").read_text())
    assert len(labels) == 4
    assert "comparing with: synthetic held-out (seed 1000)" in output_text(nb, "reference")
    table = next(out.data["text/markdown"] for cell in nb.cells if cell.get("id") == "table" for out in cell.outputs
                 if out.output_type == "display_data")
    assert "| | from VAE priors | from noise | synthetic held-out (seed 1000) |" in table
    assert (f"**{summary['pass_rate']:.0%}** | **{reference['pass_rate']:.0%}** | **{held_out['pass_rate']:.0%}**"
            in table)
    assert (samples / "pass_rates.png").is_file()
    assert images_shown(nb) >= 7  # two grids, histograms, two comparisons, worst, pass rates
