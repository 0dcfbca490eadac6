"""Linear kernels chosen by measurement, per machine.

Which kernel computes ``x @ W.T`` fastest for a decode step depends on the CPU: oneDNN on
weights packed once (:mod:`llama.packed_linear`) was 1.3x MKL's ``sgemm`` at batch 1 on
an AMD EPYC without AVX-512, and 0.8x on an Intel Xeon with AMX. So nothing is hard-wired:
for each distinct linear shape and dtype of a model, the candidate kernels of
:data:`llama.linear_kernels.KERNELS` that apply are timed on random weights of that
shape (never the real ones), at the decode batch sizes the model will run
(:func:`decode_batches`: 1, and up to 8 where its cache has that many rows), and the
fastest is kept:

- float weights: ``dense`` (``F.linear``: MKL / oneDNN), ``gemv`` (our own
  matrix-vector kernels on the same dense tensor, :mod:`llama.native`, where they build:
  x86-64 with AVX2 or AVX-512, a C++ compiler, torch on GNU OpenMP) and ``packed``
  (oneDNN's blocked layout, where this CPU can pack the dtype: float32 always, bfloat16
  with AVX512-BF16 or AMX);
- int8 weights (``quantize="int8"``): ``int8`` (``aten._weight_int8pack_mm`` with
  bfloat16 activations for a float32 model), ``int8-fp32`` (float32 activations) and
  ``int8-gemv`` (our AVX512-VNNI kernel, or AVX2 on CPUs without VNNI,
  :func:`llama.native.int8_linear`, where it builds).

The prefill of int8 layers (more rows than a decode step: compute-bound) is chosen the same way,
timed at :data:`PREFILL_ROWS` rows (layout ``"int8-prefill"``): ``prefill-int8mm`` (torch's
int8 matmul, what the int8 kernels run by default) or ``prefill-dequantized`` (blocks of rows
dequantized by our kernel, then oneDNN's GEMM: :func:`llama.linear_kernels.int8_prefill_dequantized`).

The decode step's attention is chosen the same way (layout ``"attention"``, shape heads x
kv heads x head size x the positions it is timed over): ``sdpa`` (torch's
``scaled_dot_product_attention``) or ``native-attention`` (:func:`llama.native.decode_attention`,
where it builds), which brings the RMSNorm and RoPE in one native call each; and a prefill's
(layout ``"prefill-attention"``, heads x kv heads x head size, timed causal over
:data:`PREFILL_ATTENTION_LENGTHS` tokens): ``sdpa`` or ``native-attention``
(:func:`llama.native.prefill_attention`). An override of the attention names both.

Each measurement streams through enough copies of the weight to leave the cache, as a
decode step does, unless the model's linear weights fit in the last-level cache anyway.
A decision is cached in ``$LLAMA_KERNEL_CACHE`` (default ``~/.cache/llama/kernels.json``),
keyed by the CPU (model, family/model/stepping, the flags that matter), torch version,
threads, dtype, shape and candidates, so a choice made on another CPU or torch is never
reused. A measurement during which other work took the cores (the process got less than
:data:`QUIET_SHARE` of its threads' time) is used but not cached: it is taken again at
the next build. ``LLAMA_KERNELS`` or ``Llama.build(kernels=...)`` overrides it (see
:func:`parse_override`); then nothing is measured and the choice is deterministic.

Model parallel: every rank decides (cached, or measured on its own shard's shapes),
then all take rank 0's plan (:func:`agree`), so the ranks run the same kernels.
``python -m llama.doctor`` shows the facts and the choices with their timings.
"""

import functools
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, linear_kernels, native, native_step, packed_linear
from .parallel_layers import linear_layers

KERNELS_ENV = "LLAMA_KERNELS"
CACHE_ENV = "LLAMA_KERNEL_CACHE"
CACHE_VERSION = 1
DECODE_BATCHES = (1, 8)  # the batch sizes a decision is timed at, for a model whose cache has 8 rows or more
# A kernel other than the layout's default (dense, int8) is kept only if it is this much
# faster (relative score below): decisions do not flip on timing noise.
MARGIN = 0.03
_ROUNDS = 3  # interleaved rounds per candidate and batch; the best round counts
_ROUND_S = 0.02  # seconds of passes over the copies per round (at least one)
_HOPELESS = 3.0  # a kernel this many times slower than the fastest after a round is not timed further
_MIN_STREAM_BYTES = 64 << 20  # stream at least this much per pass (or 2x the last-level cache)
_MAX_TIMED_ELEMENTS = 1 << 26  # larger weights (e.g. the output layer) are timed on their first rows
# The share of its threads' wall time that a measurement must get as CPU time to be cached.
# Alone on a 2-core Zen 5, timing a 110m model's kernels ran at 0.92-1.00 of 2 threads; beside two
# busy processes at 0.48, and it picked dense where packed is 1.8x faster.
QUIET_SHARE = 0.75
ATTENTION_KERNELS = ("sdpa", "native-attention")  # the decode step's attention (llama.model.Attention.decode_attention)
NATIVE_KERNELS = ("gemv", "int8-gemv", "native-attention", "prefill-dequantized")  # ours: llama.native
ATTENTION_KV_LEN = 512  # cached positions the decode attention is timed over (fewer where the cache holds fewer)
# the rows an int8 layer's prefill kernels are timed at (layout "int8-prefill"): from the fewest that may run one
PREFILL_ROWS = (linear_kernels.DEQUANTIZED_MIN_ROWS, 128)
PREFILL_ATTENTION_LENGTHS = (128, 512)  # the prompt lengths a prefill's attention is timed at (layout "prefill-attention")

# The CPU flags that decide which kernels are fast (x86 /proc/cpuinfo names; ARM "Features").
FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
    "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm",
)


# ----------------------------------------------------------------------------- machine facts


def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _sysctl(name: str) -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cpu_ids(cpus: Iterable[int]) -> List[Tuple[str, str]]:
    """(package, core) of each CPU number, from sysfs (a CPU without topology counts as its own core)."""
    ids = []
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        ids.append((_read(base + "physical_package_id") or "?", _read(base + "core_id") or f"cpu{cpu}"))
    return ids


