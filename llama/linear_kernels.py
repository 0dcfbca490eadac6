"""The kernels of the model-parallel linear layers: ``x @ W.T`` on one rank's local weight.

A layer of :mod:`llama.parallel_layers` holds its weight in one of three layouts, and
:func:`kernel_for` picks the kernel that reads it:

- :func:`dense`: a float tensor, ``F.linear``; :func:`gemv` reads the same tensor with our
  own matrix-vector kernels (:mod:`llama.native`) for the few rows of a decode step;
- :func:`packed`: a float32 or bfloat16 weight reordered into oneDNN's blocked layout
  (:mod:`llama.packed_linear` says why), oneDNN's inner product;
- :func:`int8`: int8 ``weight`` with one float scale per output row in ``scales``
  (:mod:`llama.quantize`), :func:`int8_linear`; :func:`int8_fp32` is the same product
  with float32 activations; :func:`int8_gemv` our AVX512-VNNI (or AVX2) kernel for decode rows.

Each kernel is called as ``kernel(x, layer)``; the layer does the model-parallel
communication around it. :data:`KERNELS` names them (the names that
:mod:`llama.kernel_choice` measures, caches and takes as overrides); a weight's layout
admits the kernels of its :func:`layout`. This module imports nothing else of the
package but :mod:`llama.native` (which imports none), so the layers, packing and
quantization all depend on it and not on each other.
"""

import contextlib
import functools
import threading
import weakref
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import native

Kernel = Callable[[torch.Tensor, nn.Module], torch.Tensor]


