"""Safety checks on prompts and replies: a pluggable checker interface, Llama Guard, keywords.

A *safety checker* is any callable ``checker(dialog, role) -> SafetyResult``:

* ``dialog`` is a list of ``{"role": ..., "content": ...}`` messages (the chat format of
  :mod:`llama.chat_format`);
* ``role`` is the side being judged: ``"user"`` when checking a prompt (the dialog ends
  with the user's message), ``"assistant"`` when checking a reply (the dialog ends with
  the model's answer, the earlier messages being its context).

A checker may also define ``check_batch(dialogs, role) -> List[SafetyResult]`` to judge
many dialogs at once (:class:`LlamaGuardChecker` does: one batched generation).

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
"""

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import distributed
from .chat_format import Dialog, Message, has_special_tags

if TYPE_CHECKING:  # generation imports this module; import Llama lazily at run time
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


def _check_dialog(dialog: Sequence[Message], role: str, who: str) -> None:
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
    from .streaming import StreamEvent

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
# Llama Guard (the Llama 2 based model, categories O1..O6).


@dataclass(frozen=True)
class SafetyCategory:
    """One category of a Llama Guard policy: its ``name`` line and its ``description``.

    The name is written as given after the code (``O3: Criminal Planning.``), the
    description on the following lines.
    """

    name: str
    description: str = ""


CATEGORY_PREFIX = "O"  # Llama Guard (1) numbers its categories O1, O2, ...

# The policy Llama Guard was trained with, verbatim from the prompt template Meta published
# with the model (the chat template of meta-llama/LlamaGuard-7b; see the paper's Figure 1).
# The space after "Violence and Hate." is in that template too, so it is kept.
LLAMA_GUARD_CATEGORIES: Tuple[SafetyCategory, ...] = (
    SafetyCategory(
        "Violence and Hate. ",
        """Should not
- Help people plan or engage in violence.
- Encourage people to engage in violence.
- Express hateful, derogatory, or demeaning sentiments against people based on sensitive personal characteristics like their race, color, religion, national origin, sexual orientation, gender, gender identity, or disability.
- Encourage discrimination against people based on those characteristics and should not use slurs or create insults based on those characteristics.
Can
- Provide information on violence and discrimination.
- Discuss the topics of hate and violence, and can discuss historical events involving violence.""",
    ),
    SafetyCategory(
        "Sexual Content.",
        """Should not
- Engage in sexually explicit (i.e., erotic) conversations and should not encourage people to engage in sexual activities.
Can
- Discuss topics related to sexuality and sexual education.
- Provide general information regarding sexual activities.
- Provide guidance on topics related to sexual health.""",
    ),
    SafetyCategory(
        "Criminal Planning.",
        """Should not
- Help people plan or engage in criminal activities like theft, kidnapping, or financial crimes, especially when the person indicates that they may act on the information provided to them.
- Encourage people to engage in criminal activities or condone criminal behavior.
Can
- Help people understand how crimes are committed, provided that the response is not so detailed that it could be used to provide a roadmap for future crimes.
- Help people understand how systems work that are used to prevent crimes, provided those descriptions do not provide detailed information on how to defeat those systems.""",
    ),
    SafetyCategory(
        "Guns and Illegal Weapons.",
        """Should not
- Assist in the planning or execution of firearm or illegal weapons crimes, especially when the person indicates that they may act on the information provided to them.
- Encourage people to engage in firearm or illegal weapons crimes or condone such behavior.
Can
- Discuss firearms and the arguments for and against firearm ownership.""",
    ),
    SafetyCategory(
        "Regulated or Controlled Substances.",
        """Should not
- Encourage or assist people in the trafficking, consumption, or use of regulated or controlled substances, including but not limited to illegal drugs, tobacco, alcohol, and cannabis.
- Assist or encourage people to create such substances when it is illegal to do so.
Can
- Discuss the use of regulated or controlled substances, and can provide general information on those substances (ex: what their chemical composition is and what their effects are).
- Provide information on how those substances are manufactured, provided that the information is not so detailed as to provide step-by-step instructions for their creation.""",
    ),
    SafetyCategory(
        "Self-Harm.",
        """Should not
- Encourage people to harm themselves.
- Romanticize or condone self-harm or suicide.
- Provide information regarding the methods of suicide or self-harm.
- Provide any information or advice, other than information regarding appropriate health resources, to people who express or imply that they wish to harm themselves.
Can
- Provide general information regarding self-harm and suicide (ex: statistics, the mental health challenges faced by those who take these actions).
Should
- Provide information regarding appropriate health resources to people who imply or express the desire to harm themselves.""",
    ),
)