def _online_cpus() -> List[int]:
    text = _read("/sys/devices/system/cpu/online")
    if not text:
        return list(range(os.cpu_count() or 1))
    cpus: List[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _cgroup_cpu_limit() -> Optional[float]:
    """CPUs allowed by a cgroup quota (containers' ``--cpus``), or None."""
    text = _read("/sys/fs/cgroup/cpu.max")  # cgroup v2: "max 100000" or "200000 100000"
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


@functools.lru_cache(maxsize=None)
def cpu_facts() -> Dict[str, object]:
    """What the kernel choice depends on, and what ``llama.doctor`` shows.

    ``model`` (the marketing name, which can be as vague as "AMD EPYC"), ``id``
    (family/model/stepping on x86, implementer/part on ARM), ``flags`` (those of
    :data:`FLAGS` this CPU has), ``physical_cores`` and ``logical_cpus`` (the machine's),
    ``usable_cpus`` (this process's affinity), ``usable_cores`` (physical cores among
    them, capped by a cgroup CPU quota), ``llc_bytes`` (last-level cache, 0 if unknown).
    """
    info = _cpuinfo()
    model = info.get("model name") or _sysctl("machdep.cpu.brand_string") or platform.processor() or platform.machine()
    if "cpu family" in info:
        ident = f"family {info.get('cpu family')} model {info.get('model')} stepping {info.get('stepping')}"
    elif "CPU implementer" in info:
        ident = f"implementer {info.get('CPU implementer')} part {info.get('CPU part')}"
        model = info.get("model name") or f"ARM {ident}"
    else:
        ident = platform.machine()
    have = set((info.get("flags") or info.get("Features") or "").split())
    if platform.system() == "Darwin":  # Apple silicon: NEON always; sysctl hw.optional.arm.FEAT_* for the rest
        have |= {"asimd"} | {f for f, s in (("bf16", "FEAT_BF16"), ("i8mm", "FEAT_I8MM"), ("asimddp", "FEAT_DotProd"))
                             if _sysctl(f"hw.optional.arm.{s}") == "1"}
    online = _online_cpus()
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else online
    physical = len(set(_cpu_ids(online))) or len(online)
    usable_cores = len(set(_cpu_ids(usable))) or len(usable)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        usable_cores = max(1, min(usable_cores, int(limit + 0.5)))
    llc = 0
    for index in range(4, -1, -1):
        size = _read(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        if size:
            number = int(re.sub(r"\D", "", size) or 0)
            llc = number << (20 if size.endswith("M") else 10 if size.endswith("K") else 0)
            break
    return {
        "model": model,
        "id": ident,
        "arch": platform.machine(),
        "flags": [f for f in FLAGS if f in have],
        "physical_cores": physical,
        "logical_cpus": len(online),
        "usable_cpus": len(usable),
        "usable_cores": usable_cores,
        "cgroup_cpu_limit": limit,
        "llc_bytes": llc,
    }


def describe_cpu(facts: Optional[dict] = None) -> str:
    """One line: model, id, flags."""
    facts = facts or cpu_facts()
    return f"{facts['model']} ({facts['id']}; {' '.join(facts['flags']) or 'no listed flags'})"


# ----------------------------------------------------------------------------- threads


def torch_default_threads() -> int:
    """The intra-op thread count torch picks without OMP_NUM_THREADS/MKL_NUM_THREADS: the
    machine's physical cores (cpuinfo's count; it ignores affinity masks and cgroup quotas)."""
    facts = cpu_facts()
    return facts["physical_cores"] if facts["physical_cores"] < facts["logical_cpus"] else facts["logical_cpus"]


def settle_threads() -> str:
    """Use the physical cores this process may run on, unless told otherwise; says what it did.

    torch's default is right on a whole machine: one thread per physical core. It is wrong
    where the process may use fewer cores than the machine has (``taskset``, a container's
    cpuset or CPU quota): threads then outnumber cores and each step waits for descheduled
    ones. Only that case is changed, and only while the thread count is still torch's
    default: ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``torch.set_num_threads`` are respected.
    """
    current = torch.get_num_threads()
    for env in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(env):
            return f"{current} threads ({env}={os.environ[env]})"
    default, usable = torch_default_threads(), cpu_facts()["usable_cores"]
    if current != default:
        return f"{current} threads (torch.set_num_threads)"
    if usable < current:
        torch.set_num_threads(usable)
        return f"{usable} threads: the physical cores this process may use (torch's default was {current}, the machine's)"
    return f"{current} threads (torch's default: the physical cores)"


# ----------------------------------------------------------------------------- bandwidth


def _sync(device: torch.device) -> None:
    if distributed.is_cuda(device):
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device = torch.device("cpu"), repeats: int = 7, nbytes: Optional[int] = None) -> float:
    """Read bandwidth in bytes/s: best of ``repeats`` sums of a float32 array of ``nbytes``
    (default 1 GiB on the CPU, 4 GiB on a GPU), written first so that every page is there."""
    device = torch.device(device)
    nbytes = nbytes or (4 << 30 if distributed.is_cuda(device) else 1 << 30)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


# ----------------------------------------------------------------------------- candidates and timing


def candidates(device: torch.device, dtype: torch.dtype, layout: str) -> List[str]:
    """Kernel names that can run a ``layout`` (``"float"``, ``"int8"``, or ``"int8-prefill"``: an int8
    weight's prefill) weight of a ``dtype`` model on ``device``; the layout's default first."""
    cpu = torch.device(device).type == "cpu"
    if layout == "int8-prefill":
        names = ["prefill-int8mm"]
        if cpu and native.dequantize_available(dtype, cpu_facts()["flags"]):
            names.append("prefill-dequantized")
        return names
    if layout == "int8":
        names = ["int8", "int8-fp32"] if cpu and dtype == torch.float32 else ["int8"]
        if cpu and native.int8_available(dtype, cpu_facts()["flags"]):
            names.append("int8-gemv")
        return names
    names = ["dense"]
    if cpu and native.available(dtype, cpu_facts()["flags"]):
        names.append("gemv")
    if packed_linear.packing_supported(device, dtype):
        names.append("packed")
    return names


def attention_candidates(device: torch.device, dtype: torch.dtype, head_dim: int, prefill: bool = False) -> List[str]:
    """The attention kernels (a decode step's, or with ``prefill`` a prefill's) that can run heads of
    ``head_dim`` in ``dtype`` on ``device``; ``sdpa`` first."""
    ours = native.prefill_attention_available if prefill else native.attends
    cpu = torch.device(device).type == "cpu"
    if cpu and native.available(dtype, cpu_facts()["flags"]) and ours(dtype, head_dim):
        return ["sdpa", "native-attention"]
    return ["sdpa"]


def prefill_attention_candidates(device: torch.device, dtype: torch.dtype, head_dim: int) -> List[str]:
    """:func:`attention_candidates` for a prefill."""
    return attention_candidates(device, dtype, head_dim, prefill=True)


def time_prefill_attention(
    shape: Tuple[int, int, int],
    dtype: torch.dtype,
    names: List[str],
    lengths: Iterable[int] = PREFILL_ATTENTION_LENGTHS,
    seed: int = 0,
    usage: Optional[Dict[str, float]] = None,
    rounds: int = _ROUNDS,
    round_s: float = _ROUND_S,
    hopeless: float = _HOPELESS,
) -> Dict[str, Dict[int, float]]:
    """Seconds per call of each prefill attention kernel of ``names`` for ``shape`` = (heads, kv
    heads, head size), per prompt length: a whole prompt from position 0 over random keys and
    values in a cache row, as :class:`llama.model.Attention` attends in a prefill. ``rounds``,
    ``round_s``, ``hopeless``: as :func:`_best_of_rounds` (a benchmark times every kernel every
    round with ``hopeless=inf``)."""
    heads, kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    lengths = list(lengths)
    data = {}
    for n in lengths:
        q = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
        k, v = (torch.randn(kv_heads, n, head_dim, generator=gen).to(dtype) for _ in range(2))
        data[n] = (q, k, v)

    def call(name: str, n: int) -> None:
        q, k, v = data[n]
        if name == "sdpa":  # what llama.model.Attention runs: (1, heads, n, head_dim) against the row, causal
            F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True,
                                           enable_gqa=heads != kv_heads)
        else:
            native.prefill_attention(q, k, v, 0)

    return _best_of_rounds(lambda name, n: _seconds_per_call(lambda: call(name, n), round_s / 4), names, lengths, usage,
                           rounds=rounds, round_s=round_s, hopeless=hopeless)


