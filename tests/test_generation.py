"""Llama.build / generate / text_completion / chat_completion on a tiny random checkpoint (CPU).

fairscale's model-parallel group is created once per process (world size 1) by the
first build and reused by every later one.
"""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import llama.engine as engine
import llama.generation as generation
from llama import Llama
from llama.model import ModelArgs

PROMPTS = [
    "The river",
    "Every morning she wrote the numbers",
    "A",
    "Travellers stopped at the inn across the bridge; they spoke of",
    "In winter",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(ckpt, tok, max_seq_len=64, max_batch_size=4, seed=1, **kwargs) -> Llama:
    return Llama.build(str(ckpt), str(tok), max_seq_len=max_seq_len, max_batch_size=max_batch_size, seed=seed,
                       device="cpu", **kwargs)


@pytest.fixture(scope="module")
def llama(tiny_checkpoint, tiny_tokenizer_path) -> Llama:
    """For greedy and argument tests only: sampling tests build their own (fresh generator)."""
    return build(tiny_checkpoint, tiny_tokenizer_path, max_seq_len=64, max_batch_size=4)


@pytest.fixture
def no_eos(llama, monkeypatch):
    """The model never ends a row: EOS is an id it cannot produce."""
    monkeypatch.setattr(llama.tokenizer, "eos_id", -100)
    return llama


def encode(llama, prompts):
    return [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def manual_logprobs(llama, prompt, generated):
    """log_softmax of the untempered logits of a fresh full forward, at each generated token."""
    full = torch.tensor([prompt + generated])
    logits = llama.model.forward(full, 0)[0]  # (len, vocab)
    logp = F.log_softmax(logits.float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(generated) - 1)
    return logp[positions, torch.tensor(generated, dtype=torch.long)], logits


# --- batching -------------------------------------------------------------------------------


def test_mixed_length_batch_equals_one_by_one(llama):
    prompts = encode(llama, PROMPTS[:4])
    assert len({len(p) for p in prompts}) == 4
    batch, _ = llama.generate(prompts, max_gen_len=12, temperature=0)
    alone = [llama.generate([p], max_gen_len=12, temperature=0)[0][0] for p in prompts]
    assert batch == alone
    assert all(len(t) > 0 for t in batch)


def test_more_prompts_than_max_batch_size(tiny_checkpoint, tiny_tokenizer_path, monkeypatch):
    small = build(tiny_checkpoint, tiny_tokenizer_path, max_batch_size=2)
    big = build(tiny_checkpoint, tiny_tokenizer_path, max_batch_size=8)
    widths, running = [], []
    decode = small.runner.decode

    def spy(tokens, positions):
        widths.append(len(tokens))
        running.append(small.engine.num_running)
        return decode(tokens, positions)

    monkeypatch.setattr(small.runner, "decode", spy)
    got = small.text_completion(PROMPTS, max_gen_len=10, temperature=0)
    assert max(widths) == 2 and max(running) == 2  # never more rows than slots
    assert got == big.text_completion(PROMPTS, max_gen_len=10, temperature=0)
    assert len(got) == len(PROMPTS)


def test_echo_returns_prompt_and_generation(llama):
    prompts = encode(llama, PROMPTS[:3])
    plain, _ = llama.generate(prompts, max_gen_len=8, temperature=0)
    echoed, _ = llama.generate(prompts, max_gen_len=8, temperature=0, echo=True)
    assert echoed == [p + g for p, g in zip(prompts, plain)]
    texts = llama.text_completion(PROMPTS[:3], max_gen_len=8, temperature=0, echo=True)
    for prompt, p, g, result in zip(PROMPTS, prompts, plain, texts):
        assert result["generation"] == llama.tokenizer.decode(p + g)
        assert result["generation"].startswith(prompt)


def test_prompts_never_overwritten(llama):
    # Prompts of very different lengths: the long ones are still being fed while the short
    # ones generate. A multi-turn dialog's prompt even contains EOS, which must not end it.
    prompts = encode(llama, ["A", PROMPTS[3]]) + [
        generation.encode_dialog(
            llama.tokenizer,
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "The river"}],
        )
    ]
    assert llama.tokenizer.eos_id in prompts[2]
    original = copy.deepcopy(prompts)
    out, _ = llama.generate(prompts, max_gen_len=6, temperature=0)
    alone = [llama.generate([p], max_gen_len=6, temperature=0)[0][0] for p in prompts]
    assert out == alone
    assert prompts == original  # the caller's lists are not modified
    assert all(len(t) > 0 for t in out)


