"""Streaming: incremental detokenization, stop strings, streamed == non-streamed."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from helpers import make_checkpoint

from llama import Llama
from llama.streaming import (
    MAX_PENDING,
    IncrementalDetokenizer,
    StopMatcher,
    StreamEvent,
    in_order,
    normalize_stop,
)

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 😀👍🏽 ok", "naïve café Ærø", "  two  spaces", "\n\nnew line", "Ünïcödé"]
PROMPTS = ["The river", "日本語 😀 café", "naïve Ærø — ünïcode", "Numbers: 3.14159"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sp_model(path) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    sp.Load(str(path))
    return sp


def stream_all(detok: IncrementalDetokenizer, ids):
    out = []
    for t in ids:
        out.append(detok.add(t))
        assert detok.pending <= MAX_PENDING
    out.append(detok.flush())
    return out


def byte_pieces(sp):
    """Token id of each byte value's piece ``<0xNN>``."""
    return [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]


def random_ids(sp, byte, rng: random.Random):
    """Token sequences of every kind: anything in the vocab, runs of byte pieces (valid
    characters cut anywhere, stray continuation bytes, truncated leads), control tokens."""
    vocab = sp.vocab_size()
    n = rng.randrange(0, 30)
    mode = rng.randrange(5)
    if mode == 0:
        return [rng.randrange(vocab) for _ in range(n)]
    if mode == 1:
        return [rng.choice(byte + [0, 1, 2]) for _ in range(n)]
    if mode == 2:
        ids = []
        for _ in range(n):
            if rng.random() < 0.5:
                data = rng.choice(TEXTS).encode()
                start = rng.randrange(len(data))
                ids += [byte[b] for b in data[start : start + rng.randrange(1, 8)]]
            else:
                ids.append(rng.randrange(vocab))
        return ids
    if mode == 3:
        return [byte[0x80 + rng.randrange(64)] for _ in range(n)] + [byte[0xE2], byte[0x82]][: rng.randrange(3)]
    return sp.encode(rng.choice(TEXTS)) + [rng.randrange(vocab) for _ in range(n)]


@pytest.fixture(params=["tiny", "real"])
def any_tokenizer_path(request, tiny_tokenizer_path):
    if request.param == "tiny":
        return tiny_tokenizer_path
    return request.getfixturevalue("real_tokenizer_path")


def test_detokenizer_deltas_add_up_to_decode(any_tokenizer_path):
    sp = sp_model(any_tokenizer_path)
    rng, byte = random.Random(0), byte_pieces(sp)
    for _ in range(1000):
        ids = random_ids(sp, byte, rng)
        context = sp.encode(rng.choice(TEXTS)) if rng.random() < 0.3 else []
        got = "".join(stream_all(IncrementalDetokenizer(sp, context), ids))
        if context:  # the text as it continues the context: the first piece keeps its space
            expected = sp.decode(context + ids)[len(sp.decode(context)) :]
        else:
            expected = sp.decode(ids)
        assert got == expected, ([sp.IdToPiece(i) for i in ids], context)


def test_detokenizer_emits_split_characters_whole(any_tokenizer_path):
    sp = sp_model(any_tokenizer_path)
    byte = byte_pieces(sp)
    for text in TEXTS:
        detok = IncrementalDetokenizer(sp, context=[1, sp.piece_to_id("▁a")])
        deltas = []
        for ch in text:  # every character as byte pieces: emitted as soon as it is complete
            for b in ch.encode():
                deltas.append(detok.add(byte[b]))
            assert detok.pending == 0
        assert detok.flush() == ""
        assert "".join(deltas) == text and "\ufffd" not in text