def time_attention(
    shape: Tuple[int, int, int, int],
    dtype: torch.dtype,
    names: List[str],
    batches: Iterable[int] = DECODE_BATCHES,
    seed: int = 0,
    usage: Optional[Dict[str, float]] = None,
) -> Dict[str, Dict[int, float]]:
    """Seconds per call of each decode attention kernel of ``names`` for ``shape`` = (heads,
    kv heads, head size, cached positions), per batch size: one query per row over random
    keys and values, as a decode step attends (no mask: every row at the same position).
    Timed as :func:`time_kernels` times (:func:`_best_of_rounds`)."""
    heads, kv_heads, head_dim, kv_len = shape
    gen = torch.Generator().manual_seed(seed)
    batches = list(batches)
    data = {}
    for b in batches:
        k, v = (torch.randn(b, kv_heads, kv_len, head_dim, generator=gen).to(dtype) for _ in range(2))
        data[b] = (torch.randn(b, heads, head_dim, generator=gen).to(dtype), k, v, torch.full((b,), kv_len, dtype=torch.long))

    def call(name: str, b: int) -> None:
        q, k, v, lengths = data[b]
        if name == "sdpa":  # what llama.model.Attention runs: (b, heads, 1, head_dim) against the cache
            F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=heads != kv_heads)
        else:
            native.decode_attention(q, k, v, lengths)

    return _best_of_rounds(lambda name, b: _seconds_per_call(lambda: call(name, b), _ROUND_S / 8), names, batches, usage)


def _seconds_per_call(call, least_s: float) -> float:
    """Seconds per call of ``call()``, called until ``least_s`` have passed (a pass of :func:`_best_of_rounds`)."""
    calls, start = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= least_s:
            return elapsed / calls


def _best_of_rounds(one_pass, names: List[str], batches: List[int], usage: Optional[Dict[str, float]], rounds: int = _ROUNDS,
                    round_s: float = _ROUND_S, hopeless: float = _HOPELESS) -> Dict[str, Dict[int, float]]:
    """The best of ``one_pass(name, b)`` (seconds per call) for each kernel and batch size: one
    warm-up pass each, then ``rounds`` rounds interleaving kernels within each batch size,
    passes for ``round_s`` seconds per kernel and round (the fastest pass counts: others were
    disturbed), a kernel ``hopeless`` times slower than the fastest after a round not timed
    further. The wall and process CPU seconds spent are added to ``usage``."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for name in names:  # warm-up: oneDNN makes its primitives on first use
            for b in batches:
                one_pass(name, b)
        best = {name: {b: float("inf") for b in batches} for name in names}
        for round_ in range(rounds):
            for b in batches:
                fastest = min(best[name][b] for name in names)
                for name in names:
                    if round_ and best[name][b] > hopeless * fastest:  # far behind after a round: not worth more time
                        continue
                    start = time.perf_counter()
                    while True:
                        best[name][b] = min(best[name][b], one_pass(name, b))
                        if time.perf_counter() - start >= round_s:
                            break
    if usage is not None:
        usage["wall_s"] = usage.get("wall_s", 0.0) + time.perf_counter() - wall0
        usage["cpu_s"] = usage.get("cpu_s", 0.0) + time.process_time() - cpu0
    return best


def _timed_rows(shape: Tuple[int, int]) -> int:
    """The rows of a ``shape`` weight a timing uses: all, or the first of one above ``_MAX_TIMED_ELEMENTS``."""
    return min(shape[0], max(64, _MAX_TIMED_ELEMENTS // shape[1]))


def _random_layer(kernel: str, shape: Tuple[int, int], dtype: torch.dtype, gen: torch.Generator) -> SimpleNamespace:
    """What a kernel reads of a layer (``weight``, ``scales``), random, in that kernel's layout."""
    out_features, in_features = shape
    if kernel.startswith("int8"):
        weight = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
        scale_dtype = torch.float32 if kernel in ("int8-fp32", "int8-gemv") else torch.bfloat16 if dtype == torch.float32 else dtype
        return SimpleNamespace(weight=weight, scales=(torch.rand(out_features, generator=gen) / 1000).to(scale_dtype))
    weight = (torch.rand(shape, generator=gen) - 0.5).to(dtype)
    if kernel == "packed":
        weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    return SimpleNamespace(weight=weight)


