"""Our own matrix-vector kernels (llama/native.py, llama/csrc/gemv.cpp): every instruction set
this CPU has, against F.linear in float32, on shapes with ragged edges; the fallbacks; the build cache."""

import pytest
import torch
import torch.nn.functional as F

from llama import kernel_choice, linear_kernels, native
from llama.model import Segments

FLAGS = kernel_choice.cpu_facts()["flags"]
# each instruction set's flags alone, so that each set's entry points are the ones called
ISA_FLAGS = {isa: needs for isa, (_, needs, _) in native.ISAS.items() if all(f in FLAGS for f in needs)}
CASES = [(dtype, isa) for isa in ISA_FLAGS for dtype in native.ISAS[isa][2]]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max error relative to the largest output


@pytest.fixture(autouse=True)
def back_to_this_cpu():
    yield
    native._library(FLAGS)  # later tests call the kernels of this CPU's best instruction sets


def need(dtype, flags=FLAGS):
    why = native.unavailable(dtype, flags)
    if why:
        pytest.skip(f"no native {dtype} kernel: {why}")


def rel_max_error(got, x, w):
    ref = F.linear(x.double(), w.double())
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.skipif(not CASES, reason=f"this CPU ({kernel_choice.describe_cpu()}) has no instruction set the kernels use")
@pytest.mark.parametrize("dtype,isa", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_every_entry_point_equals_f_linear(dtype, isa):
    need(dtype, ISA_FLAGS[isa])
    _, entries, _ = native._library(ISA_FLAGS[isa])
    assert entries[dtype].linear.__name__ == "llama_linear_" + native.ISAS[isa][2][dtype][0]  # this set's kernel is the one called
    step = entries[dtype].step
    gen = torch.Generator().manual_seed(0)
    # rows 1 (the M == 1 path), 2-3 (one row tile plus a remainder), up to MAX_ROWS; outputs that
    # are not a multiple of the row tile (the last rows one at a time); inner sizes of several steps; rows of
    # w too long for the rows a pass reuses to stay in L1 (320 steps: 40-160 KiB for the 4 or 8 rows of a pass,
    # over the 32 KiB chunk on every instruction set), passed over in chunks of K
    for rows, out_features, in_features in [(1, 8, step), (1, 13, 3 * step), (2, 37, 2 * step), (3, 100, 4 * step),
                                             (5, 8, step), (8, 96, 24 * step), (16, 17, 2 * step), (2, 1, step),
                                             (3, 27, 320 * step), (9, 24, 320 * step), (16, 40, 320 * step)]:
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        w = torch.randn(out_features, in_features, generator=gen).to(dtype)
        got = native.linear(x, w)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        err = rel_max_error(got, x, w)
        assert err < TOLERANCE[dtype], (rows, out_features, in_features, err)
    # leading dimensions are kept: (bsz, 1, in) -> (bsz, 1, out)
    x = torch.randn(4, 1, 2 * step, generator=gen).to(dtype)
    w = torch.randn(24, 2 * step, generator=gen).to(dtype)
    assert native.linear(x, w).shape == (4, 1, 24) and rel_max_error(native.linear(x, w).view(4, 24), x.view(4, -1), w) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda v: str(v).removeprefix("torch."))
