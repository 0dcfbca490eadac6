"""Weight-only int8 quantization of the linear layers.

Each weight matrix ``W`` (out x in) of ``wq, wk, wv, wo, w1, w2, w3`` and ``output``
is stored as int8 ``Q`` with one scale per output row (symmetric, per output channel)::

    scale[r] = max_c |W[r, c]| / 127        Q = round(W / scale[:, None])  in [-127, 127]
    y = x W^T  ~=  (x Q^T) * scale

and dequantized on the fly, so a decode step reads one byte per weight instead of two
(bfloat16) or four (float32). Embeddings and norms stay in the model's dtype.

Quantization acts on each rank's local shard: scales are per output row, so a
column-parallel shard (rows split) and a row-parallel shard (full rows, columns
split) are quantized on their own without talking to the other ranks. The layers
keep fairscale's collectives (copy/gather for column-parallel, reduce for
row-parallel), skipped at world size 1 as in :mod:`llama.parallel_layers`.

Kernels: on the CPU, ``aten._weight_int8pack_mm`` (vectorised for bfloat16 and
float16 activations; float32 activations are rounded to bfloat16 for it, since its
float32 path is a slow scalar loop, so a float32 model keeps bfloat16 scales); elsewhere ``F.linear(x, Q.to(x.dtype)) * scale``,
which ``torch.compile`` fuses (eager it materialises the dequantized weight).

Use ``Llama.build(..., quantize="int8")``, which quantizes tensor by tensor while
loading (:func:`load_quantized`: the float model is never held whole), or
:func:`quantize_model` on a model already in memory.
"""

from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from torch import nn

from .parallel_layers import ColumnParallelLinear, RowParallelLinear

MODES = ("int8",)

# Checkpoint keys (by suffix) of the weights that are quantized.
QUANTIZED_SUFFIXES = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
    "output.weight",
)

_CHUNK_ELEMENTS = 1 << 24  # rows are quantized in float32 chunks of at most this many elements (64 MiB)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not supported; use one of {list(MODES)} or None")
    return mode


