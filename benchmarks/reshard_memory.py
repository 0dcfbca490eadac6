"""Peak resident memory of ``python -m llama.reshard`` on a scaled-down Llama 2 70B.

The shape keeps 70B's ratios: grouped-query attention with 8 key/value heads and 8
query heads per key/value head, an FFN 3.5x the model width, a 32000-token
vocabulary, bfloat16 weights, 8 source shards. It is shrunk (dim 1024, 8 layers) to
about 350 MB. Two cases, each resharded by the CLI's ``main`` in a fresh subprocess:

* 8 -> 1: merge 70B-style shards into one;
* 1 -> 8: split one shard into 8.

Each child reports its RSS after imports (the baseline) and its peak RSS
(``ru_maxrss``) over the whole reshard. The target is

    peak RSS - baseline <= largest source shard + largest output shard

(one source shard read, one output shard built in memory), plus slack for the
allocator and the one tensor being converted: the table shows the ratio to that
budget. Prints a table and one JSON line, and writes
``benchmarks/results/reshard_memory.json``.

Usage: ``python benchmarks/reshard_memory.py [--workdir DIR] [--layers N]``
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rss import peak_rss, rss_now  # benchmarks/rss.py: scripts run from this folder

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "reshard_memory.json"
# Llama 2 70B: dim 8192, 80 layers, 64 heads, 8 kv heads, ffn_dim_multiplier 1.3, multiple_of 4096.
SHAPE = dict(dim=1024, n_layers=8, n_heads=64, n_kv_heads=8, multiple_of=512, ffn_dim_multiplier=1.3,
             norm_eps=1e-5, vocab_size=32000)
CASES = [("8 -> 1", "mp8", 1), ("1 -> 8", "mp1", 8)]
MB = 2**20
sys.path.insert(0, str(REPO))  # run as a script from a checkout






def child(src: str, dst: str, n: str) -> None:
    """Run in a fresh process: the reshard CLI on ``src``; print one JSON line."""
    import torch  # noqa: F401

    import llama.checkpoint  # noqa: F401 - everything the CLI imports, before the baseline
    from llama.reshard import main

    baseline = rss_now()
    start = time.perf_counter()
    status = main([src, dst, "--model-parallel-size", n])
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"reshard exited with status {status}")
    print(json.dumps(dict(baseline=baseline, peak=peak_rss(), seconds=seconds)))


def write_checkpoints(workdir: Path, layers: int) -> None:
    """The random bfloat16 source checkpoints, saved with 1 and with 8 shards."""
    import torch

    from llama.checkpoint import InMemoryState, random_state_dict, save_checkpoint
    from llama.model import ModelArgs

    params = {**SHAPE, "n_layers": layers}
    args = ModelArgs(**params)
    state = random_state_dict(args, seed=0, dtype=torch.bfloat16)
    for n in (1, 8):
        if not (workdir / f"mp{n}" / f"consolidated.{n - 1:02d}.pth").is_file():
            save_checkpoint(InMemoryState(args, [state]), workdir / f"mp{n}", n, params)


def largest_shard(directory: Path) -> int:
    return max(p.stat().st_size for p in directory.glob("consolidated.*.pth"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=SHAPE["n_layers"], help="layers (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file (default: %(default)s)")
    parser.add_argument("--child", nargs=3, metavar=("SRC", "DST", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.write:
        write_checkpoints(args.write, args.layers)
        return 0

    with tempfile.TemporaryDirectory(prefix="reshard_memory_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        # Linux carries a process's peak RSS across fork and exec, so this parent stays small
        # (no torch) and the checkpoints are written by a child of their own.
        written = subprocess.run([sys.executable, __file__, "--write", str(workdir), "--layers", str(args.layers)],
                                 capture_output=True, text=True, check=False)
        if written.returncode != 0:
            print(f"error: writing the checkpoints failed:\n{written.stderr}", file=sys.stderr)
            return 1
        rows = []
        for case, source, n in CASES:
            src, dst = workdir / source, workdir / f"{source}-to-{n}"
            out = subprocess.run([sys.executable, __file__, "--child", str(src), str(dst), str(n)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"error: {case} failed:\n{out.stderr}", file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            src_shard, dst_shard = largest_shard(src), largest_shard(dst)
            total = sum(p.stat().st_size for p in src.glob("consolidated.*.pth"))
            budget = src_shard + dst_shard
            used = r["peak"] - r["baseline"]
            rows.append(dict(
                case=case,
                checkpoint_mb=round(total / MB, 1),
                source_shard_mb=round(src_shard / MB, 1),
                output_shard_mb=round(dst_shard / MB, 1),
                budget_mb=round(budget / MB, 1),
                baseline_mb=round(r["baseline"] / MB, 1),
                peak_mb=round(r["peak"] / MB, 1),
                peak_minus_baseline_mb=round(used / MB, 1),
                ratio_to_budget=round(used / budget, 3),
                within_target=used <= 1.1 * budget + 64 * MB,
                seconds=round(r["seconds"], 2),
            ))

    header = (f"{'case':<8}{'ckpt MB':>9}{'src shard':>11}{'out shard':>11}{'budget':>9}"
              f"{'baseline':>10}{'peak':>9}{'peak-base':>11}{'ratio':>7}{'s':>7}")
    print(header)
    for r in rows:
        print(f"{r['case']:<8}{r['checkpoint_mb']:>9.1f}{r['source_shard_mb']:>11.1f}{r['output_shard_mb']:>11.1f}"
              f"{r['budget_mb']:>9.1f}{r['baseline_mb']:>10.1f}{r['peak_mb']:>9.1f}"
              f"{r['peak_minus_baseline_mb']:>11.1f}{r['ratio_to_budget']:>7.2f}{r['seconds']:>7.2f}")
    result = dict(benchmark="reshard_memory", shape={**SHAPE, "n_layers": args.layers}, dtype="bfloat16",
                  target="peak - baseline <= 1.1 x (largest source shard + largest output shard) + 64 MB",
                  python=sys.version.split()[0], rows=rows)
    print(json.dumps(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["within_target"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
