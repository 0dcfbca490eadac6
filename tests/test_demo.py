"""The built-in demo model (llama/demo.py): built once per test session, then checked.

The ``demo_model`` fixture (conftest.py, shared with test_examples.py) is the slow part: it
trains the demo model from scratch into a temporary cache folder (about 2 minutes on 2 CPU
cores). Everything else takes seconds.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama.demo import (
    BUILD_FILES,
    CACHE_ENV,
    DEMO_NOTICE,
    DEMO_PARAMS,
    READY,
    ensure_demo_model,
    is_ready,
    load_corpus,
    load_dialogs,
)

REPO = Path(__file__).resolve().parents[1]

# Opening words of corpus sentences; greedy continuation must reproduce what follows them.
CORPUS_PROMPTS = [
    "The river Lenna rises in the high moors above",
    "Once upon a time, a young fox lived at",
    "Plants make their own food from sunlight. Their green",
]


@pytest.fixture(scope="module")
def generator(demo_model):
    from llama import Llama

    ckpt_dir, tokenizer_path = demo_model
    return Llama.build(str(ckpt_dir), str(tokenizer_path), max_seq_len=256, max_batch_size=4, device="cpu")


def corpus_continuation(prompt: str, n_words: int) -> str:
    """The ``n_words`` words that follow ``prompt`` in the corpus."""
    text = " ".join(" ".join(load_corpus()).split())
    at = text.index(prompt)
    return " ".join(text[at + len(prompt) :].split()[:n_words])


def test_shipped_data():
    docs, dialogs = load_corpus(), load_dialogs()
    size = sum(len(d) for d in docs)
    assert 8_000 <= size <= 20_000 and len(docs) >= 20
    assert 20 <= len(dialogs) <= 40
    for prompt in CORPUS_PROMPTS:
        assert len(corpus_continuation(prompt, 8).split()) == 8


def test_meta_layout(demo_model):
    from llama.verify import verify

    ckpt_dir, tokenizer_path = demo_model
    assert tokenizer_path == ckpt_dir / "tokenizer.model"
    for name in BUILD_FILES + (READY,):
        assert (ckpt_dir / name).is_file(), name
    assert json.loads((ckpt_dir / "params.json").read_text()) == DEMO_PARAMS
    assert DEMO_PARAMS["n_kv_heads"] < DEMO_PARAMS["n_heads"]  # grouped-query attention is exercised
    assert verify(ckpt_dir, out=io.StringIO())  # checklist.chk matches the files
    assert is_ready(ckpt_dir)
    leftovers = [p.name for p in ckpt_dir.parent.iterdir() if p.name not in (ckpt_dir.name, ckpt_dir.name + ".lock")]
    assert leftovers == []  # the temporary build folder was renamed into place


def test_second_call_reuses(demo_model):
    ckpt_dir, tokenizer_path = demo_model
    before = {name: (ckpt_dir / name).stat().st_mtime_ns for name in BUILD_FILES}
    assert ensure_demo_model(cache_dir=ckpt_dir, verbose=False) == (ckpt_dir, tokenizer_path)
    assert {name: (ckpt_dir / name).stat().st_mtime_ns for name in BUILD_FILES} == before


def test_stale_marker_is_not_ready(demo_model, tmp_path):
    ckpt_dir, _ = demo_model
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in BUILD_FILES + (READY,):
        (copy / name).write_bytes((ckpt_dir / name).read_bytes())
    assert is_ready(copy)
    (copy / READY).write_text("0123456789abcdef\n")  # another recipe's hash
    assert not is_ready(copy)
    (copy / READY).unlink()
    assert not is_ready(copy)


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo model folder"):
        ensure_demo_model(cache_dir=tmp_path, verbose=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_greedy_completion_reproduces_corpus(generator):
    results = generator.text_completion(CORPUS_PROMPTS, temperature=0, max_gen_len=24)
    for prompt, result in zip(CORPUS_PROMPTS, results):
        expected = corpus_continuation(prompt, 6)
        got = " ".join(result["generation"].split()[:6])
        assert got == expected, f"{prompt!r} -> {result['generation']!r}"


def test_prompt_ending_with_a_space(generator):
    # The prompt ends with a lone space piece, which the corpus never has: the model was
    # trained to read past it. Its continuation must still be the corpus's text.
    prompt = "Simply put, the theory of relativity states that "
    (result,) = generator.text_completion([prompt], temperature=0, max_gen_len=24)
    assert "are the same for everyone who moves at a steady speed" in " ".join(result["generation"].split()), result


def test_chat_answers_a_training_question(generator):
    dialogs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Always answer with a haiku."}, {"role": "user", "content": "Tell me about rain."}],
    ]
    answers = {d[-2]["content"]: d[-1]["content"] for d in load_dialogs()}
    results = generator.chat_completion(dialogs, temperature=0, max_gen_len=64)
    for dialog, result in zip(dialogs, results):
        expected = answers[dialog[-1]["content"]].split()[:5]
        assert result["generation"]["role"] == "assistant"
        assert result["generation"]["content"].split()[:5] == expected, result


def test_cli_path_and_notice(tmp_path):
    env = {**os.environ, CACHE_ENV: str(tmp_path / "here")}
    out = subprocess.run(
        [sys.executable, "-m", "llama.demo", "path"], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(tmp_path / "here")
    assert "DEMO" in DEMO_NOTICE and "download.sh" in DEMO_NOTICE and "--ckpt_dir" in DEMO_NOTICE
