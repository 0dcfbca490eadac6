"""The Llama 2 chat prompt format: ``[INST]``/``<<SYS>>`` tags, BOS/EOS per turn.

A dialog ``[system?, user, assistant, user, ..., user]`` becomes::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user_1} [/INST] {assistant_1} </s><s>[INST] {user_2} [/INST]

where ``<s>``/``</s>`` are the BOS/EOS token ids (never the strings).
"""

from typing import Any, Dict, List, Literal, Optional, Sequence, TypedDict

from .tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required
    safety: List[Dict[str, Any]]  # not required: reports of the safety checkers (llama.safety)


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required
    safety: List[Dict[str, Any]]  # not required: reports of the safety checkers (llama.safety)


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def validate_dialog(dialog: Sequence[Message], index: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless ``dialog`` is [system?] user (assistant user)*."""
    where = "dialog" if index is None else f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or len(dialog) == 0:
        raise ValueError(f"{where} must be a non-empty list of {{'role': ..., 'content': ...}} messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"{where}, message {i}: expected a dict with 'role' and 'content', got {msg!r}"[:300])
        if msg["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{where}, message {i}: role must be 'system', 'user' or 'assistant', got {msg['role']!r}")
        if not isinstance(msg["content"], str):
            raise ValueError(
                f"{where}, message {i}: content must be a str, got {type(msg['content']).__name__}"
            )
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise ValueError(f"{where} has only a system message; add a user message after it")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            offset = len(dialog) - len(turns)
            raise ValueError(
                f"{where}, message {i + offset}: expected role {expected!r}, got {msg['role']!r}; after an optional "
                "leading system message, roles must alternate user/assistant starting with user"
            )
    if turns[-1]["role"] != "user":
        raise ValueError(f"{where} must end with a user message (the model answers it), not {turns[-1]['role']!r}")


def has_special_tags(dialog: Sequence[Message]) -> bool:
    """True when any message contains ``[INST]``, ``[/INST]``, ``<<SYS>>`` or ``<</SYS>>``."""
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def merge_system_prompt(dialog: Sequence[Message]) -> List[Message]:
    """Fold a leading system message into the first user message, as Llama 2 was trained."""
    if dialog[0]["role"] != "system":
        return list(dialog)
    first_user = {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
    return [first_user] + list(dialog[2:])


def encode_dialog(tokenizer: Tokenizer, dialog: Sequence[Message]) -> List[int]:
    """Prompt token ids for a validated dialog ending with a user message."""
    dialog = merge_system_prompt(dialog)
    tokens: List[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += tokenizer.encode(
            f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True
        )
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens
