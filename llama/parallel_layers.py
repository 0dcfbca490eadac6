"""fairscale's model-parallel layers, constructible without allocating weights.

fairscale's constructors allocate with the legacy ``torch.Tensor(rows, cols)``
constructor, which ignores ``torch.device("meta")``, and on a model-parallel world
larger than one they also materialise the *full* (unsharded) matrix to scatter it.
For a 70B model that is tens of GB of garbage per rank before the checkpoint is even
opened. These subclasses keep fairscale's forward passes (and thus its collectives)
but set up the same attributes with parameters created directly on ``device`` in
``dtype``: ``device="meta"`` costs nothing, and the checkpoint is then loaded with
``load_state_dict(assign=True)``.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel import mappings as mp_mappings
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from .packed_linear import linear


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


class ColumnParallelLinear(fs_layers.ColumnParallelLinear):
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
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.output_size_per_partition = _partition(out_features, "output features")
        self.weight = _parameter((self.output_size_per_partition, in_features), device, dtype)
        self.register_parameter("bias", None)
        self.master_weight = None
        self.single_rank = get_model_parallel_world_size() == 1
        self.packed_handle: Optional[int] = None  # set by llama.packed_linear

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.single_rank:  # fairscale's region functions are identities here; skip their overhead
            return linear(input_, self)
        if self.packed_handle is not None:  # fairscale's forward, with the packed weight's kernel
            output = linear(mp_mappings.copy_to_model_parallel_region(input_), self)
            return mp_mappings.gather_from_model_parallel_region(output) if self.gather_output else output
        return super().forward(input_)


class RowParallelLinear(fs_layers.RowParallelLinear):
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
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = input_is_parallel
        self.input_size_per_partition = _partition(in_features, "input features")
        self.weight = _parameter((out_features, self.input_size_per_partition), device, dtype)
        self.register_parameter("bias", None)
        self.master_weight = None
        self.single_rank = get_model_parallel_world_size() == 1
        self.packed_handle: Optional[int] = None  # set by llama.packed_linear

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.single_rank:
            return linear(input_, self)
        if self.packed_handle is not None:  # fairscale's forward, with the packed weight's kernel
            if not self.input_is_parallel:
                input_ = mp_mappings.scatter_to_model_parallel_region(input_)
            return mp_mappings.reduce_from_model_parallel_region(linear(input_, self))
        return super().forward(input_)
