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
stay those of :mod:`llama.parallel_layers`, holding the int8 ``weight`` and its
``scales`` (buffers, under the checkpoint's ``...weight`` and ``...scales`` keys); they
keep fairscale's collectives around the int8 kernel, :func:`int8_linear` (in
:mod:`llama.linear_kernels`, which says why a float32 model keeps bfloat16 scales).

Use ``Llama.build(..., quantize="int8")``, which quantizes tensor by tensor while
loading (:func:`load_quantized`: the float model is never held whole), or
:func:`quantize_model` on a model already in memory.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from . import linear_kernels
from .linear_kernels import int8_linear  # noqa: F401 - public here: the kernel of the int8 layers
from .parallel_layers import linear_layers

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


def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Make every float linear layer of ``model`` (in place) an int8 one; returns ``model``.

    Layer by layer: each float weight is released as soon as its int8 copy exists
    (unless something else still references it).
    """
    check_mode(mode)
    for _, layer in linear_layers(model):
        if linear_kernels.layout(layer.weight) == "int8":
            continue
        w = layer.weight.detach()
        if w.is_mkldnn:  # packed for the float32 CPU path (llama.packed_linear): one layer unpacked at a time
            w = w.to_dense()
        q, scales = quantize_weight(w, scale_dtype=scale_dtype_for(w.device, w.dtype))
        del w
        layer.set_weight(q, scales)
    return model


def swap_to_int8(model: nn.Module, dtype: torch.dtype) -> None:
    """Make the linear layers of a model built on the meta device int8 ones (scales in ``dtype``), also on meta."""
    for _, layer in linear_layers(model):
        rows, cols = layer.weight.shape
        layer.set_weight(
            torch.empty(rows, cols, dtype=torch.int8, device="meta"), torch.empty(rows, dtype=dtype, device="meta")
        )


def load_quantized(
    model: nn.Module, source, rank: int, world: int, device: torch.device, dtype: torch.dtype, mode: str = "int8"
) -> None:
    """Like :func:`llama.checkpoint.load_into`, quantizing the linear weights as they are read.

    ``model`` is built on the meta device. Each linear weight goes from the checkpoint
    (memory-mapped) to int8 on ``device`` a chunk of rows at a time, and the source pages
    it read are released right after: at no point is the float model held whole.
    """
    from . import progress
    from .checkpoint import rank_bytes, to_target

    check_mode(mode)
    swap_to_int8(model, scale_dtype_for(device, dtype))
    state: Dict[str, torch.Tensor] = {}
    total = rank_bytes(source.args, rank, world, lambda key: 1 if is_quantized_key(key) else dtype.itemsize)
    with progress.for_loading(source, total) as shown:
        for key, t in source.state_dict_for_rank(rank, world):
            if is_quantized_key(key):
                q, scales = quantize_weight(t, device=device, scale_dtype=scale_dtype_for(device, dtype))
                state[key] = q
                state[key[: -len("weight")] + "scales"] = scales
            else:
                state[key] = to_target(t, device, dtype)
            del t
            source.release(key, keep=state[key])
            shown.update(state[key].nbytes)
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)


def is_quantized(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` holds an int8 weight."""
    return any(linear_kernels.layout(layer.weight) == "int8" for _, layer in linear_layers(model))


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
