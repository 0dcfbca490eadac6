"""The generation engine: every cache row at its own position, continuous batching,
per-request sampling. Greedy output is checked token for token against transformers."""

import threading

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.engine import Engine, SamplingParams
from test_model import CONFIGS, PACKED, build_pair

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class NoEosTokenizer:  # token-level generation needs only the special ids
    pad_id, eos_id, bos_id = -1, -100, 1


def random_prompts(lengths, vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab_size, (n - 1,), generator=g).tolist() for n in lengths]


def hf_greedy(theirs, prompt, new_tokens):
    with torch.no_grad():
        out = theirs.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt):].tolist()


@PACKED
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mixed_lengths_greedy_equals_transformers(name, packed):
    # A 1-token prompt beside one that nearly fills the context, more prompts than slots,
    # and prefill chunks small enough that long prompts are cut while other rows decode.
    args, ours, theirs = build_pair(name, max_seq_len=96, max_batch_size=3, packed=packed)
    llama = Llama(ours, NoEosTokenizer())
    llama.engine.prefill_chunk_tokens = 16
    prompts = random_prompts([1, 90, 7, 33, 20, 64], args.vocab_size)
    got, _ = llama.generate(prompts, max_gen_len=14, temperature=0)
    for prompt, out in zip(prompts, got):
        assert len(out) == min(14, 96 - len(prompt))  # the context bound cuts the long one
        assert out == hf_greedy(theirs, prompt, len(out)), len(prompt)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_one_call_step_through_the_engine_equals_transformers(name):
    """The same load with our kernels everywhere, so that every decode step is one native call
    (llama/native_step.py): slots reused, rows at their own positions, prefill chunks between steps."""
    from llama import kernel_choice, native_step

    cpu = torch.device("cpu")
    if "gemv" not in kernel_choice.candidates(cpu, torch.float32, "float"):
        pytest.skip("no native kernels on this machine")
    args, ours, theirs = build_pair(name, max_seq_len=96, max_batch_size=3)
    kernel_choice.apply(ours, kernel_choice.plan_for(ours, cpu, torch.float32, kernel_choice.parse_override("gemv,native-attention")))
    if native_step.why_not(ours):
        pytest.skip(f"no one-call step: {native_step.why_not(ours)}")
    llama = Llama(ours, NoEosTokenizer())
    llama.engine.prefill_chunk_tokens = 16
    prompts = random_prompts([1, 90, 7, 33, 20, 64], args.vocab_size)
    got, _ = llama.generate(prompts, max_gen_len=14, temperature=0)
    assert llama.runner.native_decoder() is not None
    for prompt, out in zip(prompts, got):
        assert len(out) == min(14, 96 - len(prompt))
        assert out == hf_greedy(theirs, prompt, len(out)), len(prompt)


def test_decode_rows_at_different_positions_equal_full_forwards():
    # The logits of one decode step over rows at different positions, against a full
    # forward of each sequence alone (GQA: the folded-heads attention with a mask).
    args, ours, _ = build_pair("gqa", max_seq_len=64, max_batch_size=3)
    seqs = random_prompts([5, 23, 12], args.vocab_size, seed=4)
    full = [ours.forward(torch.tensor([s]), 0)[0, -1] for s in seqs]
    runner = Llama(ours, NoEosTokenizer()).runner
    from llama.model import Segments

    prompts = [s[:-1] for s in seqs]
    runner.prefill(sum(prompts, []), Segments([0, 1, 2], [0, 0, 0], [len(p) for p in prompts]), [0])
    logits = runner.decode([s[-1] for s in seqs], [len(p) for p in prompts])
    for row, want in enumerate(full):
        assert (logits[row] - want).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def llama(tiny_checkpoint, tiny_tokenizer_path):
    return Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), max_seq_len=64, max_batch_size=3, device="cpu")


def run(engine: Engine, requests):
    while not all(r.finished for r in requests):
        engine.step()
    return requests


def encode(llama, text):
    return llama.tokenizer.encode(text, bos=True, eos=False)


def test_a_request_joining_mid_flight_generates_what_it_generates_alone(llama):
    engine = llama.engine
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, max_gen_len=20, seed=5)
        (alone,) = run(engine, [engine.add_request(encode(llama, "In winter the water"), params)])
        first = engine.add_request(encode(llama, "The river ran quietly past the old mill"), params)
        for _ in range(4):
            engine.step()
        assert first.output_tokens and not first.finished
        late = engine.add_request(encode(llama, "In winter the water"), params)
        run(engine, [first, late])
        assert late.output_tokens == alone.output_tokens and late.text == alone.text


