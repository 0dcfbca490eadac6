"""Mixed prompt lengths: the engine against transformers and against the lockstep decoder it replaced.

Three implementations generate greedily from the same random weights, each in a child
process of its own (same threads, same checkpoint, loaded the same way):

* ``ours``: this checkout's ``Llama.generate`` (every cache row at its own position,
  continuous batching over ``max_batch_size`` slots);
* ``lockstep``: the same call on the package as it was at ``--baseline`` (default
  302131d, the last commit before the engine), whose rows share one position: a row
  with a longer prompt is fed the rest of it one token per step, and prompts beyond
  ``max_batch_size`` run as successive batches;
* ``hf``: transformers' ``LlamaForCausalLM.generate``, prompts left-padded, in batches
  of ``max_batch_size``.

Workloads (exactly ``new`` tokens per row: EOS never occurs):

* ``pair``: a 16-token and a 400-token prompt in one batch, 64 new tokens;
* ``sixteen``: 16 prompts of 8..400 tokens, ``max_batch_size`` 8, 64 new tokens;
* ``sixty_four``: 64 prompts of 8..400 tokens (random lengths), ``max_batch_size`` 8, 32 new tokens;
* ``equal_1`` / ``equal_8``: 1 and 8 prompts of 128 tokens; decode tok/s from the time
  of a 64-token generation minus a 1-token one (what per-row positions cost the common case).

Reported: seconds per workload (median of ``--repeats``, each after a warm-up run),
tokens/s, the ratio of ours to each peer, and whether the tokens are the same.

``--paired`` measures the ``equal_*`` decode rates of ours and lockstep in one process
instead (the old package imported as ``llama_lockstep``), alternating the two call by
call, so that a change in machine load hits both alike: the figure to trust for a 5%
difference on a shared machine.

    python benchmarks/mixed.py --shape 110m --threads 2 --repeats 2 --out benchmarks/results/cpu_110m_mixed.json
    python benchmarks/mixed.py --shape tiny --repeats 1            # smoke test
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench import SHAPES, NoEosTokenizer, hf_from_pretrained, machine, write_checkpoint_in_child  # noqa: E402

BASELINE = "302131d"
IMPLS = ("ours", "lockstep", "hf")


def workloads(vocab_size: int) -> Dict[str, dict]:
    import random

    rng = random.Random(0)

    def prompts(lengths):
        return [[1] + [rng.randrange(3, vocab_size) for _ in range(n - 1)] for n in lengths]

    sixteen = [8 + round(i * (400 - 8) / 15) for i in range(16)]
    rng_lengths = random.Random(1)
    sixty_four = [rng_lengths.randint(8, 400) for _ in range(64)]
    return {
        "pair": dict(prompts=prompts([16, 400]), new=64, batch=2),
        "sixteen": dict(prompts=prompts(sixteen), new=64, batch=8),
        "sixty_four": dict(prompts=prompts(sixty_four), new=32, batch=8),
        "equal_1": dict(prompts=prompts([128]), new=64, batch=1, decode=True),
        "equal_8": dict(prompts=prompts([128] * 8), new=64, batch=8, decode=True),
    }


# ----------------------------------------------------------------------------- children


def child(args) -> None:
    """Run every workload with one implementation; print the timings as one JSON line."""
    if args.package_root:
        sys.path.insert(0, args.package_root)
    import torch

    torch.set_num_threads(args.threads)
    work = json.loads(Path(args.workloads).read_text())
    max_seq_len = 512
    if args.impl == "hf":
        import transformers

        transformers.logging.set_verbosity_error()
        model = hf_from_pretrained(args.hf_dir, torch.device("cpu"), torch.float32)
        origin = transformers.__file__

        @torch.inference_mode()
        def generate(prompts, new, batch):
            out = []
            for start in range(0, len(prompts), batch):
                chunk = prompts[start : start + batch]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])  # left-padded
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
                config = transformers.GenerationConfig(
                    max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1, temperature=None,
                    top_p=None, top_k=None, eos_token_id=None, pad_token_id=0, bos_token_id=1, disable_compile=True,
                )
                gen = model.generate(ids, attention_mask=mask, generation_config=config)
                out += gen[:, width:].tolist()
            return out
    else:
        import llama as package
        from llama import Llama

        origin = package.__file__
        built = {}

        def generate(prompts, new, batch):
            if batch not in built:  # max_batch_size is the workload's batch
                built.clear()
                llama = Llama.build(args.ckpt_dir, args.tokenizer, max_seq_len, batch, device="cpu", dtype="float32")
                llama.tokenizer = NoEosTokenizer()
                built[batch] = llama
            tokens, _ = built[batch].generate(prompts, max_gen_len=new, temperature=0.0)
            return tokens

    results = {"origin": origin}
    for name in args.only.split(","):
        w = work[name]
        generate(w["prompts"], 2, w["batch"])  # warm-up: builds, first-touch of the weights
        times, ones = [], []
        for _ in range(args.repeats):
            if w.get("decode"):
                start = time.perf_counter()
                generate(w["prompts"], 1, w["batch"])
                ones.append(time.perf_counter() - start)
            start = time.perf_counter()
            tokens = generate(w["prompts"], w["new"], w["batch"])
            times.append(time.perf_counter() - start)
        results[name] = {"seconds": times, "one_token_seconds": ones, "tokens": tokens}
    print(json.dumps(results))


def paired_child(args) -> None:
    """``equal_*`` decode rates of ours and lockstep, alternating call by call in this one process."""
    import importlib

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.package_root)  # holds llama_lockstep/, the baseline package renamed
    from llama import Llama

    old = importlib.import_module("llama_lockstep")
    work = json.loads(Path(args.workloads).read_text())
    results = {"origin": f"{Path(Llama.__module__).name} and {old.__file__}"}
    for name in args.only.split(","):
        w = work[name]
        built = {}
        for impl, cls in (("ours", Llama), ("lockstep", old.Llama)):
            built[impl] = cls.build(args.ckpt_dir, args.tokenizer, 512, w["batch"], device="cpu", dtype="float32")
            built[impl].tokenizer = NoEosTokenizer()
            built[impl].generate(w["prompts"], 2, temperature=0.0)  # warm-up
        times = {impl: {"one": [], "all": []} for impl in built}
        tokens = {}
        for _ in range(args.repeats):
            for impl, llama in built.items():
                start = time.perf_counter()
                llama.generate(w["prompts"], 1, temperature=0.0)
                times[impl]["one"].append(time.perf_counter() - start)
                start = time.perf_counter()
                tokens[impl], _ = llama.generate(w["prompts"], w["new"], temperature=0.0)
                times[impl]["all"].append(time.perf_counter() - start)
        for impl in built:
            results.setdefault(impl, {})[name] = {"seconds": times[impl]["all"], "one_token_seconds": times[impl]["one"],
                                                  "tokens": tokens[impl]}
        del built
    print(json.dumps(results))


def run_child(impl: str, args, paths: dict, workloads_file: Path, package_root: str, only: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--workloads", str(workloads_file),
           "--ckpt-dir", paths["ckpt_dir"], "--tokenizer", paths["tokenizer"], "--hf-dir", paths.get("hf_dir", ""),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--only", only]
    if package_root:
        cmd += ["--package-root", package_root]
    env = dict(os.environ, PYTHONPATH=(package_root if impl == "lockstep" else "") or str(REPO))
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{impl}: done in {time.perf_counter() - start:.0f} s ({out['origin']})", flush=True)
    return out


# ----------------------------------------------------------------------------- parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="110m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--baseline", default=BASELINE, help="git revision of the lockstep decoder (default %(default)s)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of %(default)s")
    p.add_argument("--only", default="pair,sixteen,sixty_four,equal_1,equal_8", help="comma-separated workloads")
    p.add_argument("--paired", action="store_true", help="equal_* decode of ours and lockstep alternating in one process")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", choices=IMPLS + ("paired",), help=argparse.SUPPRESS)
    for hidden in ("--workloads", "--ckpt-dir", "--tokenizer", "--hf-dir", "--package-root", "--impl"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.impl = args.child
        paired_child(args) if args.child == "paired" else child(args)
        return 0
    if args.paired:
        args.impls, args.only = "ours,lockstep", ",".join(n for n in args.only.split(",") if n.startswith("equal"))

    import torch

    impls = args.impls.split(",")
    params = dict(SHAPES[args.shape])
    with tempfile.TemporaryDirectory(prefix="bench_mixed_") as tmp:
        tmp = Path(tmp)
        paths = write_checkpoint_in_child(tmp, params, "float32", 0, "hf" in impls)
        work = workloads(params["vocab_size"])
        workloads_file = tmp / "workloads.json"
        workloads_file.write_text(json.dumps(work))
        baseline_root = ""
        if "lockstep" in impls:
            baseline_root = str(tmp / "baseline")
            os.makedirs(baseline_root)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "llama"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", baseline_root], input=archive.stdout, check=True)
        if args.paired:  # the baseline as package llama_lockstep (its custom operator renamed to match)
            renamed = Path(baseline_root) / "llama_lockstep"
            (Path(baseline_root) / "llama").rename(renamed)
            for f in renamed.glob("*.py"):
                f.write_text(f.read_text().replace('"llama::', '"llama_lockstep::'))
            paired = run_child("paired", args, paths, workloads_file, baseline_root, args.only)
            raw = {impl: paired[impl] for impl in impls}
        else:
            raw = {impl: run_child(impl, args, paths, workloads_file, baseline_root if impl == "lockstep" else "", args.only)
                   for impl in impls}

    rows = []
    for name in args.only.split(","):
        w = work[name]
        row = {"workload": name, "prompts": len(w["prompts"]), "prompt_lengths": [min(map(len, w["prompts"])),
               max(map(len, w["prompts"]))], "new_tokens": w["new"], "max_batch_size": w["batch"]}
        for impl in impls:
            r = raw[impl][name]
            seconds = statistics.median(r["seconds"])
            row[f"{impl}_s"] = seconds
            row[f"{impl}_tok_s"] = len(w["prompts"]) * w["new"] / seconds
            if w.get("decode"):
                decode = statistics.median(b - a for a, b in zip(r["one_token_seconds"], r["seconds"]))
                row[f"{impl}_decode_tok_s"] = len(w["prompts"]) * (w["new"] - 1) / decode
        for impl in impls[1:]:
            key = "decode_tok_s" if w.get("decode") else "tok_s"
            row[f"ours_vs_{impl}"] = row[f"ours_{key}"] / row[f"{impl}_{key}"]
            row[f"same_tokens_as_{impl}"] = raw["ours"][name]["tokens"] == raw[impl][name]["tokens"]
        rows.append(row)

    result = {"benchmark": "mixed", "shape": args.shape, "threads": args.threads, "repeats": args.repeats,
              "baseline": args.baseline, "paired": args.paired, "results": rows, "machine": machine(torch.device("cpu"), args.threads)}
    print()
    print(f"{args.shape}, float32, {args.threads} threads, {result['machine']['cpu']}; median of {args.repeats}; "
          f"lockstep = {args.baseline}")
    header = f"{'workload':<11} {'rows':>4} {'new':>4} " + "".join(f"{i + ' s':>12}" for i in impls) + \
        "".join(f"{'vs ' + i:>12}" for i in impls[1:]) + "  same tokens"
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row['workload']:<11} {row['prompts']:>4} {row['new_tokens']:>4} "
        line += "".join(f"{row[i + '_s']:>12.2f}" for i in impls)
        line += "".join(f"{row['ours_vs_' + i]:>11.2f}x" for i in impls[1:])
        line += "  " + ", ".join(i for i in impls[1:] if row[f"same_tokens_as_{i}"])
        print(line)
        if "ours_decode_tok_s" in row:
            print(" " * 21 + "decode tok/s: " + ", ".join(f"{i} {row[i + '_decode_tok_s']:.1f}" for i in impls))
    print("(equal_* rows compare decode tok/s; the others whole-workload throughput)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