def test_detokenizer_leading_space_like_sentencepiece(real_tokenizer_path):
    sp = sp_model(real_tokenizer_path)
    hello = sp.piece_to_id("▁Hello")
    assert "".join(stream_all(IncrementalDetokenizer(sp), [hello, hello])) == "Hello Hello"
    assert "".join(stream_all(IncrementalDetokenizer(sp), [1, hello])) == "Hello"  # BOS does not take the strip
    assert "".join(stream_all(IncrementalDetokenizer(sp, sp.encode("Say")), [hello])) == " Hello"
    # pieces whose own text ends in U+FFFD are held back, but not without bound
    replacement = next(i for i in range(sp.vocab_size()) if sp.IdToPiece(i) == "\ufffd")
    ids = [replacement] * 30 + [hello]
    assert "".join(stream_all(IncrementalDetokenizer(sp), ids)) == sp.decode(ids)


def test_detokenizer_window_stays_bounded(tiny_tokenizer_path):
    sp = sp_model(tiny_tokenizer_path)
    continuation = sp.piece_to_id("<0x80>")
    detok = IncrementalDetokenizer(sp)
    out = stream_all(detok, [continuation] * 2000)  # invalid bytes: each is U+FFFD
    assert "".join(out) == "\ufffd" * 2000
    assert sum(len(d) for d in out[:-1]) >= 2000 - MAX_PENDING  # let through while streaming, not at the end