def time_kernels(
    shape: Tuple[int, int],
    dtype: torch.dtype,
    names: List[str],
    batches: Iterable[int] = DECODE_BATCHES,
    stream_bytes: Optional[int] = None,
    seed: int = 0,
    usage: Optional[Dict[str, float]] = None,
) -> Dict[str, Dict[int, float]]:
    """Seconds per call of each kernel of ``names`` on random ``shape`` weights, per batch size.

    ``usage``: the wall and process CPU seconds of the timed calls (not of making the
    random weights) are added to its ``"wall_s"`` and ``"cpu_s"``.

    Each kernel cycles through copies of its weight adding up to ``stream_bytes`` (at
    least one copy), so that it reads them from memory as a decode step does, rather
    than from cache; :func:`_best_of_rounds` keeps each kernel's best pass. Shapes above
    ``_MAX_TIMED_ELEMENTS`` are timed on their first rows.
    """
    rows = _timed_rows(shape)
    timed_shape = (rows, shape[1])
    gen = torch.Generator().manual_seed(seed)
    batches = list(batches)
    layers: Dict[str, list] = {}
    for name in names:
        first = _random_layer(name, timed_shape, dtype, gen)
        size = rows * shape[1] * (1 if name.startswith("int8") else torch.empty((), dtype=dtype).element_size())
        copies = max(1, -(-(stream_bytes or 0) // size))
        layers[name] = [first] + [_random_layer(name, timed_shape, dtype, gen) for _ in range(copies - 1)]
    inputs = {b: torch.rand(b, shape[1], generator=gen).to(dtype) for b in batches}

    def one_pass(name: str, b: int) -> float:  # seconds per call, over one pass through the copies
        kernel, copies, x = linear_kernels.KERNELS[name], layers[name], inputs[b]
        start = time.perf_counter()
        for layer in copies:
            kernel(x, layer)
        return (time.perf_counter() - start) / len(copies)

    best = _best_of_rounds(one_pass, names, batches, usage)
    del layers, inputs
    _give_back_freed_memory()
    scale = shape[0] / rows  # the time of the whole weight
    return {name: {b: t * scale for b, t in per.items()} for name, per in best.items()}


def time_prefill(
    shape: Tuple[int, int],
    dtype: torch.dtype,
    names: List[str],
    rows: Iterable[int] = PREFILL_ROWS,
    seed: int = 0,
    usage: Optional[Dict[str, float]] = None,
    fp32_activations: bool = False,
) -> Dict[str, Dict[int, float]]:
    """Seconds per call of each int8 prefill kernel of ``names`` (:data:`llama.linear_kernels.PREFILL_KERNELS`)
    on a random int8 ``shape`` weight, per number of ``rows``: compute-bound, so one copy of the
    weight (the first rows of one above ``_MAX_TIMED_ELEMENTS``, as :func:`time_kernels`).
    ``fp32_activations``: both multiply in float32, as they do for ``int8-fp32`` layers."""
    compute = linear_kernels.prefill_compute_dtype(dtype, fp32_activations)
    timed_rows = _timed_rows(shape)
    gen = torch.Generator().manual_seed(seed)
    layer = _random_layer("int8-gemv", (timed_rows, shape[1]), dtype, gen)  # float32 scales
    weight, scales = layer.weight, layer.scales
    rows = list(rows)
    inputs = {r: torch.rand(r, shape[1], generator=gen).to(dtype) for r in rows}

    def call(name: str, r: int) -> None:
        if name == "prefill-int8mm":
            linear_kernels.int8_linear(inputs[r], weight, scales, torch.float32 if fp32_activations else None)
        else:
            linear_kernels.int8_prefill_dequantized(inputs[r], weight, scales, compute)

    best = _best_of_rounds(lambda name, r: _seconds_per_call(lambda: call(name, r), _ROUND_S / 4), names, rows, usage)
    scale = shape[0] / timed_rows
    return {name: {r: t * scale for r, t in per.items()} for name, per in best.items()}


def _give_back_freed_memory() -> None:
    """glibc keeps freed blocks below its mmap threshold (up to 32 MiB) in the heap: return them
    to the system, so the random weights of the measurement leave no resident memory behind."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def decode_batches(max_batch_size: Optional[int]) -> Tuple[int, ...]:
    """The batch sizes to time kernels at for a model of ``max_batch_size`` cache rows: 1, and
    the rows up to 8 (:data:`DECODE_BATCHES` for 8 rows or more, or when not known). A
    one-row model (a chat, ``bench.py``'s batch-1 runs) is timed at batch 1 only: a kernel
    that wins there but loses at 8 rows is the right pick for it, and the wrong one for a
    server's eight."""
    if max_batch_size is None or max_batch_size >= DECODE_BATCHES[-1]:
        return DECODE_BATCHES
    return (1,) if max_batch_size <= 1 else (1, max_batch_size)


def pick(timings: Dict[str, Dict[int, float]], default: str) -> str:
    """The kernel with the lowest sum over batch sizes of its time relative to the fastest
    at that batch size; ``default`` unless another is at least ``MARGIN`` better."""
    names = list(timings)
    batches = list(timings[names[0]])
    fastest = {b: min(timings[n][b] for n in names) for b in batches}
    score = {n: sum(timings[n][b] / fastest[b] for b in batches) / len(batches) for n in names}
    best = min(names, key=lambda n: score[n])
    return best if score[best] < score[default] * (1 - MARGIN) else default


# ----------------------------------------------------------------------------- overrides


def parse_override(text: Optional[str], what: str = KERNELS_ENV) -> Dict[str, str]:
    """``"auto"`` (or empty) -> {}; else a comma-separated list of kernel names, at most one
    per layout: ``dense``, ``gemv`` or ``packed`` for float weights, ``int8``, ``int8-fp32`` or
    ``int8-gemv`` for int8 ones, ``prefill-int8mm`` or ``prefill-dequantized`` for int8 ones'
    prefill, ``sdpa`` or ``native-attention`` for the attention (the decode step's and a
    prefill's). Returns {layout: name}; a layout not named is still measured."""
    override: Dict[str, str] = {}
    if not text or text.strip().lower() == "auto":
        return override
    for name in (n.strip().lower() for n in text.split(",") if n.strip()):
        if name not in linear_kernels.KERNELS and name not in ATTENTION_KERNELS and name not in linear_kernels.PREFILL_KERNELS:
            known = sorted(linear_kernels.KERNELS) + list(ATTENTION_KERNELS) + list(linear_kernels.PREFILL_KERNELS)
            raise ValueError(f"{what}: unknown kernel {name!r}; use 'auto' or some of {known}")
        layout = ("attention" if name in ATTENTION_KERNELS else "int8-prefill" if name in linear_kernels.PREFILL_KERNELS
                  else "int8" if name.startswith("int8") else "float")
        if layout in override:
            raise ValueError(f"{what}: {override[layout]!r} and {name!r} are both for {layout} weights; name one")
        override[layout] = name
    return override


def resolve_override(kernels: Optional[str], pack_weights: Optional[bool]) -> Tuple[Dict[str, str], str]:
    """The override of ``Llama.build``: its ``kernels=``, else ``pack_weights=``, else ``$LLAMA_KERNELS``.
    Returns ({layout: name}, where it came from)."""
    if kernels is not None and pack_weights is not None:
        raise ValueError("give kernels= or pack_weights=, not both (pack_weights=True is kernels='packed')")
    if kernels is not None:
        return parse_override(kernels, "kernels="), "kernels="
    if pack_weights is not None:
        return {"float": "packed" if pack_weights else "dense"}, "pack_weights="
    return parse_override(os.environ.get(KERNELS_ENV)), KERNELS_ENV


def check_override(
    kernels: Optional[str], pack_weights: Optional[bool], device: torch.device, dtype: torch.dtype, quantize: Optional[str]
) -> Dict[str, str]:
    """:func:`resolve_override` checked against the model ``Llama.build`` makes: a kernel the
    build arguments name must apply (``ValueError`` otherwise); one of ``$LLAMA_KERNELS`` for
    a layout the model lacks is ignored. Raised before anything is loaded."""
    override, told_by = resolve_override(kernels, pack_weights)
    layout = "int8" if quantize is not None else "float"
    if told_by != KERNELS_ENV:
        if override.get("float") == "packed" and quantize is not None:
            raise ValueError(f"{told_by} packed and quantize= exclude each other: int8 layers have their own kernels")
        for key in ("int8", "int8-prefill"):
            if key in override and quantize is None:
                raise ValueError(f"{told_by} {override[key]!r} is for quantize='int8' models")
    if override.get("attention") == "native-attention":
        why = "it is for models on the CPU" if torch.device(device).type != "cpu" else native.unavailable(
            dtype, cpu_facts()["flags"])
        if why:
            raise ValueError(f"{told_by} 'native-attention' cannot run {dtype} here: {why}; use sdpa, or 'auto'")
    override = {k: v for k, v in override.items() if k in (layout, "attention") or (k == "int8-prefill" and quantize)}
    if "int8-prefill" in override and override["int8-prefill"] not in candidates(device, dtype, "int8-prefill"):
        raise ValueError(f"{told_by} {override['int8-prefill']!r} cannot run here (possible: "
                         f"{candidates(device, dtype, 'int8-prefill')}): it needs our native kernels on an x86-64 CPU "
                         f"({native.unavailable(dtype, cpu_facts()['flags']) or 'and float32 or bfloat16'})")
    names = candidates(device, dtype, layout)
    if layout in override and override[layout] not in names:
        raise ValueError(
            f"{told_by} {override[layout]!r} cannot run {layout} weights of {dtype} on {device} here (possible: "
            f"{names}); packing needs float32 on the CPU, or bfloat16/float16 where the CPU has the instructions; "
            f"gemv needs float32 or bfloat16 on an x86-64 CPU and a C++ compiler"
            + (f" ({native.unavailable(dtype, cpu_facts()['flags'])})" if override[layout] == "gemv" else "")
        )
    return override


# ----------------------------------------------------------------------------- cache


def cache_path() -> Path:
    """``$LLAMA_KERNEL_CACHE`` if set, else ``~/.cache/llama/kernels.json``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llama" / "kernels.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data["entries"] if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict) else {}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}


def _store(path: Path, new: Dict[str, dict]) -> None:
    """Add entries (re-reading the file first: other processes may have added theirs); best effort."""
    try:
        entries = _load_cache(path)
        entries.update(new)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        print(f"llama: could not cache the kernel choice in {path}: {e}", file=sys.stderr)


def decision_facts(
    dtype: torch.dtype, layout: str, shape: Tuple[int, int], names: List[str], resident: bool,
    batches: Tuple[int, ...] = DECODE_BATCHES,
) -> dict:
    """Everything a cached decision depends on: CPU, torch, threads, dtype, layout, shape, candidates, batch sizes."""
    facts = cpu_facts()
    return {
        "cpu": facts["model"],
        "cpu_id": facts["id"],
        "flags": facts["flags"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "layout": layout,
        "shape": list(shape),
        "candidates": names,
        "batches": list(batches),
        "cache_resident": resident,
        # our kernels' sources, where they were timed: changed kernels are measured again
        "native": native.source_key() if any(n in NATIVE_KERNELS for n in names) else None,
    }


# ----------------------------------------------------------------------------- plans


@dataclass
class Choice:
    """The kernel for one (layout, shape): ``source`` is "measured", "cached", "override" or why there was no choice."""

    kernel: str
    source: str
    timings_ms: Dict[str, Dict[int, float]] = field(default_factory=dict)  # kernel -> batch -> ms per call


@dataclass
class Plan:
    """The kernel of every (layout, out, in) of a model's local linear weights (and ("int8-prefill",
    out, in): an int8 weight's prefill), and of its attention (("attention", heads, kv heads, head
    size, positions timed) and ("prefill-attention", heads, kv heads, head size)), where chosen."""

    dtype: str
    choices: Dict[Tuple[str, int, int], Choice] = field(default_factory=dict)
    measure_s: float = 0.0
    cpu_share: Optional[float] = None  # of the measurement: CPU time / (wall time x threads); None if nothing was measured
    threads: str = ""
    # how the eager decode step runs: one native call or the modules, and why (prefer_one_call_step); None: not decided
    step: Optional[dict] = None

    def kernel(self, layout: str, shape: Tuple[int, ...]) -> str:
        return self.choices[(layout, *shape)].kernel

    def as_dict(self) -> dict:
        """JSON-ready: for benchmark results and for comparing ranks."""
        return {
            "dtype": self.dtype,
            "measure_s": round(self.measure_s, 3),
            "cpu_share": None if self.cpu_share is None else round(self.cpu_share, 2),
            "threads": self.threads,
            "step": self.step,
            "choices": {
                f"{layout} {'x'.join(map(str, shape))}": {"kernel": c.kernel, "source": c.source, "timings_ms": c.timings_ms}
                for (layout, *shape), c in self.choices.items()
            },
        }

    def summary(self) -> str:
        """One line: each kernel with the shapes it runs, and why."""
        parts = []
        for (layout, *shape), c in self.choices.items():
            what = {"attention": "attention ", "int8-prefill": "prefill ", "prefill-attention": "prefill attention "}.get(layout, "")
            parts.append(f"{what}{'x'.join(map(str, shape))}: {c.kernel} ({c.source})")
        return f"{self.dtype}: " + ", ".join(parts)


def choose(
    shapes: Iterable[Tuple[str, Tuple[int, int]]],
    device: torch.device,
    dtype: torch.dtype,
    override: Optional[Dict[str, str]] = None,
    *,
    stream_bytes: Optional[int] = None,
    use_cache: bool = True,
    remeasure: bool = False,
    compile: bool = False,
    batches: Tuple[int, ...] = DECODE_BATCHES,
) -> Plan:
    """The plan for these (layout, shape) pairs (layout ``"float"``, ``"int8"`` or
    ``"attention"``, timed at decode ``batches``, see :func:`decode_batches`; ``"int8-prefill"``
    and ``"prefill-attention"``, timed at prefill sizes; an int8 shape before its prefill).

    Per pair: the override's kernel for the layout if any; else the layout's default
    where there is nothing to choose (one candidate; not a CPU; int8 under ``compile``,
    which compiles its own); else the cached decision for this machine; else measured
    (:func:`time_kernels`, streaming ``stream_bytes`` per pass) and cached
    (``remeasure``: measured and cached even if a decision was cached). Under
    ``compile`` float weights choose between ``dense`` (which the compiled CPU step
    turns into Inductor's frozen, autotuned GEMMs) and ``gemv`` (our kernel, an operator
    of the graph), timed as in eager mode with MKL/oneDNN standing in for Inductor's
    GEMMs. An override that this device and dtype cannot run is a ``ValueError``.
    """
    device = torch.device(device)
    override = override or {}
    plan = Plan(str(dtype).removeprefix("torch."), threads=f"{torch.get_num_threads()} threads")
    llc = cpu_facts()["llc_bytes"]
    resident = stream_bytes is not None and llc > 0 and stream_bytes <= llc
    stream = None if stream_bytes is None else min(stream_bytes, max(_MIN_STREAM_BYTES, 2 * llc))
    path, entries = cache_path(), None
    measured: List[Tuple[str, dict]] = []  # (cache key, entry) of each decision measured now
    start, usage = time.perf_counter(), {"wall_s": 0.0, "cpu_s": 0.0}
    for layout, shape in dict.fromkeys((lay, tuple(s)) for lay, s in shapes):
        if layout == "attention":
            names = attention_candidates(device, dtype, shape[2])
        elif layout == "prefill-attention":
            names = prefill_attention_candidates(device, dtype, shape[2])
        else:
            names = candidates(device, dtype, layout)
        if layout == "prefill-attention" and "attention" in override:  # one override names both attentions
            override = {**override, layout: override["attention"]}
        if layout in override:
            if override[layout] not in names:
                what = (f"heads of size {shape[2]}" + (" in a prefill" if layout == "prefill-attention" else "")
                        if layout in ("attention", "prefill-attention") else f"{layout} weights {shape[0]}x{shape[1]}")
                raise ValueError(f"kernel {override[layout]!r} cannot run {what} in {dtype} on {device} here; "
                                 f"possible: {', '.join(names)} (or 'auto')")
            plan.choices[(layout, *shape)] = Choice(override[layout], "override")
            continue
        if compile and layout == "float":  # compiled, "dense" is Inductor's frozen, packed GEMMs: packing is its job
            names = [n for n in names if n != "packed"]
        if len(names) == 1 or device.type != "cpu" or (compile and layout == "int8"):
            why = "compile: Inductor picks" if compile and len(names) > 1 else "only candidate"
            plan.choices[(layout, *shape)] = Choice(names[0], why)
            continue
        timed_at = {"int8-prefill": PREFILL_ROWS, "prefill-attention": PREFILL_ATTENTION_LENGTHS}.get(layout, tuple(batches))
        facts = decision_facts(dtype, layout, shape, names, resident and layout in ("float", "int8", "attention"), timed_at)
        # an int8 prefill multiplies in float32 for int8-fp32 layers (picked above: shapes come before their prefill)
        fp32_activations = layout == "int8-prefill" and plan.choices.get(("int8", *shape), Choice("", "")).kernel == "int8-fp32"
        if fp32_activations:
            facts["fp32_activations"] = True
        key = json.dumps(facts, sort_keys=True)
        if use_cache and entries is None:
            entries = _load_cache(path)
        entry = (entries or {}).get(key) if use_cache and not remeasure else None
        if entry and entry.get("facts") == facts and entry.get("kernel") in names:
            plan.choices[(layout, *shape)] = Choice(entry["kernel"], "cached", entry.get("timings_ms", {}))
            continue
        if layout == "attention":
            seconds = time_attention(shape, dtype, names, batches, usage=usage)
        elif layout == "int8-prefill":
            seconds = time_prefill(shape, dtype, names, PREFILL_ROWS, usage=usage, fp32_activations=fp32_activations)
        elif layout == "prefill-attention":
            seconds = time_prefill_attention(shape, dtype, names, PREFILL_ATTENTION_LENGTHS, usage=usage)
        else:
            seconds = time_kernels(shape, dtype, names, batches, stream_bytes=stream, usage=usage)
        timings_ms = {n: {b: round(1000 * t, 4) for b, t in per.items()} for n, per in seconds.items()}
        kernel = pick(seconds, names[0])
        plan.choices[(layout, *shape)] = Choice(kernel, "measured", timings_ms)
        measured.append((key, {"kernel": kernel, "facts": facts, "timings_ms": timings_ms, "when": time.strftime("%Y-%m-%d %H:%M:%S")}))
    plan.measure_s = time.perf_counter() - start
    if not measured:
        return plan
    plan.cpu_share = usage["cpu_s"] / max(usage["wall_s"] * torch.get_num_threads(), 1e-9)
    quiet = plan.cpu_share >= QUIET_SHARE
    if use_cache and quiet:
        _store(path, {key: {**entry, "cpu_share": round(plan.cpu_share, 2)} for key, entry in measured})
    if use_cache and os.environ.get("RANK", "0") == "0":
        if quiet:
            print(f"llama: timed the kernels of {len(measured)} {plan.dtype} shape(s) on this CPU in "
                  f"{plan.measure_s:.1f} s (once; cached in {path})", file=sys.stderr)
        else:
            print(f"llama: timed the kernels of {len(measured)} {plan.dtype} shape(s) while other work took the "
                  f"cores (this process got {plan.cpu_share:.0%} of its {torch.get_num_threads()} threads' time): used "
                  f"for this run, not cached, measured again next time", file=sys.stderr)
    return plan


def _layout_class(weight: torch.Tensor, quantized: bool) -> str:
    return "int8" if quantized or linear_kernels.layout(weight) == "int8" else "float"


def plan_shapes(model: nn.Module, quantized: bool = False) -> List[Tuple[str, Tuple[int, int]]]:
    """(layout, local shape) of each linear layer of ``model``: what :func:`choose` takes
    (``quantized``: the layers will be int8, though still float, e.g. on the meta device)."""
    return [(_layout_class(layer.weight, quantized), tuple(layer.weight.shape)) for _, layer in linear_layers(model)]


def attention_shape(model: nn.Module) -> Optional[Tuple[int, int, int, int]]:
    """(local heads, local kv heads, head size, positions to time over) of a model's decode
    attention, or None for a model without llama.model's layers."""
    layers = getattr(model, "layers", None)
    attention = getattr(layers[0], "attention", None) if layers else None
    if attention is None or not hasattr(attention, "decode_attention"):
        return None
    kv_len = min(ATTENTION_KV_LEN, getattr(getattr(model, "params", None), "max_seq_len", ATTENTION_KV_LEN))
    return (attention.n_local_heads, attention.n_local_kv_heads, attention.head_dim, kv_len)


