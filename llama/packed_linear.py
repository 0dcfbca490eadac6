"""Linear layers with oneDNN-packed weights: on many CPUs the fast eager path.

A decode step is a chain of matrix-vector products that read every weight once, so its
speed is set by how close those products get to the memory bandwidth. ``F.linear`` on
CPU tensors goes to MKL's ``sgemm`` (float32) or oneDNN's matmul (bfloat16); oneDNN's
inner-product primitive on weights reordered once into its blocked layout (what
Inductor's weight freezing does under ``torch.compile``) is often faster, with float32
accumulation throughout, but not on every CPU. At batch 1 / 8, packed float32 was 1.3x /
1.8x MKL on a 2-core AMD EPYC without AVX-512 (Zen 3); on Llama-2-7B shapes, 1.4-1.8x /
2-3.5x on a 2-core AMD EPYC with AVX-512 (Zen 5, family 26), where packed bfloat16 was
1.3-1.8x dense bfloat16; on an Intel Xeon with AMX a whole packed float32 decode step was
0.8x the dense one. So :mod:`llama.kernel_choice` times both per shape on the machine at hand
and packs only where packing wins (or where asked: ``Llama.build(kernels="packed")``).
bfloat16 (and float16) pack only where oneDNN has the instructions for them
(:func:`packing_supported` tries).

:func:`pack_linear_weights` swaps each model-parallel linear layer's dense ``weight`` for
its packed copy, one tensor at a time: the dense tensor is dropped as soon as its packed
copy exists, so memory stays at one copy of the weights. The layers then compute with
:func:`llama.linear_kernels.packed` (which also covers ``torch.compile``, through the
custom operator ``llama::packed_linear``). ``state_dict()`` still returns ordinary dense
tensors (the layers unpack them), and :func:`unpack_linear_weights` undoes the whole
thing (``quantize_model`` unpacks one layer at a time as it quantizes).
"""

import functools
from typing import Callable, Optional

import torch
from torch import nn

from . import linear_kernels
from .parallel_layers import linear_layers


@functools.lru_cache(maxsize=None)
def _can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and multiplies a ``dtype`` weight on this CPU (tried on a small one).

    float32 always; bfloat16 and float16 only where the CPU has the instructions (oneDNN
    refuses them otherwise, e.g. "fp16 path needs the cpu support avx_ne_convert or avx512_fp16").
    """
    if not (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    try:
        w = torch.ones(16, 32, dtype=dtype)
        y = linear_kernels._pointwise(torch.ones(2, 32, dtype=dtype), torch.ops.mkldnn._reorder_linear_weight(w, 1))
        return bool((y == 32).all())
    except RuntimeError:
        return False


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can pack weights of ``dtype`` on ``device``.

    float32 on the CPU (with oneDNN); bfloat16 (and float16) where the CPU has the
    instructions oneDNN needs for them (AVX512-BF16 or AMX; AVX512-FP16 or AVX-NE-CONVERT).
    """
    return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and _can_pack(dtype)


def pack_layer(layer: nn.Module, batch_size_hint: int = 1) -> None:
    """Replace one dense linear layer's weight by its oneDNN-packed copy (the dense tensor is dropped)."""
    weight = layer.weight
    if not packing_supported(weight.device, weight.dtype):
        raise ValueError(
            f"cannot pack a {weight.dtype} weight on {weight.device} here: packing is for float32 on the CPU, "
            "and bfloat16/float16 where the CPU has the instructions for them"
        )
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size_hint)
    del weight
    layer.set_weight(packed)  # the dense tensor is freed here


def pack_linear_weights(
    model: nn.Module,
    batch_size_hint: int = 1,
    on_packed: Optional[Callable[[str], None]] = None,
    only: Optional[Callable[[str, nn.Module], bool]] = None,
) -> int:
    """Replace each linear layer's dense weight by its oneDNN-packed copy; returns how many.

    ``batch_size_hint``: the number of rows the layout is tuned for (1: decoding one
    sequence); any number of rows works. ``on_packed(key)`` is called with the state-dict
    key of each weight once its dense tensor is dropped: ``Llama.build`` passes the
    checkpoint's ``release``, so that the pages of a memory-mapped shard that packing read
    leave the process's resident memory too. ``only(name, layer)``: pack just the layers
    for which it is true (:mod:`llama.kernel_choice` packs the shapes where packing was
    measured faster). Call on a loaded model in inference mode only: packed weights take
    no gradients. Layers already packed, or int8, are left as they are. Raises
    ``ValueError`` if packing is not supported for a weight's device and dtype (see
    :func:`packing_supported`).
    """
    count = 0
    for name, layer in linear_layers(model):
        if layer.kernel is not linear_kernels.dense or (only is not None and not only(name, layer)):
            continue
        pack_layer(layer, batch_size_hint)
        if on_packed is not None:
            on_packed(f"{name}.weight" if name else "weight")
        count += 1
    return count


def unpack_linear_weights(model: nn.Module) -> int:
    """Undo :func:`pack_linear_weights`: dense weights again; returns how many were packed."""
    count = 0
    for _, layer in linear_layers(model):
        if layer.kernel is linear_kernels.packed:
            layer.set_weight(layer.weight.to_dense())
            count += 1
    return count


def is_packed(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` holds a packed weight."""
    return any(layer.kernel is linear_kernels.packed for _, layer in linear_layers(model))