def dense(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``x @ layer.weight.T`` for a dense float weight."""
    return F.linear(x, layer.weight)


@torch.library.custom_op("llama::gemv_linear", mutates_args=())
def gemv_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`llama.native.linear` as an operator, for compiled graphs (opaque to Inductor, like
    ``llama::packed_linear``): compiled, the gemv layers keep our kernels and their one copy of
    the weights (Inductor's frozen GEMMs would pack a second)."""
    return native.linear(x, weight)


@gemv_linear.register_fake
def _gemv_linear_shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def gemv(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``x @ layer.weight.T`` for a dense float weight: our kernels (:func:`llama.native.linear`)
    for up to ``native.MAX_ROWS`` rows (decode); for more (prefill, compute-bound), oneDNN's
    inner product on the same dense weight where it takes the dtype, else ``F.linear``.

    Under ``torch.compile``: the operator ``llama::gemv_linear`` (:func:`gemv_linear`).

    oneDNN takes bfloat16 only where the CPU has the instructions for it (tried once); elsewhere
    prefill is ``F.linear``. Why oneDNN and not ``F.linear`` for prefill: ``F.linear`` on float32 is MKL's ``sgemm``,
    which took 2.1-2.5x as long as oneDNN on 128 rows of the 110m shapes (Zen 5 EPYC: 160-200
    against 400-435 GFLOP/s; oneDNN read the dense weight as fast as its packed copy);
    bfloat16 goes to oneDNN either way.
    """
    weight = layer.weight
    if torch.compiler.is_compiling():  # an operator the compiled graph calls; Inductor fuses the work around it
        return gemv_linear(x, weight)
    if native.covers(x, weight):
        return native.run_linear(x, weight)
    if (
        x.dtype == weight.dtype
        and x.device.type == weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and _onednn_takes_dense(weight.dtype)
    ):
        return _pointwise(x, weight)
    return F.linear(x, weight)


@functools.lru_cache(maxsize=None)
def _onednn_takes_dense(dtype: torch.dtype) -> bool:
    """Whether oneDNN's inner product runs on a dense ``dtype`` weight on this CPU (tried once on a
    small one): float32 always, bfloat16 only where the CPU has the instructions oneDNN needs."""
    if _LINEAR_POINTWISE is None or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        return bool((_pointwise(torch.ones(2, 32, dtype=dtype), torch.ones(16, 32, dtype=dtype)) == 32).all())
    except RuntimeError:
        return False


# ----------------------------------------------------------------------------- oneDNN-packed float32

# Under ``torch.compile`` a packed weight cannot be traced (it has no storage), so each
# packed layer also gets an integer handle and the traced graph calls the custom operator
# ``llama::packed_linear(x, handle, out_features)``, which looks the weight up. Inductor
# fuses everything around these calls (norms, RoPE, attention glue, SiLU) and removes
# the per-operator overhead of eager mode; the products stay on oneDNN. Inductor's own
# frozen float32 linears use MKL's packed ``sgemm``, the slower kernel (see llama.packed_linear).

# handle -> packed weight, for the custom operator (weak: a dropped model frees its weights)
_PACKED: List[Callable[[], Optional[torch.Tensor]]] = []


def register_packed(weight: torch.Tensor) -> int:
    """The handle under which :func:`packed_linear` finds ``weight``."""
    _PACKED.append(weakref.ref(weight))
    return len(_PACKED) - 1


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _LINEAR_POINTWISE(x, weight, None, "none", [], "")


# Looked up once: ``torch.ops`` resolves each attribute anew, a cost paid ~100 times per decode step.
_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None


@torch.library.custom_op("llama::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """``x @ W.T`` for the packed weight ``W`` registered under ``handle`` (for compiled graphs)."""
    weight = _PACKED[handle]()
    if weight is None:
        raise RuntimeError("the packed weight of this compiled graph was freed with its model")
    return _pointwise(x, weight)


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def packed(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``x @ layer.weight.T`` for a oneDNN-packed weight (handle in ``layer.packed_handle``)."""
    if torch.compiler.is_compiling():  # never touch the untraceable weight while tracing
        return packed_linear(x, layer.packed_handle, layer.packed_out_features)
    return _pointwise(x, layer.weight)


# ----------------------------------------------------------------------------- int8 weight-only


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, compute_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` for int8 ``weight`` (out, in) and per-row ``scales``; in x's dtype.

    On the CPU, ``aten._weight_int8pack_mm`` with activations in ``compute_dtype``
    (default: x's, except bfloat16 for float32 ``x``: that kernel's float32 path was a
    scalar loop, ~10x slower than bfloat16, on the CPUs it was first measured on; a
    float32 model keeps bfloat16 scales; :mod:`llama.kernel_choice` measures both);
    elsewhere ``F.linear(x, Q.to(x.dtype)) * scale``, which ``torch.compile`` fuses
    (eager it materialises the dequantized weight).
    """
    in_features = weight.shape[1]
    if x.device.type == "cpu" and in_features % 8 == 0:  # the kernel misreads rows whose length is not a multiple of 8
        if compute_dtype is None:
            compute_dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
        shape = x.shape
        x2 = x.reshape(-1, in_features).to(compute_dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2, weight, scales.to(compute_dtype))
        return y.to(x.dtype).view(*shape[:-1], weight.shape[0])
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


# The prefill of an int8 layer (more than native.MAX_ROWS rows): "prefill-int8mm", its kernel's own product
# (int8_linear), or "prefill-dequantized" (int8_prefill_dequantized); llama.kernel_choice measures which.
PREFILL_KERNELS = ("prefill-int8mm", "prefill-dequantized")
DEQUANTIZED_MIN_ROWS = 32  # fewer rows keep the layer's kernel: dequantizing the weight would cost more than it saves
_DEQUANTIZED_BLOCK_BYTES = 32 << 20  # the most a block of dequantized rows holds (kept per thread, reused)
_scratch = threading.local()
_prefilling = threading.local()


@contextlib.contextmanager
def prefill_pass():
    """While it is open (on this thread), int8 layers may run their prefill kernel (``layer.prefill``):
    :meth:`llama.model.Transformer.prefill` opens it. A decode step never does, however many rows it
    has: dequantizing every weight at every step would multiply the bytes a step moves."""
    depth = getattr(_prefilling, "depth", 0)
    _prefilling.depth = depth + 1
    try:
        yield
    finally:
        _prefilling.depth = depth


def prefill_compute_dtype(dtype: torch.dtype, fp32_activations: bool = False) -> torch.dtype:
    """The dtype :func:`int8_prefill_dequantized` multiplies in for activations of ``dtype``: bfloat16
    for float32 ones where oneDNN takes bfloat16 (as :func:`int8_linear` does for its int8 matmul),
    unless ``fp32_activations`` (the ``int8-fp32`` kernel's layers); else ``dtype``."""
    if dtype == torch.float32 and not fp32_activations and _onednn_takes_dense(torch.bfloat16):
        return torch.bfloat16
    return dtype


def int8_prefill_dequantized(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, compute_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` for the many rows of a prefill, in x's dtype: blocks of the
    int8 ``weight``'s rows are dequantized into ``compute_dtype`` (default: :func:`prefill_compute_dtype`;
    :func:`llama.native.dequantize_int8`, at memory speed, into a buffer of at most 32 MiB reused
    from call to call), each multiplied by oneDNN's GEMM (``F.linear`` where oneDNN does not take
    the dtype).

    Why: a prefill is compute-bound, and torch's int8 matmul (``_weight_int8pack_mm``) ran at
    210-310 GFLOP/s where oneDNN's bfloat16 GEMM ran at 660-800 on a Zen 5 EPYC at 128-512 rows
    (float32: about 400); the dequantization reads 1 and writes 2-4 bytes per weight, once per
    call. Where the dequantized path is faster is measured per machine and shape
    (:mod:`llama.kernel_choice`, ``"prefill-dequantized"``). Needs :func:`llama.native.dequantizes`.
    """
    out_features, in_features = weight.shape
    shape, dtype = x.shape, x.dtype
    compute = compute_dtype or prefill_compute_dtype(dtype)
    x2 = x.reshape(-1, in_features).to(compute)  # (..., in) -> (rows, in)
    scales = scales.float()
    rows_per_block = max(1, min(out_features, _DEQUANTIZED_BLOCK_BYTES // (in_features * x2.element_size())))
    buffer = getattr(_scratch, "buffers", {}).get(compute)
    if buffer is None or buffer.numel() < rows_per_block * in_features:
        buffer = torch.empty(rows_per_block * in_features, dtype=compute)
        _scratch.buffers = {**getattr(_scratch, "buffers", {}), compute: buffer}
    product = _pointwise if _onednn_takes_dense(compute) else F.linear
    y = None
    for start in range(0, out_features, rows_per_block):
        stop = min(start + rows_per_block, out_features)
        block = buffer[: (stop - start) * in_features].view(stop - start, in_features)
        native.dequantize_int8(weight[start:stop], scales[start:stop], block)
        part = product(x2, block)  # (rows, stop - start)
        if stop - start == out_features:
            y = part
        else:
            if y is None:
                y = x2.new_empty((x2.shape[0], out_features))
            y[:, start:stop] = part
    return y.to(dtype).view(*shape[:-1], out_features)


def _prefill(x: torch.Tensor, layer: nn.Module) -> Optional[torch.Tensor]:
    """The product of an int8 layer by :func:`int8_prefill_dequantized`, where its plan says so, in a
    prefill pass (:func:`prefill_pass`) of at least :data:`DEQUANTIZED_MIN_ROWS` rows (None: the layer's
    kernel takes it)."""
    if (  # eager first: under torch.compile the sizes may be symbols
        getattr(layer, "prefill", None) == "prefill-dequantized"
        and getattr(_prefilling, "depth", 0) > 0
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.numel() >= DEQUANTIZED_MIN_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and x.requires_grad)
        and x.dtype in (torch.float32, torch.bfloat16)
    ):
        compute = prefill_compute_dtype(x.dtype, fp32_activations=layer.kernel is int8_fp32)
        if native.dequantizes(layer.weight, compute):
            return int8_prefill_dequantized(x, layer.weight, layer.scales, compute)
    return None


def int8(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``x @ W.T`` for an int8 ``layer.weight`` with per-output-row ``layer.scales``: :func:`int8_linear`,
    or for a prefill the layer's prefill kernel (``layer.prefill``, see :func:`int8_prefill_dequantized`)."""
    y = _prefill(x, layer)
    return y if y is not None else int8_linear(x, layer.weight, layer.scales)


