"""Model parallel on any number of ranks, under real torchrun launches (CPU, gloo, tiny models).

Each torchrun launch costs a few seconds of start-up on a small machine, so the
launches are module-scoped fixtures that run several cases at once
(``tests/mp_worker.py``) and the tests read their outputs. World size 1 runs in
this process with the same code (``mp_worker.run_case``).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import make_checkpoint

import mp_worker
from llama import distributed
from llama.checkpoint import InMemoryState, global_shape, random_state_dict, rank_range, split_dim
from llama.model import ModelArgs
from llama.reshard import main as reshard_main

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "mp_worker.py"
LAUNCH_TIMEOUT_S = 120  # a launch that takes this long has hung
FAIL_WITHIN_S = 60  # a failing job must be over within this time

PLAIN = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=-1)
# 70B-style grouped-query attention with fewer key/value heads than ranks at MP=4.
GQA = dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3, vocab_size=-1)
TOLERANCE = 1e-5  # max abs logits difference to MP=1, float32


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", LLAMA_DIST_TIMEOUT="30", PYTHONPATH=str(REPO))
    return env


def worker_args(tokenizer, out, cases, *extra) -> list:
    args = [str(WORKER), "--tokenizer", str(tokenizer), "--out", str(out)]
    for name, ckpt in cases.items():
        args += ["--case", f"{name}={ckpt}"]
    return args + list(extra)


def torchrun(nproc: int, worker: list, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *worker]
    return subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"launch failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_case(out: Path, name: str):
    return torch.load(out / f"{name}.logits.pt"), json.loads((out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_tokenizer_path):
    """Random-weight checkpoints saved with 1, 2 and 4 shards (GQA at 4: key/value heads replicated)."""
    root = tmp_path_factory.mktemp("mp_ckpts")
    dirs = {}
    for name, params, shard_counts in (("plain", PLAIN, (1, 2, 4)), ("gqa", GQA, (1, 4))):
        for n in shard_counts:
            dirs[f"{name}-mp{n}"] = root / f"{name}-mp{n}"
            # std=0.1: logits of order 1, so 1e-5 is a real bound and greedy picks are not near-ties.
            make_checkpoint(dirs[f"{name}-mp{n}"], params, tiny_tokenizer_path, n_shards=n, seed=3, std=0.1)
    return dirs


@pytest.fixture(scope="module")
def reference(ckpts, tiny_tokenizer_path, tmp_path_factory):
    """World size 1 in this process: from the 1-shard checkpoints, and merged from 2 and 4 shards."""
    out = tmp_path_factory.mktemp("mp1")
    cases = {"plain": "plain-mp1", "gqa": "gqa-mp1", "plain_from2": "plain-mp2", "gqa_from4": "gqa-mp4"}
    for name, ckpt in cases.items():
        mp_worker.run_case(name, str(ckpts[ckpt]), str(tiny_tokenizer_path), out)
    return out


@pytest.fixture(scope="module")
def mp2(ckpts, tiny_tokenizer_path, tmp_path_factory):
    """World size 2: split from 1 shard, merged from 4 (GQA: replicated heads), plus disagreeing ranks."""
    out = tmp_path_factory.mktemp("mp2")
    cases = {"plain": ckpts["plain-mp1"], "gqa": ckpts["gqa-mp1"], "plain_from4": ckpts["plain-mp4"], "gqa_from4": ckpts["gqa-mp4"]}
    result = torchrun(2, worker_args(tiny_tokenizer_path, out, cases, "--check-disagreement"))
    check_ok(result)
    return out, result


@pytest.fixture(scope="module")
def mp4(ckpts, tiny_tokenizer_path, tmp_path_factory):
    """World size 4: split from 1 and 2 shards; GQA with 2 key/value heads replicated over 4 ranks."""
    out = tmp_path_factory.mktemp("mp4")
    cases = {"plain": ckpts["plain-mp1"], "gqa": ckpts["gqa-mp1"], "plain_from2": ckpts["plain-mp2"]}
    result = torchrun(4, worker_args(tiny_tokenizer_path, out, cases))
    check_ok(result)
    return out, result


# ---------------------------------------------------------------- resharding math, in process


@pytest.mark.parametrize("params", [PLAIN, GQA], ids=["plain", "gqa"])
def test_every_shard_count_reads_back_every_world_size(params):
    """A checkpoint of k shards, read for rank r of n, gives exactly that rank's slice of the full tensor."""
    args = ModelArgs(**{**params, "vocab_size": 320})
    full = random_state_dict(args, seed=0)
    sizes = args.valid_model_parallel_sizes()
    assert sizes == [1, 2, 4] if params is PLAIN else [1, 2, 4, 8]
    for k in sizes:
        shards = [dict(InMemoryState(args, [full]).state_dict_for_rank(r, k)) for r in range(k)]
        source = InMemoryState(args, shards)
        for n in sizes:
            for key, tensor in full.items():
                dim = split_dim(key)
                for r in range(n):
                    got = source.tensor(key, r, n)
                    if dim is None:
                        want = tensor
                    else:
                        start, stop = rank_range(key, args, r, n)
                        want = tensor.narrow(dim, start, stop - start)
                    assert torch.equal(got, want), (key, k, n, r)
                if key.endswith("attention.wk.weight") and n > args.kv_heads:
                    # One whole key/value head per rank, each shared by n / n_kv_heads ranks.
                    assert source.tensor(key, 0, n).shape[0] == args.head_dim