def test_echo_keeps_a_prompt_that_contains_eos(llama):
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Bye"}]
    prompt = generation.encode_dialog(llama.tokenizer, dialog)
    assert llama.tokenizer.eos_id in prompt
    plain, _ = llama.generate([prompt], max_gen_len=5, temperature=0)
    echoed, logprobs = llama.generate([prompt], max_gen_len=5, temperature=0, echo=True, logprobs=True)
    assert echoed == [prompt + plain[0]]
    assert len(logprobs[0]) == len(echoed[0])


# --- logprobs ---------------------------------------------------------------------------------


def test_logprobs_match_a_manual_forward(llama):
    prompts = encode(llama, PROMPTS[:3])
    tokens, logprobs = llama.generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
    for prompt, gen, lp in zip(prompts, tokens, logprobs):
        assert len(lp) == len(gen) > 0
        expected, _ = manual_logprobs(llama, prompt, gen)
        assert torch.allclose(torch.tensor(lp), expected, atol=1e-4)

    results = llama.text_completion(PROMPTS[:3], max_gen_len=10, temperature=0, logprobs=True)
    for gen, lp, result in zip(tokens, logprobs, results):
        assert result["tokens"] == [llama.tokenizer.decode([t]) for t in gen]
        assert len(result["logprobs"]) == len(result["tokens"])
        assert result["logprobs"] == pytest.approx(lp, abs=1e-5)
        assert result["generation"] == llama.tokenizer.decode(gen)


def test_logprobs_with_echo(llama):
    prompts = encode(llama, PROMPTS[:2])
    tokens, logprobs = llama.generate(prompts, max_gen_len=6, temperature=0, logprobs=True, echo=True)
    for prompt, toks, lp in zip(prompts, tokens, logprobs):
        assert len(lp) == len(toks) and toks[: len(prompt)] == prompt
        # Position 0 (BOS) has no prediction; every later token is scored by the one before.
        expected, _ = manual_logprobs(llama, toks[:1], toks[1:])
        assert torch.allclose(torch.tensor(lp[1:]), expected, atol=1e-4)


def test_logprobs_when_prompts_fill_the_context(llama):
    # max_gen_len=0 with equal-length prompts: nothing is generated, the prompts are only scored.
    prompts = encode(llama, ["The river", "In winte"])
    assert len(prompts[0]) == len(prompts[1])
    tokens, logprobs = llama.generate(prompts, max_gen_len=0, temperature=0, logprobs=True, echo=True)
    assert tokens == prompts
    for prompt, lp in zip(prompts, logprobs):
        expected, _ = manual_logprobs(llama, prompt[:1], prompt[1:])
        assert torch.allclose(torch.tensor(lp[1:]), expected, atol=1e-4)
    assert llama.generate(prompts, max_gen_len=0, temperature=0, logprobs=True) == ([[], []], [[], []])


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature_does_not_change_logprobs(tiny_checkpoint, tiny_tokenizer_path, temperature):
    sampler = build(tiny_checkpoint, tiny_tokenizer_path, seed=3)
    prompts = encode(sampler, PROMPTS[:2])
    tokens, logprobs = sampler.generate(prompts, max_gen_len=10, temperature=temperature, top_p=1.0, logprobs=True)
    for prompt, gen, lp in zip(prompts, tokens, logprobs):
        expected, logits = manual_logprobs(sampler, prompt, gen)
        assert torch.allclose(torch.tensor(lp), expected, atol=1e-4)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(gen) - 1)
        tempered = F.log_softmax(logits / temperature, dim=-1)[positions, torch.tensor(gen)]
        assert not torch.allclose(torch.tensor(lp), tempered, atol=1e-3)  # the test can tell them apart


# --- lengths and stopping ---------------------------------------------------------------------


def test_max_gen_len_none_fills_max_seq_len(no_eos):
    llama = no_eos
    L = llama.model.params.max_seq_len
    prompts = encode(llama, PROMPTS[:3])
    results = llama.text_completion(PROMPTS[:3], max_gen_len=None, temperature=0, logprobs=True)
    for prompt, result in zip(prompts, results):
        assert len(result["logprobs"]) == L - len(prompt)
    (bos_only,), _ = llama.generate([[llama.tokenizer.bos_id]], max_gen_len=L - 1, temperature=0)
    assert len(bos_only) == L - 1
    dialog = [{"role": "user", "content": "Hi"}]
    (chat,) = llama.chat_completion([dialog], max_gen_len=None, temperature=0, logprobs=True)
    assert len(chat["logprobs"]) == L - len(generation.encode_dialog(llama.tokenizer, dialog))