def test_what_the_kernels_do_not_cover_goes_to_torch(dtype, monkeypatch):
    need(dtype)
    step = native._library(FLAGS)[1][dtype].step
    real, calls = F.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w: calls.append(tuple(x.shape)) or real(x, w))
    w = torch.randn(16, 2 * step).to(dtype)

    def goes_to_torch(x, weight=w):
        calls.clear()
        got = native.linear(x, weight)
        assert torch.allclose(got.float(), real(x, weight).float(), rtol=1e-2, atol=1e-2)
        return len(calls) == 1

    assert not goes_to_torch(torch.randn(native.MAX_ROWS, 2 * step).to(dtype))  # a decode batch: ours
    assert goes_to_torch(torch.randn(native.MAX_ROWS + 1, 2 * step).to(dtype))  # prefill: torch's
    assert goes_to_torch(torch.randn(2, step + 1).to(dtype), torch.randn(16, step + 1).to(dtype))  # ragged inner size
    assert goes_to_torch(torch.randn(2, 2 * step).to(dtype), torch.randn(2 * step, 16).to(dtype).t())  # column-major weight
    assert goes_to_torch(torch.randn(2, 2 * step).to(torch.float16), w.to(torch.float16))  # no float16 kernel
    with pytest.raises(RuntimeError, match="same dtype"):  # mixed dtypes: torch's own error, as with dense
        native.linear(torch.randn(2, 2 * step), w.to(torch.float64))
    x = torch.randn(2, 2 * step, dtype=dtype, requires_grad=True)  # a gradient wanted: torch's, which records it
    assert goes_to_torch(x.detach()) is False
    calls.clear()
    assert native.linear(x, w).requires_grad and len(calls) == 1


def test_unavailable_says_why():
    assert "neither AVX2" in native.unavailable(torch.float32, [])
    if not ISA_FLAGS:
        pytest.skip("this CPU has no instruction set the kernels use")
    need(torch.float32)
    assert native.unavailable(torch.float16, FLAGS) == "no native kernel for torch.float16 on this CPU"
    assert native.available(torch.float32, FLAGS)


def test_built_once_then_found_in_the_cache(tmp_path, monkeypatch):
    need(torch.float32)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    native._load.cache_clear()
    try:
        assert native.available(torch.float32, FLAGS)
        built = list(tmp_path.glob("gemv-*.so"))
        assert len(built) == 1 and not list(tmp_path.glob("tmp*"))  # no build leftovers
        stamp = built[0].stat().st_mtime_ns
        native._load.cache_clear()
        assert native.available(torch.float32, FLAGS) and built[0].stat().st_mtime_ns == stamp  # not rebuilt
    finally:
        native._load.cache_clear()


def test_no_compiler_means_no_candidate(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native._load.cache_clear()
    try:
        assert "no C++ compiler" in native.unavailable(torch.float32, FLAGS) or not ISA_FLAGS
        assert "gemv" not in kernel_choice.candidates(torch.device("cpu"), torch.float32, "float")
        with pytest.raises(ValueError, match="gemv"):
            kernel_choice.check_override("gemv", None, torch.device("cpu"), torch.float32, None)
        x, w = torch.randn(1, 64), torch.randn(8, 64)
        assert torch.equal(native.linear(x, w), F.linear(x, w))  # torch's, still right
    finally:
        native._load.cache_clear()


def attention_reference(q, cache_k, cache_v, lengths):
    """softmax(q k^T / sqrt(d)) v per row over its first lengths[b] positions, in float64."""
    bsz, heads, head_dim = q.shape
    rep = heads // cache_k.shape[1]
    out = []
    for b in range(bsz):
        n = int(lengths[b])
        k = cache_k[b, :, :n].double().repeat_interleave(rep, 0)  # (heads, n, head_dim)
        v = cache_v[b, :, :n].double().repeat_interleave(rep, 0)
        scores = q[b].double()[:, None, :] @ k.transpose(1, 2) * head_dim**-0.5  # (heads, 1, n)
        out.append((torch.softmax(scores, -1) @ v)[:, 0])
    return torch.stack(out)


@pytest.mark.skipif(not CASES, reason=f"this CPU ({kernel_choice.describe_cpu()}) has no instruction set the kernels use")
@pytest.mark.parametrize("dtype,isa", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_every_decode_attention_entry_point_equals_softmax_attention(dtype, isa):
    need(dtype, ISA_FLAGS[isa])
    step = native._library(ISA_FLAGS[isa])[1][dtype].step
    gen = torch.Generator().manual_seed(0)
    # (rows, heads, kv heads, cache length, lengths): one position; ragged lengths over rows (fewer and more
    # than a key tile, the whole cache); grouped heads, down to one kv head; head sizes of one to four steps
    for bsz, heads, kv_heads, seq, lengths, head_dim in [
        (1, 4, 4, 16, [1], step), (3, 8, 2, 100, [1, 37, 100], 2 * step), (2, 4, 1, 40, [17, 33], 4 * step),
        (4, 6, 3, 70, [70, 16, 15, 1], step),
    ]:
        q = torch.randn(bsz, heads, head_dim, generator=gen).to(dtype)
        # the cache has more rows than the batch; scores of a few units, as in a trained model
        cache_k = (2 * torch.randn(bsz + 1, kv_heads, seq, head_dim, generator=gen)).to(dtype)
        cache_v = torch.randn(bsz + 1, kv_heads, seq, head_dim, generator=gen).to(dtype)
        lengths = torch.tensor(lengths)
        got = native.decode_attention(q, cache_k, cache_v, lengths)
        err = (got.double() - attention_reference(q, cache_k, cache_v, lengths)).abs().max().item()
        assert got.dtype == dtype and got.shape == q.shape
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (bsz, heads, kv_heads, seq, head_dim, err)
    with pytest.raises(ValueError, match="cannot take"):  # heads that its kv heads do not divide
        native.decode_attention(torch.zeros(1, 3, step, dtype=dtype), torch.zeros(1, 2, 4, step, dtype=dtype),
                                torch.zeros(1, 2, 4, step, dtype=dtype), torch.tensor([1]))


def attention_test_model(config, dtype, max_seq_len):
    """A 2-layer model with 4 heads ("plain") or 8 heads over 2 kv heads ("gqa"), random weights, 3 cache rows."""
    from llama.checkpoint import random_state_dict
    from llama.model import ModelArgs, Transformer

    need(dtype)
    heads = {"plain": dict(n_heads=4), "gqa": dict(n_heads=8, n_kv_heads=2)}[config]
    args = ModelArgs(dim=256, n_layers=2, multiple_of=64, vocab_size=300, max_seq_len=max_seq_len, max_batch_size=3, **heads)
    if not native.attends(dtype, args.head_dim):
        pytest.skip(f"no native attention for head size {args.head_dim} in {dtype}")
    model = Transformer(args, dtype=dtype).requires_grad_(False)
    model.load_state_dict({k: v.to(dtype) for k, v in random_state_dict(args, seed=1, std=0.1).items()})
    model.allocate_buffers("cpu", dtype)
    return args, model


def causal_reference(q, cache_k, cache_v, start):
    """float64 softmax attention of a prefill chunk q (length, heads, d) at positions start.. over a cache row."""
    length, heads, _ = q.shape
    rep = heads // cache_k.shape[0]
    end = start + length
    k = cache_k[:, :end].double().repeat_interleave(rep, 0)  # (heads, end, d)
    v = cache_v[:, :end].double().repeat_interleave(rep, 0)
    scores = torch.einsum("shd,hld->hsl", q.double(), k) / q.shape[-1] ** 0.5
    visible = torch.ones(length, end, dtype=torch.bool).tril(start)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hsl,hld->shd", scores.softmax(-1), v)


@pytest.mark.skipif(not CASES, reason=f"this CPU ({kernel_choice.describe_cpu()}) has no instruction set the kernels use")
@pytest.mark.parametrize("dtype,isa", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_every_prefill_attention_entry_point_equals_causal_attention(dtype, isa):
    need(dtype, ISA_FLAGS[isa])
    entry = native._library(ISA_FLAGS[isa])[1][dtype]
    assert entry.prefill_attention.__name__ == "llama_prefill_attention_" + native.ISAS[isa][2][dtype][0]
    step = entry.step
    gen = torch.Generator().manual_seed(0)
    # (length, start, heads, kv heads, cache length, head size, key scale, threads): one token; a chunk continuing a
    # cached prefix; more queries than a block (32) and keys than a block (64), not multiples of them; grouped heads
    # down to one; an odd number of keys ending the cache (bfloat16 packs keys in pairs); a head size of 5 steps
    # (5 or 10 vectors: tiles of 4, then single ones); scores in the hundreds (the exponentials underflow); 3 threads
    threads = torch.get_num_threads()
    for length, start, heads, kv_heads, seq, head_dim, key_scale, n_threads in [
        (1, 0, 4, 4, 8, step, 2, threads), (7, 0, 4, 2, 16, 2 * step, 2, threads), (37, 5, 6, 2, 64, step, 2, threads),
        (130, 0, 4, 4, 160, 2 * step, 2, threads), (70, 100, 8, 1, 200, 4 * step, 2, threads), (3, 61, 2, 2, 64, step, 2, threads),
        (5, 0, 2, 1, 5, step, 2, threads), (3, 60, 2, 2, 63, step, 2, threads), (40, 3, 4, 2, 48, 5 * step, 2, threads),
        (50, 20, 4, 2, 70, step, 30, threads), (45, 30, 6, 3, 75, 2 * step, 2, 3),
    ]:
        q = torch.randn(length, heads, head_dim, generator=gen).to(dtype)
        cache_k = (key_scale * torch.randn(kv_heads, seq, head_dim, generator=gen)).to(dtype)
        cache_v = torch.randn(kv_heads, seq, head_dim, generator=gen).to(dtype)
        cache_k[:, start + length:], cache_v[:, start + length:] = float("nan"), float("nan")  # past the chunk: never read
        assert native.prefill_attends(q, cache_k)
        torch.set_num_threads(n_threads)
        try:
            got = native.prefill_attention(q, cache_k, cache_v, start)
        finally:
            torch.set_num_threads(threads)
        err = (got.double() - causal_reference(q, cache_k, cache_v, start)).abs().max().item()
        assert got.dtype == dtype and got.shape == q.shape
        # float32 scores in the hundreds carry ~1e-5 of rounding into their exponentials
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5 if key_scale <= 2 else 1e-4), (length, start, heads, kv_heads,
                                                                                              head_dim, key_scale, err)
    with pytest.raises(ValueError, match="cannot take"):  # past the cache's positions
        native.prefill_attention(q, cache_k, cache_v, seq - length + 1)
    assert not native.prefill_attends(torch.zeros(2, 3, step, dtype=dtype), torch.zeros(2, 8, step, dtype=dtype))


@pytest.mark.parametrize("config", ["plain", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda v: str(v).removeprefix("torch."))
def test_model_prefills_the_same_with_native_prefill_attention(config, dtype):
    """Whole prompts, prompts in chunks (a chunk over a cached prefix) and several rows in one pass: the
    logits and the cache with the native prefill attention against torch's."""
    args, model = attention_test_model(config, dtype, max_seq_len=128)
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 90, 41)]

    calls, real = [], native.prefill_attention

    def prefill(kernel):
        model.use_prefill_attention(kernel)
        assert all(block.attention_norm.fused == (kernel == "native-attention") for block in model.layers)
        with torch.inference_mode():
            whole = model.prefill(prompts[1], Segments([0], [0], [90]))
            first = model.prefill(prompts[1][:70], Segments([1], [0], [70]))
            rest = model.prefill(prompts[1][70:], Segments([1], [70], [20]))  # over the cached 70
            several = model.prefill(torch.cat([prompts[0], prompts[2]]), Segments([1, 2], [0, 0], [5, 41]))
        return (whole, torch.cat([first, rest]), several), [layer.cache_k.clone() for layer in model.cache.layers]

    want, want_cache = prefill("sdpa")
    with pytest.MonkeyPatch.context() as patch:  # the native attention runs: each layer, each chunk
        patch.setattr(native, "prefill_attention", lambda *a: calls.append(a[0].shape[0]) or real(*a))
        got, got_cache = prefill("native-attention")
    assert sorted(calls) == sorted([90, 70, 20, 5, 41] * args.n_layers)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()).item() < tol
    assert ((got[0] - got[1]).norm() / got[0].norm()).item() < tol  # in chunks as whole
    for g, w in zip(got_cache, want_cache):  # the native attention brings the fused RMSNorm and RoPE
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < tol


