"""Linear layers with oneDNN-packed weights: the fast eager path for float32 on the CPU.

A decode step is a chain of matrix-vector products that read every weight once, so its
speed is set by how close those products get to the memory bandwidth. ``F.linear`` on
float32 CPU tensors goes to MKL's ``sgemm``, which on small batches reaches only about
40% of the bandwidth on our 2-core machines and scales badly from 1 to 8 rows. oneDNN's
inner-product primitive on weights reordered once into its blocked layout (what
Inductor's weight freezing does under ``torch.compile``) is 1.3x faster at batch 1 and
1.8x at batch 8 on the same machine, with float32 accumulation throughout.

:func:`pack_linear_weights` swaps each model-parallel linear layer's ``weight`` for its
packed copy, one tensor at a time: the dense tensor is dropped as soon as its packed copy
exists, so memory stays at one copy of the weights. The layers' ``forward`` call
:func:`linear`, which picks the kernel from the weight. ``state_dict()`` still returns
ordinary dense tensors (a hook unpacks them), and :func:`unpack_linear_weights` undoes
the whole thing (``quantize_model`` does).

Under ``torch.compile`` a packed weight cannot be traced (it has no storage), so each
packed layer also gets an integer handle and the traced graph calls the custom operator
``llama::packed_linear(x, handle, out_features)``, which looks the weight up. Inductor
fuses everything around these calls (norms, RoPE, attention glue, SiLU) and removes
the per-operator overhead of eager mode; the products stay on oneDNN. Inductor's own
frozen float32 linears use MKL's packed ``sgemm``, the slower kernel above.
"""

import weakref
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build can pack weights of ``dtype`` on ``device`` (float32 on the CPU)."""
    return (
        torch.device(device).type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


# handle -> packed weight, for the custom operator (weak: a dropped model frees its weights)
_PACKED: List[Callable[[], Optional[torch.Tensor]]] = []


@torch.library.custom_op("llama::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """``x @ W.T`` for the packed weight ``W`` registered under ``handle`` (for compiled graphs)."""
    weight = _PACKED[handle]()
    if weight is None:
        raise RuntimeError("the packed weight of this compiled graph was freed with its model")
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``x @ layer.weight.T`` for a dense or a packed weight (out_features, in_features)."""
    handle = getattr(layer, "packed_handle", None)
    if handle is None:
        return F.linear(x, layer.weight)
    if torch.compiler.is_compiling():  # never touch the untraceable weight while tracing
        return packed_linear(x, handle, layer.packed_out_features)
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, None, "none", [], "")


def _linear_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    from .parallel_layers import ColumnParallelLinear, RowParallelLinear

    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            yield name, module


def _dense_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: report a packed weight as the dense tensor it stands for."""
    key = prefix + "weight"
    if key in state_dict and state_dict[key].is_mkldnn:
        state_dict[key] = state_dict[key].to_dense()


def pack_linear_weights(
    model: nn.Module, batch_size_hint: int = 1, on_packed: Optional[Callable[[str], None]] = None
) -> int:
    """Replace each linear layer's dense weight by its oneDNN-packed copy; returns how many.

    ``batch_size_hint``: the number of rows the layout is tuned for (1: decoding one
    sequence); any number of rows works. ``on_packed(key)`` is called with the state-dict
    key of each weight once its dense tensor is dropped: ``Llama.build`` passes the
    checkpoint's ``release``, so that the pages of a memory-mapped shard that packing read
    leave the process's resident memory too. Call on a loaded model in inference mode
    only: packed weights take no gradients. Raises ``ValueError`` if packing is not
    supported for a weight's device and dtype (see :func:`packing_supported`).
    """
    count = 0
    for name, module in _linear_layers(model):
        weight = module.weight
        if weight.is_mkldnn:
            continue
        if not packing_supported(weight.device, weight.dtype):
            raise ValueError(
                f"cannot pack a {weight.dtype} weight on {weight.device}: packing is for float32 on the CPU"
            )
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size_hint)
        del weight
        module.weight = nn.Parameter(packed, requires_grad=False)  # the dense tensor is freed here
        _PACKED.append(weakref.ref(module.weight))
        module.packed_handle, module.packed_out_features = len(_PACKED) - 1, packed.shape[0]
        if not getattr(module, "_dense_state_dict_hook", False):
            module._register_state_dict_hook(_dense_state_dict)
            module._dense_state_dict_hook = True
        if on_packed is not None:
            on_packed(f"{name}.weight" if name else "weight")
        count += 1
    return count


def unpack_linear_weights(model: nn.Module) -> int:
    """Undo :func:`pack_linear_weights`: dense weights again; returns how many were packed."""
    count = 0
    for _, module in _linear_layers(model):
        if module.weight.is_mkldnn:
            module.weight = nn.Parameter(module.weight.to_dense(), requires_grad=False)
            module.packed_handle = None
            count += 1
    return count


def is_packed(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` holds a packed weight."""
    return any(module.weight.is_mkldnn for _, module in _linear_layers(model))
