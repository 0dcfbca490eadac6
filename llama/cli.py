"""Shared plumbing for the example scripts: model resolution and rank-0 printing."""

import sys
from typing import Callable, Iterable, List, Optional, Tuple

from . import distributed
from .safety import format_reports
from .streaming import StreamEvent


def rank0_print(*args, **kwargs) -> None:
    """print() on the first process only, so torchrun output is not repeated per rank."""
    if distributed.global_rank() == 0:
        print(*args, **kwargs)
        sys.stdout.flush()


def resolve_model(ckpt_dir: Optional[str], tokenizer_path: Optional[str]) -> Tuple[str, str]:
    """The checkpoint and tokenizer to load: the given ones, or the built-in demo model."""
    if ckpt_dir is None:
        from .demo import DEMO_NOTICE, ensure_demo_model

        demo_dir, demo_tokenizer = ensure_demo_model(verbose=distributed.global_rank() == 0)
        rank0_print(DEMO_NOTICE)
        return str(demo_dir), str(tokenizer_path or demo_tokenizer)
    if tokenizer_path is None:
        raise SystemExit("--tokenizer_path is required with --ckpt_dir (the tokenizer.model downloaded with the weights)")
    return ckpt_dir, tokenizer_path


def stream_flag(stream) -> bool:
    """The example scripts' ``--stream``: True/False (or "true"/"false", "yes"/"no", "1"/"0");
    None (not given) streams when stdout is a terminal."""
    if stream is None:
        return sys.stdout.isatty()
    if isinstance(stream, bool):
        return stream
    value = str(stream).strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise SystemExit(f"--stream takes true or false, got {stream!r}")


def print_events(events: Iterable[StreamEvent], header: Callable[[int], str], results: Optional[List[dict]] = None) -> None:
    """Print (rank 0) each row's ``header(index)``, then its text as it arrives, its safety
    reports and a separator. ``events``: in row order (``llama.streaming.in_order``).
    ``results``: the non-streamed results the events were made from, which hold the
    reports under ``"safety"``; a stream carries them on its last piece instead.
    """
    shown = -1
    for event in events:
        if event.index != shown:
            shown = event.index
            rank0_print(header(shown), end="")
        rank0_print(event.text, end="")
        if event.done:
            reports = getattr(event.text, "reports", []) if results is None else results[event.index].get("safety", [])
            rank0_print("".join("\n" + line for line in format_reports(reports)), end="")
            rank0_print("\n\n==================================\n")