@pytest.mark.parametrize("config", ["plain", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda v: str(v).removeprefix("torch."))
def test_model_decodes_the_same_with_native_attention(config, dtype):
    args, model = attention_test_model(config, dtype, max_seq_len=64)
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 17, 30)]

    def decode(kernel):
        for block in model.layers:
            block.attention.decode_attention = kernel
        with torch.inference_mode():
            for row, prompt in enumerate(prompts):  # each row its own prompt length: its own position
                model.prefill(prompt, Segments([row], [0], [len(prompt)]))
            positions = torch.tensor([len(p) for p in prompts])
            tokens = torch.tensor([[7], [8], [9]])
            ragged = model.decode_step(tokens, positions, kv_len=int(positions.max()) + 1)  # rows at their own positions
            same = model.decode_step(tokens, torch.full((3,), 31), same_position=31)  # every row at one position
        return ragged, same

    want, got = decode("sdpa"), decode("native-attention")
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()).item() < tol


@pytest.mark.parametrize("isa", list(native.INT8_ENTRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda v: str(v).removeprefix("torch."))
def test_int8_kernel_equals_the_dequantized_product(dtype, isa):
    """Each instruction set's int8 kernel (AVX512-VNNI; AVX2 for CPUs without VNNI) on its own."""
    from llama.quantize import quantize_weight

    if isa not in ISA_FLAGS:
        pytest.skip(f"this CPU ({kernel_choice.describe_cpu()}) has no {isa}")
    if not native.int8_available(dtype, ISA_FLAGS[isa]):  # from here on, this set's kernels only
        pytest.skip(f"no native int8 kernel here: {native.unavailable(dtype, ISA_FLAGS[isa])}")
    assert native._INT8[dtype].__name__ == native.INT8_ENTRIES[isa][dtype]
    gen = torch.Generator().manual_seed(0)
    step = native.INT8_STEP
    for rows, out_features, in_features in [(1, 8, step), (1, 13, 3 * step), (3, 100, 4 * step), (8, 96, 12 * step),
                                             (16, 17, 2 * step)]:
        q, scales = quantize_weight(torch.randn(out_features, in_features, generator=gen), scale_dtype=torch.float32)
        x = torch.randn(rows, in_features, generator=gen)
        x[:, 5] *= 40  # a large channel: blocks of 32 keep the rest of the row's resolution
        x = x.to(dtype)
        want = x.double() @ (q.double() * scales.double()[:, None]).T
        got = native.int8_linear(x, q, scales)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        # the activations are rounded to int8 in blocks of 32: about 0.5% of the product
        assert ((got.double() - want).norm() / want.norm()).item() < 1.5e-2, (rows, out_features, in_features)
    assert not native.covers_int8(torch.zeros(native.MAX_ROWS + 1, step, dtype=dtype), q[:, :step].contiguous(), scales)
    assert not native.covers_int8(torch.zeros(1, step, dtype=dtype), q[:, :step].contiguous(), scales.bfloat16())
    with pytest.raises(ValueError, match="cannot take"):
        native.int8_linear(torch.zeros(1, step + 1, dtype=dtype), torch.zeros(4, step + 1, dtype=torch.int8), scales[:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda v: str(v).removeprefix("torch."))
def test_dequantized_int8_weights_are_torchs_product_bit_for_bit(dtype):
    need(dtype)
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(1, 16), (5, 40), (37, 768)]:  # 40: a tail after the vectors of 16
        w = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=gen)
        scales = torch.rand(rows, generator=gen) / 100
        out = torch.full((rows, cols), float("nan"), dtype=dtype)
        assert native.dequantize_int8(w, scales, out) is out
        assert torch.equal(out, (w.float() * scales[:, None]).to(dtype))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40])  # NaN stays NaN, as torch's
    w = torch.full((6, 16), 3, dtype=torch.int8)
    out = torch.empty(6, 16, dtype=dtype)
    native.dequantize_int8(w, special, out)
    want = (w.float() * special[:, None]).to(dtype)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out[~want.isnan()], want[~want.isnan()])
    with pytest.raises(ValueError, match="cannot dequantize"):
        native.dequantize_int8(w, special.bfloat16(), out)  # the kernel reads float32 scales
    with pytest.raises(ValueError, match="cannot dequantize"):
        native.dequantize_int8(w, scales, torch.empty(rows, cols + 1, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda v: str(v).removeprefix("torch."))
def test_int8_prefill_on_dequantized_blocks_equals_the_dequantized_product(dtype, monkeypatch):
    from llama.quantize import quantize_weight

    need(dtype)
    gen = torch.Generator().manual_seed(1)
    q, scales = quantize_weight(torch.randn(200, 128, generator=gen), scale_dtype=torch.float32)
    x = torch.randn(3, 24, 128, generator=gen).to(dtype)
    want = x.double() @ (q.double() * scales.double()[:, None]).T
    # one block; then blocks of 64 rows (the last one short), which fill slices of the output
    for block_bytes in (32 << 20, 64 * 128 * 4):
        monkeypatch.setattr(linear_kernels, "_DEQUANTIZED_BLOCK_BYTES", block_bytes)
        for compute in (dtype, torch.bfloat16):
            got = linear_kernels.int8_prefill_dequantized(x, q, scales, compute)
            assert got.dtype == dtype and got.shape == (3, 24, 200)
            tol = 1e-5 if compute == torch.float32 else 1e-2
            assert ((got.double() - want).norm() / want.norm()).item() < tol, (block_bytes, compute)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda v: str(v).removeprefix("torch."))
