"""``python -m llama.doctor``: what this machine offers for CPU inference, and what llama picks on it.

Prints, section by section: the CPU (model, the instruction-set flags that matter,
cores), the threads torch uses, torch's version and CPU capability, the measured read
bandwidth (and the batch-1 decode limits it sets), and the linear kernels that
:mod:`llama.kernel_choice` picks for each shape of a model, with the timings behind
each pick, and whether such a model's eager decode step then runs as one native call
(:mod:`llama.native_step`) or through its modules, and why. Usage::

    python -m llama.doctor                          # the Llama-2-7B shapes, float32, bfloat16 and int8
    python -m llama.doctor --ckpt_dir weights/llama-2-13b --model-parallel-size 2
    python -m llama.doctor --dtypes bfloat16 --remeasure   # ignore (and refresh) the cached choices
    python -m llama.doctor --prefill 128            # and each kernel's speed on a 128-token prefill

Choices come from the same cache as ``Llama.build`` (``$LLAMA_KERNEL_CACHE``): what is
shown is what a build on this machine runs, and a first run measures and fills it.
"""

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import kernel_choice, native_step, packed_linear
from .model import ModelArgs

GB = 1e9
# Llama-2-7B (params.json of Meta's download, vocab_size from its tokenizer)
LLAMA2_7B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": 32000}


