"""Peak resident memory of ``Llama.build`` on the CPU, per checkpoint format and dtype.

Writes a random checkpoint of the ~130M-parameter shape (dim 768, 12 layers, 12 heads,
vocabulary 32000) as Meta ``.pth`` and as Hugging Face safetensors, in float32 and
float16, then builds a float32 model from each in a fresh subprocess. Each child
reports its RSS after imports (the baseline), its peak RSS (``ru_maxrss``) after
``Llama.build``, and its peak after a one-token forward pass, which reads every
weight (an in-place memory-mapped load touches no weight pages until then).

    ratio = (peak RSS - baseline RSS) / bytes of the loaded weights

The target is ratio <= 1.25 plus a fixed overhead under 400 MB. Prints a table and
one JSON line, and writes ``benchmarks/results/load_memory.json``.

Usage: ``python benchmarks/load_memory.py [--tokenizer PATH] [--workdir DIR]``
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
DEFAULT_TOKENIZER = REPO.parent / "shared" / "llama2-tokenizer" / "tokenizer.model"
RESULTS = REPO / "benchmarks" / "results" / "load_memory.json"
SHAPE = dict(dim=768, n_layers=12, n_heads=12, multiple_of=256, norm_eps=1e-5)
MB = 2**20
sys.path.insert(0, str(REPO))  # run as a script from a checkout






def child(ckpt_dir: str, tokenizer: str) -> None:
    """Run in a fresh process: build a float32 model from ``ckpt_dir``; print one JSON line."""
    import torch

    from llama import Llama
    import llama.checkpoint  # noqa: F401 - everything the build imports, before the baseline
    import safetensors.torch  # noqa: F401

    torch.set_num_threads(2)
    baseline = rss_now()
    start = time.perf_counter()
    llama = Llama.build(ckpt_dir, tokenizer, max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    seconds = time.perf_counter() - start
    after_build = peak_rss()
    weight_bytes = sum(p.numel() * p.element_size() for p in llama.model.parameters())
    llama.model.forward(torch.tensor([[1]]), 0)
    after_forward = peak_rss()
    print(json.dumps(dict(baseline=baseline, build=after_build, forward=after_forward,
                          weight_bytes=weight_bytes, seconds=seconds)))


def write_checkpoints(workdir: Path, tokenizer: Path) -> dict:
    """Random checkpoints in both formats and both dtypes; returns {case name: directory}."""
    import torch

    from llama.checkpoint import InMemoryState, random_state_dict, save_checkpoint
    from llama.convert import convert_to_hf
    from llama.model import ModelArgs
    from llama.tokenizer import Tokenizer

    vocab = Tokenizer(str(tokenizer)).n_words
    args = ModelArgs(**SHAPE, vocab_size=vocab)
    cases = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        meta = workdir / f"meta-{name}"
        if not (meta / "consolidated.00.pth").is_file():
            state = random_state_dict(args, seed=0, dtype=dtype)
            save_checkpoint(InMemoryState(args, [state]), meta, 1, {**SHAPE, "vocab_size": vocab})
            del state
        hf_dir = workdir / f"hf-{name}"
        if not (hf_dir / "model.safetensors").is_file():
            convert_to_hf(meta, hf_dir, tokenizer=tokenizer)
        cases[f".pth {name}->fp32"] = meta
        cases[f"safetensors {name}->fp32"] = hf_dir
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="a 32000-piece tokenizer.model (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file (default: %(default)s)")
    parser.add_argument("--child", nargs=2, metavar=("CKPT_DIR", "TOKENIZER"), help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.write:
        print(json.dumps({k: str(v) for k, v in write_checkpoints(args.write, args.tokenizer).items()}))
        return 0
    if not args.tokenizer.is_file():
        print(f"error: tokenizer {args.tokenizer} not found; pass --tokenizer PATH/tokenizer.model", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="load_memory_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        # Linux carries a process's peak RSS across fork and exec, so this parent stays small
        # (no torch) and the checkpoints are written by a child of their own.
        written = subprocess.run(
            [sys.executable, __file__, "--write", str(workdir), "--tokenizer", str(args.tokenizer)],
            capture_output=True, text=True, check=False,
        )
        if written.returncode != 0:
            print(f"error: writing the checkpoints failed:\n{written.stderr}", file=sys.stderr)
            return 1
        cases = json.loads(written.stdout.strip().splitlines()[-1])
        rows = []
        for case, ckpt in cases.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(ckpt), str(args.tokenizer)],
                capture_output=True, text=True, check=False,
            )
            if out.returncode != 0:
                print(f"error: {case} failed:\n{out.stderr}", file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            w = r["weight_bytes"]
            rows.append(dict(
                case=case,
                weight_mb=round(w / MB, 1),
                baseline_mb=round(r["baseline"] / MB, 1),
                build_peak_mb=round(r["build"] / MB, 1),
                forward_peak_mb=round(r["forward"] / MB, 1),
                ratio_build=round((r["build"] - r["baseline"]) / w, 3),
                ratio_forward=round((r["forward"] - r["baseline"]) / w, 3),
                within_target=(r["forward"] - r["baseline"]) <= 1.25 * w + 400 * MB,
                load_seconds=round(r["seconds"], 2),
            ))

    header = f"{'case':<26}{'weights MB':>11}{'baseline MB':>12}{'peak build':>11}{'ratio':>7}{'peak +fwd':>11}{'ratio':>7}"
    print(header)
    for r in rows:
        print(f"{r['case']:<26}{r['weight_mb']:>11.1f}{r['baseline_mb']:>12.1f}{r['build_peak_mb']:>11.1f}"
              f"{r['ratio_build']:>7.2f}{r['forward_peak_mb']:>11.1f}{r['ratio_forward']:>7.2f}")
    result = dict(benchmark="load_memory", shape=SHAPE, python=sys.version.split()[0], rows=rows)
    print(json.dumps(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["within_target"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
