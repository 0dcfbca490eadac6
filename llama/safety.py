"""Safety checks on prompts and replies: a pluggable checker interface, and a keyword checker.

Llama Guard, the model-based checker, is :class:`llama.guard.LlamaGuardChecker`.

A *safety checker* is any callable ``checker(dialog, role) -> SafetyResult``:

* ``dialog`` is a list of ``{"role": ..., "content": ...}`` messages (the chat format of
  :mod:`llama.chat_format`);
* ``role`` is the side being judged: ``"user"`` when checking a prompt (the dialog ends
  with the user's message), ``"assistant"`` when checking a reply (the dialog ends with
  the model's answer, the earlier messages being its context).

A checker may also define ``check_batch(dialogs, role) -> List[SafetyResult]`` to judge
many dialogs at once (:class:`~llama.guard.LlamaGuardChecker` does: one batched generation).

Pass checkers to :meth:`llama.Llama.text_completion`, :meth:`~llama.Llama.chat_completion`
(and the streaming variants) as ``safety_checkers=[...]``, or set them once with
``llama.safety_checkers = [...]``. Then:

* every prompt is checked before generation; a prompt any checker finds unsafe is not
  generated for, and its result's text is :data:`SAFETY_REFUSAL`;
* every reply is checked once generated; an unsafe reply is replaced by :data:`SAFETY_REFUSAL`;
* each result carries a ``"safety"`` key: the reports of all checks that ran on that row
  (``SafetyResult.to_dict()``, in order: prompt checks, then reply checks), for logging.

Streams (``stream_text_completion`` and co.) check prompts when iteration starts (an
unsafe prompt's only piece is :data:`SAFETY_REFUSAL`) and each reply once it is finished.
**The reply's pieces have been yielded, and probably shown, by then**: a stream cannot
take them back. The row's last piece is a :class:`SafetyNotice` carrying the reports:
``""`` when the reply is safe, :data:`SAFETY_WITHDRAWN` (``withdrawn=True``) when it is
not, so that a caller can erase what it displayed.

Checkers run in the order given, and a row one checker finds unsafe is not shown to the
next ones: put cheap checkers (:class:`KeywordChecker`) before expensive ones. A checker
that cannot reach a verdict must say so with ``is_safe=False, failed=True``: a safety
check never passes silently. Rows of a batch are judged independently. Without
checkers nothing of this runs and results have no ``"safety"`` key.

Text completion is judged as a one-turn chat: the prompt is ``[{"role": "user",
"content": prompt}]`` and the reply ``{"role": "assistant", "content": generation}``.

This module must not import :mod:`llama.generation`, which imports it; what needs the
``Llama`` class (building Llama Guard from a checkpoint) lives in :mod:`llama.guard`.
"""

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

from . import distributed
from .chat_format import Dialog, Message, has_special_tags
from .streaming import StreamEvent

if TYPE_CHECKING:  # for annotations only: never imported at run time (generation imports this module)
    from .generation import Llama

SAFETY_REFUSAL = "I'm sorry, but I can't help with that."
"""The text returned in place of a reply to an unsafe prompt, and of an unsafe reply."""

ROLES = ("user", "assistant")


