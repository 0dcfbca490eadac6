"""The OpenAI wire format: request validation and the JSON of responses, chunks and errors.

Requests are validated by hand rather than by schema, so that every refusal is a 400 in
OpenAI's error shape that names the parameter (``param``) and says what is allowed.
Parameters OpenAI defines but this server does not implement (penalties, tools, ...) are
refused by name unless they hold their neutral value (``frequency_penalty: 0``,
``tools: []``, ``null``), which some clients always send. Unknown parameters are refused.
"""

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..chat_format import encode_dialog, has_special_tags, validate_dialog

MAX_STOP_STRINGS = 16
MAX_N = 128
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: until the context is full)


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def service_unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, "server_error", None, code, {"Retry-After": "5"})


# ------------------------------------------------------------------------------------------ parsing


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(body: bytes) -> Dict[str, Any]:
    """The request body as a JSON object; a 400 for anything else."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise bad_request(f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, float) and v.is_integer())


def _neutral_number(v: Any) -> bool:
    return v is None or (_is_number(v) and v == 0)


# Parameters of OpenAI's API that this server does not implement: accepted only at their neutral value.
UNSUPPORTED: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "frequency_penalty": (_neutral_number, "0"),
    "presence_penalty": (_neutral_number, "0"),
    "repetition_penalty": (lambda v: v is None or (_is_number(v) and v == 1), "1"),
    "logit_bias": (lambda v: v is None or v == {}, "{}"),
    "tools": (lambda v: v is None or v == [], "[]"),
    "tool_choice": (lambda v: v is None or v == "none", '"none"'),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "a boolean"),
    "functions": (lambda v: v is None or v == [], "[]"),
    "function_call": (lambda v: v is None or v == "none", '"none"'),
    "response_format": (lambda v: v is None or v == {"type": "text"}, '{"type": "text"}'),
    "modalities": (lambda v: v is None or v == ["text"], '["text"]'),
    "audio": (lambda v: v is None, "null"),
    "prediction": (lambda v: v is None, "null"),
    "reasoning_effort": (lambda v: v is None, "null"),
    "web_search_options": (lambda v: v is None, "null"),
    "store": (lambda v: v is None or v is False, "false"),
    "metadata": (lambda v: v is None or v == {}, "{}"),
    "service_tier": (lambda v: v in (None, "auto", "default"), '"auto"'),
    "best_of": (lambda v: v is None or (_is_int(v) and v == 1), "1"),
    "suffix": (lambda v: v is None or v == "", '""'),
}

COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options", "user"}
CHAT_PARAMS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "safety_identifier",
                        "prompt_cache_key"}
COMPLETION_PARAMS = COMMON | {"prompt", "logprobs", "echo"}


class Params:
    """Typed access to the fields of a request object, each failure a 400 naming the field."""

    def __init__(self, data: Dict[str, Any], known: set, where: str = ""):
        self.data = data
        self.where = where
        for name, value in data.items():
            if name in UNSUPPORTED and name not in known:
                ok, neutral = UNSUPPORTED[name]
                if not ok(value):
                    raise bad_request(
                        f"'{name}' is not supported by this server (only {neutral} or null is accepted)",
                        name, "unsupported_parameter",
                    )
            elif name not in known:
                raise bad_request(f"unrecognized request argument supplied: '{name}'", name, "unknown_parameter")

    def _get(self, name: str) -> Any:
        return self.data.get(name)

    def number(self, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        v = self._get(name)
        if v is None:
            return default
        if not _is_number(v):
            raise bad_request(f"'{name}' must be a number, got {_json_type(v)}", name, "invalid_type")
        if v < lo or v > hi or (lo_open and v == lo):
            rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise bad_request(f"'{name}' must be in {rng}, got {v!r}", name, "invalid_value")
        return float(v)

    def integer(self, name: str, default: Optional[int], lo: int, hi: Optional[int] = None) -> Optional[int]:
        v = self._get(name)
        if v is None:
            return default
        if not _is_int(v):
            raise bad_request(f"'{name}' must be an integer, got {_json_type(v)} ({str(v)[:40]})", name, "invalid_type")
        v = int(v)
        if v < lo or (hi is not None and v > hi):
            allowed = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise bad_request(f"'{name}' must be {allowed}, got {v}", name, "invalid_value")
        return v

    def boolean(self, name: str, default: bool) -> bool:
        v = self._get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise bad_request(f"'{name}' must be a boolean, got {_json_type(v)}", name, "invalid_type")
        return v

    def string(self, name: str) -> Optional[str]:
        v = self._get(name)
        if v is not None and not isinstance(v, str):
            raise bad_request(f"'{name}' must be a string, got {_json_type(v)}", name, "invalid_type")
        return v

    def stop(self) -> Tuple[str, ...]:
        v = self._get("stop")
        if v is None:
            return ()
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise bad_request("'stop' must be a string or an array of strings", "stop", "invalid_type")
        if len(items) > MAX_STOP_STRINGS:
            raise bad_request(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(items)}", "stop",
                              "invalid_value")
        if any(s == "" for s in items):
            raise bad_request("'stop' strings must not be empty", "stop", "invalid_value")
        return tuple(dict.fromkeys(items))

    def stream_options(self, stream: bool) -> bool:
        """``include_usage`` of ``stream_options`` (only allowed with ``stream: true``)."""
        v = self._get("stream_options")
        if v is None:
            return False
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options",
                              "invalid_value")
        if not isinstance(v, dict):
            raise bad_request("'stream_options' must be an object", "stream_options", "invalid_type")
        extra = set(v) - {"include_usage", "include_obfuscation"}
        if extra:
            name = sorted(extra)[0]
            raise bad_request(f"unrecognized stream option '{name}'", f"stream_options.{name}", "unknown_parameter")
        include = v.get("include_usage", False)
        if include is None:
            include = False
        if not isinstance(include, bool):
            raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
        return include


# ------------------------------------------------------------------------------------------ requests


@dataclass
class Sampling:
    """The sampling parameters of a request, as the engine's ``SamplingParams`` fields."""

    temperature: float
    top_p: float
    max_gen_len: Optional[int]
    stop: Tuple[str, ...]
    logprobs: bool
    top_logprobs: int
    echo: bool
    seed: Optional[int]

    def for_choice(self, params_cls, j: int):
        """The engine's ``SamplingParams`` for choice ``j`` (seeds seed, seed + 1, ...)."""
        seed = None if self.seed is None else (self.seed + j) % 2**63
        return params_cls(
            temperature=self.temperature, top_p=self.top_p, max_gen_len=self.max_gen_len, stop=self.stop,
            logprobs=self.logprobs, top_logprobs=self.top_logprobs, echo=self.echo, seed=seed,
        )


