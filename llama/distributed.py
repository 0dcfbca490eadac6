"""Device selection and process-group setup, with or without torchrun.

Everything that knows about backends, ranks and device names lives here, so the
rest of the package only sees a ``torch.device`` and fairscale's model-parallel group.
"""

import atexit
import contextlib
import datetime
import io
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

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
        return _this_rank_gpu() if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a torch device name (try 'cpu' or 'cuda'): {e}") from None
    if is_cuda(device):
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available; use device='cpu'")
        if device.index is None:
            device = _this_rank_gpu()
    return device


def is_cuda(device: Union[str, torch.device]) -> bool:
    """Whether ``device`` is a CUDA GPU: the one test behind every CUDA-specific choice."""
    return torch.device(device).type == "cuda"


def _this_rank_gpu() -> torch.device:
    """This process's GPU: ``LOCAL_RANK`` modulo the GPUs visible on this host."""
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def select_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """Return the parameter dtype: bfloat16 on CUDA where supported (else float16), float32 elsewhere."""
    if dtype is None:
        if is_cuda(device):
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
    return "nccl" if is_cuda(device) else "gloo"


def _destroy_process_group() -> None:
    """At exit: tear the process group down while the interpreter is still whole.

    Left to the interpreter's own teardown, gloo's threads are sometimes destroyed
    while still running and the process aborts ("terminate called without an active
    exception", exit status -6) after having done all its work.
    """
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; nothing useful to report
            pass


TIMEOUT_ENV = "LLAMA_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = {"gloo": 300.0, "nccl": 600.0}


def dist_timeout(backend: str) -> datetime.timedelta:
    """How long a rank waits for the others in a collective (and to join the process group).

    ``LLAMA_DIST_TIMEOUT`` (seconds) if set, else 5 minutes for gloo and 10 for nccl,
    instead of torch's 30-minute gloo default: a rank whose peer failed before
    reaching a collective (and was not killed by torchrun, e.g. on another host)
    then fails within that time instead of hanging for half an hour. Raise it when
    ranks may legitimately reach a collective minutes apart (a slow shared disk).
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return datetime.timedelta(seconds=_DEFAULT_TIMEOUT_S.get(backend, 300.0))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds (e.g. {TIMEOUT_ENV}=600)")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def _new_groups_timeout(timeout: datetime.timedelta) -> Iterator[None]:
    """Give the groups fairscale creates our timeout (it passes none, so torch's default applies)."""
    new_group = dist.new_group

    def with_timeout(*args, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = timeout
        return new_group(*args, **kwargs)

    dist.new_group = with_timeout
    try:
        yield
    finally:
        dist.new_group = new_group


def init_model_parallel(model_parallel_size: Optional[int], device: torch.device) -> int:
    """Make sure a process group and fairscale's model-parallel groups exist.

    Under torchrun (or any launcher that sets ``WORLD_SIZE``/``MASTER_ADDR``) the
    default ``env://`` rendezvous is used, so multi-host runs work through torchrun's
    ``--rdzv_endpoint``. A plain ``python`` run gets a one-process group on an
    in-memory store: no port is opened, so concurrent runs cannot collide.
    Returns the model-parallel world size.
    """
    if not dist.is_initialized():
        if is_cuda(device):
            torch.cuda.set_device(device)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        backend = backend_for(device)
        timeout = dist_timeout(backend)
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise RuntimeError(
                    f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with "
                    f"`torchrun --nproc_per_node {world_size} ...` instead of setting WORLD_SIZE by hand"
                )
            try:
                dist.init_process_group(backend, timeout=timeout)
                atexit.register(_destroy_process_group)
            except RuntimeError as e:  # DistStoreError, DistNetworkError, gloo errors
                raise RankFailure(
                    f"rank {os.environ['RANK']} of {world_size}: could not set up the process group with the other "
                    f"ranks within {timeout.total_seconds():g} s; did another rank fail before reaching it "
                    f"(see its error)? ({TIMEOUT_ENV} sets the wait) [{type(e).__name__}: {_first_line(e)}]"
                ) from e
    world_size = dist.get_world_size()
    if fs_init.model_parallel_is_initialized():
        current = fs_init.get_model_parallel_world_size()
        if model_parallel_size is not None and model_parallel_size != current:
            raise ValueError(
                f"model_parallel_size={model_parallel_size} but this process already uses a "
                f"model-parallel group of size {current}"
            )
        return current
    # Every rank must create the same groups: a mismatch would hang in new_group.
    check_ranks_agree(model_parallel_size, "model_parallel_size")
    if model_parallel_size is None:
        model_parallel_size = world_size
    if model_parallel_size < 1 or world_size % model_parallel_size != 0:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} must divide the number of processes ({world_size})"
        )
    backend = dist.get_backend()
    with contextlib.redirect_stdout(io.StringIO()), _new_groups_timeout(dist_timeout(backend)):
        fs_init.initialize_model_parallel(model_parallel_size)  # prints three banner lines
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


