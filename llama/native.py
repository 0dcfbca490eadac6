"""Our own CPU kernels for the decode step (``llama/csrc/``), built on first use and called through ctypes.

- :func:`linear` (``gemv.cpp``): ``x @ W.T`` for the few rows of a decode step on a dense
  float32 or bfloat16 weight, at the speed the weight streams from memory;
  :func:`linear_many` the same for several weights that read one input (q/k/v, w1/w3);
- :func:`int8_linear` (``gemv.cpp``, AVX512-VNNI, else AVX2): int8 weights with per-row scales, the
  activations quantized in blocks of 32;
- :func:`decode_attention` (``attention.cpp``): one new token per cache row attending
  over that row's cached keys and values, each read once, in float32;
  :func:`prefill_attention` a prefill chunk's causal attention (flash-style blocks);
- :func:`rms_norm` and :func:`rope` (``norm_rope.cpp``): the model's RMSNorm and RoPE in one
  call each (a prefill's many rows shared among the threads);
- :func:`dequantize_int8` (``gemv.cpp``): int8 weights times their scales, for the prefill of
  int8 layers through oneDNN (:func:`llama.linear_kernels.int8_prefill_dequantized`);
- :func:`decode_step_entry` (``decode_step.cpp``): a whole decode step of a model whose every
  piece runs the kernels above, in one call (bound to a model by :mod:`llama.native_step`).

The loops live in headers (``gemv.h``, ``attention.h``, ``norm_rope.h``) shared by the
per-operator entry points and the whole step.

The sources say why each exists. The first three are candidates that
:mod:`llama.kernel_choice` times on each machine against torch's (``"gemv"``,
``"int8-gemv"``, ``"native-attention"``), never defaults; the norm and RoPE come with the
native attention. Where the CPU, the compiler or the thread runtime is missing, they are
simply absent, and :func:`unavailable` says why.

Building: the machine's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
compiles the sources once per instruction set (AVX2+FMA, AVX-512, AVX512-BF16,
AVX512-VNNI) into one shared library, cached under ``~/.cache/llama/native/``
(``$LLAMA_NATIVE_CACHE``) by a hash of the sources, the compiler and its flags; a few
seconds, once. The library needs no torch headers: it is plain C ABI, with OpenMP threads
from the ``libgomp`` that torch has already loaded (the same soname resolves to it), so it
shares torch's thread pool instead of starting a second one; after loading, the OpenMP
runtime it resolves is checked to be torch's. Where torch's threads are not GNU OpenMP
(e.g. a build on Intel's or LLVM's OpenMP), the kernels are not offered: two runtimes
would fight over the cores.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, NamedTuple, Optional, Tuple

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("gemv.cpp", "attention.cpp", "norm_rope.cpp", "decode_step.cpp")  # each compiled once per instruction set
HEADERS = ("simd.h", "gemv.h", "attention.h", "norm_rope.h")  # what they include
CACHE_ENV = "LLAMA_NATIVE_CACHE"
# instruction set -> (compiler flags, cpuinfo flags the CPU needs, dtype -> (entry points' suffix, step)):
# the entry points are llama_linear_<suffix> and llama_decode_attention_<suffix>; the inner size
# (linear) or head size (attention) must be a multiple of the step.
ISAS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Dict[torch.dtype, Tuple[str, int]]]] = {
    "avx512bf16": (
        ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-mfma"),
        ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"),
        {torch.bfloat16: ("bf16_avx512bf16", 32)},
    ),
    "avx512": (
        ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"),
        ("avx512f", "avx512bw", "avx512dq", "avx512vl"),
        {torch.float32: ("f32_avx512", 16)},
    ),
    "avx2": (
        ("-mavx2", "-mfma"),
        ("avx2", "fma"),
        {torch.float32: ("f32_avx2", 8), torch.bfloat16: ("bf16_avx2", 16)},
    ),
    "avx512vnni": (  # int8 weights only: INT8_ENTRIES
        ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mfma"),
        ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"),
        {},
    ),
}
# int8 weights (per-row float32 scales) x activations of a dtype: instruction set -> dtype -> entry point,
# the preferred set first (AVX512-VNNI; else AVX2's vpmaddubsw, as CPUs without VNNI such as Zen 2/3 have)
INT8_ENTRIES = {
    "avx512vnni": {torch.float32: "llama_linear_i8_f32_avx512vnni", torch.bfloat16: "llama_linear_i8_bf16_avx512vnni"},
    "avx2": {torch.float32: "llama_linear_i8_f32_avx2", torch.bfloat16: "llama_linear_i8_bf16_avx2"},
}
# the whole decode step (decode_step.cpp) of a model with float weights: llama_decode_step_<suffix> (ISAS);
# with int8 weights: instruction set -> dtype -> entry point (preferred first, as INT8_ENTRIES)
INT8_STEP_ENTRIES = {
    "avx512vnni": {torch.float32: "llama_decode_step_i8_f32_avx512vnni", torch.bfloat16: "llama_decode_step_i8_bf16_avx512vnni"},
    "avx2": {torch.float32: "llama_decode_step_i8_f32_avx2", torch.bfloat16: "llama_decode_step_i8_bf16_avx2"},
}
INT8_STEP = 64  # the inner size must be a multiple of this
MAX_ROWS = 16  # more rows than this (prefill) go to oneDNN/MKL (int8: llama.linear_kernels' prefill kernels): compute-bound
MAX_STEP_ROWS = 16  # rows (cache rows, one token each) of a whole decode step: decode_step.cpp's MAX_STEP_ROWS
_LINEAR_ARGS = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]  # x, w, y, M, N, K, threads
# x, ws, ys, Ns, count, M, K, threads
_LINEAR_MANY_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_int64] * 2 + [ctypes.c_int]
MAX_MANY = 8  # weights per linear_many call
# q, k, v, out, lengths, B, H, KVH, S, D, scale, threads
_ATTENTION_ARGS = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
# q, k, v, out, S, start, H, KVH, Smax, D, scale, threads
_PREFILL_ATTENTION_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]
_INT8_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]  # x, w, w_scale, y, M, N, K, threads
_NORM_ARGS = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]  # x, w, y, rows, dim, eps, threads
_ROPE_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int]  # x, cos, sin, y, B, S, H, D, cos rows, threads
_STEP_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]  # model, tokens, positions, rows, M, logits, threads
# dtype -> (RMSNorm, RoPE, int8 dequantization) entry points (AVX2 objects: every CPU that has any of the kernels)
ELEMENTWISE_ENTRIES = {
    torch.float32: ("llama_rms_norm_f32", "llama_rope_f32", "llama_dequantize_i8_f32"),
    torch.bfloat16: ("llama_rms_norm_bf16", "llama_rope_bf16", "llama_dequantize_i8_bf16"),
}
_DEQUANTIZE_ARGS = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int]  # w, scales, y, N, K, threads


class Entries(NamedTuple):
    """One dtype's kernels, of the best instruction set the CPU has."""

    linear: Callable
    attention: Callable
    linear_many: Callable
    step: int  # the inner size (linear) and head size (attention) must be multiples of this
    decode_step: Optional[Callable] = None  # the whole step, float weights (llama.native_step)
    prefill_attention: Optional[Callable] = None  # a prefill chunk's causal attention in one cache row


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llama" / "native"