@dataclass
class ParsedRequest:
    """A validated request: its prompts as token ids and what to do with the results."""

    chat: bool
    model: Optional[str]
    prompts: List[List[int]]
    dialogs: List[List[Dict[str, str]]]  # per prompt, what safety checkers judge (the prompt as a chat)
    refused: List[bool]  # per prompt: special tags in a chat (answered with UNSAFE_ERROR, not run)
    n: int
    sampling: Sampling
    stream: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


SEED_RANGE = (0, 2**63 - 1)


def _common(p: Params, max_tokens_name: str, default_max_tokens: Optional[int], min_max_tokens: int):
    model = p.string("model")
    stream = p.boolean("stream", False)
    include_usage = p.stream_options(stream)
    p.string("user")  # accepted: the end user's id, for the caller's own bookkeeping
    n = p.integer("n", 1, 1, MAX_N)
    temperature = p.number("temperature", 0.6, 0.0, 2.0)
    top_p = p.number("top_p", 0.9, 0.0, 1.0, lo_open=True)
    seed = p.integer("seed", None, *SEED_RANGE)
    max_tokens = p.integer(max_tokens_name, None, min_max_tokens)
    if max_tokens_name != "max_tokens":  # chat: max_completion_tokens wins over the older max_tokens
        legacy = p.integer("max_tokens", None, min_max_tokens)
        max_tokens = legacy if max_tokens is None else max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    return model, stream, include_usage, n, temperature, top_p, seed, max_tokens, p.stop()


def _message_content(msg: Dict[str, Any], i: int) -> str:
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or "type" not in part:
                raise bad_request(f"{where} must be an object with a 'type'", where, "invalid_type")
            if part["type"] != "text":
                raise bad_request(
                    f"{where}: content of type {str(part['type'])[:40]!r} is not supported (text only)", where,
                    "unsupported_content",
                )
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.text must be a string", f"{where}.text", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(
        f"messages[{i}].content must be a string or an array of text parts, got {_json_type(content)}",
        f"messages[{i}].content", "invalid_type",
    )


MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "function_call", "audio"}