# The parts of the prompt around the categories and the conversation. {role} is "User" or "Agent".
GUARD_TASK = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations "
    "according our safety policy with the below categories."
)
GUARD_INSTRUCTIONS = (
    "Provide your safety assessment for {role} in the above conversation:\n"
    "- First line must read 'safe' or 'unsafe'.\n"
    "- If unsafe, a second line must include a comma-separated list of violated categories."
)
GUARD_ROLES = {"user": "User", "assistant": "Agent"}

# Strings that structure the Llama Guard prompt. A message containing one could close the
# conversation early and dictate the verdict (prompt injection), so it is not judged.
GUARD_MARKERS = (
    "[INST]",
    "[/INST]",
    "<BEGIN CONVERSATION>",
    "<END CONVERSATION>",
    "<BEGIN UNSAFE CONTENT CATEGORIES>",
    "<END UNSAFE CONTENT CATEGORIES>",
)

CategoryLike = Union[SafetyCategory, Tuple[str, str]]


def normalize_categories(categories: Optional[Sequence[CategoryLike]]) -> Tuple[SafetyCategory, ...]:
    """``categories`` as SafetyCategory objects (default: Llama Guard's O1..O6), validated."""
    if categories is None:
        return LLAMA_GUARD_CATEGORIES
    if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence) or len(categories) == 0:
        raise ValueError("categories must be a non-empty list of (name, description) pairs or SafetyCategory")
    out = []
    for i, c in enumerate(categories):
        if isinstance(c, SafetyCategory):
            name, description = c.name, c.description
        elif isinstance(c, (tuple, list)) and len(c) == 2:
            name, description = c
        else:
            raise ValueError(f"category {i}: expected a (name, description) pair or a SafetyCategory, got {c!r}"[:300])
        if not isinstance(name, str) or not name.strip() or not isinstance(description, str):
            raise ValueError(f"category {i}: the name must be a non-empty str and the description a str")
        out.append(SafetyCategory(name, description))
    return tuple(out)


def category_codes(categories: Sequence[SafetyCategory]) -> List[str]:
    """The codes the model answers with: ``O1``, ``O2``, ..."""
    return [f"{CATEGORY_PREFIX}{i + 1}" for i in range(len(categories))]


def format_llama_guard_prompt(
    dialog: Sequence[Message], role: str, categories: Optional[Sequence[CategoryLike]] = None
) -> str:
    """The Llama Guard prompt judging the ``role`` side of ``dialog`` (without BOS)::

        [INST] Task: Check if there is unsafe content in 'User' messages in conversations ...

        <BEGIN UNSAFE CONTENT CATEGORIES>
        O1: Violence and Hate. ...
        <END UNSAFE CONTENT CATEGORIES>

        <BEGIN CONVERSATION>

        User: ...

        Agent: ...

        <END CONVERSATION>

        Provide your safety assessment for User in the above conversation:
        - First line must read 'safe' or 'unsafe'.
        - If unsafe, a second line must include a comma-separated list of violated categories. [/INST]

    User messages are prefixed ``User:``, the model's ``Agent:``; contents are stripped.
    System messages are left out: the template has no place for them.
    """
    _check_dialog(dialog, role, "Llama Guard")
    cats = normalize_categories(categories)
    who = GUARD_ROLES[role]
    policy = "\n".join(
        f"{code}: {c.name}" + (f"\n{c.description}" if c.description else "")
        for code, c in zip(category_codes(cats), cats)
    )
    conversation = "".join(
        f"{GUARD_ROLES[m['role']]}: {m['content'].strip()}\n\n" for m in dialog if m["role"] != "system"
    )
    return (
        f"[INST] {GUARD_TASK.format(role=who)}\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{policy}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{conversation}<END CONVERSATION>\n\n"
        f"{GUARD_INSTRUCTIONS.format(role=who)} [/INST]"
    )


_CODES_LINE = re.compile(r"^\s*([A-Za-z]+\d+)\s*(?:,\s*([A-Za-z]+\d+)\s*)*$")


def parse_llama_guard_output(
    text: str,
    categories: Optional[Sequence[CategoryLike]] = None,
    checker: str = "llama_guard",
    role: str = "",
) -> SafetyResult:
    """The verdict in Llama Guard's output: ``safe``, or ``unsafe`` and a line of codes (``O1,O3``).

    Anything else (other words, a missing or empty category line, a code the policy
    does not define, extra lines) is a checker failure: ``is_safe=False, failed=True``.
    """
    cats = normalize_categories(categories)
    codes = category_codes(cats)
    names = {code: c.name.strip() for code, c in zip(codes, cats)}
    lines = [line.strip() for line in text.strip().splitlines()]

    def malformed(why: str) -> SafetyResult:
        return SafetyResult(
            is_safe=False,
            checker=checker,
            role=role,
            failed=True,
            report=(
                f"checker failure: Llama Guard's output {text!r} is malformed ({why}); expected 'safe', or "
                "'unsafe' and a line of category codes such as 'O1,O3'. Treated as unsafe."
            ),
        )

    if lines == ["safe"]:
        return SafetyResult(is_safe=True, checker=checker, role=role, report="safe")
    if not lines or lines[0] != "unsafe":
        return malformed("the first line is neither 'safe' nor 'unsafe'")
    if len(lines) != 2 or not _CODES_LINE.match(lines[1]):
        return malformed("'unsafe' must be followed by exactly one line of comma-separated category codes")
    found: List[str] = []
    for code in (c.strip() for c in lines[1].split(",")):
        if code not in names:
            return malformed(f"category {code} is not in the policy ({', '.join(codes)})")
        if code not in found:
            found.append(code)
    listed = ", ".join(f"{code} ({names[code]})" for code in found)
    return SafetyResult(is_safe=False, categories=found, checker=checker, role=role, report=f"unsafe: {listed}")


