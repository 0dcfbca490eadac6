"""Streaming building blocks: incremental detokenization and stop strings.

``IncrementalDetokenizer`` turns token ids into text deltas whose concatenation is
exactly ``tokenizer.decode(ids)``, at a cost per token that does not grow with the
length of the output. ``StopMatcher`` cuts a stream of text deltas just before the
first stop string, never letting a partial stop string through. ``TextStream``
combines the two for one generated sequence.

How the detokenizer stays exact (SentencePiece's decoding is not a concatenation of
per-token strings):

* The first non-control piece of a decode loses its leading "▁" (the dummy prefix).
  A window of tokens is decoded on its own only while that has not happened yet;
  afterwards it is decoded behind a fixed *anchor* piece, whose text is then cut
  off, so the window's first piece keeps its space.
* Byte-fallback pieces (``<0xE2>``...) are joined into UTF-8 before decoding, and
  an incomplete sequence decodes to U+FFFD. Text ending in U+FFFD is held back
  until more tokens arrive. A decoded window not ending in U+FFFD is final: later
  tokens cannot change it. Invalid bytes that legitimately decode to U+FFFD are let
  through once three more tokens have been seen (no UTF-8 character is longer than
  four bytes), so the held-back window never exceeds ``MAX_PENDING`` tokens.
"""

import bisect
from typing import Iterable, Iterator, List, NamedTuple, Sequence, Tuple, Union

REPLACEMENT_CHAR = "\ufffd"
MAX_PENDING = 8  # most tokens held back at once (a run of invalid byte pieces)


def _sp_model(tokenizer):
    return getattr(tokenizer, "sp_model", tokenizer)


def _find_anchor(sp) -> Tuple[int, str]:
    """A piece that decodes to visible text on its own, with no leading space: any
    window decoded behind it keeps its first piece's leading space."""
    fallback = None
    for i in range(sp.vocab_size()):
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
            continue
        if sp.IsByte(i):
            # An ASCII letter as a byte piece is a whole character: safe, but only if
            # no normal piece qualifies.
            if fallback is None and sp.IdToPiece(i) == "<0x41>":
                fallback = i
            continue
        text = sp.decode([i])
        if text and not text[0].isspace() and REPLACEMENT_CHAR not in text and not sp.IdToPiece(i).startswith("\u2581"):
            return i, text
    if fallback is not None:
        return fallback, sp.decode([fallback])
    raise ValueError("the tokenizer has no piece usable as a streaming anchor (a visible piece without a leading space)")


class IncrementalDetokenizer:
    """Token ids in, text deltas out; the deltas concatenate to ``tokenizer.decode(ids)``.

    Args:
        tokenizer: a ``llama.Tokenizer`` or a ``sentencepiece.SentencePieceProcessor``.
        context: token ids that precede the stream (e.g. the prompt). With a context,
            the deltas concatenate to ``decode(context + ids)[len(decode(context)):]``,
            the text as it continues the context; without one, to ``decode(ids)``,
            which drops the first piece's leading space as SentencePiece does.
            The context must end on a character boundary (as an encoded string does).

    Call ``add`` for each token and ``flush`` once at the end.
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self._sp = _sp_model(tokenizer)
        self._anchor, self._anchor_text = _find_anchor(self._sp)
        self._tokens: List[int] = []
        self._read = 0  # tokens before this index have been emitted
        # SentencePiece strips the leading space of the first non-control piece only.
        self._strip_pending = all(self._sp.IsControl(int(t)) for t in context)
        self._emitted = 0  # characters emitted so far
        # after each emission: how many tokens were read, and how many characters emitted
        self._boundary_tokens: List[int] = [0]
        self._boundary_chars: List[int] = [0]

    @property
    def tokens(self) -> List[int]:
        """All token ids added so far."""
        return self._tokens

    @property
    def pending(self) -> int:
        """How many tokens are held back (their text is not emitted yet)."""
        return len(self._tokens) - self._read

    def _decode(self, window: List[int], strip_pending: bool) -> str:
        if strip_pending:
            return self._sp.decode(window)
        return self._sp.decode([self._anchor] + window)[len(self._anchor_text) :]

    def _emit(self, end: int, text: str) -> str:
        if self._strip_pending and not all(self._sp.IsControl(t) for t in self._tokens[self._read : end]):
            self._strip_pending = False
        self._read = end
        self._emitted += len(text)
        self._boundary_tokens.append(end)
        self._boundary_chars.append(self._emitted)
        return text

    def add(self, token_id: int) -> str:
        """Append one token; returns the text that became final ("" while it is held back)."""
        self._tokens.append(int(token_id))
        window = self._tokens[self._read :]
        text = self._decode(window, self._strip_pending)
        if not text.endswith(REPLACEMENT_CHAR):
            return self._emit(len(self._tokens), text)
        if len(window) < MAX_PENDING:
            return ""
        # A long tail that keeps ending in U+FFFD: invalid bytes. Emit up to a cut k
        # with three tokens after it (so every byte before k has been decided) that
        # falls between two decoded characters (so the parts decode independently).
        n = len(self._tokens)
        for k in range(n - 3, self._read, -1):
            head = self._decode(self._tokens[self._read : k], self._strip_pending)
            tail_strip = self._strip_pending and all(self._sp.IsControl(t) for t in self._tokens[self._read : k])
            if head + self._decode(self._tokens[k:], tail_strip) == text:
                return self._emit(k, head)
        return ""  # unreachable: a UTF-8 character spans at most four byte pieces

    def flush(self) -> str:
        """The text still held back (e.g. a trailing incomplete byte sequence, as U+FFFD)."""
        if self._read == len(self._tokens):
            return ""
        return self._emit(len(self._tokens), self._decode(self._tokens[self._read :], self._strip_pending))

    def tokens_within(self, n_chars: int) -> int:
        """How many of the added tokens have all their text within the first ``n_chars``
        characters emitted (a character made of several byte pieces counts whole)."""
        i = bisect.bisect_right(self._boundary_chars, n_chars) - 1
        return self._boundary_tokens[i]

    @property
    def emitted_chars(self) -> int:
        """Characters emitted so far."""
        return self._emitted


class StopMatcher:
    """Cuts a stream of text deltas just before the first stop string.

    "First" is the occurrence that completes first, i.e. ends earliest (the longer
    one when two end together), so the result does not depend on how the text was
    split into deltas. Text that could still be the start of a stop string is held
    back until it is resolved, so a stop string is never partly emitted.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = list(stop)
        self._held = ""
        self.stopped = False  # a stop string was found; everything after it is dropped
        self.emitted = 0  # characters emitted so far (after a stop: where the stop string began)

    def add(self, text: str) -> str:
        """Feed a delta; returns the text that is now known to precede any stop string."""
        if self.stopped or not text:
            return ""
        buf = self._held + text
        best = None  # (end, start) of the occurrence that ends first
        for s in self.stop:
            start = buf.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        if best is not None:
            out, self._held, self.stopped = buf[: best[1]], "", True
        else:
            keep = self._partial_suffix(buf)
            out, self._held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self.emitted += len(out)
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """At the end of the stream: the held-back text (it did not become a stop string)."""
        out, self._held = self._held, ""
        self.emitted += len(out)
        return out