def parse_messages(messages: Any) -> List[Dict[str, str]]:
    """OpenAI messages as a Llama 2 dialog; a 400 for what the chat format cannot hold."""
    if messages is None:
        raise bad_request("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad_request(f"'messages' must be an array, got {_json_type(messages)}", "messages", "invalid_type")
    if not messages:
        raise bad_request("'messages' must hold at least one message", "messages", "invalid_value")
    dialog = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{where} must be an object, got {_json_type(msg)}", where, "invalid_type")
        for key in msg:
            if key not in MESSAGE_KEYS:
                raise bad_request(f"{where}: unrecognized field '{key}'", f"{where}.{key}", "unknown_parameter")
            if key not in ("role", "content") and msg[key] not in (None, [], ""):
                raise bad_request(f"{where}.{key} is not supported by this server", f"{where}.{key}",
                                  "unsupported_parameter")
        role = msg.get("role")
        if role is None:
            raise bad_request(f"{where}.role is required", f"{where}.role", "missing_required_parameter")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role in ("tool", "function"):
            raise bad_request(f"{where}: role '{role}' is not supported (no tool calling)", f"{where}.role",
                              "unsupported_role")
        if role not in ("system", "user", "assistant"):
            raise bad_request(
                f"{where}: unknown role {str(role)[:40]!r}; use 'system', 'user' or 'assistant'", f"{where}.role",
                "invalid_role",
            )
        dialog.append({"role": role, "content": _message_content(msg, i)})
    try:
        validate_dialog(dialog)
    except ValueError as e:
        raise bad_request(str(e), "messages", "invalid_dialog") from None
    return dialog


def parse_chat(data: Dict[str, Any], tokenizer) -> ParsedRequest:
    p = Params(data, CHAT_PARAMS)
    model, stream, include_usage, n, temperature, top_p, seed, max_tokens, stop = _common(
        p, "max_completion_tokens", None, 1
    )
    p.string("safety_identifier")
    p.string("prompt_cache_key")
    logprobs = p.boolean("logprobs", False)
    top_logprobs = p.integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS_CHAT)
    if top_logprobs and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    dialog = parse_messages(data.get("messages"))
    refused = has_special_tags(dialog)
    prompt = [] if refused else encode_dialog(tokenizer, dialog)
    sampling = Sampling(temperature, top_p, max_tokens, stop, logprobs, top_logprobs, False, seed)
    return ParsedRequest(True, model, [prompt], [dialog], [refused], n, sampling, stream, include_usage,
                         id=f"chatcmpl-{uuid.uuid4().hex}")


def _token_list(v: Any, n_words: int, where: str) -> List[int]:
    if not v:
        raise bad_request(f"{where} is an empty list of tokens", where, "invalid_value")
    for t in v:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_words:
            raise bad_request(f"{where} must hold token ids in [0, {n_words}), got {str(t)[:40]}", where,
                              "invalid_value")
    return list(v)


def parse_prompts(v: Any, tokenizer) -> Tuple[List[List[int]], List[str]]:
    """``prompt`` (a string, strings, token ids or lists of token ids) as token lists and their texts."""
    if v is None:
        raise bad_request("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        raise bad_request("'prompt' must be a string, an array of strings, an array of token ids or an array of "
                          "arrays of token ids", "prompt", "invalid_type")
    n_words = tokenizer.n_words
    if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        tokens = _token_list(v, n_words, "prompt")
        return [tokens], [tokenizer.decode(tokens)]
    prompts, texts = [], []
    for i, x in enumerate(v):
        if isinstance(x, str):
            prompts.append(tokenizer.encode(x, bos=True, eos=False))
            texts.append(x)
        elif isinstance(x, list):
            tokens = _token_list(x, n_words, f"prompt[{i}]")
            prompts.append(tokens)
            texts.append(tokenizer.decode(tokens))
        else:
            raise bad_request(f"prompt[{i}] must be a string or an array of token ids, got {_json_type(x)}",
                              f"prompt[{i}]", "invalid_type")
    return prompts, texts


def parse_completion(data: Dict[str, Any], tokenizer) -> ParsedRequest:
    p = Params(data, COMPLETION_PARAMS)
    echo = p.boolean("echo", False)
    model, stream, include_usage, n, temperature, top_p, seed, max_tokens, stop = _common(
        p, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS, 0 if echo else 1
    )
    logprobs = p.integer("logprobs", None, 0, MAX_LOGPROBS_COMPLETION)
    prompts, texts = parse_prompts(data.get("prompt"), tokenizer)
    sampling = Sampling(temperature, top_p, max_tokens, stop, logprobs is not None, logprobs or 0, echo, seed)
    dialogs = [[{"role": "user", "content": t}] for t in texts]
    return ParsedRequest(False, model, prompts, dialogs, [False] * len(prompts), n, sampling, stream,
                         include_usage, id=f"cmpl-{uuid.uuid4().hex}")