def scale_dtype_for(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """dtype of the scales for a model in ``dtype`` on ``device``: the one the kernel takes."""
    return torch.bfloat16 if torch.device(device).type == "cpu" and dtype == torch.float32 else dtype


def is_quantized_key(key: str) -> bool:
    """Whether checkpoint key ``key`` is a weight that :func:`load_quantized` stores as int8."""
    return key == "output.weight" or key.endswith(tuple("." + s for s in QUANTIZED_SUFFIXES))


def quantize_weight(
    w: torch.Tensor, device: Optional[torch.device] = None, scale_dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of a 2-d weight: ``(q int8 (rows, cols), scales (rows,))``.

    Computed in float32, a chunk of rows at a time, directly onto ``device`` (default:
    ``w``'s), so no full-size float copy of ``w`` is made. ``scales`` are in
    ``scale_dtype`` (default ``w``'s dtype); ``q`` is rounded against the scales as
    stored, so ``q * scale`` is the value the kernels compute with.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-d weight, got shape {tuple(w.shape)}")
    device = w.device if device is None else torch.device(device)
    scale_dtype = w.dtype if scale_dtype is None else scale_dtype
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=device)
    scales = torch.empty(rows, dtype=scale_dtype, device=device)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        chunk = w[start : start + step].to(device=device, dtype=torch.float32)
        scale = (chunk.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny).to(scale_dtype)
        q[start : start + step] = torch.round(chunk / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[start : start + step] = scale
        del chunk
    return q, scales


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` for int8 ``weight`` (out, in) and per-row ``scales``; in x's dtype."""
    in_features = weight.shape[1]
    if x.device.type == "cpu" and in_features % 8 == 0:  # the kernel misreads rows whose length is not a multiple of 8
        shape = x.shape
        x2 = x.reshape(-1, in_features)
        if x.dtype == torch.float32:  # its float32 path is a scalar loop, ~10x slower than bfloat16
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), weight, scales.to(torch.bfloat16))
            y = y.to(torch.float32)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, weight, scales.to(x.dtype))
        return y.view(*shape[:-1], weight.shape[0])
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


class Int8Linear(nn.Module):
    """int8 weight (``weight``, out x in) and per-output-row ``scales``, as buffers (nothing to train)."""

    def __init__(self, out_features: int, in_features: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype or torch.float32, device=device))
        self.single_rank = get_model_parallel_world_size() == 1

    def extra_repr(self) -> str:
        return f"local weight {tuple(self.weight.shape)} int8, scales {self.scales.dtype}"


class Int8ColumnParallelLinear(Int8Linear):
    """:class:`~llama.parallel_layers.ColumnParallelLinear` with an int8 local shard (rows split)."""

    def __init__(self, in_features: int, out_features: int, *, gather_output: bool, local_rows: int, device=None, dtype=None):
        super().__init__(local_rows, in_features, device=device, dtype=dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.output_size_per_partition = local_rows

    @classmethod
    def like(cls, layer: ColumnParallelLinear, device=None, dtype=None) -> "Int8ColumnParallelLinear":
        return cls(layer.in_features, layer.out_features, gather_output=layer.gather_output,
                   local_rows=layer.output_size_per_partition, device=device, dtype=dtype)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.single_rank:
            return int8_linear(input_, self.weight, self.scales)
        output = int8_linear(copy_to_model_parallel_region(input_), self.weight, self.scales)
        return gather_from_model_parallel_region(output) if self.gather_output else output


class Int8RowParallelLinear(Int8Linear):
    """:class:`~llama.parallel_layers.RowParallelLinear` with an int8 local shard (columns split, full rows)."""

    def __init__(self, in_features: int, out_features: int, *, input_is_parallel: bool, local_cols: int, device=None, dtype=None):
        super().__init__(out_features, local_cols, device=device, dtype=dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = input_is_parallel
        self.input_size_per_partition = local_cols

    @classmethod
    def like(cls, layer: RowParallelLinear, device=None, dtype=None) -> "Int8RowParallelLinear":
        return cls(layer.in_features, layer.out_features, input_is_parallel=layer.input_is_parallel,
                   local_cols=layer.input_size_per_partition, device=device, dtype=dtype)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.single_rank:
            return int8_linear(input_, self.weight, self.scales)
        input_parallel = input_ if self.input_is_parallel else scatter_to_model_parallel_region(input_)
        return reduce_from_model_parallel_region(int8_linear(input_parallel, self.weight, self.scales))


def _linear_layers(model: nn.Module) -> Iterator[Tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, layer) of every float model-parallel linear layer of ``model``."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                yield module, child_name, child


def _int8_like(layer: nn.Module, device, dtype) -> Int8Linear:
    if isinstance(layer, ColumnParallelLinear):
        return Int8ColumnParallelLinear.like(layer, device=device, dtype=dtype)
    return Int8RowParallelLinear.like(layer, device=device, dtype=dtype)


def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace every linear layer of ``model`` (in place) by its int8 version; returns ``model``.

    Layer by layer: each float weight is released as soon as its int8 copy exists
    (unless something else still references it).
    """
    check_mode(mode)
    for parent, name, layer in _linear_layers(model):
        w = layer.weight.detach()
        if w.is_mkldnn:  # packed for the float32 CPU path (llama.packed_linear): one layer unpacked at a time
            w = w.to_dense()
        q, scales = quantize_weight(w, scale_dtype=scale_dtype_for(w.device, w.dtype))
        new = _int8_like(layer, device="meta", dtype=scales.dtype)
        new.weight, new.scales = q, scales
        setattr(parent, name, new)
        del layer, w
    return model


def swap_to_int8(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace the linear layers of a model built on the meta device by int8 ones, also on meta."""
    for parent, name, layer in _linear_layers(model):
        setattr(parent, name, _int8_like(layer, device="meta", dtype=dtype))


def load_quantized(
    model: nn.Module, source, rank: int, world: int, device: torch.device, dtype: torch.dtype, mode: str = "int8"
) -> None:
    """Like :func:`llama.checkpoint.load_into`, quantizing the linear weights as they are read.

    ``model`` is built on the meta device. Each linear weight goes from the checkpoint
    (memory-mapped) to int8 on ``device`` a chunk of rows at a time, and the source pages
    it read are released right after: at no point is the float model held whole.
    """
    from .checkpoint import to_target

    check_mode(mode)
    swap_to_int8(model, scale_dtype_for(device, dtype))
    state: Dict[str, torch.Tensor] = {}
    for key, t in source.state_dict_for_rank(rank, world):
        if is_quantized_key(key):
            q, scales = quantize_weight(t, device=device, scale_dtype=scale_dtype_for(device, dtype))
            state[key] = q
            state[key[: -len("weight")] + "scales"] = scales
        else:
            state[key] = to_target(t, device, dtype)
        del t
        source.release(key, keep=state[key])
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)


def is_quantized(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` is an int8 layer of this module."""
    return any(isinstance(module, Int8Linear) for module in model.modules())


def weight_bytes(model: nn.Module, exclude_embedding: bool = True) -> int:
    """Bytes of the weights (parameters, int8 weights and scales) of ``model``; KV cache and RoPE tables excluded.

    With ``exclude_embedding`` (the default) the token embedding is left out: a decode
    step reads one row of it, so this is what one decode step reads from memory.
    """
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or name.endswith(("cache_k", "cache_v", "rope_cos", "rope_sin")):
            continue
        if exclude_embedding and name.endswith("tok_embeddings.weight"):
            continue
        total += t.numel() * t.element_size()
    return total