def normalize_stop(stop: Union[None, str, Sequence[str]]) -> List[str]:
    """Validate a ``stop`` argument: ``None``, a string, or a list of strings.

    A single string means ``[string]``. Returns the list (empty: no stop strings).
    """
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a list of strings (or one string), got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
    return list(stop)


class TextStream:
    """One generated sequence: token ids in, text deltas out, ended by a stop string.

    Args:
        tokenizer: a ``llama.Tokenizer``.
        stop: stop strings (already validated); the text ends just before the first.
        context: the prompt's token ids when the text continues it (see
            ``IncrementalDetokenizer``); empty for text decoded on its own.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), context: Sequence[int] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer, context)
        self.matcher = StopMatcher(stop) if stop else None

    @property
    def stopped(self) -> bool:
        """True once a stop string was found: add no more tokens."""
        return self.matcher is not None and self.matcher.stopped

    def add(self, token_id: int) -> str:
        """Append a generated token; returns the text delta it made final (maybe "")."""
        delta = self.detokenizer.add(token_id)
        return self.matcher.add(delta) if self.matcher is not None else delta

    def finish(self) -> str:
        """The sequence has ended: returns the remaining text."""
        delta = self.detokenizer.flush()
        if self.matcher is None:
            return delta
        return self.matcher.add(delta) + self.matcher.flush()

    def emitted_tokens(self) -> int:
        """How many of the added tokens have all their text emitted so far (text held
        back, as a possible start of a stop string or an unfinished character, is not)."""
        chars = self.matcher.emitted if self.matcher is not None else self.detokenizer.emitted_chars
        return self.detokenizer.tokens_within(chars)

    def kept_tokens(self) -> int:
        """How many of the added tokens to report: all, or after a stop string those
        whose text lies wholly before it."""
        if not self.stopped:
            return len(self.detokenizer.tokens)
        return self.detokenizer.tokens_within(self.matcher.emitted)


class StreamEvent(NamedTuple):
    """A piece of one sequence's output in a batch stream.

    ``index`` is the sequence's position in the request, ``text`` the new text
    (possibly empty), ``done`` is True on the sequence's last event (exactly one).
    """

    index: int
    text: str
    done: bool


def in_order(events: Iterable[StreamEvent]) -> Iterator[StreamEvent]:
    """Reorder a batch stream so that sequence 0's events come first, then 1's, ...

    Events of the sequence being shown pass through as they arrive; the others are
    buffered until every earlier sequence is done. Useful to print a batch live.
    """
    current = 0
    buffered: dict = {}
    for ev in events:
        if ev.index != current:
            buffered.setdefault(ev.index, []).append(ev)
            continue
        yield ev
        finished = ev.done
        while finished:  # on to the next sequence: release what it has so far
            current += 1
            finished = False
            for queued in buffered.pop(current, []):
                yield queued
                finished = queued.done
    for index in sorted(buffered):  # only if the input skipped an index
        yield from buffered[index]