def prefer_one_call_step(
    plan: Plan,
    layers: List[Tuple[str, Tuple[int, int]]],
    n_layers: int,
    device: torch.device,
    dtype: torch.dtype,
    override: Optional[Dict[str, str]] = None,
    *,
    world: int = 1,
    batches: Tuple[int, ...] = DECODE_BATCHES,
    use_cache: bool = True,
) -> Plan:
    """Put every linear layer on our kernel where the whole decode step is then faster as one native
    call (:mod:`llama.native_step`) than ``plan``'s picks through the model's modules; sets ``plan.step``.

    ``layers``: (layout, local shape) of each linear layer of the model, one entry per layer.
    Where ``plan`` already has ``gemv`` (or ``int8-gemv``) everywhere and ``native-attention``,
    the step is one call anyway. Where a shape picked another kernel (e.g. oneDNN-packed
    bfloat16, faster per call at batch 8), the two ways are compared by measurement: per batch
    size, the sum of the products' measured times plus the step's overhead for each way
    (:func:`llama.native_step.step_overheads`, timed once per machine and number of layers,
    cached), scored as :func:`pick` scores kernels. An override for the layers' layout, model
    parallel, or an attention other than ``native-attention`` keeps the plan as it is.
    """
    override = override or {}
    kinds = {layout for layout, _ in layers}
    int8 = kinds == {"int8"}
    kernel = "int8-gemv" if int8 else "gemv"
    attention = [(key[3], c.kernel) for key, c in plan.choices.items() if key[0] == "attention"]  # (head size, kernel)
    if device.type != "cpu" or kinds not in ({"float"}, {"int8"}) or not attention:
        return plan
    (head_dim, attend), in_features = attention[0], [shape[1] for _, shape in layers]
    picked = {plan.kernel(layout, shape) for layout, shape in layers}
    why_not_now = native_step.plan_allows(dtype, int8, picked, attend, world, in_features, head_dim)
    if not why_not_now:
        plan.step = {"one_call": True, "why": f"every layer picked {kernel}"}
        return plan
    if (kinds & set(override)) or native_step.plan_allows(dtype, int8, {kernel}, attend, world, in_features, head_dim):
        plan.step = {"one_call": False, "why": why_not_now}  # not even with our kernel everywhere, or not ours to change
        return plan
    timings = [plan.choices[(layout, *shape)].timings_ms for layout, shape in layers]
    if not all(kernel in t for t in timings):
        plan.step = {"one_call": False, "why": f"{kernel} was not timed for every shape"}
        return plan
    facts = {**decision_facts(dtype, "step", (n_layers, int(int8)), [], False, batches), "native": native.source_key()}
    key = json.dumps(facts, sort_keys=True)
    path = cache_path()
    entry = _load_cache(path).get(key) if use_cache else None
    if entry and entry.get("facts") == facts:
        overheads, source = {int(b): tuple(v) for b, v in entry["overhead_ms"].items()}, "cached"
    else:
        overheads, share = native_step.step_overheads(n_layers, dtype, int8, batches)
        source = "measured" if share >= QUIET_SHARE else f"measured while other work took the cores ({share:.0%}): not cached"
        if use_cache and share >= QUIET_SHARE:
            _store(path, {key: {"facts": facts, "overhead_ms": overheads, "cpu_share": round(share, 2),
                                "when": time.strftime("%Y-%m-%d %H:%M:%S")}})

    def ms(per: Dict, b: int) -> float:  # cached timings have string keys
        return float(per[b] if b in per else per[str(b)])

    # Each product's measured time includes its own call from Python, which the one-call step does not
    # pay: both estimates carry it (the per-call cost on top of the overheads), so it roughly cancels.

    modules = {b: sum(ms(t[plan.kernel(lay, shp)], b) for t, (lay, shp) in zip(timings, layers)) + overheads[b][0] for b in batches}
    one_call = {b: sum(ms(t[kernel], b) for t in timings) + overheads[b][1] for b in batches}
    fastest = {b: min(modules[b], one_call[b]) for b in batches}
    score = {way: sum(est[b] / fastest[b] for b in batches) / len(batches) for way, est in (("modules", modules), ("one_call", one_call))}
    wins = score["one_call"] < score["modules"]
    plan.step = {
        "one_call": wins, "source": source, "overhead_ms": {b: list(v) for b, v in overheads.items()},
        "estimate_ms": {"modules": {b: round(t, 3) for b, t in modules.items()}, "one_call": {b: round(t, 3) for b, t in one_call.items()}},
        "why": f"estimated {'faster' if wins else 'slower'} than the picks through the modules",
    }
    if wins:
        for layout, shape in dict.fromkeys(layers):
            choice = plan.choices[(layout, *shape)]
            if choice.kernel != kernel:
                plan.choices[(layout, *shape)] = Choice(kernel, f"{choice.source}, for the one-call step", choice.timings_ms)
    return plan