def test_totals_never_exceed_max_seq_len(no_eos):
    llama = no_eos
    L = llama.model.params.max_seq_len
    prompts = encode(llama, PROMPTS) + [[1] * (L - 1), [1] * L]
    tokens, _ = llama.generate(prompts, max_gen_len=1000, temperature=0.8)
    for prompt, gen in zip(prompts, tokens):
        assert len(prompt) + len(gen) == L
    echoed, _ = llama.generate(prompts, max_gen_len=1000, temperature=0, echo=True)
    assert all(len(t) == L for t in echoed)


def test_cut_at_max_gen_len(no_eos):
    prompts = encode(no_eos, PROMPTS)
    for n in (0, 1, 7):
        tokens, logprobs = no_eos.generate(prompts, max_gen_len=n, temperature=0, logprobs=True)
        assert [len(t) for t in tokens] == [n] * len(prompts)
        assert [len(lp) for lp in logprobs] == [n] * len(prompts)


def test_cut_at_eos(llama, monkeypatch):
    """Scripted sampling: row 0 draws EOS at its third step, row 1 never does."""
    eos = llama.tokenizer.eos_id
    script = {0: [5, 6, eos, 7, 8, 9, 10, 11], 1: [20, 21, 22, 23, 24, 25, 26, 27]}
    steps = []

    def scripted(logits, temperatures, top_ps, generators):
        # The engine samples its rows in slot order; slot i follows script[i].
        steps.append(logits.shape[0])
        live = [r for r in llama.engine.slots if r is not None]
        assert len(live) == logits.shape[0]
        return torch.tensor([script[r.slot][len(r.output_tokens)] for r in live])

    monkeypatch.setattr(engine, "sample_rows", scripted)
    prompts = [[1, 40, 41], [1, 50, 51]]
    tokens, logprobs = llama.generate(prompts, max_gen_len=8, temperature=0.6, logprobs=True)
    assert tokens == [[5, 6], [20, 21, 22, 23, 24, 25, 26, 27]]
    assert [len(lp) for lp in logprobs] == [2, 8]
    steps.clear()
    echoed, _ = llama.generate(prompts[:1], max_gen_len=8, temperature=0.6, echo=True)
    assert echoed == [[1, 40, 41, 5, 6]]
    assert len(steps) == 3  # decoding stops as soon as every row has ended

    steps.clear()
    results = llama.text_completion(["The river"], max_gen_len=8, temperature=0.6)
    assert results == [{"generation": llama.tokenizer.decode([5, 6])}]


def test_eos_in_a_longer_prompt_does_not_stop_it(llama, monkeypatch):
    eos = llama.tokenizer.eos_id
    short, long = [1, 40], [1, 40, 41, eos, 1, 42]

    def always(logits, temperatures, top_ps, generators):
        return torch.full((logits.shape[0],), 9)

    monkeypatch.setattr(engine, "sample_rows", always)
    tokens, _ = llama.generate([short, long], max_gen_len=3, temperature=0)
    assert tokens == [[9, 9, 9], [9, 9, 9]]


# --- seeds ------------------------------------------------------------------------------------


def test_same_seed_same_output(tiny_checkpoint, tiny_tokenizer_path):
    def run(seed):
        llama = build(tiny_checkpoint, tiny_tokenizer_path, seed=seed)
        return llama.text_completion(PROMPTS[:3], max_gen_len=16, temperature=1.0, top_p=1.0)

    first = run(7)
    assert run(7) == first
    assert run(8) != first


def test_generation_does_not_touch_global_rng(llama):
    state = torch.random.get_rng_state()
    llama.text_completion(PROMPTS[:2], max_gen_len=4, temperature=1.0)
    assert torch.equal(torch.random.get_rng_state(), state)


# --- argument errors --------------------------------------------------------------------------


def test_prompt_longer_than_max_seq_len(llama):
    L = llama.model.params.max_seq_len
    with pytest.raises(ValueError, match=rf"prompt 1 is {L + 6} tokens long, more than max_seq_len={L}"):
        llama.generate([[1, 2, 3], [1] * (L + 6)], max_gen_len=4)
    long_text = "The river ran quietly past the old mill " * 10
    n = len(llama.tokenizer.encode(long_text, bos=True, eos=False))
    with pytest.raises(ValueError, match=rf"prompt 2 is {n} tokens long, more than max_seq_len={L}; shorten it"):
        llama.text_completion(["a", "b", long_text])
    with pytest.raises(ValueError, match=rf"dialog 1 is \d+ tokens long, more than max_seq_len={L}"):
        llama.chat_completion([[{"role": "user", "content": "a"}], [{"role": "user", "content": long_text}]])


def test_empty_prompt(llama):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llama.generate([[]], max_gen_len=4)


@pytest.mark.parametrize("max_gen_len", [-1, 2.5, "8"])
def test_bad_max_gen_len(llama, max_gen_len):
    with pytest.raises(ValueError, match="max_gen_len must be an integer >= 0"):
        llama.generate([[1]], max_gen_len=max_gen_len)