def test_valid_model_parallel_sizes():
    llama2_70b = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                           ffn_dim_multiplier=1.3, vocab_size=32000)
    assert llama2_70b.ffn_hidden_dim == 28672
    assert llama2_70b.valid_model_parallel_sizes() == [1, 2, 4, 8, 16, 32, 64]
    llama2_13b = ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000)
    assert llama2_13b.ffn_hidden_dim == 13824  # not divisible by 5: 40 heads alone would allow 5, 10, 20, 40
    assert llama2_13b.valid_model_parallel_sizes() == [1, 2, 4, 8]
    # 12 heads over 4 key/value heads: 6 ranks would split a key/value head unevenly.
    assert 6 not in ModelArgs(dim=192, n_layers=1, n_heads=12, n_kv_heads=4, vocab_size=96).valid_model_parallel_sizes()
    with pytest.raises(ValueError, match=r"cannot be split over 3 .*sizes that work: \[1, 2, 4\]"):
        ModelArgs(**{**PLAIN, "vocab_size": 320}).check_model_parallel_size(3)


def test_dist_timeout(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.dist_timeout("gloo").total_seconds() == 300
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.dist_timeout("nccl").total_seconds() == 12.5
    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="LLAMA_DIST_TIMEOUT"):
            distributed.dist_timeout("gloo")


def test_reshard_cli_round_trip(ckpts, tmp_path, capsys):
    """MP 1 -> 4 -> 2 -> 1 reproduces every tensor exactly (GQA: heads replicated at 4, merged back)."""
    src = ckpts["gqa-mp1"]
    mp4_dir, mp2_dir, back = tmp_path / "mp4", tmp_path / "mp2", tmp_path / "mp1"
    assert reshard_main([str(src), str(mp4_dir), "--model-parallel-size", "4"]) == 0
    assert "wrote 4 shard(s)" in capsys.readouterr().out
    assert reshard_main([str(mp4_dir), str(mp2_dir), "--model-parallel-size", "2"]) == 0
    assert reshard_main([str(mp2_dir), str(back), "-n", "1"]) == 0
    assert sorted(p.name for p in mp4_dir.glob("*.pth")) == [f"consolidated.0{i}.pth" for i in range(4)]
    assert json.loads((back / "params.json").read_text()) == json.loads((src / "params.json").read_text())
    original = torch.load(src / "consolidated.00.pth", weights_only=True)
    restored = torch.load(back / "consolidated.00.pth", weights_only=True)
    assert sorted(original) == sorted(restored)
    for key in original:
        assert original[key].dtype == restored[key].dtype and torch.equal(original[key], restored[key]), key
    args = ModelArgs.from_json(src / "params.json", vocab_size=original["output.weight"].shape[0])
    wk = torch.load(mp4_dir / "consolidated.03.pth", weights_only=True)["layers.0.attention.wk.weight"]
    assert wk.shape == (args.head_dim, args.dim)  # 2 key/value heads over 4 shards: one (replicated) head each