def plan_for(
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    override: Optional[Dict[str, str]] = None,
    *,
    quantized: bool = False,
    compile: bool = False,
) -> Plan:
    """:func:`choose` for the local linear layers of ``model`` (built on any device, meta
    included; ``quantized``: they will be int8), streaming as many bytes as they hold, at
    the batch sizes its ``params.max_batch_size`` allows (:func:`decode_batches`); and for
    its decode attention (:func:`attention_shape`)."""
    shapes = plan_shapes(model, quantized)
    weights = [layer.weight for _, layer in linear_layers(model)]
    nbytes = sum(w.numel() * (1 if kind == "int8" else w.element_size()) for w, (kind, _) in zip(weights, shapes))
    batches = decode_batches(getattr(getattr(model, "params", None), "max_batch_size", None))
    attention = attention_shape(model)
    extra = [("attention", attention), ("prefill-attention", attention[:3])] if attention is not None else []
    extra += [("int8-prefill", shape) for kind, shape in shapes if kind == "int8"]
    plan = choose(shapes + extra, device, dtype, override, stream_bytes=nbytes, compile=compile, batches=batches)
    n_layers = len(getattr(model, "layers", ()))
    if compile or not n_layers:  # compiled: the step is a graph (or, all ours, one native call anyway)
        return plan
    return prefer_one_call_step(plan, shapes, n_layers, torch.device(device), dtype, override,
                                world=distributed.model_parallel_world_size(), batches=batches)