@pytest.mark.parametrize("call", ["generate", "text_completion", "chat_completion"])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), r"temperature must be a number >= 0 \(0 means greedy\), got -0.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_p=-0.1), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_arguments(llama, call, kwargs, message):
    args = {
        "generate": ([[1, 5]],),
        "text_completion": (["The river"],),
        "chat_completion": ([[{"role": "user", "content": "Hi"}]],),
    }[call]
    if call == "generate":
        kwargs = {"max_gen_len": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        getattr(llama, call)(*args, **kwargs)


def test_text_completion_wants_a_list_of_strings(llama):
    with pytest.raises(ValueError, match="wrap a single prompt in a list"):
        llama.text_completion("The river")
    with pytest.raises(ValueError, match="list of strings"):
        llama.text_completion([[1, 2, 3]])


# --- build errors -----------------------------------------------------------------------------


def copy_checkpoint(src, dst, **params_changes):
    shutil.copytree(src, dst)
    params = json.loads((dst / "params.json").read_text())
    params.update(params_changes)
    (dst / "params.json").write_text(json.dumps(params))
    return dst


def test_missing_checkpoint_dir(tmp_path, tiny_tokenizer_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build(missing, tiny_tokenizer_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty} is not a checkpoint directory"):
        build(empty, tiny_tokenizer_path)


def test_missing_params_json(tmp_path, tiny_checkpoint, tiny_tokenizer_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    (d / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(d / "params.json")):
        build(d, tiny_tokenizer_path)


def test_missing_shards(tmp_path, tiny_checkpoint, tiny_tokenizer_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    (d / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated\.NN\.pth"):
        build(d, tiny_tokenizer_path)


def test_missing_tokenizer(tmp_path, tiny_checkpoint):
    path = tmp_path / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=str(path)):
        build(tiny_checkpoint, path)


def test_unknown_params_key(tmp_path, tiny_checkpoint, tiny_tokenizer_path):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt", n_experts=8)
    with pytest.raises(ValueError, match=r"params\.json has unknown keys \['n_experts'\]"):
        build(d, tiny_tokenizer_path)


def test_n_heads_not_divisible_by_n_kv_heads(tmp_path, tiny_checkpoint, tiny_tokenizer_path):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt", n_kv_heads=3)
    with pytest.raises(ValueError, match=r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"):
        build(d, tiny_tokenizer_path)


def test_dim_not_divisible_by_n_heads(tmp_path, tiny_checkpoint, tiny_tokenizer_path):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt", n_heads=5)
    with pytest.raises(ValueError, match=r"dim \(64\) must be divisible by n_heads \(5\)"):
        build(d, tiny_tokenizer_path)
    with pytest.raises(ValueError, match="must be divisible by n_heads"):
        ModelArgs(dim=64, n_heads=6)


@pytest.mark.parametrize("device, message", [("nonsense", "not a torch device name"), ("gpu:0", "not a torch device")])
def test_bad_device(tiny_checkpoint, tiny_tokenizer_path, device, message):
    with pytest.raises(ValueError, match=message):
        Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), 64, 2, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(tiny_checkpoint, tiny_tokenizer_path):
    with pytest.raises(ValueError, match="CUDA is not available; use device='cpu'"):
        Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), 64, 2, device="cuda")


@pytest.mark.parametrize("dtype", ["float8", "int8", "bfloat", torch.int8, torch.float64])
def test_bad_dtype(tiny_checkpoint, tiny_tokenizer_path, dtype):
    with pytest.raises(ValueError, match=r"is not supported; use .*float32.*bfloat16.*float16"):
        build(tiny_checkpoint, tiny_tokenizer_path, dtype=dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.bfloat16])
def test_bfloat16_on_cpu(tiny_checkpoint, tiny_tokenizer_path, dtype):
    llama = build(tiny_checkpoint, tiny_tokenizer_path, dtype=dtype)
    assert {p.dtype for p in llama.model.parameters()} == {torch.bfloat16}
    assert llama.model.cache.layers[0].cache_k.dtype == torch.bfloat16
    tokens, logprobs = llama.generate([[1, 40, 41]], max_gen_len=4, temperature=0, logprobs=True)
    assert len(tokens[0]) == len(logprobs[0]) and all(lp <= 0 for lp in logprobs[0])
    assert isinstance(llama.text_completion(["The river"], max_gen_len=4)[0]["generation"], str)


def test_float32_is_the_cpu_default(llama):
    assert {p.dtype for p in llama.model.parameters()} == {torch.float32}
    assert llama.device == torch.device("cpu")