def int8_fp32(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """:func:`int8` with float32 activations (float32 scales) on the CPU."""
    y = _prefill(x, layer)
    return y if y is not None else int8_linear(x, layer.weight, layer.scales, torch.float32)


def int8_gemv(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``x @ W.T`` for an int8 ``layer.weight`` with float32 per-output-row ``layer.scales``: our
    AVX512-VNNI or AVX2 kernel (:func:`llama.native.int8_linear`, activations quantized in blocks of 32)
    for up to ``native.MAX_ROWS`` rows (decode); for more (prefill), as :func:`int8`."""
    if native.covers_int8(x, layer.weight, layer.scales):
        return native.run_int8_linear(x, layer.weight, layer.scales)
    y = _prefill(x, layer)
    return y if y is not None else int8_linear(x, layer.weight, layer.scales)


# ----------------------------------------------------------------------------- names and layouts

# name -> kernel, for plans, caches and overrides (llama.kernel_choice)
KERNELS: Dict[str, Kernel] = {
    "dense": dense, "gemv": gemv, "packed": packed, "int8": int8, "int8-fp32": int8_fp32, "int8-gemv": int8_gemv,
}
_NAMES = {kernel: name for name, kernel in KERNELS.items()}


def name_of(kernel: Kernel) -> str:
    """The :data:`KERNELS` name of ``kernel``."""
    return _NAMES[kernel]


def layout(weight_or_name) -> str:
    """``"dense"``, ``"packed"`` or ``"int8"``: the layout of a weight, or the one a kernel (name) reads."""
    if isinstance(weight_or_name, str):
        return "int8" if weight_or_name.startswith("int8") else "dense" if weight_or_name == "gemv" else weight_or_name
    if weight_or_name.is_mkldnn:
        return "packed"
    return "int8" if weight_or_name.dtype == torch.int8 else "dense"


def kernel_for(weight: torch.Tensor) -> Kernel:
    """The default kernel for a weight in this layout (int8 means int8 with scales)."""
    return KERNELS[layout(weight)]
