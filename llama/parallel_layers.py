"""fairscale's model-parallel layers, constructible without allocating weights.

fairscale's constructors allocate with the legacy ``torch.Tensor(rows, cols)``
constructor, which ignores ``torch.device("meta")``, and on a model-parallel world
larger than one they also materialise the *full* (unsharded) matrix to scatter it.
For a 70B model that is tens of GB of garbage per rank before the checkpoint is even
opened. These layers keep fairscale's collectives but create their parameters directly
on ``device`` in ``dtype``: ``device="meta"`` costs nothing, and the checkpoint is then
loaded with ``load_state_dict(assign=True)``.

The two linear layers do the model-parallel communication (fairscale's copy/gather
for column-parallel, scatter/reduce for row-parallel; skipped at world size 1) around
a kernel of :mod:`llama.linear_kernels`, chosen by the layout of the local weight they
hold: dense float, oneDNN-packed (:mod:`llama.packed_linear`) or int8 with per-row
``scales`` (:mod:`llama.quantize`). Whatever the layout, ``state_dict()`` has the
checkpoint's keys: ``weight`` (reported dense when packed), plus ``scales`` for int8.
"""

from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel import mappings as mp_mappings
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from . import linear_kernels, native


def _partition(size: int, what: str) -> int:
    world_size = get_model_parallel_world_size()
    if size % world_size != 0:
        raise ValueError(
            f"{what} ({size}) is not divisible by the model-parallel world size ({world_size})"
        )
    return size // world_size


def _parameter(shape, device, dtype) -> nn.Parameter:
    # Uninitialised, like fairscale's torch.Tensor(...): weights come from a checkpoint.
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))


class ParallelEmbedding(fs_layers.ParallelEmbedding):
    """Embedding split along the embedding dimension (checkpoint dim 1)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        nn.Module.__init__(self)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        # Same attribute values fairscale sets (its norm_type is scale_grad_by_freq).
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = False
        self.scale_grad_by_freq = False
        self.sparse = False
        self._weight = None
        self.embedding_dim_per_partition = _partition(embedding_dim, "dim")
        self.weight = _parameter((num_embeddings, self.embedding_dim_per_partition), device, dtype)
        self.single_rank = get_model_parallel_world_size() == 1

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.single_rank:
            return F.embedding(input_, self.weight)
        return super().forward(input_)


def _dense_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: report a packed weight as the dense tensor it stands for."""
    key = prefix + "weight"
    if key in state_dict and state_dict[key].is_mkldnn:
        state_dict[key] = state_dict[key].to_dense()


class ParallelLinear(nn.Module):
    """y = x W^T on this rank's shard of W (``local_shape``), no bias; see the subclasses."""

    def __init__(self, in_features: int, out_features: int, local_shape: Tuple[int, int], device, dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _parameter(local_shape, device, dtype)
        self.register_parameter("bias", None)
        self.kernel: linear_kernels.Kernel = linear_kernels.dense
        self.packed_handle: Optional[int] = None  # set with a packed weight, for linear_kernels.packed
        self.single_rank = get_model_parallel_world_size() == 1
        self._register_state_dict_hook(_dense_state_dict)

    def set_weight(
        self, weight: torch.Tensor, scales: Optional[torch.Tensor] = None, kernel: Optional[linear_kernels.Kernel] = None
    ) -> None:
        """Hold ``weight`` (local shard, out x in) in place of the current one, and compute with ``kernel``.

        ``weight``: dense float or oneDNN-packed (a parameter that takes no gradient), or
        int8 with its per-output-row ``scales`` (buffers: nothing to train). ``kernel``:
        one of :data:`llama.linear_kernels.KERNELS` that reads this layout (default: the
        layout's, :func:`llama.linear_kernels.kernel_for`). The previous tensors are
        dropped here, so they are freed unless referenced elsewhere.
        """
        layout = linear_kernels.layout(weight)
        if kernel is None:
            kernel = linear_kernels.kernel_for(weight)
        elif linear_kernels.layout(linear_kernels.name_of(kernel)) != layout:
            raise ValueError(f"kernel {linear_kernels.name_of(kernel)!r} cannot read a {layout} weight")
        if (scales is not None) != (layout == "int8"):
            raise ValueError("an int8 weight needs its scales, and only an int8 weight takes scales")
        del self.weight
        if "scales" in self._buffers:
            del self.scales
        if scales is None:
            self.weight = nn.Parameter(weight, requires_grad=False)
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("scales", scales)
        self.kernel = kernel
        self.packed_handle = None
        if layout == "packed":  # the parameter itself: the handle holds it weakly
            self.packed_handle = linear_kernels.register_packed(self.weight)
            self.packed_out_features = weight.shape[0]

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.single_rank:  # fairscale's region functions are identities here; skip their overhead
            return self.kernel(input_, self)
        return self._leave_region(self.kernel(self._enter_region(input_), self))

    def _enter_region(self, input_: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _leave_region(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"local weight {tuple(self.weight.shape)} {self.weight.dtype}, kernel={self.kernel.__name__}"
        )


class ColumnParallelLinear(ParallelLinear):
    """y = x W^T with W split along its output rows (checkpoint dim 0); no bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        gather_output: bool,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        rows = _partition(out_features, "output features")
        super().__init__(in_features, out_features, (rows, in_features), device, dtype)
        self.gather_output = gather_output

    def _enter_region(self, input_: torch.Tensor) -> torch.Tensor:
        return mp_mappings.copy_to_model_parallel_region(input_)

    def _leave_region(self, output: torch.Tensor) -> torch.Tensor:
        return mp_mappings.gather_from_model_parallel_region(output) if self.gather_output else output


class RowParallelLinear(ParallelLinear):
    """y = x W^T with W split along its input columns (checkpoint dim 1); no bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        input_is_parallel: bool,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        cols = _partition(in_features, "input features")
        super().__init__(in_features, out_features, (out_features, cols), device, dtype)
        self.input_is_parallel = input_is_parallel

    def _enter_region(self, input_: torch.Tensor) -> torch.Tensor:
        return input_ if self.input_is_parallel else mp_mappings.scatter_to_model_parallel_region(input_)

    def _leave_region(self, output: torch.Tensor) -> torch.Tensor:
        return mp_mappings.reduce_from_model_parallel_region(output)


def project(x: torch.Tensor, *layers: "ColumnParallelLinear") -> list:
    """``[layer(x) for layer in layers]`` for column-parallel layers that read the same ``x`` (a
    layer's q, k and v projections; w1 and w3): one native call for all of them where they all
    run the ``gemv`` kernel without gathering their outputs (:func:`llama.native.linear_many`),
    so their weights stream back to back; else each layer on its own."""
    first = layers[0]
    if all(layer.kernel is linear_kernels.gemv and not layer.gather_output for layer in layers):
        x_in = x if first.single_rank else first._enter_region(x)
        if all(native.covers(x_in, layer.weight) for layer in layers):
            return native.run_linear_many(x_in, [layer.weight for layer in layers])
    return [layer(x) for layer in layers]


def linear_layers(model: nn.Module) -> Iterator[Tuple[str, ParallelLinear]]:
    """(name, layer) of every model-parallel linear layer of ``model``, whatever its weight's layout."""
    for name, module in model.named_modules():
        if isinstance(module, ParallelLinear):
            yield name, module