def test_fused_norm_and_rope_equal_the_model_math(dtype, monkeypatch):
    from llama.model import RMSNorm, apply_rotary_emb, precompute_rope

    need(dtype)
    norms = native.norms
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, eps=1e-5, dtype=dtype).requires_grad_(False)
    norm.weight.copy_(torch.randn(96, generator=gen))
    norm.fused = True  # as llama.kernel_choice.apply sets it with the native attention
    x = (3 * torch.randn(3, 5, 96, generator=gen)).to(dtype)  # 15 decode-sized rows: the calling thread
    many = (3 * torch.randn(2, 400, 96, generator=gen)).to(dtype)  # a prefill's 800 rows: shared among the threads
    cos, sin = precompute_rope(32, 512)
    q = torch.randn(3, 2, 6, 32, generator=gen).to(dtype)
    positions = torch.tensor([[3, 4], [40, 41], [62, 63]])  # each row its own positions: tables (3, 2, 16)
    prompt = torch.randn(2, 400, 6, 32, generator=gen).to(dtype)  # 2 x 400 tokens at positions 0..399
    with torch.inference_mode():
        assert native.norms(x, norm.weight) and native.ropes(q, cos[positions], sin[positions])
        assert native.norms(many, norm.weight) and native.ropes(prompt, cos[None, :400], sin[None, :400])

        def each():
            return (norm(x), norm(many), apply_rotary_emb(q, cos[positions], sin[positions], fused=True),
                    apply_rotary_emb(q, cos[None, :2], sin[None, :2], fused=True),
                    apply_rotary_emb(prompt, cos[None, :400], sin[None, :400], fused=True))

        fused = each()
        monkeypatch.setattr(native, "norms", lambda *a: False)
        monkeypatch.setattr(native, "ropes", lambda *a: False)
        unfused = each()
    # float32: the same to rounding (FMA contraction); bfloat16: rounded where torch rounds, so at most one step apart
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, want in zip(fused, unfused):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() <= tol
    wants_grad = x.detach().clone().requires_grad_()
    assert norms(x, norm.weight) and not norms(wants_grad, norm.weight)  # a gradient wanted: torch's, which records it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda v: str(v).removeprefix("torch."))
