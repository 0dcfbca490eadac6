"""The whole decode step in one native call (llama/native_step.py, llama/csrc/decode_step.cpp)
against the model's own decode step (Transformer.decode_step, torch between our kernels):
logits, the keys and values it writes, greedy generation through the model runner; when it
is not used, and why; the errors it gives."""

import pytest
import torch

from llama import kernel_choice, native, native_step
from llama.checkpoint import random_state_dict
from llama.model import ModelArgs, Segments, Transformer
from llama.quantize import quantize_model
from llama.runner import ModelRunner

FLAGS = kernel_choice.cpu_facts()["flags"]
# each instruction set's flags alone, so that its entry points are the ones called (as tests/test_native.py)
ISA_FLAGS = {isa: needs for isa, (_, needs, _) in native.ISAS.items() if all(f in FLAGS for f in needs)}
ISA_CASES = [(dtype, isa, False) for isa in ISA_FLAGS for dtype in native.ISAS[isa][2]] + [
    (dtype, isa, True) for isa in ISA_FLAGS for dtype in native.INT8_STEP_ENTRIES.get(isa, {})]


@pytest.fixture(autouse=True)
def back_to_this_cpu():
    yield
    native._library(FLAGS)  # later tests call the kernels of this CPU's best instruction sets
DTYPES = [torch.float32, torch.bfloat16]
# max |logits difference| relative to the largest logit: float32 sums in another order; bfloat16
# rounds where torch rounds, so it differs where a sum lands next to a rounding boundary; int8
# quantizes activations, so a last-bit difference may move a value by a quantization step
TOLERANCE = {(torch.float32, False): 1e-5, (torch.bfloat16, False): 2e-2, (torch.float32, True): 5e-2,
             (torch.bfloat16, True): 5e-2}


def make_model(dtype, int8=False, n_kv_heads=1, vocab_size=250, max_batch_size=4, multiple_of=64):
    """A 2-layer model whose every piece runs our kernels: grouped kv heads, a vocabulary that is not
    a multiple of the row tile (the output's last rows one at a time)."""
    why = native.unavailable(dtype, FLAGS)
    if why:
        pytest.skip(f"no native {dtype} kernels: {why}")
    if int8 and not native.int8_available(dtype, FLAGS):
        pytest.skip("no native int8 kernel (AVX512-VNNI or AVX2) on this CPU")
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, multiple_of=multiple_of, vocab_size=vocab_size,
                     max_seq_len=48, max_batch_size=max_batch_size)
    model = Transformer(args, dtype=dtype).requires_grad_(False)
    model.load_state_dict({k: v.to(dtype) for k, v in random_state_dict(args, seed=3, std=0.1).items()})
    model.allocate_buffers("cpu", dtype)
    if int8:
        model = quantize_model(model, "int8")
    kernels = "int8-gemv,native-attention" if int8 else "gemv,native-attention"
    kernel_choice.apply(model, kernel_choice.plan_for(model, torch.device("cpu"), dtype, kernel_choice.parse_override(kernels)))
    return model


