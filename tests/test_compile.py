"""Llama.build(compile=True): the torch.compile'd decode step (Inductor on the CPU)
generates what the eager path generates, with packed weights (oneDNN calls) and
dense ones (frozen, autotuned C++ GEMMs). About a minute of compilation."""

import gc
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from llama import Llama
from llama.packed_linear import is_packed


@pytest.mark.parametrize("pack_weights", [True, False], ids=["packed", "dense"])
def test_compiled_decode_matches_eager(tiny_checkpoint, tiny_tokenizer_path, pack_weights):
    kwargs = dict(max_seq_len=48, max_batch_size=2, device="cpu", pack_weights=pack_weights)
    eager = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), **kwargs)
    compiled = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), compile=True, **kwargs)
    assert compiled.runner.compiled and is_packed(compiled.model) == pack_weights
    prompts = ["the river", "once upon a time a fox"]
    a = eager.text_completion(prompts, temperature=0, max_gen_len=20, logprobs=True)
    b = compiled.text_completion(prompts, temperature=0, max_gen_len=20, logprobs=True)
    assert [r["generation"] for r in a] == [r["generation"] for r in b]
    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra["logprobs"], rb["logprobs"]))
    assert diff < 1e-4
    # Compiling a model that is already in use (another batch size compiles on first use).
    eager.compile(warmup_batch_sizes=(2,))
    c = eager.text_completion(prompts, temperature=0, max_gen_len=20)
    assert [r["generation"] for r in c] == [r["generation"] for r in a]
    # One row: no new graph, the same text. Packed weights: run padded to the compiled batch
    # size 2. Dense: the frozen step is one graph for every batch size, run at 1.
    graphs = counters["stats"]["unique_graphs"]
    d = eager.text_completion(prompts[1:], temperature=0, max_gen_len=20)
    assert d[0]["generation"] == a[1]["generation"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert eager.runner.any_batch_size != pack_weights
    assert eager.runner.compiled_batch_sizes == ([2] if pack_weights else [2, 1])


def test_compiled_int8_decode_matches_eager(tiny_checkpoint, tiny_tokenizer_path):
    # Not frozen: freezing would fold the dequantized weights back into float constants.
    kwargs = dict(max_seq_len=48, max_batch_size=2, device="cpu", quantize="int8")
    eager = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), **kwargs)
    compiled = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), compile=True, **kwargs)
    prompts = ["the river", "once upon a time a fox"]
    a = eager.text_completion(prompts, temperature=0, max_gen_len=20)
    b = compiled.text_completion(prompts, temperature=0, max_gen_len=20)
    assert [r["generation"] for r in a] == [r["generation"] for r in b]


def test_compiled_models_are_freed_and_do_not_share_a_recompile_limit(tiny_checkpoint, tiny_tokenizer_path):
    # Each model's compiled graphs live in a cache of its own, freed with the model: in one
    # shared cache, dead models would stay alive and the 9th graph would hit Dynamo's limit of 8.
    kwargs = dict(max_seq_len=48, max_batch_size=2, device="cpu", pack_weights=True)
    refs = []
    for _ in range(9):
        llama = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), compile=True, **kwargs)
        out = llama.text_completion(["the river"], temperature=0, max_gen_len=4)
        refs.append(weakref.ref(llama.model))
        del llama
        gc.collect()
    assert out[0]["generation"]
    assert all(ref() is None for ref in refs)


def test_compiled_step_never_recompiles_for_new_lengths(tiny_checkpoint, tiny_tokenizer_path):
    # Positions are a tensor and the token input a fresh (bsz, 1) tensor: after the warm-up,
    # no prompt or generation length (nor a row count below a compiled size) compiles again.
    import torch._dynamo

    kwargs = dict(max_seq_len=96, max_batch_size=2, device="cpu")
    eager = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), **kwargs)
    compiled = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), compile=True, **kwargs)
    compiled.compile(warmup_batch_sizes=(2,))
    vocab = compiled.model.vocab_size
    prompts = [[1] + [(7 * i + 3 * j) % (vocab - 3) + 3 for j in range(i)] for i in range(50)]  # 50 lengths
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, _ = compiled.generate(prompts, max_gen_len=12, temperature=0)
        for n, prompt in enumerate(prompts[:5]):  # one row at a time too, each with its own length
            assert compiled.generate([prompt], max_gen_len=3 + n, temperature=0)[0][0] == got[n][: 3 + n]
    assert counters["stats"]["unique_graphs"] == graphs
    want, _ = eager.generate(prompts, max_gen_len=12, temperature=0)
    assert got == want