def test_same_seed_same_sample_whatever_shares_the_batch(llama):
    engine = llama.engine
    params = SamplingParams(temperature=1.0, top_p=0.95, max_gen_len=24, seed=1234)
    prompt = encode(llama, "Travellers stopped at the inn")
    (alone,) = run(engine, [engine.add_request(prompt, params)])
    others = [
        engine.add_request(encode(llama, "A"), SamplingParams(temperature=0.7, max_gen_len=30)),
        engine.add_request(encode(llama, "Numbers, letters and punctuation"), SamplingParams(temperature=0)),
    ]
    shared = engine.add_request(prompt, params)
    run(engine, others + [shared])
    assert shared.output_tokens == alone.output_tokens
    different = engine.add_request(prompt, SamplingParams(temperature=1.0, top_p=0.95, max_gen_len=24, seed=99))
    run(engine, [different])
    assert different.output_tokens != alone.output_tokens


def test_abort_frees_the_slot_for_the_next_request(llama):
    engine = llama.engine
    params = SamplingParams(temperature=0, max_gen_len=40)
    requests = [engine.add_request(encode(llama, f"The river {i}"), params) for i in range(4)]
    engine.step()
    assert engine.num_running == 3 and engine.num_waiting == 1
    victim = requests[1]
    slot = victim.slot
    engine.abort(victim.request_id)
    outputs = engine.step()
    done = [o for o in outputs if o.request_id == victim.request_id]
    assert done and done[-1].finished and done[-1].finish_reason == "abort"
    assert requests[3].slot == slot and engine.num_waiting == 0  # the waiting one took it at once
    engine.abort(requests[3].request_id)
    engine.abort("no-such-request")  # ignored
    run(engine, [requests[0], requests[2], requests[3]])
    assert requests[3].finish_reason == "abort"
    assert engine.num_running == 0 and not engine.has_unfinished()


def test_rows_end_independently_and_outputs_add_up(llama):
    engine = llama.engine
    free = run(engine, [engine.add_request(encode(llama, "The river"), SamplingParams(temperature=0, max_gen_len=30))])[0]
    stop = free.text[5:9]
    assert stop.strip()
    specs = [
        ("The river", SamplingParams(temperature=0, max_gen_len=30, stop=(stop,), logprobs=True, top_logprobs=3)),
        ("In winter", SamplingParams(temperature=0, max_gen_len=3, logprobs=True)),
        ("A café", SamplingParams(temperature=1.0, max_gen_len=12, seed=3)),
    ]
    requests = [engine.add_request(encode(llama, p), params) for p, params in specs]
    outputs = {r.request_id: [] for r in requests}
    while not all(r.finished for r in requests):
        for out in engine.step():
            outputs[out.request_id].append(out)
    stopped, short, sampled = requests
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.index(stop)]
    assert short.finish_reason == "length" and len(short.generated) == 3
    assert sampled.finish_reason in ("length", "eos")
    for request in requests:
        outs = outputs[request.request_id]
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
        assert "".join(o.text for o in outs) == request.text
        assert sum((o.token_ids for o in outs), []) == request.generated
        assert outs[-1].num_generated_tokens == len(request.generated)
        if request.params.logprobs:
            assert sum((o.logprobs for o in outs), []) == request.generated_logprobs
    # The tokens of the stopped row are those whose text precedes the stop string.
    assert stopped.text.startswith(llama.tokenizer.decode(stopped.generated))
    assert len(stopped.generated) < len(stopped.output_tokens)  # the one that completed the stop is dropped
    for out in outputs[stopped.request_id]:
        for token, top in zip(out.token_ids, out.top_logprobs):
            assert len(top) == 3 and max(top, key=top.get) == token  # greedy picks the most likely