def reference_cut(text, stops):
    """Text before the stop occurrence that ends first (the longer one on a tie)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return text if best is None else text[: best[1]]


def test_stop_matcher_any_chunking():
    rng = random.Random(1)
    alphabet = "ab😀 "
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 3))]
        matcher, out, cuts = StopMatcher(stops), [], sorted(rng.sample(range(len(text) + 1), rng.randrange(len(text) + 2)))
        expected = reference_cut(text, stops)
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            out.append(matcher.add(text[a:b]))
            assert expected.startswith("".join(out)), "emitted text that a stop string later cut off"
        out.append(matcher.flush() if not matcher.stopped else "")
        assert "".join(out) == expected
        assert matcher.stopped == any(s in text for s in stops)


def test_normalize_stop():
    assert normalize_stop(None) == [] and normalize_stop([]) == []
    assert normalize_stop("\n\n") == ["\n\n"]
    assert normalize_stop(("a", "b")) == ["a", "b"]
    for bad in ([""], ["a", 3], 3, {"a"}):
        with pytest.raises(ValueError, match="stop"):
            normalize_stop(bad)


def test_in_order():
    events = [StreamEvent(1, "x", False), StreamEvent(0, "a", False), StreamEvent(2, "", True),
              StreamEvent(0, "b", True), StreamEvent(1, "y", True)]
    assert [(e.index, e.text) for e in in_order(events)] == [(0, "a"), (0, "b"), (1, "x"), (1, "y"), (2, "")]


# -- generation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_checkpoint, tiny_tokenizer_path):
    return Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), max_seq_len=160, max_batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def real_llama(tmp_path_factory, real_tokenizer_path):
    d = tmp_path_factory.mktemp("real_vocab_ckpt")
    make_checkpoint(d, dict(dim=32, n_layers=1, n_heads=2, multiple_of=16, vocab_size=-1), real_tokenizer_path, std=0.05)
    return Llama.build(str(d), str(real_tokenizer_path), max_seq_len=64, max_batch_size=4, device="cpu")


def seeded(llama, seed, fn, *args, **kwargs):
    llama.generator.manual_seed(seed)
    result = fn(*args, **kwargs)
    return list(result) if not isinstance(result, list) else result


@pytest.mark.parametrize("model", ["llama", "real_llama"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_equals_text_completion(request, model, temperature):
    llama = request.getfixturevalue(model)
    for seed, prompt in enumerate(PROMPTS):
        expected = seeded(llama, seed, llama.text_completion, [prompt], temperature=temperature, max_gen_len=40)
        pieces = seeded(llama, seed, llama.stream_text_completion, prompt, temperature=temperature, max_gen_len=40)
        assert "".join(pieces) == expected[0]["generation"]
        assert all(pieces)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_stream_equals_batch_completion(llama, temperature):
    prompts = PROMPTS + ["A café in the square", "😀"]  # more than max_batch_size: two batches
    expected = seeded(llama, 7, llama.text_completion, prompts, temperature=temperature, max_gen_len=30)
    events = seeded(llama, 7, llama.stream_batch_text_completion, prompts, temperature=temperature, max_gen_len=30)
    for i, result in enumerate(expected):
        mine = [e for e in events if e.index == i]
        assert "".join(e.text for e in mine) == result["generation"]
        assert [e.done for e in mine] == [False] * (len(mine) - 1) + [True]


@pytest.mark.parametrize("model", ["llama", "real_llama"])
def test_chat_stream_equals_chat_completion(request, model):
    llama = request.getfixturevalue(model)
    dialogs = [
        [{"role": "user", "content": "Où est le café? 😀"}],
        [
            {"role": "system", "content": "Answer in 日本語."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "こんにちは"},
            {"role": "user", "content": "Again, naïvely"},
        ],
        [{"role": "user", "content": "[INST] tags are refused"}],
    ]
    for temperature in (0.0, 0.8):
        expected = seeded(llama, 3, llama.chat_completion, dialogs, temperature=temperature, max_gen_len=24)
        events = seeded(llama, 3, llama.stream_batch_chat_completion, dialogs, temperature=temperature, max_gen_len=24)
        for i, result in enumerate(expected):
            assert "".join(e.text for e in events if e.index == i) == result["generation"]["content"]
        for i, dialog in enumerate(dialogs):
            one = seeded(llama, 5, llama.chat_completion, [dialog], temperature=temperature, max_gen_len=24)
            pieces = seeded(llama, 5, llama.stream_chat_completion, dialog, temperature=temperature, max_gen_len=24)
            assert "".join(pieces) == one[0]["generation"]["content"]


def token_offsets(llama, tokens):
    """Character offsets in the decoded text where a token ends (where the text so far is a prefix)."""
    text = llama.tokenizer.decode(tokens)
    offsets = []
    for k in range(1, len(tokens)):
        head = llama.tokenizer.decode(tokens[:k])
        if text.startswith(head) and "\ufffd" not in head[-1:]:
            offsets.append(len(head))
    return text, offsets


def pick_multi_token_stop(llama, seed, prompt, temperature=1.0):
    """Generate freely; return (text, generated tokens, a stop string spanning several tokens)."""
    llama.generator.manual_seed(seed)
    (tokens,), _ = llama.generate([llama.tokenizer.encode(prompt, bos=True, eos=False)], 40, temperature)
    text, offsets = token_offsets(llama, tokens)
    inner = [o for o in offsets if 3 <= o <= len(text) - 3]
    assert inner, "the free generation is too short to pick a stop string from"
    cut = inner[len(inner) // 2]
    return text, tokens, text[cut - 3 : cut + 3]


def test_stop_string_spanning_tokens(llama):
    prompt = PROMPTS[1]
    text, tokens, stop = pick_multi_token_stop(llama, 11, prompt)
    expected = text[: text.find(stop)]
    result = seeded(llama, 11, llama.text_completion, [prompt], temperature=1.0, max_gen_len=40, stop=[stop], logprobs=True)
    assert result[0]["generation"] == expected
    pieces = seeded(llama, 11, llama.stream_text_completion, prompt, temperature=1.0, max_gen_len=40, stop=stop)
    assert "".join(pieces) == expected
    # logprobs keep the tokens whose text lies before the stop string
    full = seeded(llama, 11, llama.text_completion, [prompt], temperature=1.0, max_gen_len=40, logprobs=True)[0]
    k = len(result[0]["tokens"])
    assert result[0]["tokens"] == full["tokens"][:k] and result[0]["logprobs"] == full["logprobs"][:k]
    assert expected.startswith(llama.tokenizer.decode(tokens[:k]))
    assert not expected.startswith(llama.tokenizer.decode(tokens[: k + 1])) or k == len(tokens)
    # with echo, the prompt comes first and the same tokens follow it
    echoed = seeded(llama, 11, llama.text_completion, [prompt], temperature=1.0, max_gen_len=40, stop=[stop],
                    logprobs=True, echo=True)[0]
    assert echoed["generation"].startswith(prompt) and len(echoed["logprobs"]) == len(echoed["tokens"])
    if k:
        assert echoed["tokens"][-k:] == result[0]["tokens"]


def test_stop_string_in_prompt_does_not_stop(llama):
    prompt = "The river ran past the old mill"
    free = seeded(llama, 4, llama.text_completion, [prompt], temperature=1.0, max_gen_len=30)[0]["generation"]
    assert "river" not in free
    for echo in (False, True):
        expected = seeded(llama, 4, llama.text_completion, [prompt], temperature=1.0, max_gen_len=30, echo=echo)
        got = seeded(llama, 4, llama.text_completion, [prompt], temperature=1.0, max_gen_len=30, echo=echo, stop="river")
        assert got == expected
    assert "".join(seeded(llama, 4, llama.stream_text_completion, prompt, temperature=1.0, max_gen_len=30, stop=["river"])) == free


def test_stop_ends_only_its_row(llama):
    prompts = [PROMPTS[1], PROMPTS[2]]
    free = seeded(llama, 21, llama.text_completion, prompts, temperature=1.0, max_gen_len=40)
    text0 = free[0]["generation"]
    stop = next(text0[i : i + 4] for i in range(2, len(text0) - 4) if text0[i : i + 4] not in free[1]["generation"])
    got = seeded(llama, 21, llama.text_completion, prompts, temperature=1.0, max_gen_len=40, stop=[stop])
    assert got[0]["generation"] == text0[: text0.find(stop)]
    assert got[1] == free[1]
    events = seeded(llama, 21, llama.stream_batch_text_completion, prompts, temperature=1.0, max_gen_len=40, stop=[stop])
    assert ["".join(e.text for e in events if e.index == i) for i in (0, 1)] == [g["generation"] for g in got]


def test_chat_stop(llama):
    dialog = [{"role": "user", "content": "Tell me about the river."}]
    free = seeded(llama, 2, llama.chat_completion, [dialog], temperature=1.0, max_gen_len=40)[0]["generation"]["content"]
    stop = free[5:9]
    got = seeded(llama, 2, llama.chat_completion, [dialog], temperature=1.0, max_gen_len=40, stop=[stop])
    assert got[0]["generation"]["content"] == free[: free.find(stop)]
    pieces = seeded(llama, 2, llama.stream_chat_completion, dialog, temperature=1.0, max_gen_len=40, stop=[stop])
    assert "".join(pieces) == free[: free.find(stop)]


def test_stream_arguments_are_checked_at_call(llama):
    with pytest.raises(ValueError, match="stop"):
        llama.stream_text_completion("x", stop=[""])
    with pytest.raises(ValueError, match="str"):
        llama.stream_text_completion(["x"])
    with pytest.raises(ValueError, match="temperature"):
        llama.stream_chat_completion([{"role": "user", "content": "x"}], temperature=-1)
    with pytest.raises(ValueError, match="stop"):
        llama.text_completion(["x"], stop=[1])


def test_example_script_streams_the_same_text(tiny_checkpoint, tiny_tokenizer_path):
    outputs = []
    for stream in ("true", "false"):
        proc = subprocess.run(
            [sys.executable, "example_text_completion.py", "--ckpt_dir", str(tiny_checkpoint),
             "--tokenizer_path", str(tiny_tokenizer_path), "--max_gen_len", "24", "--stream", stream],
            cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout.split("\n", 1)[1])  # after "Loaded in ... seconds"
    assert outputs[0] == outputs[1] and outputs[0].count("==================================") == 4