def test_reshard_cli_errors(ckpts, tmp_path, capsys):
    src = str(ckpts["plain-mp1"])
    for argv, message in (
        ([src, str(tmp_path / "x"), "-n", "3"], "sizes that work: [1, 2, 4]"),
        ([str(tmp_path / "missing"), str(tmp_path / "y"), "-n", "2"], "not found"),
        ([src, src, "-n", "2"], "must differ"),
        ([src, str(ckpts["plain-mp4"]), "-n", "2"], "already holds a checkpoint"),  # no stale shards left behind
        ([src, str(tmp_path / "z"), "-n", "2", "--dtype", "float33"], "dtype='float33' is not supported"),
    ):
        assert reshard_main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


# ---------------------------------------------------------------- torchrun launches


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["plain", "gqa"])
def test_logits_and_generations_match_mp1(world, case, mp2, mp4, reference):
    out = (mp2 if world == 2 else mp4)[0]
    want_logits, want = read_case(reference, case)
    for name in [n for n in (case, f"{case}_from2", f"{case}_from4") if (out / f"{n}.json").exists()]:
        logits, got = read_case(out, name)
        assert got["world"] == world
        diff = (logits - want_logits).abs().max().item()
        print(f"MP={world} {name} (from {got['shards']} shard(s)): max abs logits diff to MP=1 {diff:.2e}")
        assert diff <= TOLERANCE, (name, diff)
        assert got["greedy"] == want["greedy"], name
        assert got["sampled"] == want["sampled"], name
        assert got["served"] == want["served"] and len(want["served"]) == 7, name


def test_compiled_decode_at_mp2_matches_mp1(ckpts, tiny_tokenizer_path, tmp_path, reference):
    # Collectives split the compiled step into several graphs (float32 CPU: oneDNN-packed weights).
    result = torchrun(2, worker_args(tiny_tokenizer_path, tmp_path, {"plain": ckpts["plain-mp1"]}, "--compile"))
    check_ok(result)
    assert "Compiled the decode step" in result.stdout
    _, want = read_case(reference, "plain")
    _, got = read_case(tmp_path, "plain")
    assert got["world"] == 2 and got["greedy"] == want["greedy"] and got["sampled"] == want["sampled"]


def test_native_kernels_at_mp2_match_mp1(ckpts, tiny_tokenizer_path, tmp_path, reference):
    # Our kernels on each rank's shard: q/k/v and w1/w3 in one call per rank (parallel_layers.project), the
    # native decode attention over each rank's local heads; the same logits and greedy tokens as MP=1.
    from llama import kernel_choice, native

    if "gemv" not in kernel_choice.candidates(torch.device("cpu"), torch.float32, "float"):
        pytest.skip(f"no native kernels here: {native.unavailable(torch.float32, kernel_choice.cpu_facts()['flags'])}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *worker_args(tiny_tokenizer_path, tmp_path, {"plain": ckpts["plain-mp1"], "gqa": ckpts["gqa-mp1"]})]
    env = {**launch_env(), "LLAMA_KERNELS": "gemv,native-attention"}
    check_ok(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=REPO))
    for case in ("plain", "gqa"):
        want_logits, want = read_case(reference, case)
        logits, got = read_case(tmp_path, case)
        assert got["world"] == 2 and (logits - want_logits).abs().max().item() <= TOLERANCE
        assert got["greedy"] == want["greedy"]


def test_world1_loads_sharded_checkpoints(reference):
    for case, source in (("plain", "plain_from2"), ("gqa", "gqa_from4")):
        want_logits, want = read_case(reference, case)
        logits, got = read_case(reference, source)
        assert got["world"] == 1 and got["shards"] > 1
        assert torch.equal(logits, want_logits) and got["greedy"] == want["greedy"] and got["sampled"] == want["sampled"]


