"""Progress of long operations (loading, converting, resharding, verifying) on a terminal.

One line, redrawn in place on stderr at most a few times a second::

    loading llama-2-70b: 41.3 GB / 138 GB   30%  1.21 GB/s  ETA 1:20

and a last line once done (``loading llama-2-70b: 138 GB in 1:54 (1.21 GB/s)``). Nothing at all is
written when stderr is not a terminal (a log file, a pipe, a test), nor on a rank other
than 0 under torchrun: progress is for the person watching. ``LLAMA_PROGRESS=1``
forces it on, ``LLAMA_PROGRESS=0`` off.

The operation in progress is also readable in-process (:func:`current`): the server's
``/health`` shows it while the model loads.
"""

import os
import sys
import threading
import time
from typing import Dict, List, Optional, TextIO

ENV = "LLAMA_PROGRESS"
GB = 1e9

_active: List["Progress"] = []
_lock = threading.Lock()


def _enabled_by_default(stream: TextIO) -> bool:
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks for every rank
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3:07"`` or ``"1:02:03"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_size(nbytes: float) -> str:
    """``"512 KB"``, ``"41.3 MB"``, ``"1.23 GB"``, ``"137.9 GB"`` (powers of 1000)."""
    for unit, scale in (("GB", GB), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale or unit == "KB":
            value = nbytes / scale
            digits = 2 if value < 10 else (1 if value < 100 else 0)
            return f"{value:.{digits}f} {unit}"
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    return format_size(bytes_per_s) + "/s"


class Progress:
    """A progress line for an operation of ``total_bytes`` (and/or ``total_items``).

    Use as a context manager; call :meth:`update` as work is done. ``items`` are counted
    with their name (``"files"``, ``"shards"``, ``"tensors"``); ``note`` is shown after
    the label (e.g. the file being read). Thread-safe.
    """

    def __init__(
        self,
        label: str,
        total_bytes: Optional[int] = None,
        total_items: Optional[int] = None,
        item_name: str = "files",
        stream: Optional[TextIO] = None,
        enabled: Optional[bool] = None,
        min_interval_s: float = 0.2,
    ):
        self.label = label
        self.total_bytes = total_bytes
        self.total_items = total_items
        self.item_name = item_name
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _enabled_by_default(self.stream) if enabled is None else enabled
        self.min_interval_s = min_interval_s
        self.done_bytes = 0
        self.done_items = 0
        self.note = ""
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self._closed = False
        self._lock = threading.Lock()

    def __enter__(self) -> "Progress":
        with _lock:
            _active.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def update(self, nbytes: int = 0, items: int = 0, note: Optional[str] = None) -> None:
        """Count ``nbytes`` and ``items`` more as done; redraw if due."""
        with self._lock:
            self.done_bytes += nbytes
            self.done_items += items
            if note is not None:
                self.note = note
            now = time.monotonic()
            if self.enabled and now - self._last_draw >= self.min_interval_s:
                self._last_draw = now
                self._draw(self.line())

    def rate(self) -> float:
        """Bytes per second so far."""
        elapsed = time.monotonic() - self.start
        return self.done_bytes / elapsed if elapsed > 0 else 0.0

    def snapshot(self) -> Dict[str, object]:
        """The state as plain data (for ``/health``)."""
        out: Dict[str, object] = {"what": self.label, "elapsed_s": round(time.monotonic() - self.start, 1)}
        if self.total_bytes:
            out.update(done_bytes=self.done_bytes, total_bytes=self.total_bytes,
                       fraction=round(min(1.0, self.done_bytes / self.total_bytes), 4))
        if self.total_items:
            out.update({f"done_{self.item_name}": self.done_items, f"total_{self.item_name}": self.total_items})
        return out

    def line(self) -> str:
        """The progress line (without the terminal control characters)."""
        parts = []
        if self.total_items:
            parts.append(f"{self.done_items}/{self.total_items} {self.item_name}")
        rate = self.rate()
        if self.total_bytes:
            fraction = min(1.0, self.done_bytes / self.total_bytes)
            parts.append(f"{format_size(self.done_bytes)} / {format_size(self.total_bytes)}  {100 * fraction:3.0f}%")
            if rate > 0 and self.done_bytes < self.total_bytes:
                parts.append(f"{format_rate(rate)}  ETA {format_duration((self.total_bytes - self.done_bytes) / rate)}")
        elif self.done_bytes:
            parts.append(f"{format_size(self.done_bytes)}  {format_rate(rate)}")
        return self.label + (f" [{self.note}]" if self.note else "") + ": " + "  ".join(parts)

    def _draw(self, text: str) -> None:
        try:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self._drawn = True
        except (OSError, ValueError):  # a closed terminal: progress is never worth an error
            self.enabled = False

    def print(self, text: str, file: Optional[TextIO] = None) -> None:
        """Print a line of output above the progress line (which is redrawn at the next update)."""
        with self._lock:
            if self._drawn:
                self._draw("")
                self._drawn = False
                self._last_draw = 0.0
        print(text, file=file or sys.stdout, flush=True)

    def close(self, failed: bool = False) -> None:
        """End the line: the totals and the time taken, or nothing more if ``failed``."""
        with _lock:
            if self in _active:
                _active.remove(self)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.enabled:
                return
            if failed:
                if self._drawn:
                    self.stream.write("\n")
                    self.stream.flush()
                return
            elapsed = time.monotonic() - self.start
            summary = [self.label + ":"]
            if self.total_items:
                summary.append(f"{self.done_items} {self.item_name},")
            if self.done_bytes:
                summary.append(format_size(self.done_bytes))
            summary.append(f"in {format_duration(elapsed)}")
            if self.done_bytes and elapsed > 0:
                summary.append(f"({format_rate(self.done_bytes / elapsed)})")
            self._draw(" ".join(summary) + "\n")


def current() -> Optional[Dict[str, object]]:
    """A snapshot of the innermost operation in progress in this process, or None."""
    with _lock:
        return _active[-1].snapshot() if _active else None



def for_loading(checkpoint, total_bytes: int) -> Progress:
    """The progress line of loading ``checkpoint`` (a ``llama.checkpoint`` source): ``total_bytes`` are
    this rank's weights once loaded; call ``update(nbytes)`` after each tensor."""
    directory = getattr(checkpoint, "ckpt_dir", None)
    name = os.path.basename(os.path.normpath(str(directory))) if directory is not None else "the model"
    files = len(getattr(checkpoint, "paths", ()) or ())
    return Progress(f"loading {name}" + (f" ({files} file{'s' if files != 1 else ''})" if files else ""), total_bytes)