@pytest.mark.parametrize("kernels", ["dense,sdpa", "gemv,native-attention"])
def test_frozen_step_is_one_graph_for_every_batch_size(tiny_checkpoint, tiny_tokenizer_path, kernels, monkeypatch):
    # One graph (so one frozen copy of the weights) however many rows decode; freed with its model.
    # With our kernels, the graph calls them as operators (llama::gemv_linear, llama::decode_attention).
    from llama import kernel_choice, native, native_step

    if kernels != "dense,sdpa" and "gemv" not in kernel_choice.candidates(torch.device("cpu"), torch.float32, "float"):
        pytest.skip(f"no native kernels here: {native.unavailable(torch.float32, kernel_choice.cpu_facts()['flags'])}")
    monkeypatch.setenv(native_step.ENV, "0")  # the graph itself (with it, a model on our kernels everywhere compiles nothing)
    kwargs = dict(max_seq_len=48, max_batch_size=4, device="cpu", kernels=kernels)
    eager = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), **kwargs)
    compiled = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), **kwargs)
    graphs = counters["stats"]["unique_graphs"]
    calls = {"linear": 0, "attention": 0}
    real_linear, real_attention = native.linear, native.decode_attention

    def linear(x, w):
        calls["linear"] += torch.compiler.is_compiling() is False and x.shape[-2] == 1  # decode rows at run time
        return real_linear(x, w)

    def attention(*args):
        calls["attention"] += 1
        return real_attention(*args)

    monkeypatch.setattr(native, "linear", linear)
    monkeypatch.setattr(native, "decode_attention", attention)
    compiled.compile(warmup_batch_sizes=(1, 4))
    compiled_calls = {}
    assert compiled.runner.any_batch_size and counters["stats"]["unique_graphs"] == graphs + 1
    prompts = ["the river", "once upon a time a fox", "a", "the end of the"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (3, 2, 1, 4):
            counted = dict(calls)
            got = compiled.text_completion(prompts[:n], temperature=0, max_gen_len=12, logprobs=True)
            compiled_calls = {k: compiled_calls.get(k, 0) + calls[k] - counted[k] for k in calls}
            want = eager.text_completion(prompts[:n], temperature=0, max_gen_len=12, logprobs=True)
            assert [r["generation"] for r in got] == [r["generation"] for r in want]
            diff = max(abs(x - y) for ra, rb in zip(got, want) for x, y in zip(ra["logprobs"], rb["logprobs"]))
            assert diff < 1e-4
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert sorted(compiled.runner.compiled_batch_sizes) == [1, 2, 3, 4]
    # the compiled decode steps ran our kernels (eager prefill aside: its rows are not 1 per sequence)
    assert (compiled_calls["linear"] > 0 and compiled_calls["attention"] > 0) == (kernels != "dense,sdpa")
    ref = weakref.ref(compiled.model)
    del compiled
    gc.collect()
    assert ref() is None


def two_on_our_kernels(tiny_checkpoint, tiny_tokenizer_path, max_seq_len: int, max_batch_size: int):
    """Two builds of the tiny model with our kernels everywhere (the one-call step's), or a skip."""
    from llama import kernel_choice, native

    if "gemv" not in kernel_choice.candidates(torch.device("cpu"), torch.float32, "float") or \
            native.decode_step_entry(torch.float32, False) is None:
        pytest.skip("no native decode step for float32 here")
    kwargs = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size, device="cpu", kernels="gemv,native-attention")
    return tuple(Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), **kwargs) for _ in range(2))


def test_a_step_that_is_one_native_call_compiles_nothing(tiny_checkpoint, tiny_tokenizer_path, capsys):
    """Every piece on our kernels: compile() keeps the one-call step (no graph, no warm-up) and says so."""
    from llama import native_step

    eager, built = two_on_our_kernels(tiny_checkpoint, tiny_tokenizer_path, 48, 4)
    graphs = counters["stats"]["unique_graphs"]
    assert built.compile(warmup_batch_sizes=(1, 4)) < 1.0
    assert "one native call" in capsys.readouterr().out
    assert not built.runner.compiled and built.runner.native_decoder() is not None
    prompts = ["the river", "once upon a time a fox"]
    got = built.text_completion(prompts, temperature=0, max_gen_len=8)
    assert counters["stats"]["unique_graphs"] == graphs
    assert [r["generation"] for r in got] == [r["generation"] for r in eager.text_completion(prompts, temperature=0, max_gen_len=8)]
    assert native_step.why_not(built.model) == ""


def test_past_the_one_call_steps_rows_a_graph_takes_the_larger_batches(tiny_checkpoint, tiny_tokenizer_path, monkeypatch):
    """A cache of 18 rows: steps of up to 16 rows stay one native call, 17 and 18 run the compiled graph."""
    from llama import native_step

    eager, built = two_on_our_kernels(tiny_checkpoint, tiny_tokenizer_path, 32, 18)
    built.compile(warmup_batch_sizes=(1, 18))
    assert built.runner.compiled and built.runner.native_decoder() is not None
    assert built.runner.compiled_batch_sizes == [18]  # not 1: one row is the one-call step's
    calls = {"one call": 0}
    real_call = native_step.NativeStep.__call__

    def counted(self, tokens, positions):
        calls["one call"] += 1
        return real_call(self, tokens, positions)

    monkeypatch.setattr(native_step.NativeStep, "__call__", counted)
    prompts = [f"the river {i}" for i in range(18)]
    got = built.text_completion(prompts, temperature=0, max_gen_len=4)
    assert calls["one call"] == 0  # 18 rows decoding together: the graph
    assert [r["generation"] for r in got] == [r["generation"] for r in eager.text_completion(prompts, temperature=0, max_gen_len=4)]
    built.text_completion(prompts[:2], temperature=0, max_gen_len=4)
    assert calls["one call"] > 0