def prefill_rows(model, lengths, seed=0):
    """Row ``i`` of the cache holds a random prompt of ``lengths[i]`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for row, n in enumerate(lengths):
            model.prefill(torch.randint(0, model.vocab_size, (n,), generator=gen), Segments([row], [0], [n]))


def cache_copy(model):
    return [(layer.cache_k.clone(), layer.cache_v.clone()) for layer in model.cache.layers]


def restore(model, saved):
    for layer, (k, v) in zip(model.cache.layers, saved):
        layer.cache_k.copy_(k)
        layer.cache_v.copy_(v)


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda v: str(v).removeprefix("torch."))
def test_one_call_step_equals_the_models_step(dtype, int8):
    model = make_model(dtype, int8)
    assert native_step.why_not(model) == ""
    step = native_step.NativeStep.for_model(model)
    lengths = [5, 17, 30, 2]
    prefill_rows(model, lengths)
    before = cache_copy(model)
    for rows in (1, 3, 4):  # one row; rows at their own positions (with a tail past the row tile)
        tokens, positions = [7, 8, 9, 10][:rows], lengths[:rows]
        restore(model, before)
        with torch.inference_mode():
            want = model.decode_step(torch.tensor(tokens)[:, None], torch.tensor(positions), kv_len=max(positions) + 1)
        written = cache_copy(model)
        restore(model, before)
        got = step(tokens, positions)
        assert got.dtype == torch.float32 and got.shape == (rows, model.vocab_size)
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < TOLERANCE[dtype, int8], (rows, err)
        for layer, want_kv, before_kv in zip(model.cache.layers, written, before):  # the same keys and values, same places
            for got_t, want_t, before_t in zip((layer.cache_k, layer.cache_v), want_kv, before_kv):
                assert ((got_t.float() - want_t.float()).abs().max() / want_t.float().abs().max()).item() < TOLERANCE[dtype, int8]
                untouched = torch.ones_like(got_t, dtype=torch.bool)
                for row, pos in enumerate(positions):
                    untouched[row, :, pos] = False
                assert torch.equal(got_t[untouched], before_t[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda v: str(v).removeprefix("torch."))
def test_one_call_step_over_weight_rows_too_long_for_l1(dtype):
    """w2's rows of 2560 (8 of them take more than the 32 KiB chunk with AVX-512: with several rows of x the
    passes run chunk by chunk of K, csrc/gemv.h's tile_rows_chunked, into the step's add-to-residual
    epilogue), against the modules on torch's F.linear (dense), which share none of our products."""
    model = make_model(dtype, multiple_of=2560)
    assert model.layers[0].feed_forward.w2.weight.shape == (128, 2560)
    lengths, tokens = [5, 17, 30, 2], [7, 8, 9, 10]
    prefill_rows(model, lengths)
    before = cache_copy(model)
    cpu = torch.device("cpu")
    for rows in (3, 4):  # two passes of x over each tile: the chunked passes
        restore(model, before)
        kernel_choice.apply(model, kernel_choice.plan_for(model, cpu, dtype, kernel_choice.parse_override("dense,sdpa")))
        with torch.inference_mode():
            want = model.decode_step(torch.tensor(tokens[:rows])[:, None], torch.tensor(lengths[:rows]),
                                     kv_len=max(lengths[:rows]) + 1)
        restore(model, before)
        kernel_choice.apply(model, kernel_choice.plan_for(model, cpu, dtype, kernel_choice.parse_override("gemv,native-attention")))
        got = native_step.NativeStep.for_model(model)(tokens[:rows], lengths[:rows])
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < TOLERANCE[dtype, False], (rows, err)


def test_runner_decodes_the_same_tokens_with_and_without_it(monkeypatch):
    """Greedy decoding through the model runner, 12 steps of 3 rows at their own positions: the same
    tokens as the model's modules give (float32), and the runner did use the one-call step."""
    def greedy(model):
        runner = ModelRunner(model, 4, 48)
        prefill_rows(model, [3, 9, 6])
        tokens, positions, out = [1, 2, 3], [3, 9, 6], []
        for _ in range(12):
            logits = runner.decode(tokens, positions)
            tokens = logits.argmax(-1).tolist()
            positions = [p + 1 for p in positions]
            out.append(tokens)
        return out, runner.native_decoder()

    with_step, used = greedy(make_model(torch.float32))
    assert used is not None
    monkeypatch.setenv(native_step.ENV, "0")
    without, unused = greedy(make_model(torch.float32))
    assert unused is None
    assert with_step == without


def test_why_not_names_the_reason(monkeypatch):
    model = make_model(torch.float32)
    assert native_step.why_not(model) == ""
    monkeypatch.setenv(native_step.ENV, "0")
    assert "LLAMA_NATIVE_STEP=0" in native_step.why_not(model)
    monkeypatch.delenv(native_step.ENV)
    runner = ModelRunner(model, 4, 48)
    assert runner.native_decoder() is not None
    # another kernel for one shape: the runner notices the new plan and goes back to the modules
    plan = kernel_choice.plan_for(model, torch.device("cpu"), torch.float32, kernel_choice.parse_override("dense,native-attention"))
    kernel_choice.apply(model, plan)
    assert "not all gemv" in native_step.why_not(model)
    assert runner.native_decoder() is None
    kernel_choice.apply(model, kernel_choice.plan_for(model, torch.device("cpu"), torch.float32, kernel_choice.parse_override("gemv,sdpa")))
    assert "not native-attention" in native_step.why_not(model)