def test_linear_many_equals_one_call_per_weight(dtype):
    from llama.model import ModelArgs, Transformer
    from llama.parallel_layers import project

    need(dtype)
    step = native._library(FLAGS)[1][dtype].step
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, 4 * step, generator=gen).to(dtype) for n in (48, 13, 13)]  # q, k, v-like; ragged rows
    for rows in (1, 3, native.MAX_ROWS):
        x = torch.randn(rows, 1, 4 * step, generator=gen).to(dtype)
        for got, w in zip(native.linear_many(x, weights), weights):
            assert got.shape == (rows, 1, w.shape[0]) and torch.equal(got, native.linear(x, w))  # the same tiles, bit for bit
    # the model's projections: one call where every layer runs gemv, each layer's own call otherwise
    args = ModelArgs(dim=2 * step, n_layers=1, n_heads=2, multiple_of=step, vocab_size=64, max_batch_size=1, max_seq_len=8)
    attention = Transformer(args, dtype=dtype).requires_grad_(False).layers[0].attention
    for layer in (attention.wq, attention.wk, attention.wv):
        layer.weight.normal_(generator=gen)
    x = torch.randn(1, 1, args.dim, generator=gen).to(dtype)
    with torch.inference_mode():
        separate = [layer(x) for layer in (attention.wq, attention.wk, attention.wv)]  # dense: F.linear
        for layer in (attention.wq, attention.wk, attention.wv):
            layer.kernel = linear_kernels.gemv
        fused = project(x, attention.wq, attention.wk, attention.wv)
    for a, b in zip(fused, separate):
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < TOLERANCE[dtype]