@dataclass
class SafetyResult:
    """One checker's verdict on one prompt or reply.

    Attributes:
        is_safe: the verdict; False also when the checker could not decide (see ``failed``).
        categories: the violated categories (for Llama Guard their codes, e.g. ``["O3"]``;
            for :class:`KeywordChecker` the patterns that matched); empty when safe.
        checker: the checker's name.
        report: a human-readable explanation, for logs.
        role: ``"user"`` for a prompt check, ``"assistant"`` for a reply check.
        failed: True when the checker could not reach a verdict (malformed model output,
            a conversation too long for it, ...); such a result is always unsafe.
    """

    is_safe: bool
    categories: List[str] = field(default_factory=list)
    checker: str = ""
    report: str = ""
    role: str = ""
    failed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.is_safe, bool):
            raise TypeError(f"SafetyResult.is_safe must be a bool, got {self.is_safe!r}")
        if self.failed and self.is_safe:
            raise ValueError("a SafetyResult with failed=True must have is_safe=False (a failed check never passes)")

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (JSON-serialisable) of the fields."""
        return asdict(self)


SafetyChecker = Callable[[Dialog, str], SafetyResult]


def checker_name(checker: Any) -> str:
    """The name reports use for ``checker``: its ``name`` attribute, else its function or class name."""
    name = getattr(checker, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(checker, "__name__", type(checker).__name__)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be 'user' (to check a prompt) or 'assistant' (to check a reply), got {role!r}")


def _last_turn_role(dialog: Sequence[Message], who: str) -> str:
    turns = [m for m in dialog if m.get("role") != "system"]
    if not turns:
        raise ValueError(f"{who}: the dialog to check has no user or assistant message")
    return turns[-1]["role"]


def check_dialog(dialog: Sequence[Message], role: str, who: str) -> None:
    """Raise ``ValueError`` (naming ``who``) unless ``dialog`` is a list of messages ending with a ``role`` turn."""
    _check_role(role)
    if not isinstance(dialog, (list, tuple)) or not all(isinstance(m, dict) for m in dialog):
        raise ValueError(f"{who}: the dialog must be a list of {{'role': ..., 'content': ...}} messages")
    for i, m in enumerate(dialog):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"{who}: message {i} must have a role 'system', 'user' or 'assistant' and str content")
    last = _last_turn_role(dialog, who)
    if last != role:
        raise ValueError(
            f"{who}: asked to judge the {role!r} side, but the dialog ends with a {last!r} message; "
            "a prompt check needs a dialog ending with the user's message, a reply check one ending with the reply"
        )


def run_checks(
    checkers: Sequence[SafetyChecker], dialogs: Sequence[Dialog], role: str
) -> List[List[SafetyResult]]:
    """Judge each dialog's ``role`` side with ``checkers``; returns the results of each row.

    Checkers run in order; a row found unsafe is not passed to the later checkers.
    A checker's ``check_batch`` is used when it has one. Exceptions raised by a
    checker propagate (a broken checker is an error, never a pass). Under torchrun
    every rank must reach the same verdicts (it is checked), as every rank generates.
    """
    _check_role(role)
    reports: List[List[SafetyResult]] = [[] for _ in dialogs]
    pending = list(range(len(dialogs)))
    for checker in checkers:
        if not pending:
            break
        name = checker_name(checker)
        batch = [dialogs[i] for i in pending]
        if hasattr(checker, "check_batch"):
            results = list(checker.check_batch(batch, role))
            if len(results) != len(batch):
                raise ValueError(
                    f"safety checker {name!r}: check_batch returned {len(results)} results for {len(batch)} dialogs"
                )
        else:
            if not callable(checker):
                raise TypeError(f"safety checker {checker!r} is not callable (expected checker(dialog, role))")
            results = [checker(d, role) for d in batch]
        still = []
        for i, result in zip(pending, results):
            if not isinstance(result, SafetyResult):
                raise TypeError(
                    f"safety checker {name!r} returned {type(result).__name__}; it must return a SafetyResult"
                )
            if not result.role:
                result = replace(result, role=role)
            if not result.checker:
                result = replace(result, checker=name)
            reports[i].append(result)
            if result.is_safe:
                still.append(i)
        pending = still
    verdicts = [[r.is_safe for r in row] for row in reports]
    distributed.check_ranks_agree(verdicts, "safety verdicts (a checker answered differently on different ranks)")
    return reports


def all_safe(results: Sequence[SafetyResult]) -> bool:
    """True when every result of a row is safe."""
    return all(r.is_safe for r in results)


def resolve_checkers(
    checkers: Optional[Iterable[SafetyChecker]], default: Sequence[SafetyChecker]
) -> List[SafetyChecker]:
    """The checkers to use: ``checkers`` when given (``[]`` turns checks off), else ``default``."""
    if checkers is None:
        checkers = default or ()
    if callable(checkers) and not isinstance(checkers, (list, tuple)):
        raise TypeError("safety_checkers must be a list of checkers (wrap a single checker in a list)")
    checkers = list(checkers)
    for c in checkers:
        if not callable(c) and not hasattr(c, "check_batch"):
            raise TypeError(f"safety checker {c!r} is not callable (expected checker(dialog, role) -> SafetyResult)")
    return checkers


# ---------------------------------------------------------------------------------------------
# Wiring into Llama.text_completion / chat_completion (called by llama.generation).


def _refused(prediction: Dict[str, Any], chat: bool, reports: List[SafetyResult]) -> Dict[str, Any]:
    out = dict(prediction)
    out["generation"] = {"role": "assistant", "content": SAFETY_REFUSAL} if chat else SAFETY_REFUSAL
    if "tokens" in out or "logprobs" in out:
        out["tokens"], out["logprobs"] = [], []
    out["safety"] = [r.to_dict() for r in reports]
    return out


def checked_text_completion(
    llama: "Llama", checkers: Sequence[SafetyChecker], prompts: List[str], kwargs: Dict[str, Any]
) -> List[Dict[str, Any]]:
    """``llama.text_completion(prompts, **kwargs)`` with prompt and reply checks (see the module doc)."""
    dialogs: List[Dialog] = [[{"role": "user", "content": p}] for p in prompts]
    prompt_reports = run_checks(checkers, dialogs, "user")
    allowed = [i for i, r in enumerate(prompt_reports) if all_safe(r)]
    inner = llama.text_completion([prompts[i] for i in allowed], **kwargs, safety_checkers=[]) if allowed else []
    base: Dict[str, Any] = {"generation": ""}
    if kwargs.get("logprobs"):
        base.update(tokens=[], logprobs=[])
    results = [_refused(base, False, prompt_reports[i]) for i in range(len(prompts))]

    replies: List[Dialog] = []
    for i, pred in zip(allowed, inner):
        text = pred["generation"]
        if kwargs.get("echo") and text.startswith(prompts[i]):
            text = text[len(prompts[i]):]  # judge what the model wrote, not the echoed prompt
        replies.append(dialogs[i] + [{"role": "assistant", "content": text}])
    reply_reports = run_checks(checkers, replies, "assistant")
    for i, pred, reports in zip(allowed, inner, reply_reports):
        everything = prompt_reports[i] + reports
        if all_safe(reports):
            results[i] = {**pred, "safety": [r.to_dict() for r in everything]}
        else:
            results[i] = _refused(pred, False, everything)
    return results


def checked_chat_completion(
    llama: "Llama", checkers: Sequence[SafetyChecker], dialogs: List[Dialog], kwargs: Dict[str, Any]
) -> List[Dict[str, Any]]:
    """``llama.chat_completion(dialogs, **kwargs)`` with prompt and reply checks (see the module doc).

    Dialogs with special tags (``[INST]`` ...) are still answered with ``UNSAFE_ERROR``
    by ``chat_completion`` itself; their (never generated) reply is not checked.
    """
    prompt_reports = run_checks(checkers, dialogs, "user")
    allowed = [i for i, r in enumerate(prompt_reports) if all_safe(r)]
    inner = llama.chat_completion([dialogs[i] for i in allowed], **kwargs, safety_checkers=[]) if allowed else []
    base: Dict[str, Any] = {"generation": {"role": "assistant", "content": ""}}
    if kwargs.get("logprobs"):
        base.update(tokens=[], logprobs=[])
    results = [_refused(base, True, prompt_reports[i]) for i in range(len(dialogs))]

    judged = [(i, pred) for i, pred in zip(allowed, inner) if not has_special_tags(dialogs[i])]
    for i, pred in zip(allowed, inner):
        results[i] = {**pred, "safety": [r.to_dict() for r in prompt_reports[i]]}
    replies = [list(dialogs[i]) + [dict(pred["generation"])] for i, pred in judged]
    reply_reports = run_checks(checkers, replies, "assistant")
    for (i, pred), reports in zip(judged, reply_reports):
        everything = prompt_reports[i] + reports
        if all_safe(reports):
            results[i] = {**pred, "safety": [r.to_dict() for r in everything]}
        else:
            results[i] = _refused(pred, True, everything)
    return results


SAFETY_WITHDRAWN = "\n\n[The reply above was withdrawn by a safety check.] " + SAFETY_REFUSAL
"""The last piece of a streamed reply found unsafe once finished (its text was already shown)."""


class SafetyNotice(str):
    """The last piece of a row of a stream run with safety checkers; carries the reports.

    It is a ``str`` (so printing or concatenating the pieces works as usual) with:

    * ``reports``: the row's reports (``SafetyResult.to_dict()``: prompt checks, then the
      reply checks);
    * ``is_safe``: whether the row passed every check;
    * ``withdrawn``: True when the reply was streamed and then found unsafe: the text
      is :data:`SAFETY_WITHDRAWN`, and a caller that can should erase what it showed and
      display :data:`SAFETY_REFUSAL` instead.

    Its text is ``""`` for a safe row, :data:`SAFETY_REFUSAL` for a prompt found unsafe
    (then it is the row's only piece: nothing was generated) and :data:`SAFETY_WITHDRAWN`
    for an unsafe reply.
    """

    reports: List[Dict[str, Any]]
    is_safe: bool
    withdrawn: bool

    def __new__(cls, text: str, reports: Sequence[SafetyResult], withdrawn: bool = False) -> "SafetyNotice":
        notice = super().__new__(cls, text)
        notice.reports = [r.to_dict() for r in reports]
        notice.is_safe = all_safe(reports)
        notice.withdrawn = withdrawn
        return notice


def checked_stream(
    llama: "Llama",
    checkers: Sequence[SafetyChecker],
    dialogs: Sequence[Dialog],
    start: Callable[[List[int]], Iterable[Any]],
    judge_reply: Optional[Sequence[bool]] = None,
) -> Iterable[Any]:
    """A batch stream with prompt and reply checks (see the module doc and :class:`SafetyNotice`).

    Prompts are checked when iteration starts; ``start(rows)`` then streams the rows
    whose prompts passed (``StreamEvent``s indexed within ``rows``). A row's pieces pass
    through as generated; when it ends, its reply is checked and its last event
    (``done=True``) carries a :class:`SafetyNotice`. The deltas shown before are not
    taken back: an unsafe reply ends with :data:`SAFETY_WITHDRAWN`. ``judge_reply[i]``
    False skips the reply check of row ``i`` (e.g. a reply that is a fixed error text).
    """
    for checker in checkers:
        if getattr(checker, "llama", None) is llama:
            raise ValueError(
                f"safety checker {checker_name(checker)!r} runs on the model being streamed from, whose KV cache "
                "is in use while a stream runs; build the checker on its own Llama, or use the non-streaming calls"
            )

    def events() -> Iterable[Any]:
        prompt_reports = run_checks(checkers, dialogs, "user")
        rows = [i for i, reports in enumerate(prompt_reports) if all_safe(reports)]
        for i, reports in enumerate(prompt_reports):
            if not all_safe(reports):
                yield StreamEvent(i, SafetyNotice(SAFETY_REFUSAL, reports), True)
        if not rows:
            return
        texts: Dict[int, List[str]] = {i: [] for i in rows}
        for event in start(rows):
            i = rows[event.index]
            texts[i].append(event.text)
            if not event.done:
                yield event._replace(index=i)
                continue
            if event.text:
                yield StreamEvent(i, event.text, False)
            if judge_reply is not None and not judge_reply[i]:
                yield StreamEvent(i, SafetyNotice("", prompt_reports[i]), True)
                continue
            reply = {"role": "assistant", "content": "".join(texts[i])}
            reports = run_checks(checkers, [list(dialogs[i]) + [reply]], "assistant")[0]
            everything = prompt_reports[i] + reports
            if all_safe(reports):
                yield StreamEvent(i, SafetyNotice("", everything), True)
            else:
                yield StreamEvent(i, SafetyNotice(SAFETY_WITHDRAWN, everything, withdrawn=True), True)

    return events()


# ---------------------------------------------------------------------------------------------
# Keywords / regular expressions: no model, for a cheap first line and for tests.


class KeywordChecker:
    """Flags content matching any of a list of regular expressions (case-insensitive).

    A plain word is a valid pattern. With ``whole_words`` (the default) a pattern only
    matches where it is not glued to other letters or digits, so ``kill`` does not match
    ``skill``. A prompt check (role ``"user"``) scans every message of the dialog, since
    all of it comes from the caller; a reply check scans the reply only. The result's
    ``categories`` are the patterns that matched; its report says what matched where.

    Args:
        patterns: regular expressions (Python ``re`` syntax).
        name: the checker's name in reports.
        whole_words: match only at word boundaries.
    """

    def __init__(self, patterns: Iterable[str], name: str = "keywords", whole_words: bool = True):
        if isinstance(patterns, str):
            raise ValueError("patterns must be a list of strings (wrap a single pattern in a list)")
        self.patterns: List[str] = []
        self._compiled: List[re.Pattern] = []
        for p in patterns:
            self._add(p, whole_words, where=f"pattern {p!r}")
        if not self.patterns:
            raise ValueError("KeywordChecker needs at least one pattern")
        self.name = name
        self.whole_words = whole_words

    def _add(self, pattern: str, whole_words: bool, where: str) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{where}: a pattern must be a non-empty string")
        source = rf"(?<!\w)(?:{pattern})(?!\w)" if whole_words else pattern
        try:
            compiled = re.compile(source, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"{where} is not a valid regular expression: {e}") from None
        if compiled.search(""):
            raise ValueError(f"{where} matches the empty string, so it would flag everything")
        self.patterns.append(pattern)
        self._compiled.append(compiled)

    @classmethod
    def from_file(
        cls, path: Union[str, Path], name: Optional[str] = None, whole_words: bool = True
    ) -> "KeywordChecker":
        """Read patterns from a text file: one per line; blank lines and lines starting with ``#`` are skipped.

        Surrounding whitespace of a line is not part of its pattern.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"keyword file {path} not found")
        self = cls.__new__(cls)
        self.patterns, self._compiled = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            self._add(line, whole_words, where=f"{path}:{n}: pattern {line!r}")
        if not self.patterns:
            raise ValueError(f"{path} holds no patterns (one per line; lines starting with # are comments)")
        self.name = name or f"keywords:{path.name}"
        self.whole_words = whole_words
        return self

    def __call__(self, dialog: Dialog, role: str) -> SafetyResult:
        """Judge the ``role`` side of ``dialog``: unsafe when any pattern matches."""
        check_dialog(dialog, role, self.name)
        indices = range(len(dialog)) if role == "user" else [len(dialog) - 1]
        matched: List[str] = []
        found: List[str] = []
        for i in indices:
            content = dialog[i]["content"]
            for pattern, compiled in zip(self.patterns, self._compiled):
                m = compiled.search(content)
                if m is None:
                    continue
                if pattern not in matched:
                    matched.append(pattern)
                found.append(f"{m.group(0)!r} (pattern {pattern!r}) in message {i} ({dialog[i]['role']})")
        if not matched:
            return SafetyResult(is_safe=True, checker=self.name, role=role, report="no pattern matched")
        return SafetyResult(
            is_safe=False, categories=matched, checker=self.name, role=role, report="matched " + "; ".join(found)
        )


# ---------------------------------------------------------------------------------------------
# Printing.


def format_reports(reports: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per report of a result's ``"safety"`` list, for printing."""
    lines = []
    for r in reports:
        what = "prompt" if r.get("role") == "user" else "reply"
        verdict = "safe" if r.get("is_safe") else ("CHECK FAILED" if r.get("failed") else "UNSAFE")
        lines.append(f"[safety] {r.get('checker')}: {what} {verdict} - {r.get('report')}")
    return lines