def linear_shapes(args: ModelArgs, world: int = 1) -> List[Tuple[str, Tuple[int, int]]]:
    """(layer names, local weight shape) of each distinct linear layer of one rank of ``world``."""
    head_dim = args.dim // args.n_heads
    kv_heads = args.n_kv_heads or args.n_heads
    kv_rows = max(kv_heads // world, 1) * head_dim  # ranks that outnumber the kv heads hold one each
    hidden = args.ffn_hidden_dim
    layers = [
        ("wq", (args.n_heads * head_dim // world, args.dim)),
        ("wk wv", (kv_rows, args.dim)),
        ("wo", (args.dim, args.n_heads * head_dim // world)),
        ("w1 w3", (hidden // world, args.dim)),
        ("w2", (args.dim, hidden // world)),
        ("output", (args.vocab_size // world, args.dim)),
    ]
    names: Dict[Tuple[int, int], str] = {}
    for name, shape in layers:  # merge equal shapes: "wq wk wv wo" for plain attention
        names[shape] = f"{names[shape]} {name}" if shape in names else name
    return [(name, shape) for shape, name in names.items()]


def every_linear_shape(args: ModelArgs, world: int = 1) -> List[Tuple[int, int]]:
    """The local weight shape of each linear layer of one rank: every layer's, and the output layer's once."""
    return [shape for names, shape in linear_shapes(args, world) for name in names.split()
            for _ in range(1 if name == "output" else args.n_layers)]


def linear_bytes(args: ModelArgs, world: int, element_size: float) -> int:
    """Bytes of one rank's linear weights: every layer's, and the output layer's once."""
    return int(element_size * sum(rows * cols for rows, cols in every_linear_shape(args, world)))


def _ms(seconds_ms: float, nbytes: int) -> str:
    return f"{seconds_ms:8.3f} ms {nbytes / (seconds_ms / 1000) / GB:6.1f} GB/s"


def _section(title: str) -> None:
    print(f"\n== {title}")


def report(
    args: ModelArgs, world: int, dtypes: List[torch.dtype], int8: bool, remeasure: bool, bandwidth: bool, label: str,
    prefill: int = 0,
) -> int:
    facts = kernel_choice.cpu_facts()
    _section("CPU")
    print(f"model      {facts['model']} ({facts['id']}), {facts['arch']}")
    lack = [f for f in kernel_choice.FLAGS if f not in facts["flags"]]
    if facts["arch"] in ("x86_64", "AMD64", "i686"):
        lack = [f for f in lack if f not in ("asimd", "asimddp", "sve", "sve2", "bf16", "i8mm")]
    else:
        lack = [f for f in lack if f in ("asimd", "asimddp", "sve", "sve2", "bf16", "i8mm")]
    print(f"flags      have: {' '.join(facts['flags']) or '-'}")
    print(f"           lack: {' '.join(lack) or '-'}")
    quota = facts["cgroup_cpu_limit"]
    print(f"cores      {facts['physical_cores']} physical, {facts['logical_cpus']} logical CPUs; this process may use "
          f"{facts['usable_cpus']} CPUs = {facts['usable_cores']} physical cores"
          f"{f' (cgroup quota {quota:g} CPUs)' if quota else ''}; last-level cache {facts['llc_bytes'] >> 20} MiB")

    _section("Threads")
    print(f"torch      {kernel_choice.settle_threads()}")
    print(f"           interop threads {torch.get_num_interop_threads()}; torch's default without "
          f"OMP_NUM_THREADS: {kernel_choice.torch_default_threads()}")

    _section("torch")
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    onednn = torch.backends.mkldnn.is_available()
    print(f"version    torch {torch.__version__}; CPU capability {capability}; oneDNN {'yes' if onednn else 'no'}; "
          f"MKL {'yes' if torch.backends.mkl.is_available() else 'no'}")
    packing = ", ".join(f"{str(d).removeprefix('torch.')} {'yes' if packed_linear.packing_supported('cpu', d) else 'no'}"
                        for d in (torch.float32, torch.bfloat16, torch.float16))
    print(f"packing    oneDNN-packed weights: {packing}")

    _section("Memory bandwidth")
    read = None
    if bandwidth:
        read = kernel_choice.read_bandwidth(torch.device("cpu"))
        print(f"read       {read / GB:.1f} GB/s (best of 7 sums of a 1 GiB float32 array)")
        sizes = [(str(d).removeprefix("torch."), linear_bytes(args, world, torch.empty((), dtype=d).element_size()))
                 for d in dtypes] + ([("int8", linear_bytes(args, world, 1))] if int8 else [])
        print(f"limits     {label} batch-1 decode at most (linear weights read per token): "
              + ", ".join(f"{name} {read / nbytes:.1f} tok/s ({nbytes / GB:.2f} GB)" for name, nbytes in sizes))
    else:
        print("read       not measured (--no-bandwidth)")

    _section(f"Kernels ({label}, model parallel {world}: one rank's shapes; ms per call at decode batch sizes "
             f"{' and '.join(map(str, kernel_choice.DECODE_BATCHES))}, GB/s of weights read)")
    shapes = linear_shapes(args, world)
    runs = [(d, "float") for d in dtypes] + ([(torch.float32, "int8")] if int8 else [])
    attention: Dict[torch.dtype, str] = {}  # dtype -> the decode attention picked
    for dtype, layout in runs:
        element = 1 if layout == "int8" else torch.empty((), dtype=dtype).element_size()
        stream = linear_bytes(args, world, element)
        prefill_shapes = [("int8-prefill", s) for _, s in shapes] if layout == "int8" else []
        plan = kernel_choice.choose([(layout, s) for _, s in shapes] + prefill_shapes, torch.device("cpu"), dtype, {},
                                    stream_bytes=stream, use_cache=True, remeasure=remeasure)
        title = f"{str(dtype).removeprefix('torch.')}" + (" model, int8 weights (quantize='int8')" if layout == "int8" else "")
        busy = "" if plan.cpu_share is None else (
            f"; the timing got {plan.cpu_share:.0%} of its threads' time"
            + ("" if plan.cpu_share >= kernel_choice.QUIET_SHARE else ": the CPU was busy, not cached"))
        print(f"{title}  ({plan.measure_s:.1f} s to decide{busy})")
        for names, shape in shapes:
            choice = plan.choices[(layout, *shape)]
            nbytes = shape[0] * shape[1] * element
            print(f"  {shape[0]:>6}x{shape[1]:<6} {names:<14} -> {choice.kernel:<9} ({choice.source})")
            for kernel, per in choice.timings_ms.items():
                cells = "   ".join(f"b{b}: {_ms(t, nbytes)}" for b, t in sorted(per.items(), key=lambda kv: int(kv[0])))
                print(f"        {kernel:<9} {cells}")
        for _, shape in prefill_shapes:  # int8 weights' prefill (compute-bound: GFLOP/s)
            choice = plan.choices[("int8-prefill", *shape)]
            print(f"  prefill {shape[0]:>6}x{shape[1]:<6} -> {choice.kernel} ({choice.source})")
            for kernel, per in choice.timings_ms.items():
                cells = "   ".join(f"{r} rows: {float(t):8.3f} ms {2 * int(r) * shape[0] * shape[1] / float(t) / 1e6:6.0f} GFLOP/s"
                                   for r, t in sorted(per.items(), key=lambda kv: int(kv[0])))
                print(f"        {kernel:<19} {cells}")
        if dtype not in attention:  # the decode step's attention, over ATTENTION_KV_LEN cached positions (once per dtype)
            shape = (args.n_heads // world, max(1, args.kv_heads // world), args.head_dim, kernel_choice.ATTENTION_KV_LEN)
            choice = kernel_choice.choose([("attention", shape)], torch.device("cpu"), dtype, {}, remeasure=remeasure
                                          ).choices[("attention", *shape)]
            attention[dtype] = choice.kernel
            print(f"  attention: {shape[0]} heads, {shape[1]} kv heads of {shape[2]}, over {shape[3]} positions "
                  f"-> {choice.kernel} ({choice.source})")
            for kernel, per in choice.timings_ms.items():
                cells = "   ".join(f"b{b}: {float(t):8.3f} ms" for b, t in sorted(per.items(), key=lambda kv: int(kv[0])))
                print(f"        {kernel:<16} {cells}")
            prefill_shape = shape[:3]
            choice = kernel_choice.choose([("prefill-attention", prefill_shape)], torch.device("cpu"), dtype, {},
                                          remeasure=remeasure).choices[("prefill-attention", *prefill_shape)]
            print(f"  prefill attention: causal, a prompt from position 0 -> {choice.kernel} ({choice.source})")
            for kernel, per in choice.timings_ms.items():
                cells = "   ".join(f"{n} tokens: {float(t):8.3f} ms" for n, t in sorted(per.items(), key=lambda kv: int(kv[0])))
                print(f"        {kernel:<16} {cells}")
        # as Llama.build decides it: the picks above, or our kernels everywhere where the one-call step wins
        attention_key = ("attention", args.n_heads // world, max(1, args.kv_heads // world), args.head_dim, kernel_choice.ATTENTION_KV_LEN)
        plan.choices[attention_key] = kernel_choice.Choice(attention[dtype], "above")
        per_layer = [(layout, shape) for shape in every_linear_shape(args, world)]
        kernel_choice.prefer_one_call_step(plan, per_layer, args.n_layers, torch.device("cpu"), dtype, world=world)
        step = plan.step or {"one_call": False, "why": "not decided"}
        moved = [f"{shape[0]}x{shape[1]}" for _, shape in shapes if plan.choices[(layout, *shape)].source.endswith("one-call step")]
        estimate = step.get("estimate_ms")
        print(f"  decode step: {native_step.describe('' if step['one_call'] else step['why'])}"
              + (f"; {', '.join(moved)} put on {plan.kernel(layout, shapes[0][1])} for it" if moved else "")
              + ("" if not estimate else "; estimated ms per step, modules / one call: " + ", ".join(
                  f"b{b} {estimate['modules'][b]:.2f} / {estimate['one_call'][b]:.2f}" for b in estimate["modules"])))
    if prefill:
        _section(f"Prefill ({prefill} rows: compute-bound; each kernel on the largest per-layer shape, not cached)")
        names, shape = max(shapes[:-1], key=lambda item: item[1][0] * item[1][1])  # the output layer aside
        for dtype, layout in runs:
            if layout == "int8":  # the int8 layers' prefill kernels
                timings = kernel_choice.time_prefill(shape, dtype, kernel_choice.candidates(torch.device("cpu"), dtype,
                                                                                            "int8-prefill"), rows=(prefill,))
            else:
                timings = kernel_choice.time_kernels(shape, dtype, kernel_choice.candidates(torch.device("cpu"), dtype, layout),
                                                     batches=(prefill,))
            cells = "   ".join(f"{k} {1000 * t[prefill]:7.2f} ms {2 * prefill * shape[0] * shape[1] / t[prefill] / 1e9:6.0f} GFLOP/s"
                               for k, t in timings.items())
            print(f"{str(dtype).removeprefix('torch.') + (' int8' if layout == 'int8' else ''):<13} {shape[0]}x{shape[1]} "
                  f"({names}): {cells}")
    print(f"\ncache      {kernel_choice.cache_path()} (${kernel_choice.CACHE_ENV}); override with "
          f"${kernel_choice.KERNELS_ENV}=dense|gemv|packed|int8|int8-fp32|int8-gemv[,prefill-int8mm|prefill-dequantized]"
          f"[,sdpa|native-attention] or Llama.build(kernels=...)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama.doctor", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt_dir", "--ckpt-dir", type=Path, help="take the shapes from this checkpoint's params.json "
                   "(or config.json) instead of Llama-2-7B's")
    p.add_argument("--model-parallel-size", type=int, default=1, help="show one rank's shapes at this size (default 1)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="float dtypes to choose kernels for (default %(default)s)")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 (quantize='int8') kernels")
    p.add_argument("--remeasure", action="store_true", help="measure again, ignoring (and replacing) cached choices")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth measurement (1 GiB array)")
    p.add_argument("--prefill", type=int, default=0, metavar="ROWS", help="also time every kernel at ROWS rows "
                   "(a prompt's prefill, e.g. 128) on the largest per-layer shape")
    a = p.parse_args(argv)
    if a.ckpt_dir:
        from .checkpoint import open_checkpoint

        try:
            checkpoint = open_checkpoint(a.ckpt_dir)  # memory-mapped: reads params and the embedding's shape only
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--ckpt_dir: {e}")
        args, label = checkpoint.args, str(a.ckpt_dir)
        checkpoint.close()
    else:
        args, label = ModelArgs(**LLAMA2_7B), "Llama-2-7B shapes"
    dtypes = []
    for name in (n.strip() for n in a.dtypes.split(",") if n.strip()):
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            p.error(f"--dtypes: {name!r} is not a float dtype")
        dtypes.append(dtype)
    return report(args, a.model_parallel_size, dtypes, not a.no_int8, a.remeasure, not a.no_bandwidth, label, a.prefill)


if __name__ == "__main__":
    sys.exit(main())