def test_prompt_logprobs_in_chunks_equal_a_full_forward(llama):
    engine = llama.engine
    prompt = encode(llama, "Every morning she wrote the numbers 1, 2, 3 and 42")
    logits = llama.model.forward(torch.tensor([prompt]), 0)[0]
    want = F.log_softmax(logits, dim=-1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    for chunk in (4096, 5):
        engine.prefill_chunk_tokens = engine.max_prefill_tokens = chunk
        busy = engine.add_request(encode(llama, "The"), SamplingParams(temperature=0, max_gen_len=30))
        engine.step()  # decoding while the prompt is scored
        params = SamplingParams(temperature=0, max_gen_len=0, logprobs=True, echo=True)
        (scored,) = run(engine, [engine.add_request(prompt, params)])
        assert not busy.finished
        assert scored.finish_reason == "length" and scored.generated == []
        assert scored.prompt_logprobs[0] == 0.0
        assert torch.allclose(torch.tensor(scored.prompt_logprobs[1:]), want, atol=1e-4)
        run(engine, [busy])
    engine.prefill_chunk_tokens, engine.max_prefill_tokens = 256, 4096


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(llama, monkeypatch):
    engine = llama.engine
    engine.prefill_chunk_tokens = 8
    prefills = []
    prefill = llama.runner.prefill

    def spy(tokens, segments, logit_index):
        prefills.append(len(tokens))
        return prefill(tokens, segments, logit_index)

    monkeypatch.setattr(llama.runner, "prefill", spy)
    short = engine.add_request(encode(llama, "A"), SamplingParams(temperature=0, max_gen_len=20))
    engine.step()
    long = engine.add_request(encode(llama, "The river ran quietly past the old mill, where the miller"),
                              SamplingParams(temperature=0, max_gen_len=5))
    before = len(short.output_tokens)
    while long.num_cached < len(long.prompt_tokens):
        engine.step()
    assert max(prefills[1:]) <= 8 and len(prefills) > 2  # never more than the budget while a row decodes
    assert len(short.output_tokens) - before >= len(prefills) - 2  # and the short row kept decoding
    run(engine, [short, long])
    engine.prefill_chunk_tokens = 256


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_gen_len=-1), "max_gen_len"),
        (dict(max_gen_len=True), "max_gen_len"),
        (dict(stop=[""]), "stop"),
        (dict(top_logprobs=21), "top_logprobs"),
        (dict(logprobs=1), "logprobs"),
        (dict(seed=-3), "seed"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests(llama):
    engine = llama.engine
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="max_seq_len=64"):
        engine.add_request([1] * 65, SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([1, llama.model.vocab_size], SamplingParams())
    request = engine.add_request([1, 5], SamplingParams(max_gen_len=2), request_id="mine")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 5], SamplingParams(), request_id="mine")
    run(engine, [request])
    assert not engine.has_unfinished()


def test_run_loop_serves_requests_added_from_another_thread(llama):
    engine = llama.engine
    params = SamplingParams(temperature=0, max_gen_len=10)
    want = [r.output_tokens for r in run(engine, [engine.add_request(encode(llama, p), params) for p in ("A", "In winter")])]
    stop = threading.Event()
    seen = {}

    def on_outputs(outputs):
        for out in outputs:
            seen.setdefault(out.request_id, []).extend(out.token_ids)

    loop = threading.Thread(target=engine.run_loop, args=(stop.is_set, on_outputs), daemon=True)
    loop.start()
    requests = [engine.add_request(encode(llama, p), params) for p in ("A", "In winter")]
    for r in requests:
        while not r.finished:
            threading.Event().wait(0.01)
    stop.set()
    loop.join(timeout=30)
    assert not loop.is_alive()
    assert [seen[r.request_id] for r in requests] == want


@pytest.mark.parametrize("first_done", ["last slots", "first slots"])
def test_steps_move_between_the_one_call_and_the_modules_as_rows_come_and_go(tiny_checkpoint, tiny_tokenizer_path, monkeypatch, first_done):
    """18 slots: while more than 16 rows decode the modules run the step, then the one call does, in
    the middle of the same generations; the tokens are those of the modules alone. Where the first
    slots finish first, the one call takes only the rows still decoding (the runner's decode_rows)."""
    from llama import kernel_choice, native, native_step

    if "gemv" not in kernel_choice.candidates(torch.device("cpu"), torch.float32, "float") or \
            native.decode_step_entry(torch.float32, False) is None:
        pytest.skip("no native decode step for float32 here")
    kwargs = dict(max_seq_len=40, max_batch_size=18, device="cpu", kernels="gemv,native-attention")
    prompts = [f"the river {i}" for i in range(18)]

    def generate():
        built = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), **kwargs)
        engine, requests = built.engine, []
        for i, prompt in enumerate(prompts):  # rows finish one after the other
            max_gen_len = 20 - i if first_done == "last slots" else 3 + i
            requests.append(engine.add_request(encode(built, prompt), SamplingParams(temperature=0.0, max_gen_len=max_gen_len)))
        run(engine, requests)
        return [r.output_tokens for r in requests], built

    calls = []
    real_call = native_step.NativeStep.__call__
    monkeypatch.setattr(native_step.NativeStep, "__call__",
                        lambda self, t, p, rows=None: calls.append((len(t), rows is not None)) or real_call(self, t, p, rows))
    mixed, built = generate()
    assert calls and max(n for n, _ in calls) == 16 and built.runner.native_decoder() is not None  # 17-18: the modules
    # the first slots free while the last decode: the one call runs the decoding rows only
    assert any(chosen for _, chosen in calls) == (first_done == "first slots")
    monkeypatch.setenv(native_step.ENV, "0")
    modules_only, _ = generate()
    assert mixed == modules_only
