"""`circularity-check`: outputs, exit codes and bad input."""

import csv
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.cli.circularity_check import main
from pipeline.common.images import to_uint8, to_uint16, write_image
from pipeline.common.pool import guided_chunks
from pipeline.data.synthetic import generate_irises


def _run(argv):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


@pytest.fixture(scope="module")
def eye_folder(tmp_path_factory) -> Path:
    """12 grey PNGs (3 defective) in two levels, an RGB PNG, a 16-bit PNG, a 96-px BMP,
    a constant image, a corrupt file, a hidden file and a text file."""
    root = tmp_path_factory.mktemp("eyes") / "samples"
    (root / "sub").mkdir(parents=True)
    kinds = [None] * 9 + ["bleed", "oval", "offcenter"]
    images, _ = generate_irises(len(kinds), 128, seed=2, defects=kinds)
    for i, img in enumerate(images):
        write_image(root / ("sub" if i % 2 else "") / f"eye{i:02d}.png", img)
    rgb, _ = generate_irises(1, 128, seed=20, channels=3)
    write_image(root / "rgb.png", rgb[0])
    cv2.imwrite(str(root / "deep16.png"), to_uint16(images[0, 0]))
    small, _ = generate_irises(1, 96, seed=21)
    cv2.imwrite(str(root / "small.bmp"), to_uint8(small[0, 0]))
    cv2.imwrite(str(root / "flat.png"), np.full((64, 64), 128, np.uint8))
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    cv2.imwrite(str(root / ".hidden.png"), to_uint8(images[0, 0]))
    (root / "notes.txt").write_text("not an image")
    return root