def check_context(parsed: ParsedRequest, max_seq_len: int) -> None:
    """400 ``context_length_exceeded`` unless every prompt leaves room for its completion (at least a token)."""
    for i, prompt in enumerate(parsed.prompts):
        if parsed.refused[i]:
            continue
        wanted = parsed.sampling.max_gen_len
        room = 1 if wanted is None else wanted
        if len(prompt) + room <= max_seq_len or (wanted == 0 and len(prompt) <= max_seq_len):
            continue
        what = "messages" if parsed.chat else ("prompt" if len(parsed.prompts) == 1 else f"prompt[{i}]")
        if wanted is None:
            detail = f"your {what} resulted in {len(prompt)} tokens, which leaves no room for a completion"
        else:
            detail = (f"you requested {len(prompt) + wanted} tokens ({len(prompt)} in the {what}, {wanted} in the "
                      "completion)")
        raise bad_request(
            f"This model's maximum context length is {max_seq_len} tokens. However, {detail}. Please reduce the "
            f"length of the {what} or completion.",
            "messages" if parsed.chat else "prompt", "context_length_exceeded",
        )


# ------------------------------------------------------------------------------------------ responses


FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "content_filter": "content_filter"}


class TokenText:
    """Token ids as OpenAI's logprob entries: the piece's text (SentencePiece's "▁" as a space) and its bytes."""

    def __init__(self, tokenizer):
        self.sp = getattr(tokenizer, "sp_model", tokenizer)
        self._cache: Dict[int, Tuple[str, List[int]]] = {}

    def __call__(self, token_id: int) -> Tuple[str, List[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.sp.IdToPiece(token_id)
            if self.sp.IsByte(token_id):
                raw = bytes([int(piece[3:5], 16)])
                text = raw.decode() if raw[0] < 0x80 else "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            else:
                raw = piece.replace("\u2581", " ").encode("utf-8")
                text = raw.decode("utf-8")
            hit = self._cache[token_id] = (text, list(raw))
        return hit


def chat_logprobs(token_text: TokenText, ids: Sequence[int], lps: Sequence[float],
                  tops: Optional[Sequence[Dict[int, float]]]) -> Dict[str, Any]:
    content = []
    for k, (t, lp) in enumerate(zip(ids, lps)):
        text, raw = token_text(t)
        entry = {"token": text, "logprob": lp, "bytes": raw, "top_logprobs": []}
        if tops is not None:
            for tid, tlp in sorted(tops[k].items(), key=lambda kv: -kv[1]):
                ttext, traw = token_text(tid)
                entry["top_logprobs"].append({"token": ttext, "logprob": tlp, "bytes": traw})
        content.append(entry)
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """The legacy ``logprobs`` object of /v1/completions, built up delta by delta."""

    def __init__(self, token_text: TokenText):
        self.token_text = token_text
        self.offset = 0  # characters of text before the next token
        self.strip = True  # the first visible piece loses its leading space (SentencePiece's dummy prefix)

    def add(self, ids: Sequence[int], lps: Sequence[Optional[float]], tops: Optional[Sequence[Optional[Dict]]],
            text: str) -> Dict[str, Any]:
        """The entries for tokens ``ids`` whose text is ``text`` (``tops`` None: no top_logprobs)."""
        tokens, offsets, top = [], [], []
        end = self.offset + len(text)
        at = self.offset
        for k, t in enumerate(ids):
            piece, _ = self.token_text(t)
            tokens.append(piece)
            offsets.append(min(at, end))
            # A control piece has no text, a partial character's byte ends at the delta's end.
            if not (self.token_text.sp.IsControl(t) or piece.startswith("bytes:")):
                at += len(piece) - (1 if self.strip and piece.startswith(" ") else 0)
                self.strip = False
            if tops is not None:
                ranked = None if tops[k] is None else sorted(tops[k].items(), key=lambda kv: -kv[1])
                top.append(None if ranked is None else {self.token_text(tid)[0]: tlp for tid, tlp in ranked})
        self.offset = end
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top if tops is not None else None,
                "text_offset": offsets}


def merge_completion_logprobs(parts: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if not parts:
        return None
    merged: Dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": None, "text_offset": []}
    for part in parts:
        merged["tokens"] += part["tokens"]
        merged["token_logprobs"] += part["token_logprobs"]
        merged["text_offset"] += part["text_offset"]
        if part["top_logprobs"] is not None:
            merged["top_logprobs"] = (merged["top_logprobs"] or []) + part["top_logprobs"]
    return merged


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: Any) -> str:
    """One server-sent event carrying ``payload`` as JSON (or the ``[DONE]`` marker)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