def test_new_weight_tensors_make_a_new_step():
    """load_state_dict(assign=True) replaces the tensors: the runner binds the step to the new ones
    (else it would decode with the old weights it still holds)."""
    model = make_model(torch.float32)
    runner = ModelRunner(model, 4, 48)
    step = runner.native_decoder()
    assert step is not None and runner.native_decoder() is step
    state = {k: v.clone() * 2 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert runner.native_decoder() is not step
    with torch.inference_mode():
        want = model.decode_step(torch.tensor([[3]]), torch.tensor([0]), same_position=0)
    got = runner.decode([3], [0])
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_any_cache_rows_not_just_the_first():
    """Tokens for cache rows 2 and 0 (row 1 left alone): the logits the model's step gives those rows,
    and row 1's keys and values untouched."""
    model = make_model(torch.float32)
    lengths = [6, 11, 3]
    prefill_rows(model, lengths)
    before = cache_copy(model)
    with torch.inference_mode():
        want = model.decode_step(torch.tensor([[7], [8], [9]]), torch.tensor(lengths), kv_len=max(lengths) + 1)
    restore(model, before)
    got = native_step.NativeStep.for_model(model)([9, 7], [lengths[2], lengths[0]], rows=[2, 0])
    assert ((got - want[[2, 0]]).abs().max() / want.abs().max()).item() < TOLERANCE[torch.float32, False]
    for layer, (k, v) in zip(model.cache.layers, before):
        assert torch.equal(layer.cache_k[1], k[1]) and torch.equal(layer.cache_v[1], v[1])
        assert not torch.equal(layer.cache_k[2], k[2])  # row 2 got its new key


def test_bad_rows_tokens_and_positions_are_errors_not_reads_out_of_bounds():
    model = make_model(torch.float32, max_batch_size=2)
    step = native_step.NativeStep.for_model(model)
    with pytest.raises(ValueError, match="1..2 rows"):
        step([1, 2, 3], [0, 0, 0])
    with pytest.raises(ValueError, match="token ids"):
        step([250], [0])
    with pytest.raises(ValueError, match="token ids"):
        step([-1], [0])
    with pytest.raises(ValueError, match="positions"):
        step([1], [48])
    with pytest.raises(ValueError, match="a position each"):
        step([1, 2], [0])
    with pytest.raises(ValueError, match="distinct cache rows"):
        step([1, 2], [0, 0], rows=[1, 1])
    with pytest.raises(ValueError, match="distinct cache rows"):
        step([1], [0], rows=[2])  # a cache of 2 rows


@pytest.mark.skipif(not ISA_CASES, reason=f"this CPU ({kernel_choice.describe_cpu()}) has no instruction set the kernels use")
@pytest.mark.parametrize("dtype,isa,int8", ISA_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_every_instruction_sets_step_equals_the_models(dtype, isa, int8):
    """Each instruction set's whole step (an AVX2-only CPU runs the AVX2 one), against the model's modules."""
    model = make_model(dtype, int8)
    prefill_rows(model, [9, 4])
    before = cache_copy(model)
    native._library(ISA_FLAGS[isa])  # from here on, this set's kernels only (the modules' too)
    entry = native.decode_step_entry(dtype, int8)
    suffix = native.INT8_STEP_ENTRIES[isa][dtype] if int8 else "llama_decode_step_" + native.ISAS[isa][2][dtype][0]
    assert entry is not None and entry.__name__ == suffix
    with torch.inference_mode():
        want = model.decode_step(torch.tensor([[5], [6]]), torch.tensor([9, 4]), kv_len=10)
    restore(model, before)
    got = native_step.NativeStep(model, entry)([5, 6], [9, 4])
    assert ((got - want).abs().max() / want.abs().max()).item() < TOLERANCE[dtype, int8]


def test_what_the_step_cannot_read_safely_is_refused():
    """A cache of another dtype or layout, or RoPE tables shorter than the cache: the modules take the model."""
    from llama.model import KVCache

    model = make_model(torch.float32)
    assert native_step.why_not(model) == ""
    model.cache = KVCache(model.params, 4, 48, "cpu", torch.bfloat16)
    assert "cache_k is torch.bfloat16" in native_step.why_not(model)
    model.cache = KVCache(model.params, 4, 64, "cpu", torch.float32)  # more positions than the RoPE tables (48)
    assert "RoPE tables do not cover" in native_step.why_not(model)
    model.cache = KVCache(model.params, 4, 48, "cpu", torch.float32)
    model.layers[1].attention.wq.weight.data = model.layers[1].attention.wq.weight.data.t().contiguous().t()
    assert "layer 1 wq is not a contiguous" in native_step.why_not(model)


def test_a_moved_weight_makes_a_new_step():
    """Assigning a parameter's .data frees the old storage the step was bound to (were it not kept) and
    moves the weight: the runner notices and binds anew."""
    model = make_model(torch.float32)
    runner = ModelRunner(model, 4, 48)
    step = runner.native_decoder()
    wq = model.layers[1].attention.wq.weight
    wq.data = wq.data * 3
    assert runner.native_decoder() is not step
    with torch.inference_mode():
        want = model.decode_step(torch.tensor([[3]]), torch.tensor([0]), same_position=0)
    assert ((runner.decode([3], [0]) - want).abs().max() / want.abs().max()).item() < 1e-5
