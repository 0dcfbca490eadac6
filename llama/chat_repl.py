"""An interactive chat: streamed replies, a history kept within the context window.

``ChatSession`` holds a conversation and answers one message at a time, dropping the
oldest exchanges when the prompt would leave too little room for a reply.
``run_chat`` is the read-eval-print loop of ``example_chat_completion.py
--interactive``; under torchrun, rank 0 reads each line and shares it with the
other ranks (every rank runs the same generation), and only rank 0 prints.
"""

import sys
from typing import IO, Iterator, List, Optional

from . import distributed
from .chat_format import UNSAFE_ERROR, Dialog, Message, encode_dialog, has_special_tags

HELP = "Commands: /reset forgets the conversation, /quit (or Ctrl-D) ends the chat, /help shows this."


class ContextOverflowError(ValueError):
    """A message that cannot fit the context window even with no history."""


class ChatSession:
    """A conversation with a chat model that always fits its context window.

    Args:
        generator: a ``Llama`` (a chat model).
        system: optional system prompt, kept for the whole conversation.
        temperature, top_p: sampling settings of every reply.
        max_gen_len: longest reply in tokens; ``None``: as much as the context allows.
        reply_reserve: tokens kept free for the reply when the history is trimmed;
            default ``max_gen_len``, or ``max_seq_len // 4`` (at most 512) when that is
            ``None``; never more than half of ``max_seq_len``.
    """

    def __init__(
        self,
        generator,
        system: Optional[str] = None,
        *,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        reply_reserve: Optional[int] = None,
    ):
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a str, got {type(system).__name__}")
        if system is not None and has_special_tags([{"role": "system", "content": system}]):
            raise ValueError("the system prompt contains [INST], [/INST], <<SYS>> or <</SYS>>; remove those tags")
        self.generator = generator
        self.system = system or None
        self.temperature, self.top_p, self.max_gen_len = temperature, top_p, max_gen_len
        self.max_seq_len: int = generator.model.params.max_seq_len
        if reply_reserve is None:
            reply_reserve = max_gen_len if max_gen_len is not None else min(512, self.max_seq_len // 4)
        if not isinstance(reply_reserve, int) or reply_reserve < 0:
            raise ValueError(f"reply_reserve must be an integer >= 0, got {reply_reserve!r}")
        self.reply_reserve = min(reply_reserve, self.max_seq_len // 2)
        self.history: List[Message] = []  # user, assistant, user, assistant, ... (no system message)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history = []

    def dialog(self, message: str, history: Optional[List[Message]] = None) -> Dialog:
        """The dialog sent to the model for ``message``: system prompt, history, message."""
        system: List[Message] = [{"role": "system", "content": self.system}] if self.system else []
        history = self.history if history is None else history
        return system + history + [{"role": "user", "content": message}]

    def prompt_length(self, message: str, history: Optional[List[Message]] = None) -> int:
        """Tokens of the prompt for ``message`` after ``history`` (default: the current one)."""
        return len(encode_dialog(self.generator.tokenizer, self.dialog(message, history)))

    def fit(self, message: str) -> int:
        """Drop the oldest exchanges until ``message`` fits with room for a reply.

        Returns how many user/assistant exchanges were dropped (the system prompt and
        the message itself are always kept). Raises ``ContextOverflowError`` (history
        unchanged) when the message does not fit even without history.
        """
        limit = self.max_seq_len - self.reply_reserve
        history, dropped = self.history, 0
        while history and self.prompt_length(message, history) > limit:
            history, dropped = history[2:], dropped + 1
        length = self.prompt_length(message, history)
        if length > limit:
            prompt = "the prompt for this message (with the system prompt)" if self.system else "this message"
            raise ContextOverflowError(
                f"{prompt} is {length} tokens, but at most {limit} fit (max_seq_len={self.max_seq_len} minus "
                f"{self.reply_reserve} kept for the reply); send a shorter message or restart with a larger --max_seq_len"
            )
        self.history = history
        return dropped

    def reply(self, message: str) -> Iterator[str]:
        """Answer ``message``, yielding the reply in pieces as it is generated.

        Call ``fit`` first to learn whether history was dropped (``reply`` fits the
        message too). The exchange joins the history once the reply is complete; a
        message with special tags gets ``UNSAFE_ERROR`` and is not kept, nor is an
        exchange that the model's safety checkers (if any) found unsafe.
        """
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message must be a non-empty string")
        if has_special_tags([{"role": "user", "content": message}]):
            yield UNSAFE_ERROR
            return
        self.fit(message)
        pieces: List[str] = []
        refused = False
        for piece in self.generator.stream_chat_completion(
            self.dialog(message), temperature=self.temperature, top_p=self.top_p, max_gen_len=self.max_gen_len
        ):
            if hasattr(piece, "is_safe"):  # a safety checker's verdict (llama.safety.SafetyNotice)
                refused = refused or not piece.is_safe
            else:
                pieces.append(piece)
            yield piece
        if refused:
            return  # an unsafe exchange is not kept
        self.history = self.history + [
            {"role": "user", "content": message},
            {"role": "assistant", "content": "".join(pieces)},
        ]


def _read_line(stdin: IO[str], stdout: IO[str], prompt: str, echo: bool) -> Optional[str]:
    """One line of input without its newline, or None at end of input (Ctrl-D, Ctrl-C)."""
    try:
        if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
            return input(prompt)  # line editing through readline where available
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
    except (EOFError, KeyboardInterrupt):
        stdout.write("\n")
        return None
    if not line:
        stdout.write("\n")
        return None
    line = line.rstrip("\r\n")
    if echo:
        stdout.write(line + "\n")
    return line


def run_chat(
    generator,
    system: Optional[str] = None,
    *,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
    reply_reserve: Optional[int] = None,
    stdin: Optional[IO[str]] = None,
    stdout: Optional[IO[str]] = None,
    echo: Optional[bool] = None,
) -> ChatSession:
    """Chat on ``stdin``/``stdout`` until ``/quit`` or end of input; returns the session.

    Every rank must call this; rank 0 reads and prints. Replies are printed as they
    are generated. ``echo`` repeats each input line on ``stdout`` (default: when
    ``stdin`` is not a terminal, so piped transcripts read like a conversation).
    See ``ChatSession`` for the other arguments.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    main = distributed.global_rank() == 0
    if echo is None:
        echo = not (hasattr(stdin, "isatty") and stdin.isatty())
    session = ChatSession(
        generator, system, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, reply_reserve=reply_reserve
    )

    def say(text: str, end: str = "\n") -> None:
        if main:
            stdout.write(text + end)
            stdout.flush()

    say(f"Chatting with a context window of {session.max_seq_len} tokens. {HELP}")
    if session.system:
        say(f"System: {session.system}")
    while True:
        # Rank 0's line (None: end of input) on every rank. The others wait for it as long as
        # the user takes: a plain broadcast would fail after LLAMA_DIST_TIMEOUT.
        line = distributed.wait_for_rank0(_read_line(stdin, stdout, "\nUser: ", echo) if main else None)
        if line is None:
            break
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            session.reset()
            say("[conversation cleared]")
            continue
        if command == "/help":
            say(HELP)
            continue
        if command.startswith("/") and " " not in command:
            say(f"[unknown command {command}] {HELP}")
            continue
        try:
            dropped = session.fit(line)
        except ContextOverflowError as e:
            say(f"[message too long: {e}]")
            continue
        if dropped:
            s = "s" if dropped > 1 else ""
            say(f"[context window full: forgot the oldest {dropped} exchange{s} of this conversation]")
        say("Assistant: ", end="")
        try:
            for piece in session.reply(line):
                say(piece, end="")
        except KeyboardInterrupt:
            if distributed.world_size() > 1:
                raise  # the other ranks cannot be told: stop them all
            say(" [interrupted]", end="")
        say("")
    return session
