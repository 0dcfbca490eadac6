"""benchmarks/bench.py runs end to end on the tiny shape and prints its JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import kernel_choice

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench.py"
COMMON = ["--shape", "tiny", "--gen-tokens", "8", "--repeats", "1", "--prompt-len", "16", "--batch-sizes", "1,2",
          "--threads", "1"]
ROW_FIELDS = {"impl", "batch", "ttft_s", "prefill_tok_s", "decode_tok_s", "decode_tok_s_best", "ms_per_step",
              "pct_of_bandwidth_limit", "speedup_vs_ours"}


def run_bench(*extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(BENCH), *COMMON, *extra], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    lines = result.stdout.strip().splitlines()
    assert "decode tok/s" in result.stdout  # the table
    return json.loads(lines[-1])


def check_common(r: dict, impls: set) -> None:
    assert r["shape"] == "tiny" and r["device"] == "cpu" and r["dtype"] == "float32" and r["threads"] == 1
    assert r["read_bandwidth_gb_s"] > 0
    assert {(row["impl"], row["batch"]) for row in r["results"]} == {(i, b) for i in impls for b in (1, 2)}
    for row in r["results"]:
        assert ROW_FIELDS <= set(row)
        assert row["decode_tok_s"] > 0 and row["ttft_s"] > 0 and row["pct_of_bandwidth_limit"] > 0
    assert set(r["weight_bytes_per_step"]) == impls
    assert r["load"]["ours"]["s"] > 0
    assert r["memory"]["peak_rss_mb"] > 0
    machine = r["machine"]
    assert machine["torch"] and machine["cpu"] and machine["load_average"] is not None


def test_bench_ours_only(tmp_path):
    out = tmp_path / "results" / "tiny.json"
    r = run_bench("--skip-hf", "--out", str(out))
    check_common(r, {"ours"})
    assert json.loads(out.read_text()) == r


def test_bench_against_transformers_with_int8():
    pytest.importorskip("transformers")
    r = run_bench("--quantize", "int8")
    check_common(r, {"ours", "ours-int8", "hf"})
    assert r["quantize"] == "int8"
    # int8 reads about a quarter of the float32 bytes
    assert r["weight_bytes_per_step"]["ours-int8"] < 0.35 * r["weight_bytes_per_step"]["ours"]
    assert r["weight_bytes_per_step"]["hf"] == r["weight_bytes_per_step"]["ours"]
    hf_rows = [row for row in r["results"] if row["impl"] == "hf"]
    # the same weights, greedy: transformers generates our tokens (float32, tiny model)
    assert all(row["tokens_equal_to_ours"] == 1.0 for row in hf_rows)
    assert r["impl_notes"]["hf"]["kv_cache"] == "dynamic"
    assert r["load"]["hf"]["s"] > 0


def test_prefill_benchmark_runs_on_the_tiny_shape(tmp_path):
    """benchmarks/prefill.py: each way of each model compared with the first, and the attention alone, in its JSON."""
    out = tmp_path / "prefill.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prefill.py"), "--shape", "tiny", "--threads", "1",
                             "--lengths", "16,40", "--rounds", "1", "--attention-shapes", "tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    r = json.loads(out.read_text())
    assert set(r["runs"]) == {"float32", "bfloat16", "float32 int8"}
    for run in r["runs"].values():
        assert set(run["lengths"]) == {"16", "40"}
        for ways in run["lengths"].values():
            first = next(iter(ways.values()))
            assert first["vs_first"] == 1.0 and first["logits_rel_diff"] == 0.0
            assert all(w["ms"] > 0 and w["logits_rel_diff"] < 0.05 for w in ways.values())
    assert set(r["dtypes_alternating"]) == {"16", "40"}
    for per_dtype in r["dtypes_alternating"].values():
        assert list(per_dtype) == ["float32", "bfloat16"] and all(x["ms"] > 0 for x in per_dtype.values())
    attention = r["attention"]["tiny"]
    assert (attention["heads"], attention["kv_heads"], attention["head_dim"]) == (4, 4, 16)
    for dtype in (torch.float32, torch.bfloat16):  # each kernel the chooser would time, at each length
        timed = attention[str(dtype).removeprefix("torch.")]
        assert set(timed) == set(kernel_choice.prefill_attention_candidates(torch.device("cpu"), dtype, 16))
        for per_length in timed.values():
            assert set(per_length) == {"16", "40"} and all(x["gflop_s"] > 0 for x in per_length.values())