def test_an_instruction_set_that_does_not_compile_leaves_the_others(tmp_path, monkeypatch):
    # a compiler too old for one instruction set's flags: that set's kernels are missing, the rest build
    import shutil
    import stat

    real = native._compiler()
    if real is None or not ISA_FLAGS:
        pytest.skip("no C++ compiler or no instruction set the kernels use")
    fake = tmp_path / "old-c++"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -mavx512bf16 ] && {{ echo "unknown -mavx512bf16" >&2; exit 1; }}; done\n'
                    f'exec {shutil.which(real) or real} "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    native._load.cache_clear()
    try:
        assert native.available(torch.float32, FLAGS)
        entries = native._library(FLAGS)[1]
        if "avx512bf16" in ISA_FLAGS:  # bfloat16 falls back to the AVX2 kernel
            assert entries[torch.bfloat16].linear.__name__ == "llama_linear_bf16_avx2"
        x, w = torch.randn(2, 64).bfloat16(), torch.randn(24, 64).bfloat16()
        assert rel_max_error(native.linear(x, w), x, w) < TOLERANCE[torch.bfloat16]
    finally:
        native._load.cache_clear()


def test_an_unwritable_cache_means_no_candidate_and_says_where(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(native.CACHE_ENV, str(blocked / "native"))  # its parent is a file: mkdir fails
    native._load.cache_clear()
    try:
        why = native.unavailable(torch.float32, FLAGS)
        if ISA_FLAGS and native._compiler():
            assert native.CACHE_ENV in why and "could not build" in why
        assert "gemv" not in kernel_choice.candidates(torch.device("cpu"), torch.float32, "float")
    finally:
        native._load.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda v: str(v).removeprefix("torch."))
def test_mismatched_shapes_get_torchs_error_not_garbage(dtype):
    need(dtype)
    step = native._library(FLAGS)[1][dtype].step
    x, w = torch.randn(4, step).to(dtype), torch.randn(8, 2 * step).to(dtype)
    assert not native.covers(x, w)
    with pytest.raises(RuntimeError):  # what F.linear says; the kernel would have read past x's rows
        native.linear(x, w)
    assert not native.covers(torch.randn(2, 2 * step).to(dtype), torch.randn(2 * step).to(dtype))  # a 1-d weight
    if native.int8_available(dtype, FLAGS):
        q = torch.zeros(16, native.INT8_STEP, dtype=torch.int8)
        x8 = torch.randn(2, native.INT8_STEP).to(dtype)
        assert native.covers_int8(x8, q, torch.ones(16))
        assert not native.covers_int8(x8, q, torch.ones(8))  # fewer scales than rows: it would read past them
        assert not native.covers_int8(torch.randn(2, 2 * native.INT8_STEP).to(dtype), q, torch.ones(16))
