"""Prefill speed, piece by piece, in one process: each of our prefill kernels on and off, on the same model.

For a float32 and a bfloat16 model (random weights of a shape, built with ``Llama.build``, kernels as
chosen on this machine), prompts of several lengths from position 0 are prefilled with:

- the attention as chosen (ours, ``native-attention``) and torch's ``sdpa``;
- the RMSNorm and RoPE in one native call each, and torch's operators;

and, for an int8 model (``quantize="int8"``, float32 activations), its layers' prefill by
``prefill-dequantized`` and by torch's int8 matmul (``prefill-int8mm``). The ways alternate, round
after round, and the best time of each counts; the logits of each way are compared with the
first's. The float32 and bfloat16 models as built are then timed alternating, round after round (their
ratio, free of the machine's drift between sections). Last, the prefill attention alone
(``--attention-shapes``: the heads of those shapes), ours and torch's ``sdpa``, causal from position 0, in
GFLOP/s (4 * length^2 / 2 * head size per head: the causal half of Q K^T and P V), the two alternating
round by round. Run it alone on the machine::

    python benchmarks/prefill.py --shape 110m --threads 2 [--lengths 128,512,2000] [--attention-shapes 110m,7b] [--out results/NAME.json]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402  (benchmarks/bench.py: machine facts, random checkpoints)
from llama import Llama, kernel_choice, native  # noqa: E402
from llama.model import RMSNorm, Segments  # noqa: E402
from llama.parallel_layers import linear_layers  # noqa: E402


def ways_for(model, quantized: bool):
    """name -> function that switches the model to that way (the first: as built)."""
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    attention = model.layers[0].attention.prefill_attention
    fused = norms[0].fused
    real_ropes = native.ropes

    def use(attn=attention, fuse=fused, prefill=None):
        def switch():
            model.use_prefill_attention(attn)
            for n in norms:
                n.fused = fuse
            native.ropes = real_ropes if fuse else (lambda *a: False)
            if prefill is not None:
                for _, layer in linear_layers(model):
                    layer.prefill = prefill
        return switch

    if quantized:
        chosen = {layer.prefill for _, layer in linear_layers(model)}
        return {f"as chosen ({', '.join(sorted(map(str, chosen)))})": use(),
                "prefill-int8mm": use(prefill="prefill-int8mm"), "prefill-dequantized": use(prefill="prefill-dequantized")}
    return {f"as chosen (attention {attention}, fused norms {fused})": use(),
            "attention sdpa": use(attn="sdpa"), "torch norms and RoPE": use(fuse=False),
            "attention sdpa, torch norms and RoPE": use(attn="sdpa", fuse=False)}


def measure(model, ways, length: int, rounds: int) -> dict:
    tokens = torch.randint(0, model.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    segments, index = Segments([0], [0], [length]), torch.tensor([length - 1])
    best, logits = {}, {}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, switch in ways.items():
                switch()
                start = time.perf_counter()
                logits[name] = model.prefill(tokens, segments, index)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    first = next(iter(ways))
    next(iter(ways.values()))()  # back as built
    return {name: {"ms": round(1000 * t, 2), "tok_s": round(length / t, 1), "vs_first": round(best[first] / t, 3),
                   "logits_rel_diff": float((logits[name] - logits[first]).norm() / logits[first].norm())}
            for name, t in best.items()}


def attention_alone(shape: str, lengths, rounds: int, dtypes=(torch.float32, torch.bfloat16)) -> dict:
    """The prefill attention for the heads of ``shape``, as the kernel chooser times it
    (:func:`llama.kernel_choice.time_prefill_attention`) but for ``rounds`` rounds of 0.2 s, every
    kernel timed in every round: ms and GFLOP/s of ours and torch's per dtype and length."""
    params = bench.SHAPES[shape]
    heads = params["n_heads"]
    kv_heads, head_dim = params.get("n_kv_heads") or heads, params["dim"] // heads
    result = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    for dtype in dtypes:
        names = kernel_choice.prefill_attention_candidates(torch.device("cpu"), dtype, head_dim)
        best = kernel_choice.time_prefill_attention((heads, kv_heads, head_dim), dtype, names, lengths, rounds=rounds,
                                                    round_s=0.2, hopeless=float("inf"))
        label = str(dtype).removeprefix("torch.")
        result[label] = {name: {n: {"ms": round(1000 * t, 3), "gflop_s": round(4 * n * n / 2 * head_dim * heads / t / 1e9, 1)}
                                for n, t in per_length.items()} for name, per_length in best.items()}
        for name, per_length in result[label].items():
            cells = "   ".join(f"{n:5} tokens {r['ms']:9.3f} ms {r['gflop_s']:6.0f} GFLOP/s" for n, r in per_length.items())
            print(f"attention {shape:5} {heads}x{kv_heads}x{head_dim} {label:9} {name:17} {cells}")
    return result