@functools.lru_cache(maxsize=None)
def source_key() -> str:
    """A hash of the kernels' sources: part of every cached kernel decision that timed them, so
    that changed kernels are measured again."""
    return hashlib.sha256(b"".join((CSRC / name).read_bytes() for name in (*SOURCES, *HEADERS))).hexdigest()[:16]


def _compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _openmp_of(library: ctypes.CDLL) -> Optional[str]:
    """The file that ``omp_get_max_threads`` resolves to from ``library`` (its OpenMP runtime), or None."""
    try:
        function = library.omp_get_max_threads
        dladdr = ctypes.CDLL(None).dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        info = _DlInfo()
        if not dladdr(ctypes.cast(function, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
            return None
        return os.path.realpath(info.dli_fname.decode())
    except (AttributeError, OSError):
        return None


def _torch_openmp() -> Optional[str]:
    """torch's OpenMP runtime where it is GNU OpenMP (libgomp), which the kernels link too; else None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    torch_cpu = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        runtime = _openmp_of(ctypes.CDLL(str(torch_cpu)))  # already loaded: the same handle
    except OSError:
        return None
    return runtime if runtime and Path(runtime).name.startswith("libgomp.so") else None


# dtype -> the kernels that linear() and decode_attention() call: those of the latest _library() call
_ENTRIES: Dict[torch.dtype, Entries] = {}
# activation dtype -> the int8 kernel that int8_linear() calls (same)
_INT8: Dict[torch.dtype, Callable] = {}
# dtype -> (RMSNorm, RoPE, dequantization) that rms_norm(), rope() and dequantize_int8() call (same)
_ELEMENTWISE: Dict[torch.dtype, Tuple[Callable, Callable, Callable]] = {}
# activation dtype -> the whole decode step with int8 weights (llama.native_step) (same)
_INT8_DECODE_STEP: Dict[torch.dtype, Callable] = {}


def _library(flags: Iterable[str]) -> Tuple[Optional[ctypes.CDLL], Dict[torch.dtype, Entries], str]:
    """(library, dtype -> kernels of the best instruction set among ``flags`` (cpuinfo names),
    why there is none); built or found in the cache. :func:`linear` and :func:`decode_attention` then use these."""
    lib, entries, int8, elementwise, int8_step, why = _load(frozenset(flags))
    for table, new in ((_ENTRIES, entries), (_INT8, int8), (_ELEMENTWISE, elementwise), (_INT8_DECODE_STEP, int8_step)):
        table.clear()
        table.update(new)
    return lib, entries, why


def _none(why: str):
    """What :func:`_load` returns where there are no native kernels: no library, no entry points, why."""
    return None, {}, {}, {}, {}, why


@functools.lru_cache(maxsize=None)
def _load(flags: frozenset) -> Tuple[Optional[ctypes.CDLL], Dict[torch.dtype, Entries], Dict[torch.dtype, Callable],
                                    Dict[torch.dtype, Tuple[Callable, Callable]], Dict[torch.dtype, Callable], str]:
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return _none(f"no native kernels for {platform.machine()} on {sys.platform} (x86-64 Linux only)")
    runtime = _torch_openmp()
    if runtime is None:
        return _none("torch's threads are not GNU OpenMP (libgomp) here: the kernels would start a second thread pool")
    isas = [isa for isa, (_, needs, _) in ISAS.items() if all(f in flags for f in needs)]
    if not isas:
        return _none("this CPU has neither AVX2+FMA nor AVX-512")
    compiler = _compiler()
    if compiler is None:
        return _none("no C++ compiler (set CXX, or install g++ or clang++)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return _none(f"{compiler} --version failed: {e}")
    key = hashlib.sha256((source_key() + version + repr([(i, ISAS[i][0]) for i in isas])).encode()).hexdigest()[:16]
    path = _cache_dir() / f"gemv-{key}.so"
    if not path.exists():
        try:
            error = _build(compiler, isas, path)
        except OSError as e:  # e.g. a read-only home: no native kernels, and say where to put them
            error = f"could not build the native kernels in {path.parent} ({e}); set {CACHE_ENV} to a writable folder"
        if error:
            return _none(error)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return _none(f"could not load {path}: {e}")
    linked = _openmp_of(lib)
    if linked != runtime:  # e.g. clang's libomp: a second pool beside torch's threads
        return _none(f"{path.name} links the OpenMP runtime {linked}, not torch's {runtime}")
    entries: Dict[torch.dtype, Entries] = {}
    for isa in isas:  # ISAS lists the faster instruction sets first
        for dtype, (suffix, step) in ISAS[isa][2].items():
            names = (f"llama_linear_{suffix}", f"llama_decode_attention_{suffix}", f"llama_linear_many_{suffix}")
            if dtype not in entries and all(hasattr(lib, name) for name in names):
                linear_fn, attention_fn, many_fn = (getattr(lib, name) for name in names)
                linear_fn.argtypes, linear_fn.restype = _LINEAR_ARGS, None
                attention_fn.argtypes, attention_fn.restype = _ATTENTION_ARGS, None
                many_fn.argtypes, many_fn.restype = _LINEAR_MANY_ARGS, None
                prefill_fn = getattr(lib, f"llama_prefill_attention_{suffix}", None)
                if prefill_fn is not None:
                    prefill_fn.argtypes, prefill_fn.restype = _PREFILL_ATTENTION_ARGS, None
                entries[dtype] = Entries(linear_fn, attention_fn, many_fn, step, _step_entry(lib, f"llama_decode_step_{suffix}"),
                                         prefill_fn)
    int8: Dict[torch.dtype, Callable] = {}
    for isa in (isa for isa in INT8_ENTRIES if isa in isas):  # the preferred set first
        for dtype, name in INT8_ENTRIES[isa].items():
            if dtype not in int8 and hasattr(lib, name):
                int8[dtype] = getattr(lib, name)
                int8[dtype].argtypes, int8[dtype].restype = _INT8_ARGS, None
    elementwise: Dict[torch.dtype, Tuple[Callable, Callable, Callable]] = {}
    for dtype, names in ELEMENTWISE_ENTRIES.items():
        if all(hasattr(lib, name) for name in names):
            norm_fn, rope_fn, dequantize_fn = (getattr(lib, name) for name in names)
            norm_fn.argtypes, norm_fn.restype = _NORM_ARGS, None
            rope_fn.argtypes, rope_fn.restype = _ROPE_ARGS, None
            dequantize_fn.argtypes, dequantize_fn.restype = _DEQUANTIZE_ARGS, None
            elementwise[dtype] = (norm_fn, rope_fn, dequantize_fn)
    int8_step: Dict[torch.dtype, Callable] = {}
    for isa in (isa for isa in INT8_STEP_ENTRIES if isa in isas):
        for dtype, name in INT8_STEP_ENTRIES[isa].items():
            entry = _step_entry(lib, name)
            if dtype not in int8_step and entry is not None:
                int8_step[dtype] = entry
    return lib, entries, int8, elementwise, int8_step, ""


def _step_entry(lib: ctypes.CDLL, name: str) -> Optional[Callable]:
    """The whole-step entry point ``name`` (model, tokens, positions, cache rows, M, logits, threads), if the library has it."""
    if not hasattr(lib, name):
        return None
    entry = getattr(lib, name)
    entry.argtypes, entry.restype = _STEP_ARGS, ctypes.c_int  # 0, or 1 for a number of rows it does not take
    return entry


def _openmp_flag(compiler: str) -> str:
    """GNU OpenMP, the runtime torch's wheels use: clang's plain -fopenmp would link LLVM's libomp."""
    return "-fopenmp=libgomp" if "clang" in Path(compiler).name else "-fopenmp"


def _build(compiler: str, isas, path: Path) -> str:
    """Compile one object per source and instruction set (all at once), link them into ``path``; '' or what failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        jobs = {}  # (isa, source) -> (object, process)
        for isa in isas:
            for name in SOURCES:
                obj = Path(tmp) / f"{isa}-{name}.o"
                cmd = [compiler, "-std=c++17", "-O3", "-fPIC", _openmp_flag(compiler), f"-DLLAMA_ISA_{isa.upper()}", *ISAS[isa][0],
                       "-c", str(CSRC / name), "-o", str(obj)]
                jobs[(isa, name)] = (obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        failed = {}
        for (isa, name), (_, process) in jobs.items():
            output = process.communicate()[0]
            if process.returncode != 0:  # e.g. a compiler too old for -mavx512bf16: the other sets still build
                failed.setdefault(isa, f"{name}: {output.strip()[-300:]}")
        for isa, why in failed.items():
            print(f"llama: native kernels for {isa} did not compile ({why})", file=sys.stderr)
        objects = [str(obj) for (isa, _), (obj, _) in jobs.items() if isa not in failed]
        if not objects:
            return f"{compiler} compiled the native kernels for none of the instruction sets {isas}"
        tmp_so = Path(tmp) / path.name
        done = subprocess.run([compiler, "-shared", _openmp_flag(compiler), *objects, "-o", str(tmp_so)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            return f"linking {path.name} failed: {done.stderr.strip()[-300:]}"
        os.replace(tmp_so, path)  # atomic: ranks building at once each install a whole file
    return ""


def unavailable(dtype: torch.dtype, flags: Iterable[str]) -> str:
    """Why there is no native kernel for ``dtype`` weights on a CPU with these cpuinfo ``flags``
    ('' if there is one; :func:`llama.kernel_choice.cpu_facts` has this CPU's)."""
    lib, entries, why = _library(flags)
    if lib is None:
        return why
    return "" if dtype in entries else f"no native kernel for {dtype} on this CPU"


def available(dtype: torch.dtype, flags: Iterable[str]) -> bool:
    """Whether :func:`linear` has a kernel of its own for ``dtype`` weights on a CPU with ``flags``
    (building it if need be); :func:`linear` uses it from then on."""
    return not unavailable(dtype, flags)


def covers(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` computes ``x @ weight.T`` with its own kernel: a 2-d, row-major
    CPU ``weight`` of a dtype :func:`available` said yes for, a CPU ``x`` of the same dtype
    whose last size is the weight's inner size (a multiple of the kernel's step) and with
    at most :data:`MAX_ROWS` rows, no gradient wanted, and not under ``torch.compile``
    (:mod:`llama.linear_kernels` calls it through an operator there)."""
    entry = _ENTRIES.get(weight.dtype)
    return (
        entry is not None
        and not torch.compiler.is_compiling()
        and x.dtype == weight.dtype
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
        and weight.shape[1] % entry.step == 0
        and 0 < x.numel() // weight.shape[1] <= MAX_ROWS
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def _as_rows(x: torch.Tensor, in_features: int) -> Tuple[int, torch.Tensor]:
    rows = x.numel() // in_features
    return rows, x.reshape(rows, in_features).contiguous()  # (..., in) -> (rows, in)


def run_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`linear` for a call that :func:`covers` said yes to (not checked again: the decode loop's path)."""
    out_features, in_features = weight.shape
    rows, x2 = _as_rows(x, in_features)
    y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype)
    _ENTRIES[weight.dtype].linear(x2.data_ptr(), weight.data_ptr(), y.data_ptr(), rows, out_features, in_features,
                                  torch.get_num_threads())
    return y


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (``F.linear`` without bias): the native kernel where :func:`covers`
    says so, else ``F.linear``, so the result is always right."""
    return run_linear(x, weight) if covers(x, weight) else torch.nn.functional.linear(x, weight)


def run_linear_many(x: torch.Tensor, weights) -> list:
    """:func:`linear_many` for weights (at most :data:`MAX_MANY`, one inner size) that :func:`covers`
    said yes to with ``x`` (not checked again: the decode loop's path)."""
    in_features, count = weights[0].shape[1], len(weights)
    rows, x2 = _as_rows(x, in_features)
    ys = [torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype) for w in weights]
    pointers = (ctypes.c_void_p * count)
    _ENTRIES[x.dtype].linear_many(
        x2.data_ptr(), pointers(*(w.data_ptr() for w in weights)), pointers(*(y.data_ptr() for y in ys)),
        (ctypes.c_int64 * count)(*(w.shape[0] for w in weights)), count, rows, in_features, torch.get_num_threads(),
    )
    return ys


def linear_many(x: torch.Tensor, weights) -> list:
    """``[linear(x, w) for w in weights]`` in one native call (one parallel region over all the
    weights' rows: a layer's q/k/v or w1/w3 projections), where :func:`covers` holds for
    each weight (at most :data:`MAX_MANY`); else one call per weight."""
    if not (0 < len(weights) <= MAX_MANY and all(covers(x, w) for w in weights)):
        return [linear(x, w) for w in weights]
    return run_linear_many(x, weights)  # covers() checked x's size against each weight's inner size


def dequantize_available(dtype: torch.dtype, flags: Iterable[str]) -> bool:
    """Whether :func:`dequantize_int8` has a kernel for ``dtype`` on a CPU with ``flags``."""
    _library(flags)
    return dtype in _ELEMENTWISE


def int8_available(dtype: torch.dtype, flags: Iterable[str]) -> bool:
    """Whether :func:`int8_linear` has a kernel of its own for a ``dtype`` model on a CPU with ``flags``
    (AVX512-VNNI, else AVX2)."""
    _library(flags)
    return dtype in _INT8


def covers_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether :func:`int8_linear` takes this call: as :func:`covers`, for an int8 ``weight``
    with float32 per-row ``scales``, an inner size that is a multiple of :data:`INT8_STEP`."""
    return (
        x.dtype in _INT8
        and not torch.compiler.is_compiling()
        and weight.dtype == torch.int8
        and scales.dtype == torch.float32
        and x.device.type == weight.device.type == scales.device.type == "cpu"
        and weight.dim() == 2
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
        and scales.shape == weight.shape[:1]
        and weight.shape[1] % INT8_STEP == 0
        and 0 < x.numel() // weight.shape[1] <= MAX_ROWS
        and weight.is_contiguous()
        and scales.is_contiguous()
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` for int8 ``weight`` (out, in) and float32 per-row
    ``scales``, in x's dtype, with AVX512-VNNI or AVX2: x is quantized to int8 in blocks of 32 (a
    scale each), as llama.cpp's Q8 activations. Needs :func:`covers_int8` (``ValueError`` otherwise)."""
    if not covers_int8(x, weight, scales):
        raise ValueError(f"the native int8 kernel cannot take x {tuple(x.shape)} {x.dtype} with weight "
                         f"{tuple(weight.shape)} {weight.dtype} and scales {scales.dtype}")
    return run_int8_linear(x, weight, scales)


def run_int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """:func:`int8_linear` for a call that :func:`covers_int8` said yes to (not checked again)."""
    out_features, in_features = weight.shape
    rows, x2 = _as_rows(x, in_features)
    y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype)
    _INT8[x.dtype](x2.data_ptr(), weight.data_ptr(), scales.data_ptr(), y.data_ptr(), rows, out_features, in_features,
                   torch.get_num_threads())
    return y


def _eager_cpu(*tensors: torch.Tensor) -> bool:
    """All on the CPU, no gradient wanted, not under torch.compile: where the fused kernels may run."""
    return (
        not torch.compiler.is_compiling()
        and all(t.device.type == "cpu" for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    )


def dequantizes(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`dequantize_int8` takes an int8 ``weight`` (out, in) into ``dtype`` (float32
    or bfloat16; the AVX2 kernels, which every CPU with any of ours has)."""
    return (
        _eager_cpu(weight) and dtype in _ELEMENTWISE and weight.dtype == torch.int8 and weight.dim() == 2
        and weight.is_contiguous()
    )


def dequantize_int8(weight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = weight * scales[:, None]`` for int8 ``weight`` (out, in) and float32 ``scales`` (out,):
    the product in float32, rounded to ``out``'s dtype (float32 or bfloat16) as torch rounds;
    ``out``: contiguous, of ``weight``'s shape. Needs :func:`dequantizes` (``ValueError`` otherwise)."""
    if not (dequantizes(weight, out.dtype) and scales.dtype == torch.float32 and scales.shape == weight.shape[:1]
            and scales.is_contiguous() and out.shape == weight.shape and out.is_contiguous()):
        raise ValueError(f"cannot dequantize a {tuple(weight.shape)} {weight.dtype} weight with {scales.dtype} scales "
                         f"into {tuple(out.shape)} {out.dtype}")
    _ELEMENTWISE[out.dtype][2](weight.data_ptr(), scales.data_ptr(), out.data_ptr(), weight.shape[0], weight.shape[1],
                               torch.get_num_threads())
    return out


def norms(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`rms_norm` takes ``x`` (..., dim) with this ``weight`` (dim,) (a decode step's
    rows on the calling thread; a prefill's many shared among torch's threads)."""
    return (  # eager first: under torch.compile the sizes may be symbols that cannot be compared
        _eager_cpu(x, weight) and x.dtype in _ELEMENTWISE and weight.dtype == x.dtype and x.dim() >= 1
        and weight.shape == x.shape[-1:] and x.shape[-1] % 8 == 0 and x.numel() > 0
        and x.is_contiguous() and weight.is_contiguous()
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.model.RMSNorm in one call: ``(x * rsqrt(mean(x^2) + eps)).type_as(x) * weight``, in float32 inside.
    Needs :func:`norms`."""
    y = torch.empty_like(x)
    dim = x.shape[-1]
    _ELEMENTWISE[x.dtype][0](x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps,
                             torch.get_num_threads())
    return y


def ropes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether :func:`rope` takes ``x`` (bsz, seqlen, heads, head_dim) with these tables (bsz or 1,
    seqlen, head_dim/2) (a decode step's tokens on the calling thread; a prefill's many shared
    among torch's threads)."""
    return (  # eager first: under torch.compile the sizes may be symbols that cannot be compared
        _eager_cpu(x, cos, sin) and x.dtype in _ELEMENTWISE and x.dim() == 4 and x.is_contiguous()
        and x.shape[-1] % 2 == 0 and x.numel() > 0
        and cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape and cos.dim() == 3
        and cos.shape[0] in (1, x.shape[0]) and cos.shape[1:] == (x.shape[1], x.shape[3] // 2)
        and cos.is_contiguous() and sin.is_contiguous()
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.model.apply_rotary_emb in one call (a new tensor). Needs :func:`ropes`."""
    y = torch.empty_like(x)
    bsz, seqlen, heads, head_dim = x.shape
    _ELEMENTWISE[x.dtype][1](x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), bsz, seqlen, heads, head_dim,
                             cos.shape[0], torch.get_num_threads())
    return y


def attends(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :func:`decode_attention` has a kernel for these heads (after :func:`available` said yes for ``dtype``)."""
    entry = _ENTRIES.get(dtype)
    return entry is not None and head_dim % entry.step == 0


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for one query per cache row, over that row's first ``lengths[b]`` positions.

    q: (bsz, heads, head_dim); cache_k, cache_v: one layer's whole cache (rows >= bsz,
    kv_heads, max_seq_len, head_dim), of which rows ``0..bsz-1`` are read, query head ``h``
    reading kv head ``h // (heads // kv_heads)``; lengths: (bsz,) int64, each in
    ``1..max_seq_len`` (the kernel clamps others to that range; a length of 0 gives zeros).
    Returns (bsz, heads, head_dim) in q's dtype. Needs :func:`attends`
    (``ValueError`` otherwise): the caller picks torch's attention where it is false.
    """
    bsz, heads, head_dim = q.shape
    rows, kv_heads, max_seq_len, cache_dim = cache_k.shape
    entry = _ENTRIES.get(q.dtype)
    if (
        not attends(q.dtype, head_dim)
        or cache_k.dtype != q.dtype or cache_v.dtype != q.dtype or cache_k.shape != cache_v.shape
        or cache_dim != head_dim or rows < bsz or heads % kv_heads
        or not (cache_k.is_contiguous() and cache_v.is_contiguous())
        or q.device.type != "cpu" or cache_k.device.type != "cpu"
        or lengths.shape != (bsz,) or lengths.dtype != torch.int64
    ):
        raise ValueError(
            f"native decode attention cannot take q {tuple(q.shape)} {q.dtype} with a cache {tuple(cache_k.shape)} "
            f"{cache_k.dtype} and lengths {tuple(lengths.shape)} {lengths.dtype}"
        )
    q = q.contiguous()
    lengths = lengths.contiguous()
    out = torch.empty_like(q)
    entry.attention(q.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), out.data_ptr(), lengths.data_ptr(),
                    bsz, heads, kv_heads, max_seq_len, head_dim, head_dim ** -0.5, torch.get_num_threads())
    return out


def prefill_attention_available(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :func:`prefill_attention` has a kernel for heads of ``head_dim`` in ``dtype`` (after
    :func:`available` said yes for ``dtype``)."""
    entry = _ENTRIES.get(dtype)
    return entry is not None and entry.prefill_attention is not None and head_dim % entry.step == 0


def prefill_attends(q: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """Whether :func:`prefill_attention` takes these queries (chunk, heads, head_dim) over a cache row
    (kv_heads, max_seq_len, head_dim) of the same dtype (eager, on the CPU, contiguous)."""
    entry = _ENTRIES.get(q.dtype)
    return (
        entry is not None and entry.prefill_attention is not None and _eager_cpu(q, cache_k)
        and q.dim() == 3 and cache_k.dim() == 3 and cache_k.dtype == q.dtype and q.shape[-1] == cache_k.shape[-1]
        and q.shape[-1] % entry.step == 0 and q.shape[1] % cache_k.shape[0] == 0
        and q.is_contiguous() and cache_k.is_contiguous()
    )


def prefill_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of a prefill chunk: ``q`` (length, heads, head_dim), the queries of positions
    ``start..start+length-1`` of one cache row, over that row's keys and values ``cache_k``,
    ``cache_v`` (kv_heads, max_seq_len, head_dim) at positions ``0..start+length-1`` (the chunk's
    own already written); query head ``h`` reads kv head ``h // (heads // kv_heads)``.
    Returns (length, heads, head_dim) in q's dtype: float32 scores, softmax and sums; in bfloat16
    the probabilities are rounded to bfloat16 for their product with the values, as torch's flash
    attention does (``csrc/attention.h``). Needs :func:`prefill_attends` (``ValueError`` otherwise)."""
    length, heads, head_dim = q.shape
    if not (prefill_attends(q, cache_k) and cache_v.shape == cache_k.shape and cache_v.dtype == q.dtype
            and cache_v.is_contiguous() and 0 <= start and start + length <= cache_k.shape[1]):
        raise ValueError(f"native prefill attention cannot take q {tuple(q.shape)} {q.dtype} at position {start} over "
                         f"a cache row {tuple(cache_k.shape)} {cache_k.dtype}")
    kv_heads, max_seq_len, _ = cache_k.shape
    out = torch.empty_like(q)
    _ENTRIES[q.dtype].prefill_attention(q.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), out.data_ptr(), length, start,
                                        heads, kv_heads, max_seq_len, head_dim, head_dim ** -0.5, torch.get_num_threads())
    return out


@torch.library.custom_op("llama::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """:func:`decode_attention` as an operator, for compiled decode steps (opaque to Inductor)."""
    return decode_attention(q, cache_k, cache_v, lengths)


@decode_attention_op.register_fake
def _decode_attention_shape(q, cache_k, cache_v, lengths):
    return q.new_empty(q.shape)


def decode_step_entry(dtype: torch.dtype, int8_weights: bool) -> Optional[Callable]:
    """The whole decode step (``decode_step.cpp``, see :mod:`llama.native_step`) for a ``dtype`` model
    with float (``dtype``) or int8 weights, of the best instruction set the CPU has; None if there
    is none (or the library was not loaded: :func:`available` loads it)."""
    if int8_weights:
        return _INT8_DECODE_STEP.get(dtype)
    entry = _ENTRIES.get(dtype)
    return None if entry is None else entry.decode_step
