"""Our own matrix-vector kernels (``llama/csrc/gemv.cpp``), built on first use and called through ctypes.

``x @ W.T`` for the few rows of a decode step on a dense float32 or bfloat16 weight, at
the speed the weight streams from memory (see the source for why). They are one of the
candidates that :mod:`llama.kernel_choice` times on each machine (``"gemv"`` in
:data:`llama.linear_kernels.KERNELS`), never a default: where the CPU, the compiler or
the thread runtime is missing, the candidate is simply absent, and :func:`unavailable`
says why.

Building: the machine's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
compiles the file once per instruction set (AVX2+FMA, AVX-512, AVX512-BF16) into one
shared library, cached under ``~/.cache/llama/native/`` (``$LLAMA_NATIVE_CACHE``) by a
hash of the source, the compiler and its flags; about a second, once. The library needs
no torch headers: it is plain C ABI, with OpenMP threads from the ``libgomp`` that torch
has already loaded (the same soname resolves to it), so it shares torch's thread pool
instead of starting a second one. Where torch's threads are not GNU OpenMP (e.g. a build
on Intel's OpenMP), the kernels are not offered: two runtimes would fight over the cores.
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
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
CACHE_ENV = "LLAMA_NATIVE_CACHE"
# instruction set -> (compiler flags, cpuinfo flags the CPU needs, entry points: dtype -> (name, K step))
ISAS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Dict[torch.dtype, Tuple[str, int]]]] = {
    "avx512bf16": (
        ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-mfma"),
        ("avx512f", "avx512bw", "avx512_bf16"),
        {torch.bfloat16: ("llama_linear_bf16_avx512bf16", 32)},
    ),
    "avx512": (
        ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"),
        ("avx512f", "avx512bw"),
        {torch.float32: ("llama_linear_f32_avx512", 16)},
    ),
    "avx2": (
        ("-mavx2", "-mfma"),
        ("avx2", "fma"),
        {torch.float32: ("llama_linear_f32_avx2", 8), torch.bfloat16: ("llama_linear_bf16_avx2", 16)},
    ),
}
MAX_ROWS = 16  # more rows than this (prefill) go to torch: there the product is compute-bound and oneDNN/MKL block for it
_ARGTYPES = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llama" / "native"


def _compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _torch_uses_libgomp() -> bool:
    """Whether torch's intra-op threads are GNU OpenMP's, already loaded in this process."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


# dtype -> (entry point, K step) that linear() calls: those of the latest _library() call
_ENTRIES: Dict[torch.dtype, Tuple[Callable, int]] = {}


def _library(flags: Iterable[str]) -> Tuple[Optional[ctypes.CDLL], Dict[torch.dtype, Tuple[Callable, int]], str]:
    """(library, dtype -> (entry point, K step) of the best instruction set among ``flags``
    (cpuinfo names), why there is none); built or found in the cache. :func:`linear` then uses these."""
    lib, entries, why = _load(frozenset(flags))
    _ENTRIES.clear()
    _ENTRIES.update(entries)
    return lib, entries, why


@functools.lru_cache(maxsize=None)
def _load(flags: frozenset) -> Tuple[Optional[ctypes.CDLL], Dict[torch.dtype, Tuple[Callable, int]], str]:
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return None, {}, f"no native kernels for {platform.machine()} on {sys.platform} (x86-64 Linux only)"
    if not _torch_uses_libgomp():
        return None, {}, "torch's threads are not GNU OpenMP (libgomp) here: the kernels would start a second thread pool"
    isas = [isa for isa, (_, needs, _) in ISAS.items() if all(f in flags for f in needs)]
    if not isas:
        return None, {}, "this CPU has neither AVX2+FMA nor AVX-512"
    compiler = _compiler()
    if compiler is None:
        return None, {}, "no C++ compiler (set CXX, or install g++ or clang++)"
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, {}, f"{compiler} --version failed: {e}"
    key = hashlib.sha256(source + version.encode() + repr([(i, ISAS[i][0]) for i in isas]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"gemv-{key}.so"
    if not path.exists():
        error = _build(compiler, isas, path)
        if error:
            return None, {}, error
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, {}, f"could not load {path}: {e}"
    entries: Dict[torch.dtype, Tuple[Callable, int]] = {}
    for isa in isas:  # ISAS lists the faster instruction sets first
        for dtype, (name, step) in ISAS[isa][2].items():
            if dtype not in entries and hasattr(lib, name):
                function = getattr(lib, name)
                function.argtypes, function.restype = _ARGTYPES, None
                entries[dtype] = (function, step)
    return lib, entries, ""


def _build(compiler: str, isas, path: Path) -> str:
    """Compile one object per instruction set, link them into ``path``; '' or what failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        objects = []
        for isa in isas:
            obj = Path(tmp) / f"{isa}.o"
            cmd = [compiler, "-std=c++17", "-O3", "-fPIC", "-fopenmp", f"-DLLAMA_ISA_{isa.upper()}", *ISAS[isa][0],
                   "-c", str(SOURCE), "-o", str(obj)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                objects.append(str(obj))
            else:  # e.g. a compiler too old for -mavx512bf16: the other instruction sets still build
                print(f"llama: native kernels: {isa} did not compile: {done.stderr.strip()[-300:]}", file=sys.stderr)
        if not objects:
            return f"{compiler} compiled none of {SOURCE.name}'s instruction sets"
        tmp_so = Path(tmp) / path.name
        done = subprocess.run([compiler, "-shared", "-fopenmp", *objects, "-o", str(tmp_so)], capture_output=True, text=True)
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


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (``F.linear`` without bias) with the native kernel where it applies:
    a CPU ``weight`` of a dtype :func:`available` covers, ``x`` of the same dtype with at most
    :data:`MAX_ROWS` rows, the inner size a multiple of the kernel's step, and no gradient
    wanted, and :func:`available` said yes. Anything else goes to ``F.linear``, so the
    result is always right. Under ``torch.compile`` it is ``F.linear``: Inductor picks."""
    entry = _ENTRIES.get(weight.dtype)
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if (
        entry is None
        or torch.compiler.is_compiling()
        or x.dtype != weight.dtype
        or x.device.type != "cpu"
        or in_features % entry[1]
        or not 0 < rows <= MAX_ROWS
        or not weight.is_contiguous()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return torch.nn.functional.linear(x, weight)
    x2 = x.reshape(rows, in_features).contiguous()  # (rows, in)
    y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype)
    entry[0](x2.data_ptr(), weight.data_ptr(), y.data_ptr(), rows, out_features, in_features, torch.get_num_threads())
    return y
