"""Linear layers with oneDNN-packed weights: the fast eager path for float32 on the CPU.

A decode step is a chain of matrix-vector products that read every weight once, so its
speed is set by how close those products get to the memory bandwidth. ``F.linear`` on
float32 CPU tensors goes to MKL's ``sgemm``, which on small batches reaches only about
40% of the bandwidth on our 2-core machines and scales badly from 1 to 8 rows. oneDNN's
inner-product primitive on weights reordered once into its blocked layout (what
Inductor's weight freezing does under ``torch.compile``) is 1.3x faster at batch 1 and
1.8x at batch 8 on the same machine, with float32 accumulation throughout.

:func:`pack_linear_weights` swaps each model-parallel linear layer's dense ``weight`` for
its packed copy, one tensor at a time: the dense tensor is dropped as soon as its packed
copy exists, so memory stays at one copy of the weights. The layers then compute with
:func:`llama.linear_kernels.packed` (which also covers ``torch.compile``, through the
custom operator ``llama::packed_linear``). ``state_dict()`` still returns ordinary dense
tensors (the layers unpack them), and :func:`unpack_linear_weights` undoes the whole
thing (``quantize_model`` unpacks one layer at a time as it quantizes).
"""

from typing import Callable, Optional

import torch
from torch import nn

from . import linear_kernels
from .parallel_layers import linear_layers


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build can pack weights of ``dtype`` on ``device`` (float32 on the CPU)."""
    return (
        torch.device(device).type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack_linear_weights(
    model: nn.Module, batch_size_hint: int = 1, on_packed: Optional[Callable[[str], None]] = None
) -> int:
    """Replace each linear layer's dense weight by its oneDNN-packed copy; returns how many.

    ``batch_size_hint``: the number of rows the layout is tuned for (1: decoding one
    sequence); any number of rows works. ``on_packed(key)`` is called with the state-dict
    key of each weight once its dense tensor is dropped: ``Llama.build`` passes the
    checkpoint's ``release``, so that the pages of a memory-mapped shard that packing read
    leave the process's resident memory too. Call on a loaded model in inference mode
    only: packed weights take no gradients. Layers already packed, or int8, are left as
    they are. Raises ``ValueError`` if packing is not supported for a weight's device and
    dtype (see :func:`packing_supported`).
    """
    count = 0
    for name, layer in linear_layers(model):
        if layer.kernel is not linear_kernels.dense:
            continue
        weight = layer.weight
        if not packing_supported(weight.device, weight.dtype):
            raise ValueError(
                f"cannot pack a {weight.dtype} weight on {weight.device}: packing is for float32 on the CPU"
            )
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size_hint)
        del weight
        layer.set_weight(packed)  # the dense tensor is freed here
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