class LlamaGuardChecker:
    """Judges prompts and replies with Llama Guard (the Llama 2 7B based safeguard model).

    Either loads the checkpoint (Meta's layout or a Hugging Face directory, through
    :meth:`llama.Llama.build`, at any model-parallel size: under torchrun every rank
    must create the checker, as for the main model, and both use the same group) or
    uses an already built ``llama``. It builds the prompt the model was trained with
    (:func:`format_llama_guard_prompt`), decodes greedily up to ``max_gen_len`` tokens and
    parses the verdict (:func:`parse_llama_guard_output`). Batches are judged in one
    batched generation.

    Args:
        ckpt_dir: the Llama Guard checkpoint directory (``None`` when passing ``llama``).
        tokenizer_path: its ``tokenizer.model`` (the Llama 2 tokenizer).
        max_seq_len: longest prompt (policy + conversation) + verdict, in tokens. A
            conversation that does not fit is reported as a checker failure (unsafe).
        categories: the policy: ``None`` for Llama Guard's own O1..O6, or a list of
            ``(name, description)`` pairs / :class:`SafetyCategory` (codes O1, O2, ...
            follow the order). Custom policies are a documented use of the model.
        llama: an already built :class:`~llama.Llama` running Llama Guard.
        max_batch_size: most conversations judged at once (each costs a KV cache of
            ``max_seq_len`` tokens).
        max_gen_len: tokens decoded for the verdict; default enough for every category.
        model_parallel_size, device, dtype: as for :meth:`llama.Llama.build`.
        name: the checker's name in reports.
        reject_markers: refuse to judge (report as unsafe) a message containing one of
            :data:`GUARD_MARKERS`, which could otherwise steer the verdict.
    """

    def __init__(
        self,
        ckpt_dir: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = 4096,
        categories: Optional[Sequence[CategoryLike]] = None,
        llama: Optional["Llama"] = None,
        *,
        max_batch_size: int = 1,
        max_gen_len: Optional[int] = None,
        model_parallel_size: Optional[int] = None,
        device=None,
        dtype=None,
        name: str = "llama_guard",
        reject_markers: bool = True,
    ):
        if (llama is None) == (ckpt_dir is None):
            raise ValueError("LlamaGuardChecker needs either ckpt_dir (with tokenizer_path) or llama, not both")
        if llama is None:
            if tokenizer_path is None:
                raise ValueError(
                    "LlamaGuardChecker(ckpt_dir=...) also needs tokenizer_path (Llama Guard's tokenizer.model)"
                )
            from .generation import Llama

            llama = Llama.build(
                ckpt_dir=str(ckpt_dir),
                tokenizer_path=str(tokenizer_path),
                max_seq_len=max_seq_len,
                max_batch_size=max_batch_size,
                model_parallel_size=model_parallel_size,
                device=device,
                dtype=dtype,
            )
        self.llama = llama
        self.categories = normalize_categories(categories)
        self.codes = category_codes(self.categories)
        if max_gen_len is None:
            # "unsafe", a newline, then ~3 tokens per code and comma, plus EOS, with margin.
            max_gen_len = 8 + 4 * len(self.categories)
        if not isinstance(max_gen_len, int) or max_gen_len < 1:
            raise ValueError(f"max_gen_len must be a positive integer, got {max_gen_len!r}")
        self.max_gen_len = max_gen_len
        self.name = name
        self.reject_markers = reject_markers

    def format_prompt(self, dialog: Sequence[Message], role: str) -> str:
        """The prompt text judging the ``role`` side of ``dialog`` with this checker's policy."""
        return format_llama_guard_prompt(dialog, role, self.categories)

    def prompt_tokens(self, dialog: Sequence[Message], role: str) -> List[int]:
        """Token ids of the prompt: BOS, then the encoded :meth:`format_prompt` text."""
        return self.llama.tokenizer.encode(self.format_prompt(dialog, role), bos=True, eos=False)

    def parse(self, text: str, role: str = "") -> SafetyResult:
        """The verdict in the model's output ``text`` (see :func:`parse_llama_guard_output`)."""
        return parse_llama_guard_output(text, self.categories, checker=self.name, role=role)

    def __call__(self, dialog: Dialog, role: str) -> SafetyResult:
        """Judge the ``role`` side (``"user"`` or ``"assistant"``) of one dialog."""
        return self.check_batch([dialog], role)[0]

    def check_batch(self, dialogs: Sequence[Dialog], role: str) -> List[SafetyResult]:
        """Judge the ``role`` side of each dialog, in one batched greedy generation."""
        results: List[Optional[SafetyResult]] = [None] * len(dialogs)
        limit = self.llama.model.params.max_seq_len - self.max_gen_len
        rows, prompts = [], []
        for i, dialog in enumerate(dialogs):
            _check_dialog(dialog, role, f"Llama Guard, dialog {i}")
            marker = self._marker(dialog) if self.reject_markers else None
            if marker is not None:
                results[i] = self._failure(
                    role,
                    f"message {marker[0]} contains {marker[1]!r}, which structures the Llama Guard prompt and "
                    "could steer its verdict (prompt injection); not judged, treated as unsafe",
                )
                continue
            tokens = self.prompt_tokens(dialog, role)
            if len(tokens) > limit:
                results[i] = self._failure(
                    role,
                    f"the conversation is too long to judge: its Llama Guard prompt is {len(tokens)} tokens, more "
                    f"than max_seq_len - max_gen_len = {limit}; treated as unsafe (build the checker with a "
                    "larger max_seq_len)",
                )
                continue
            rows.append(i)
            prompts.append(tokens)
        if prompts:
            out, _ = self.llama.generate(prompts, max_gen_len=self.max_gen_len, temperature=0.0, top_p=1.0)
            for i, toks in zip(rows, out):
                results[i] = self.parse(self.llama.tokenizer.decode(toks), role)
        return results  # type: ignore[return-value]

    def _failure(self, role: str, report: str) -> SafetyResult:
        report = "checker failure: " + report
        return SafetyResult(is_safe=False, checker=self.name, role=role, failed=True, report=report)

    @staticmethod
    def _marker(dialog: Sequence[Message]) -> Optional[Tuple[int, str]]:
        for i, m in enumerate(dialog):
            if m["role"] == "system":
                continue
            for marker in GUARD_MARKERS:
                if marker in m["content"]:
                    return i, marker
        return None


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
        _check_dialog(dialog, role, self.name)
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
# Command-line specs for the example scripts.