def test_gqa_replicates_kv_heads_when_ranks_outnumber_them(mp4):
    _, got = read_case(mp4[0], "gqa")
    head_dim = GQA["dim"] // GQA["n_heads"]
    assert got["local_shapes"]["layers.0.attention.wk.weight"] == [head_dim, GQA["dim"]]
    assert got["local_shapes"]["layers.0.attention.wq.weight"] == [GQA["dim"] // 4, GQA["dim"]]


def test_only_rank0_prints(mp2, mp4):
    # mp2: four cases plus the build in --check-disagreement; mp4: three cases.
    for (_, result), builds in ((mp2, 5), (mp4, 3)):
        assert result.stdout.count("Loaded in") == builds, result.stdout
        assert "initializing model parallel" not in result.stdout  # fairscale's banner


def test_ranks_that_disagree_fail_clearly(mp2):
    errors = json.loads((mp2[0] / "disagreement.json").read_text())
    assert len(errors) == 2
    for rank_errors in errors:
        assert rank_errors["prompts"].startswith("ranks disagree on prompts and generation arguments")
        assert "every rank must be given the same" in rank_errors["prompts"]
        assert rank_errors["build"].startswith("ranks disagree on max_seq_len")
        assert "rank 0: (64," in rank_errors["build"] and "rank 1: (65," in rank_errors["build"]


def test_two_hosts_match_one_host(ckpts, tiny_tokenizer_path, tmp_path, mp2, reference):
    """Two torchrun processes (two "hosts", one rank each) meeting at a c10d rendezvous endpoint."""
    cases = {"plain": ckpts["plain-mp1"], "gqa": ckpts["gqa-mp4"]}
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
             "--rdzv_id", f"two-hosts-{port}", *worker_args(tiny_tokenizer_path, tmp_path, cases)],
            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, f"{stdout}\n{stderr}"
    assert sum(stdout.count("Loaded in") for stdout, _ in outputs) == 2  # global rank 0 only
    for name, one_host_name in (("plain", "plain"), ("gqa", "gqa_from4")):
        logits, got = read_case(tmp_path, name)
        one_host_logits, one_host = read_case(mp2[0], one_host_name)
        assert got["world"] == 2
        assert torch.equal(logits, one_host_logits)
        assert got["greedy"] == one_host["greedy"] and got["sampled"] == one_host["sampled"]


def run_failing(nproc: int, worker: list):
    start = time.monotonic()
    result = torchrun(nproc, worker, timeout=FAIL_WITHIN_S + 30)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert elapsed < FAIL_WITHIN_S, f"the failing job took {elapsed:.0f} s to end"
    return output


@pytest.mark.parametrize("how", ["corrupt", "dtype"])
def test_one_failing_rank_ends_the_job(how, ckpts, tiny_tokenizer_path, tmp_path):
    """corrupt: rank 1's shard is truncated (fails inside loading, while rank 0 loads fine).
    dtype: rank 1 is given a bad argument and fails before it joins the process group."""
    worker = worker_args(tiny_tokenizer_path, tmp_path, {"plain": ckpts["plain-mp1"]}, "--fail-rank", "1", "--fail", how)
    output = run_failing(2, worker)
    error = {"corrupt": "is truncated or corrupted", "dtype": "dtype='float33' is not supported"}[how]
    assert f"ValueError: " in output and error in output, output
    if how == "corrupt":
        # The real error's traceback comes from rank 1; rank 0 says in one line what happened.
        assert "[rank 0] stopping: loading the checkpoint failed on rank 1: ValueError: cannot read" in output
        assert output.count("Traceback (most recent call last)") == 2  # rank 1's and torchrun's own
        assert "local_rank: 1" in output  # torchrun names rank 1 as the root cause
    assert not (tmp_path / "plain.json").exists()


def test_world_size_that_does_not_divide_the_heads(ckpts, tiny_tokenizer_path, tmp_path):
    """n_heads=4 on 3 ranks: every rank fails alike; the error, with the sizes that work, is shown once."""
    output = run_failing(3, worker_args(tiny_tokenizer_path, tmp_path, {"plain": ckpts["plain-mp1"]}))
    message = "this model cannot be split over 3 model-parallel ranks"
    assert f"ValueError: {message}" in output and "sizes that work: [1, 2, 4]" in output, output
    assert output.count("Traceback (most recent call last)") == 2  # rank 0's and torchrun's own
    assert output.count("stopping: loading the checkpoint failed on rank 0") == 2  # ranks 1 and 2, one line each
