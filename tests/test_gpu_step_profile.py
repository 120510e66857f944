"""benchmarks/gpu_step_profile.py: kernels land in the kind their names say, phases parse or fail
in one line, and on a CPU the whole script runs through (its plumbing, before a device call)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_step_profile as gsp  # noqa: E402


@pytest.mark.parametrize("kernel, kind", [
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float>", "layout transpose"),
    ("sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize64x128x64", "convolution"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x64x32", "convolution"),
    ("void at::native::(anonymous namespace)::ComputeInternalGradientsCUDAKernel<c10::BFloat16>", "group norm"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::CUDAFunctor_add",
     "elementwise"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("triton_per_fused_native_group_norm_silu_0", "fused (triton)"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16>>", "reduction"),
    ("some_unknown_kernel", "other"),
])
def test_kernels_are_grouped_by_what_their_names_say(kernel, kind):
    assert gsp.kind_of(kernel) == kind


def test_phases_parse_and_bad_ones_say_what_is_wrong():
    assert gsp.parse_phases(["32:eager bf16", "16:eager bf16, compiled bf16 channels_last"]) == [
        (32, ["eager bf16"]), (16, ["eager bf16", "compiled bf16 channels_last"])]
    for bad, says in (("eager bf16", "not BATCH:VARIANT"), ("0:eager bf16", "not BATCH:VARIANT"),
                      ("16:", "not BATCH:VARIANT"), ("16:eager fp16", "unknown variant(s) eager fp16")):
        with pytest.raises(ValueError, match=re.escape(says)):
            gsp.parse_phases([bad])


def run_script(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step_profile.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_a_bad_phase_is_one_error_line_and_exit_2(tmp_path):
    done = run_script("--device", "cpu", "--phase", "16:eager fp16", out=tmp_path / "r.json")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown variant(s) eager fp16; valid: " + ", ".join(gsp.VARIANTS)]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow  # two HP1 steps per variant and one profiled: about half a minute on 2 cores
def test_the_script_runs_through_on_a_cpu(tmp_path):
    out = tmp_path / "r.json"
    done = run_script("--device", "cpu", "--config", "HP1", "--phase", "1:eager bf16,eager bf16 channels_last",
                      "--repeats", "1", out=out)
    assert done.returncode == 0, done.stderr[-2000:]
    phase = json.loads(out.read_text())["phases"]["batch 1"]
    assert phase["gflop_per_step"] > 0
    for name in ("eager bf16", "eager bf16 channels_last"):
        v = phase[name]
        assert len(v["warmup_ms"]) == 2 and len(v["times_ms"]) == 1
        assert v["kernel_ms_by_kind"] and v["busy_ms"] > 0
        assert v["achieved_tflop_per_s"] == pytest.approx(phase["gflop_per_step"] / v["median_ms"], rel=0.01)