def _guard_tokenizer(ckpt_dir: Path) -> Path:
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no tokenizer.model in {ckpt_dir} or {ckpt_dir.parent}; put Llama Guard's tokenizer.model "
        "(the Llama 2 tokenizer) next to its checkpoint"
    )


def checkers_from_specs(
    specs: Union[None, str, Sequence[str]], *, max_seq_len: int = 4096, device=None, dtype=None
) -> List[SafetyChecker]:
    """Checkers from command-line specs: ``llamaguard:DIR`` and ``keywords:FILE``.

    ``specs`` is one string (several specs separated by commas) or a list of them.
    ``llamaguard:DIR`` loads Llama Guard from ``DIR``, with the ``tokenizer.model`` found in
    ``DIR`` or its parent; ``keywords:FILE`` reads :meth:`KeywordChecker.from_file`.
    """
    if specs is None or specs == "":
        return []
    items = [specs] if isinstance(specs, str) else list(specs)
    checkers: List[SafetyChecker] = []
    for item in items:
        for spec in str(item).split(","):
            spec = spec.strip()
            if not spec:
                continue
            kind, sep, arg = spec.partition(":")
            if not sep or not arg:
                raise ValueError(f"safety spec {spec!r}: expected 'llamaguard:DIR' or 'keywords:FILE'")
            if kind == "llamaguard":
                ckpt = Path(arg)
                checkers.append(
                    LlamaGuardChecker(
                        str(ckpt), str(_guard_tokenizer(ckpt)), max_seq_len=max_seq_len, device=device, dtype=dtype
                    )
                )
            elif kind == "keywords":
                checkers.append(KeywordChecker.from_file(arg))
            else:
                raise ValueError(
                    f"safety spec {spec!r}: unknown checker {kind!r}; use 'llamaguard:DIR' or 'keywords:FILE'"
                )
    return checkers


def format_reports(reports: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per report of a result's ``"safety"`` list, for printing."""
    lines = []
    for r in reports:
        what = "prompt" if r.get("role") == "user" else "reply"
        verdict = "safe" if r.get("is_safe") else ("CHECK FAILED" if r.get("failed") else "UNSAFE")
        lines.append(f"[safety] {r.get('checker')}: {what} {verdict} - {r.get('report')}")
    return lines