def dtypes_alternating(models: dict, length: int, rounds: int) -> dict:
    """Each model as built (label -> model), alternating round after round on the same prompt: the best ms of
    each, and each one's speed against the first's (the bfloat16 / float32 ratio of a run, which a drift of the
    machine's speed between the sections above would skew)."""
    first = next(iter(models.values()))
    tokens = torch.randint(0, first.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    segments, index = Segments([0], [0], [length]), torch.tensor([length - 1])
    best = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for label, model in models.items():
                start = time.perf_counter()
                model.prefill(tokens, segments, index)
                best[label] = min(best.get(label, float("inf")), time.perf_counter() - start)
    base = next(iter(best.values()))
    return {label: {"ms": round(1000 * t, 2), "tok_s": round(length / t, 1), "vs_first": round(base / t, 3)}
            for label, t in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="110m", choices=sorted(bench.SHAPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lengths", default="128,512,2000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--attention-shapes", default="110m,7b", help="the heads to time the prefill attention alone for ('' for none)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    lengths = [int(n) for n in a.lengths.split(",")]
    params = dict(bench.SHAPES[a.shape])
    result = {"benchmark": "prefill, piece by piece", "shape": a.shape, "lengths": lengths, "rounds": a.rounds,
              "machine": bench.machine(torch.device("cpu"), torch.get_num_threads()), "runs": {}}
    kept = {}  # label -> the float models, for the alternating comparison
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, quantize in (("float32", None), ("bfloat16", None), ("float32", "int8")):
            work = Path(tmp) / dtype
            work.mkdir(exist_ok=True)
            paths = bench.write_random_checkpoint(work, params, dtype, 0, False)
            llama = Llama.build(paths["ckpt_dir"], paths["tokenizer"], max_seq_len=max(lengths), max_batch_size=1,
                                dtype=dtype, quantize=quantize)
            ways = ways_for(llama.model, quantize is not None)
            label = dtype + (" int8" if quantize else "")
            run = {"kernels": llama.model.kernel_plan.summary(), "lengths": {}}
            for length in lengths:
                run["lengths"][length] = measure(llama.model, ways, length, a.rounds)
                for name, r in run["lengths"][length].items():
                    print(f"{label:14} {length:5} tokens  {name:48} {r['ms']:9.1f} ms {r['tok_s']:8.0f} tok/s "
                          f"{r['vs_first']:6.2f}x of the first (logits {r['logits_rel_diff']:.1e})")
            result["runs"][label] = run
            if quantize is None:
                kept[label] = llama.model
            del llama, ways
            if len(kept) == 2:  # float32 and bfloat16 as built, in the same rounds; then freed, before the int8 model
                result["dtypes_alternating"] = {}
                for length in lengths:
                    result["dtypes_alternating"][length] = r = dtypes_alternating(kept, length, a.rounds)
                    print(f"alternating    {length:5} tokens  "
                          + "   ".join(f"{label} {x['ms']:8.1f} ms ({x['vs_first']:.2f}x)" for label, x in r.items()))
                kept.clear()
    result["attention"] = {shape: attention_alone(shape, lengths, a.rounds) for shape in filter(None, a.attention_shapes.split(","))}
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