def apply(model: nn.Module, plan: Plan, on_packed=None) -> int:
    """Give each linear layer of ``model`` its kernel of ``plan``, changing layouts where needed; returns how many changed.

    Dense <-> packed converts the weight (one layer at a time; ``on_packed(key)`` is
    called after each packing, as in :func:`llama.packed_linear.pack_linear_weights`);
    dense <-> gemv (the same tensor) and between int8 kernels only the kernel (and the
    scales' dtype) changes.
    """
    changed = 0
    model.kernel_plan = plan
    attention = attention_shape(model)
    if attention is not None and ("attention", *attention) in plan.choices:
        kernel = plan.kernel("attention", attention)
        model.use_decode_attention(kernel)  # the native one brings its fused RoPE (in Attention) and RMSNorm
    if attention is not None and ("prefill-attention", *attention[:3]) in plan.choices:
        model.use_prefill_attention(plan.kernel("prefill-attention", attention[:3]))
    for name, layer in linear_layers(model):
        layout = _layout_class(layer.weight, False)
        want = plan.kernel(layout, tuple(layer.weight.shape))
        have = linear_kernels.name_of(layer.kernel)
        if layout == "int8":  # its prefill's kernel (linear_kernels._prefill), where one was chosen
            prefill = plan.choices.get(("int8-prefill", *layer.weight.shape))
            layer.prefill = prefill.kernel if prefill is not None else None
        if want == have:
            continue
        if want == "packed":
            packed_linear.pack_layer(layer)
            if on_packed is not None:
                on_packed(f"{name}.weight" if name else "weight")
        elif have == "packed":
            layer.set_weight(layer.weight.to_dense(), kernel=linear_kernels.KERNELS[want])
        elif linear_kernels.layout(want) == "dense":  # dense <-> gemv: the same tensor
            layer.set_weight(layer.weight.data, kernel=linear_kernels.KERNELS[want])
        else:  # between int8 kernels: int8-fp32 and int8-gemv read float32 scales
            scales = layer.scales.float() if want in ("int8-fp32", "int8-gemv") else layer.scales
            layer.set_weight(layer.weight, scales, linear_kernels.KERNELS[want])
        changed += 1
    return changed


def agree(model: nn.Module) -> Plan:
    """Rank 0's plan (the one :func:`apply` gave ``model`` there) on every rank; all ranks call it."""
    plan = model.kernel_plan
    if distributed.world_size() == 1:
        return plan
    return distributed._gather(plan, "agreeing on the linear kernels")[0]
