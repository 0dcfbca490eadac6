"""Device selection and process-group setup, with or without torchrun.

Everything that knows about backends, ranks and device names lives here, so the
rest of the package only sees a ``torch.device`` and fairscale's model-parallel group.
"""

import contextlib
import io
import os
from typing import Any, Callable, Optional, TypeVar, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

T = TypeVar("T")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def select_device(device: Union[None, str, torch.device] = None) -> torch.device:
    """Return the device to run on.

    ``None`` picks this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is
    available, else the CPU. Any torch device string (``"cpu"``, ``"cuda:1"``,
    ``"mps"``) or ``torch.device`` is accepted as given.
    """
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a torch device name (try 'cpu' or 'cuda'): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
    return device


def select_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """Return the parameter dtype: bfloat16 on CUDA where supported (else float16), float32 elsewhere."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype={dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r} is not supported; use 'float32', 'bfloat16' or 'float16'")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_model_parallel(model_parallel_size: Optional[int], device: torch.device) -> int:
    """Make sure a process group and fairscale's model-parallel groups exist.

    Under torchrun (or any launcher that sets ``WORLD_SIZE``/``MASTER_ADDR``) the
    default ``env://`` rendezvous is used, so multi-host runs work through torchrun's
    ``--rdzv_endpoint``. A plain ``python`` run gets a one-process group on an
    in-memory store: no port is opened, so concurrent runs cannot collide.
    Returns the model-parallel world size.
    """
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1)
        else:
            missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise RuntimeError(
                    f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with "
                    f"`torchrun --nproc_per_node {world_size} ...` instead of setting WORLD_SIZE by hand"
                )
            dist.init_process_group(backend_for(device))
    world_size = dist.get_world_size()
    if fs_init.model_parallel_is_initialized():
        current = fs_init.get_model_parallel_world_size()
        if model_parallel_size is not None and model_parallel_size != current:
            raise ValueError(
                f"model_parallel_size={model_parallel_size} but this process already uses a "
                f"model-parallel group of size {current}"
            )
        return current
    if model_parallel_size is None:
        model_parallel_size = world_size
    if model_parallel_size < 1 or world_size % model_parallel_size != 0:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} must divide the number of processes ({world_size})"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints three banner lines
        fs_init.initialize_model_parallel(model_parallel_size)
    return model_parallel_size


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank() if fs_init.model_parallel_is_initialized() else 0


def model_parallel_world_size() -> int:
    return fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else 1


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return global_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class RankFailure(RuntimeError):
    """Raised on every rank when another rank failed a step that all ranks run together."""


def run_on_all_ranks(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank, then make all ranks agree on whether it worked.

    A rank whose ``fn`` raises still joins the agreement, so the others learn of the
    failure and raise too instead of waiting forever in the next collective. The
    failing rank re-raises its own exception; the others raise ``RankFailure`` with
    its message.
    """
    error: Optional[BaseException] = None
    result: Any = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = e
    if world_size() > 1:
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages: list = [None] * world_size()
        dist.all_gather_object(messages, message)
        if error is None:
            failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
            if failed:
                rank, m = failed[0]
                raise RankFailure(f"{what} failed on rank {rank}: {m}")
    if error is not None:
        raise error
    return result


def check_ranks_agree(value: Any, what: str) -> None:
    """Raise ``ValueError`` on every rank unless all ranks passed an equal ``value``."""
    if world_size() == 1:
        return
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        shown = ", ".join(f"rank {r}: {v!r}"[:200] for r, v in enumerate(values))
        raise ValueError(f"ranks disagree on {what} ({shown}); every rank must be given the same {what}")