def test_outputs_and_counts(eye_folder, tmp_path, capsys, caplog):
    out = tmp_path / "report"
    assert _run([eye_folder, "--out", out, "--workers", 1, "--overlays"]) == 0
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out and "pass rate" in printed.out
    assert "broken.png" in caplog.text  # warned
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    files = {r["file"] for r in rows}
    assert len(rows) == 16 and "sub/eye01.png" in files and "broken.png" not in files and ".hidden.png" not in files
    by_file = {r["file"]: r for r in rows}
    assert by_file["flat.png"]["pupil_found"] == "False" and by_file["flat.png"]["reason"] == "no dark pupil region"
    assert by_file["small.bmp"]["width"] == "96" and by_file["deep16.png"]["pass"] == by_file["eye00.png"]["pass"]
    assert float(by_file["deep16.png"]["pupil_r"]) == pytest.approx(float(by_file["eye00.png"]["pupil_r"]), abs=0.1)
    assert by_file["rgb.png"]["pupil_found"] == "True"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_files"] == 17 and summary["n_analysed"] == 16 and summary["n_unreadable"] == 1
    assert summary["unreadable"][0]["file"] == "broken.png"
    assert summary["n_pass"] + summary["n_fail"] == 16
    assert summary["pass_rate"] == pytest.approx(sum(r["pass"] == "True" for r in rows) / 16)
    assert sum(summary["failure_reasons"].values()) == summary["n_fail"]
    assert summary["failure_reasons"].get("no dark pupil region") == 1
    stats = summary["metrics"]["pupil_circularity"]
    assert stats["p5"] <= stats["median"] <= stats["p95"]
    assert (out / "histograms.png").stat().st_size > 0 and (out / "worst.png").stat().st_size > 0
    assert len(list((out / "overlays").rglob("*.png"))) == 16
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_default_out_beside_folder_and_overwrite(eye_folder, capsys):
    out = eye_folder.parent / "samples_circularity"
    assert _run([eye_folder, "--workers", 2]) == 0  # also exercises the process pool
    assert (out / "results.csv").exists()
    first = json.loads((out / "summary.json").read_text())
    assert _run([eye_folder, "--workers", 1]) == 2  # refuses to clobber
    assert "--overwrite" in _error_line(capsys)
    assert _run([eye_folder, "--workers", 1, "--overwrite"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["n_pass"] == first["n_pass"]  # same answers inline and in workers


def test_fail_under_exit_code(eye_folder, tmp_path, capsys):
    assert _run([eye_folder, "--out", tmp_path / "a", "--workers", 1, "--fail-under", 0.99]) == 1
    assert "below --fail-under" in capsys.readouterr().err
    assert _run([eye_folder, "--out", tmp_path / "b", "--workers", 1, "--fail-under", 0.1]) == 0
    assert _run([eye_folder, "--out", tmp_path / "c", "--fail-under", 5]) == 2


def test_reference_comparison(eye_folder, tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    images, _ = generate_irises(6, 128, seed=9)
    for i, img in enumerate(images):
        write_image(ref / f"r{i}.png", img)
    out = tmp_path / "cmp"
    assert _run([eye_folder, "--out", out, "--workers", 1, "--reference", ref]) == 0
    printed = capsys.readouterr().out
    assert "proxy FD" in printed and "not Inception" in printed
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["reference"]["n_analysed"] == 6 and comparison["folder"]["n_analysed"] == 16
    assert comparison["distances"]["proxy_fd"] > 0 and "fid" not in comparison["distances"]
    assert (out / "comparison.png").exists()


def test_thresholds_from_set(eye_folder, tmp_path):
    out = tmp_path / "strict"
    assert _run([eye_folder, "--out", out, "--workers", 1, "--set", "circularity.min_pupil_circularity=0.9999"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_pass"] == 0 and summary["config"]["min_pupil_circularity"] == 0.9999


@pytest.mark.parametrize("make", ["missing", "empty", "no_images", "only_broken", "file"])
def test_bad_folders_exit_2(tmp_path, capsys, make):
    folder = tmp_path / "in"
    if make != "missing" and make != "file":
        folder.mkdir()
    if make == "no_images":
        (folder / "a.txt").write_text("x")
    if make == "only_broken":
        (folder / "a.png").write_bytes(b"nope")
    if make == "file":
        folder.write_text("x")
    assert _run([folder, "--out", tmp_path / "o"]) == 2
    assert _error_line(capsys)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_bad_options_exit_2(eye_folder, tmp_path, capsys):
    assert _run([eye_folder, "--out", tmp_path / "o", "--set", "circularity.nope=1"]) == 2
    assert "nope" in _error_line(capsys)
    assert _run([eye_folder, "--out", tmp_path / "o", "--workers", 0]) == 2
    _error_line(capsys)
    assert _run([eye_folder, "--out", tmp_path / "o", "--reference", tmp_path / "absent"]) == 2
    assert "reference" in _error_line(capsys)
    assert _run([eye_folder, "--out", tmp_path / "o", "--reference", eye_folder,
                 "--inception-weights", tmp_path / "inception.pt"]) == 2
    assert "--metrics inception" in _error_line(capsys)
    assert _run([eye_folder, "--out", tmp_path / "o", "--metrics", "inception"]) == 2
    assert "--reference" in _error_line(capsys)


@pytest.mark.parametrize(("n", "workers"), [(1, 2), (7, 2), (1000, 2), (333, 3)])
def test_guided_chunks_cover_the_items_in_order_and_shrink(n, workers):
    chunks = guided_chunks(list(range(n)), workers)
    assert [i for c in chunks for i in c] == list(range(n))
    sizes = [len(c) for c in chunks]
    assert max(sizes) <= 64 and sizes == sorted(sizes, reverse=True)
    assert sizes[-1] <= 4  # the workers finish within a few images of each other
    if n >= 1000:
        assert len(chunks) <= n // 30  # few messages: the parent's cost is per chunk


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)


@pytest.mark.parametrize(("outcome", "code"), [("0", 0), ("1", 1), ("user", 2), ("message", 1)])
def test_quick_exit_keeps_the_exit_code_the_output_and_the_exit_handlers(outcome, code):
    done = _python("""
        import atexit, sys
        from pipeline.cli.entry import cli_entry, exit_without_teardown
        from pipeline.common.errors import UserError
        atexit.register(print, "exit handler ran")

        @cli_entry
        def main(argv=None):
            print("unflushed", end="")
            if sys.argv[1] == "user":
                raise UserError("bad input")
            if sys.argv[1] == "message":
                sys.exit("a message")
            return int(sys.argv[1])

        exit_without_teardown(main)()
        """, outcome)
    assert done.returncode == code
    assert done.stdout == "unflushedexit handler ran\n"
    assert done.stderr == {"user": "error: bad input\n", "message": "a message\n"}.get(outcome, "")


def test_console_script_module_writes_everything_and_exits_0(eye_folder, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.cli.circularity_check", str(eye_folder), "--out",
                           str(tmp_path / "out"), "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.csv", "summary.json", "histograms.png", "worst.png"}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_kept_freed_memory_stops_the_page_faults_of_every_image():
    # Both runs start from glibc's static defaults (blocks from 128 KiB mapped, the heap trimmed above
    # 128 KiB): a fresh pool worker's state, in which the unchanged code faulted ~100 times per image.
    # (glibc raises them by itself after freeing a big block, which a run's history may or may not do.)
    code = """
        import ctypes, resource, sys
        from pipeline.check.analyze import analyze_image
        from pipeline.common.config import CircularityConfig
        from pipeline.common.images import to_unit
        from pipeline.common.pool import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
        from pipeline.data.synthetic import generate_irises
        images, _ = generate_irises(30, 128, seed=0, defects=0.3)
        grey = [to_unit(img[0]) for img in images]
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 << 10)
        ctypes.CDLL(None).mallopt(M_TRIM_THRESHOLD, 128 << 10)
        if sys.argv[1] == "kept":
            keep_freed_memory()
        for g in grey[:10]:
            analyze_image(g, CircularityConfig())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for g in grey[10:]:
            analyze_image(g, CircularityConfig())
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
        """
    faults = {how: float(_python(code, how).stdout) for how in ("default", "kept")}
    assert faults["default"] > 20 and faults["kept"] < 8, faults