_PATIENT_TIMEOUT = datetime.timedelta(days=7)
_patient_group = None


def wait_for_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank, however long rank 0 takes to get here.

    For waits with no natural bound, such as rank 0 reading a user's next line while
    the other ranks wait for it: a plain broadcast would fail after
    ``LLAMA_DIST_TIMEOUT``. This one runs on a separate gloo group with a one-week
    timeout; if rank 0 dies the others still stop at once, as gloo sees its
    connections close. Every rank must call it (the first call creates the group).
    """
    global _patient_group
    if world_size() == 1:
        return value
    if _patient_group is None:
        _patient_group = dist.new_group(backend="gloo", timeout=_PATIENT_TIMEOUT)
    box = [value]
    try:
        dist.broadcast_object_list(box, src=0, group=_patient_group)
    except RuntimeError as e:
        raise RankFailure(
            f"rank {global_rank()}: lost rank 0 while waiting for it: it probably failed or was killed "
            f"(see its error) [{type(e).__name__}: {_first_line(e)}]", 0
        ) from e
    return box[0]


class RankFailure(RuntimeError):
    """Raised on every rank when another rank failed a step that all ranks run together.

    ``rank`` is the rank whose error is reported (None when unknown, e.g. a lost
    connection) and ``message`` that error's one-line description.
    """

    def __init__(self, text: str, rank: Optional[int] = None, message: Optional[str] = None):
        super().__init__(text)
        self.rank = rank
        self.message = message


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _gather(value: Any, what: str, group=None) -> list:
    """``all_gather_object`` whose failure (a peer died, or did not arrive in time) reads as such."""
    values: list = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(values, value, group=group)
    except RuntimeError as e:  # gloo: peer closed the connection, or timed out
        raise RankFailure(
            f"rank {global_rank()}: lost the other ranks while {what}: one of them probably failed or was "
            f"killed (see its error), or did not arrive within {TIMEOUT_ENV} "
            f"[{type(e).__name__}: {_first_line(e)}]"
        ) from e
    return values


def run_on_all_ranks(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank, then make all ranks agree on whether it worked.

    A rank whose ``fn`` raises still joins the agreement, so the others learn of the
    failure and raise too instead of waiting forever in the next collective. Each
    distinct error is raised, as itself, by the lowest rank that hit it; every other
    rank raises ``RankFailure`` naming that rank and message (chained to its own
    error, if it had an identical one). So an error that every rank hits (a bad
    argument) is reported in full once, by rank 0.
    """
    error: Optional[BaseException] = None
    result: Any = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = e
    if world_size() > 1:
        message = None if error is None else f"{type(error).__name__}: {_first_line(error)}"
        messages = _gather(message, what)
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if failed:
            first_rank, first_message = failed[0]
            if error is not None:
                first_rank, first_message = next((r, m) for r, m in failed if m == message)
            if first_rank != global_rank():
                raise RankFailure(
                    f"{what} failed on rank {first_rank}: {first_message}", first_rank, first_message
                ) from error
    if error is not None:
        raise error
    return result


def check_ranks_agree(value: Any, what: str, group=None) -> None:
    """Raise ``ValueError`` on every rank of ``group`` (default: all) unless all passed an equal ``value``."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    values = _gather(value, f"checking that the ranks agree on {what}", group)
    if any(v != values[0] for v in values):
        shown = ", ".join(f"rank {r}: {v!r}"[:200] for r, v in enumerate(values))
        raise ValueError(f"ranks disagree on {what} ({shown}); every rank must be given the same {what}")


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting")


@contextlib.contextmanager
def report_rank_failures(grace_s: float = 2.0) -> Iterator[None]:
    """For a script's top level: end this rank with one line on stderr (exit status 1) when another rank failed.

    The rank that hit the real error raises it as usual (full traceback). A rank that
    only learnt of it (``RankFailure``, or a collective that lost its peer) prints one
    line and waits ``grace_s`` before exiting, so that the failing rank's traceback
    gets printed before torchrun stops the job, and torchrun names it as the root
    cause::

        with distributed.report_rank_failures():
            main()
    """
    try:
        yield
    except RankFailure as e:
        reason = str(e)
    except RuntimeError as e:
        if not any(marker in str(e) for marker in _PEER_LOST):
            raise
        reason = f"lost contact with another rank, which probably failed (see its error): {_first_line(e)}"
    else:
        return
    print(f"[rank {global_rank()}] stopping: {reason}", file=sys.stderr, flush=True)
    time.sleep(grace_s)
    raise SystemExit(1)
