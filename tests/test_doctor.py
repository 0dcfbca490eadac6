"""python -m llama.doctor runs and prints its sections (tiny shapes, a private kernel cache)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from llama import kernel_choice

REPO = Path(__file__).resolve().parents[1]


def doctor(tmp_path, *args) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMA_KERNEL_CACHE": str(tmp_path / "kernels.json")}
    env.pop("LLAMA_KERNELS", None)
    result = subprocess.run([sys.executable, "-m", "llama.doctor", *args], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


def test_doctor_prints_every_section(tmp_path, tiny_checkpoint):
    out = doctor(tmp_path, "--ckpt_dir", str(tiny_checkpoint))
    for section in ("== CPU", "== Threads", "== torch", "== Memory bandwidth", "== Kernels"):
        assert section in out, out
    assert "flags      have:" in out and "CPU capability" in out and "GB/s (best of 7" in out
    assert "float32" in out and "bfloat16" in out and "int8 weights" in out
    # every distinct shape of the tiny model (dim 64, hidden 192, vocab 320) gets a pick
    for shape in ("64x64", "192x64", "64x192", "320x64"):
        assert shape in out, out
    # and the attention, for each float dtype, and the int8 weights' prefill, for each shape
    # each float dtype's decode and prefill attention
    prefill_attention = out.count("  prefill attention:")
    assert out.count("->") == 3 * 4 + 2 * 2 + 4 and prefill_attention == 2 and out.count("  prefill ") - prefill_attention == 4
    dequantized = "prefill-dequantized" in kernel_choice.candidates(torch.device("cpu"), torch.float32, "int8-prefill")
    assert ("prefill-dequantized" in out) == dequantized
    assert out.count("attention: 4 heads, 4 kv heads of 16") == 2
    assert out.count("decode step: ") == 3  # one native call, or the model's modules and why, per run
    assert (tmp_path / "kernels.json").exists()
    again = doctor(tmp_path, "--ckpt_dir", str(tiny_checkpoint), "--no-bandwidth", "--dtypes", "float32", "--no-int8")
    assert "not measured" in again and again.count("->") == 4 + 2
    assert "(measured)" not in again  # the first run's choices, from the cache


def test_doctor_model_parallel_shapes(tmp_path, tiny_checkpoint):
    out = doctor(tmp_path, "--ckpt_dir", str(tiny_checkpoint), "--model-parallel-size", "2", "--no-bandwidth",
                 "--dtypes", "float32", "--no-int8", "--prefill", "16")
    assert "model parallel 2" in out and "96x64" in out and "64x96" in out and "160x64" in out
    assert "decode step: the model's modules (model parallel" in out
    assert "== Prefill (16 rows" in out and "GFLOP/s" in out


def test_doctor_says_what_is_wrong_with_a_checkpoint_dir(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llama.doctor", "--ckpt_dir", str(tmp_path / "missing"), "--no-bandwidth"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and "--ckpt_dir: checkpoint directory" in result.stderr and "Traceback" not in result.stderr
