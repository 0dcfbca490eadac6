"""Kernels chosen by measurement (llama/kernel_choice.py): overrides, the per-machine cache,
threads, and agreement of every kernel the chooser may pick with dense float32."""

import json

import pytest
import torch

from llama import kernel_choice, linear_kernels
from llama.checkpoint import random_state_dict
from llama.model import ModelArgs, Transformer
from llama.packed_linear import is_packed, packing_supported
from llama.parallel_layers import linear_layers
from llama.quantize import quantize_model

CPU = torch.device("cpu")
CONFIGS = {  # tests/test_model.py's
    "plain": dict(dim=128, n_layers=3, n_heads=4, multiple_of=64, vocab_size=300, norm_eps=1e-5),
    "gqa": dict(
        dim=128, n_layers=3, n_heads=8, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3,
        rope_theta=1e6, vocab_size=300, norm_eps=1e-6,
    ),
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache and no override from the environment."""
    monkeypatch.setenv(kernel_choice.CACHE_ENV, str(tmp_path / "kernels.json"))
    monkeypatch.delenv(kernel_choice.KERNELS_ENV, raising=False)
    return tmp_path / "kernels.json"


@pytest.fixture
def fake_timer(monkeypatch):
    """Replace the measurement by one that counts its calls and always finds ``fast`` fastest."""
    state = {"calls": 0, "fast": None}

    def fake(shape, dtype, names, batches=kernel_choice.DECODE_BATCHES, stream_bytes=None, seed=0, usage=None):
        state["calls"] += 1
        fast = state["fast"] if state["fast"] in names else names[-1]
        return {n: {b: (1.0 if n == fast else 2.0) * 1e-3 for b in batches} for n in names}

    monkeypatch.setattr(kernel_choice, "time_kernels", fake)
    monkeypatch.setattr(kernel_choice, "QUIET_SHARE", 0.0)  # a fake measurement takes no CPU time: always "quiet"
    return state


def model(name="plain", dtype=torch.float32, std=0.1):
    args = ModelArgs(**CONFIGS[name], max_seq_len=64, max_batch_size=2)
    m = Transformer(args, dtype=dtype)
    m.load_state_dict({k: v.to(dtype) for k, v in random_state_dict(args, seed=1, std=std).items()})
    return args, m.requires_grad_(False)


def kernels_of(m):
    return {linear_kernels.name_of(layer.kernel) for _, layer in linear_layers(m)}


SHAPES = [("float", (64, 32)), ("float", (32, 64)), ("float", (64, 32))]  # one repeated


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("override", ["dense", "packed"])
def test_override_is_deterministic_and_measures_nothing(override, fake_timer, monkeypatch):
    if override == "packed" and not packing_supported(CPU, torch.float32):
        pytest.skip("no oneDNN packing in this torch build")
    for how in ("argument", "env"):
        if how == "env":
            monkeypatch.setenv(kernel_choice.KERNELS_ENV, f"{override},sdpa")
            parsed = kernel_choice.check_override(None, None, CPU, torch.float32, None)
        else:
            parsed = kernel_choice.check_override(f"{override},sdpa", None, CPU, torch.float32, None)
        for _ in range(2):
            _, m = model()
            plan = kernel_choice.plan_for(m, CPU, torch.float32, parsed)
            kernel_choice.apply(m, plan)
            assert kernels_of(m) == {override}
            assert {c.source for c in plan.choices.values()} == {"override"}
    assert fake_timer["calls"] == 0


def test_pack_weights_is_an_override():
    assert kernel_choice.resolve_override(None, True) == ({"float": "packed"}, "pack_weights=")
    assert kernel_choice.resolve_override(None, False) == ({"float": "dense"}, "pack_weights=")
    with pytest.raises(ValueError, match="not both"):
        kernel_choice.resolve_override("dense", True)


def test_parse_override():
    assert kernel_choice.parse_override(None) == {} and kernel_choice.parse_override("auto") == {}
    assert kernel_choice.parse_override("packed, int8-fp32") == {"float": "packed", "int8": "int8-fp32"}
    assert kernel_choice.parse_override("int8-gemv,prefill-dequantized") == {"int8": "int8-gemv",
                                                                              "int8-prefill": "prefill-dequantized"}
    with pytest.raises(ValueError, match="name one"):
        kernel_choice.parse_override("prefill-int8mm,prefill-dequantized")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel_choice.parse_override("fast")
    with pytest.raises(ValueError, match="name one"):
        kernel_choice.parse_override("dense,packed")


def test_build_override_must_apply_env_override_need_not():
    with pytest.raises(ValueError, match="exclude each other"):
        kernel_choice.check_override("packed", None, CPU, torch.float32, "int8")
    with pytest.raises(ValueError, match="quantize='int8'"):
        kernel_choice.check_override("int8", None, CPU, torch.float32, None)
    with pytest.raises(ValueError, match="quantize='int8'"):
        kernel_choice.check_override("prefill-int8mm", None, CPU, torch.float32, None)
    unpackable = [d for d in (torch.float16, torch.bfloat16) if not packing_supported(CPU, d)]
    if unpackable:
        with pytest.raises(ValueError, match="float32 on the CPU"):
            kernel_choice.check_override(None, True, CPU, unpackable[0], None)


def test_int8_prefill_is_measured_cached_and_overridable(private_cache, monkeypatch):
    """An int8 model's prefill kernel: timed at PREFILL_ROWS rows once per shape and cached, given to
    every layer by apply; an override measures nothing."""
    if "prefill-dequantized" not in kernel_choice.candidates(CPU, torch.float32, "int8-prefill"):
        pytest.skip("no native dequantization here: prefill-int8mm is the only candidate")
    calls = []

    def fake(shape, dtype, names, rows=kernel_choice.PREFILL_ROWS, seed=0, usage=None, fp32_activations=False):
        calls.append((shape, tuple(rows)))
        return {n: {r: (1.0 if n == "prefill-dequantized" else 3.0) * 1e-3 for r in rows} for n in names}

    monkeypatch.setattr(kernel_choice, "time_prefill", fake)
    monkeypatch.setattr(kernel_choice, "QUIET_SHARE", 0.0)
    for round in ("measured", "cached"):
        _, m = model()
        quantize_model(m)
        plan = kernel_choice.plan_for(m, CPU, torch.float32, {"int8": "int8", "attention": "sdpa"})
        kernel_choice.apply(m, plan)
        prefill = {key: c for key, c in plan.choices.items() if key[0] == "int8-prefill"}
        shapes = {tuple(layer.weight.shape) for _, layer in linear_layers(m)}
        assert {key[1:] for key in prefill} == shapes and {c.source for c in prefill.values()} == {round}
        assert {layer.prefill for _, layer in linear_layers(m)} == {"prefill-dequantized"}
        assert len(calls) == len(shapes) and all(rows == kernel_choice.PREFILL_ROWS for _, rows in calls)
    # a prompt runs it in every layer; a decode step (2 rows) runs the layers' own kernel
    ran, real = [], linear_kernels.int8_prefill_dequantized
    monkeypatch.setattr(linear_kernels, "int8_prefill_dequantized", lambda *a: ran.append(a[1].shape) or real(*a))
    with torch.inference_mode():
        m.forward(torch.ones(2, 20, dtype=torch.long), 0)
        assert sorted(ran) == sorted(tuple(layer.weight.shape) for _, layer in linear_layers(m))
        m.forward(torch.ones(2, 1, dtype=torch.long), 20)
    assert len(ran) == len(list(linear_layers(m)))
    # only a prefill pass of at least DEQUANTIZED_MIN_ROWS rows: not a short chunk, nor a decode step of many rows
    ran.clear()
    big_args = ModelArgs(**CONFIGS["plain"], max_seq_len=64, max_batch_size=40)
    big = Transformer(big_args, dtype=torch.float32).requires_grad_(False)
    big.load_state_dict(random_state_dict(big_args, seed=1, std=0.1))
    quantize_model(big)
    kernel_choice.apply(big, plan)
    with torch.inference_mode():
        big.forward(torch.ones(1, linear_kernels.DEQUANTIZED_MIN_ROWS - 1, dtype=torch.long), 0)
        big.decode_step(torch.ones(40, 1, dtype=torch.long), torch.full((40,), 33), same_position=33)
        assert ran == []
        big.forward(torch.ones(1, linear_kernels.DEQUANTIZED_MIN_ROWS, dtype=torch.long), 0)
    assert len(ran) == len(list(linear_layers(big)))
    override = kernel_choice.check_override("int8,prefill-int8mm,sdpa", None, CPU, torch.float32, "int8")
    plan = kernel_choice.plan_for(m, CPU, torch.float32, override)
    kernel_choice.apply(m, plan)
    assert {layer.prefill for _, layer in linear_layers(m)} == {"prefill-int8mm"}
    assert {c.source for c in plan.choices.values()} == {"override"} and len(calls) == len(shapes)


def test_int8_prefill_is_timed_in_the_activations_of_the_layers_kernel(private_cache, monkeypatch):
    """int8-fp32 layers multiply in float32 in both prefill kernels: timed so, and cached apart."""
    if "prefill-dequantized" not in kernel_choice.candidates(CPU, torch.float32, "int8-prefill"):
        pytest.skip("no native dequantization here: prefill-int8mm is the only candidate")
    seen = []

    def fake(shape, dtype, names, rows=kernel_choice.PREFILL_ROWS, seed=0, usage=None, fp32_activations=False):
        seen.append(fp32_activations)
        return {n: {r: 1e-3 for r in rows} for n in names}

    monkeypatch.setattr(kernel_choice, "time_prefill", fake)
    monkeypatch.setattr(kernel_choice, "QUIET_SHARE", 0.0)
    shapes = [("int8", (64, 32)), ("int8-prefill", (64, 32))]
    for kernel in ("int8-fp32", "int8", "int8-fp32"):  # the third: cached, apart from the second's
        kernel_choice.choose(shapes, CPU, torch.float32, {"int8": kernel})
    assert seen == [True, False]
    entries = json.loads(private_cache.read_text())["entries"]
    assert sorted(e["facts"].get("fp32_activations", False) for e in entries.values()) == [False, True]


def test_prefill_attention_is_measured_and_an_attention_override_names_both(private_cache, monkeypatch):
    _, m = model()
    names = kernel_choice.prefill_attention_candidates(CPU, torch.float32, m.layers[0].attention.head_dim)
    if names == ["sdpa"]:
        pytest.skip("no native attention here: sdpa is the only candidate")
    calls = []

    def fake(shape, dtype, names, lengths=kernel_choice.PREFILL_ATTENTION_LENGTHS, seed=0, usage=None):
        calls.append(shape)
        return {n: {t: (1.0 if n == "native-attention" else 2.0) * 1e-3 for t in lengths} for n in names}

    monkeypatch.setattr(kernel_choice, "time_prefill_attention", fake)
    monkeypatch.setattr(kernel_choice, "QUIET_SHARE", 0.0)
    plan = kernel_choice.plan_for(m, CPU, torch.float32, {"float": "dense", "attention": "sdpa"})
    kernel_choice.apply(m, plan)  # the override names the decode and the prefill attention: nothing measured
    assert calls == [] and {(b.attention.decode_attention, b.attention.prefill_attention) for b in m.layers} == {("sdpa", "sdpa")}
    plan = kernel_choice.plan_for(m, CPU, torch.float32, {"float": "dense"})
    kernel_choice.apply(m, plan)
    heads = (m.layers[0].attention.n_local_heads, m.layers[0].attention.n_local_kv_heads, m.layers[0].attention.head_dim)
    assert calls == [heads] and plan.choices[("prefill-attention", *heads)].source == "measured"
    assert {b.attention.prefill_attention for b in m.layers} == {"native-attention"}


def test_env_override_for_a_layout_the_model_lacks_is_ignored(monkeypatch):
    monkeypatch.setenv(kernel_choice.KERNELS_ENV, "packed")
    assert kernel_choice.check_override(None, None, CPU, torch.float32, "int8") == {}
    monkeypatch.setenv(kernel_choice.KERNELS_ENV, "dense,int8-fp32")
    assert kernel_choice.check_override(None, None, CPU, torch.float32, "int8") == {"int8": "int8-fp32"}


def test_timed_at_the_batch_sizes_the_model_runs(fake_timer, monkeypatch, private_cache):
    assert kernel_choice.decode_batches(None) == kernel_choice.decode_batches(32) == kernel_choice.DECODE_BATCHES
    assert kernel_choice.decode_batches(1) == (1,) and kernel_choice.decode_batches(4) == (1, 4)
    seen = []
    timer = kernel_choice.time_kernels
    monkeypatch.setattr(kernel_choice, "time_kernels", lambda shape, dtype, names, batches, **kw: seen.append(tuple(batches))
                        or timer(shape, dtype, names, batches, **kw))
    for rows in (1, 2, 1):  # a one-row model, a two-row one, the one-row one again (cached)
        args = ModelArgs(**CONFIGS["plain"], max_seq_len=64, max_batch_size=rows)
        plan = kernel_choice.plan_for(Transformer(args, device="meta"), CPU, torch.float32)
        assert all({int(b) for b in next(iter(c.timings_ms.values()))} == set(kernel_choice.decode_batches(rows))
                   for key, c in plan.choices.items() if key[0] != "prefill-attention")  # the linear shapes', the attention's
        prefill = [c for key, c in plan.choices.items() if key[0] == "prefill-attention"]  # timed at prompt lengths
        assert len(prefill) == 1 and all({int(n) for n in per} == set(kernel_choice.PREFILL_ATTENTION_LENGTHS)
                                         for per in prefill[0].timings_ms.values())
    shapes = len(set(kernel_choice.plan_shapes(Transformer(args, device="meta"))))
    assert seen == [(1,)] * shapes + [(1, 2)] * shapes  # each decision cached under its own batch sizes
    entries = json.loads(private_cache.read_text())["entries"]
    assert sorted({tuple(e["facts"]["batches"]) for e in entries.values()}) == [
        (1,), (1, 2), kernel_choice.PREFILL_ATTENTION_LENGTHS]


def test_compile_never_packs_and_non_cpu_devices_keep_the_default(fake_timer):
    # compiled, dense weights are Inductor's to pack: the choice is dense or gemv (the fake timer favours the last)
    fake_timer["fast"] = "packed"
    plan = kernel_choice.choose(SHAPES, CPU, torch.float32, compile=True)
    gemv = "gemv" in kernel_choice.candidates(CPU, torch.float32, "float")
    assert {c.kernel for c in plan.choices.values()} == ({"gemv"} if gemv else {"dense"})
    assert fake_timer["calls"] == (2 if gemv else 0)
    int8 = kernel_choice.choose([("int8", (64, 32))], CPU, torch.float32, compile=True)
    assert int8.kernel("int8", (64, 32)) == "int8" and "compile" in int8.choices[("int8", 64, 32)].source
    plan = kernel_choice.choose(SHAPES, torch.device("meta"), torch.float32)
    assert {c.kernel for c in plan.choices.values()} == {"dense"} and fake_timer["calls"] == (2 if gemv else 0)


# ----------------------------------------------------------------------------- cache


def test_measures_once_then_uses_the_cache(fake_timer, private_cache):
    if not packing_supported(CPU, torch.float32):
        pytest.skip("one candidate only: nothing is measured")
    fake_timer["fast"] = "packed"
    plan = kernel_choice.choose(SHAPES, CPU, torch.float32, stream_bytes=1 << 20)
    assert fake_timer["calls"] == 2 and len(plan.choices) == 2  # the repeated shape is measured once
    assert {c.source for c in plan.choices.values()} == {"measured"} and {c.kernel for c in plan.choices.values()} == {"packed"}
    fake_timer["fast"] = "dense"  # a second measurement would now pick dense: the cache must win
    again = kernel_choice.choose(SHAPES, CPU, torch.float32, stream_bytes=1 << 20)
    assert fake_timer["calls"] == 2 and {c.source for c in again.choices.values()} == {"cached"}
    assert {c.kernel for c in again.choices.values()} == {"packed"}
    entries = json.loads(private_cache.read_text())["entries"]
    assert len(entries) == 2 and all(e["facts"]["cpu"] == kernel_choice.cpu_facts()["model"] for e in entries.values())
    remeasured = kernel_choice.choose(SHAPES, CPU, torch.float32, stream_bytes=1 << 20, remeasure=True)
    assert fake_timer["calls"] == 4 and {c.kernel for c in remeasured.choices.values()} == {"dense"}


def test_a_measurement_on_a_busy_cpu_is_used_not_cached(fake_timer, private_cache, monkeypatch, capsys):
    if not packing_supported(CPU, torch.float32):
        pytest.skip("one candidate only: nothing is measured")
    monkeypatch.setattr(kernel_choice, "QUIET_SHARE", 2.0)  # no measurement gets 2x its threads' time
    fake_timer["fast"] = "packed"
    plan = kernel_choice.choose(SHAPES, CPU, torch.float32, stream_bytes=1 << 20)
    assert {c.kernel for c in plan.choices.values()} == {"packed"} and plan.cpu_share is not None
    assert not private_cache.exists() and "not cached, measured again next time" in capsys.readouterr().err
    kernel_choice.choose(SHAPES, CPU, torch.float32, stream_bytes=1 << 20)
    assert fake_timer["calls"] == 4  # measured again
    monkeypatch.setattr(kernel_choice, "QUIET_SHARE", 0.0)
    kernel_choice.choose(SHAPES, CPU, torch.float32, stream_bytes=1 << 20)
    entries = json.loads(private_cache.read_text())["entries"]
    assert fake_timer["calls"] == 6 and len(entries) == 2 and all("cpu_share" in e for e in entries.values())


def test_a_busy_cpu_shows_in_the_share_of_a_real_measurement():
    # What the rule above relies on: with twice as many spinning processes as usable cores,
    # the timing threads get clearly less of their wall time than alone.
    import subprocess
    import sys
    import time

    def share():
        plan = kernel_choice.choose([("float", (512, 512))], CPU, torch.float32, stream_bytes=8 << 20, use_cache=False)
        return plan.cpu_share

    alone = share()
    cores = kernel_choice.cpu_facts()["usable_cpus"] or 1
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * cores)]
    try:
        time.sleep(0.3)
        busy = share()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert busy < 0.8 * alone, (alone, busy)


@pytest.mark.parametrize("change", ["cpu model", "cpu id", "cpu flags", "torch version", "threads"])
def test_a_choice_cached_elsewhere_is_ignored(change, fake_timer, monkeypatch):
    if not packing_supported(CPU, torch.float32):
        pytest.skip("one candidate only: nothing is measured")
    fake_timer["fast"] = "packed"
    kernel_choice.choose(SHAPES, CPU, torch.float32, stream_bytes=1 << 20)
    assert fake_timer["calls"] == 2
    facts = dict(kernel_choice.cpu_facts())
    if change == "cpu model":
        facts["model"] = "Some Other CPU"
    elif change == "cpu id":
        facts["id"] = "family 25 model 1 stepping 1"
    elif change == "cpu flags":
        facts["flags"] = [f for f in facts["flags"] if f != "avx2"] + ["amx_bf16"]
    if change.startswith("cpu"):
        monkeypatch.setattr(kernel_choice, "cpu_facts", lambda: facts)
    elif change == "torch version":
        monkeypatch.setattr(torch, "__version__", "0.0.1-other")
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else 2)
    try:
        fake_timer["fast"] = "dense"
        plan = kernel_choice.choose(SHAPES, CPU, torch.float32, stream_bytes=1 << 20)
    finally:
        if change == "threads":
            torch.set_num_threads(threads)
    assert fake_timer["calls"] == 4  # measured again, not taken from the other machine's entries
    assert {c.source for c in plan.choices.values()} == {"measured"} and {c.kernel for c in plan.choices.values()} == {"dense"}


def test_a_tampered_or_broken_cache_is_ignored(fake_timer, private_cache):
    if not packing_supported(CPU, torch.float32):
        pytest.skip("one candidate only: nothing is measured")
    fake_timer["fast"] = "packed"
    kernel_choice.choose(SHAPES[:1], CPU, torch.float32, stream_bytes=1 << 20)
    data = json.loads(private_cache.read_text())
    (entry,) = data["entries"].values()
    entry["facts"]["cpu"] = "Some Other CPU"  # a key that does not match what the entry says
    private_cache.write_text(json.dumps(data))
    kernel_choice.choose(SHAPES[:1], CPU, torch.float32, stream_bytes=1 << 20)
    assert fake_timer["calls"] == 2
    private_cache.write_text("{not json")
    kernel_choice.choose(SHAPES[:1], CPU, torch.float32, stream_bytes=1 << 20)
    assert fake_timer["calls"] == 3 and json.loads(private_cache.read_text())["version"] == kernel_choice.CACHE_VERSION


def test_pick_keeps_the_default_unless_clearly_faster():
    t = {"dense": {1: 1.00, 8: 1.00}, "packed": {1: 0.99, 8: 0.99}}
    assert kernel_choice.pick(t, "dense") == "dense"  # 1% faster: within the margin
    t["packed"] = {1: 0.90, 8: 0.95}
    assert kernel_choice.pick(t, "dense") == "packed"
    t["packed"] = {1: 0.80, 8: 1.30}  # faster at batch 1, much slower at batch 8
    assert kernel_choice.pick(t, "dense") == "dense"


def test_real_measurement_times_every_candidate():
    names = kernel_choice.candidates(CPU, torch.float32, "float")
    timings = kernel_choice.time_kernels((96, 64), torch.float32, names, stream_bytes=1 << 16)
    assert set(timings) == set(names) and all(0 < t < 1 for per in timings.values() for t in per.values())
    int8 = kernel_choice.time_kernels((96, 64), torch.float32, ["int8", "int8-fp32"], batches=(1,))
    assert all(0 < per[1] < 1 for per in int8.values())


# ----------------------------------------------------------------------------- threads


def test_threads_respect_the_user_and_fix_only_torchs_default(monkeypatch):
    threads = torch.get_num_threads()
    facts = dict(kernel_choice.cpu_facts(), physical_cores=threads + 2, logical_cpus=threads + 2, usable_cores=1)
    monkeypatch.setattr(kernel_choice, "cpu_facts", lambda: facts)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(threads + 2)  # torch's default on this (pretend) machine
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads + 2))
        assert "OMP_NUM_THREADS" in kernel_choice.settle_threads() and torch.get_num_threads() == threads + 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert "may use" in kernel_choice.settle_threads() and torch.get_num_threads() == 1  # affinity/quota: 1 core
        torch.set_num_threads(threads + 1)  # the user's choice
        assert "set_num_threads" in kernel_choice.settle_threads() and torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)


def test_cpu_facts():
    facts = kernel_choice.cpu_facts()
    assert facts["model"] and facts["physical_cores"] >= 1 and facts["usable_cores"] >= 1
    assert set(facts["flags"]) <= set(kernel_choice.FLAGS)
    assert kernel_choice.read_bandwidth(CPU, repeats=2, nbytes=1 << 24) > 1e8


# ----------------------------------------------------------------------------- agreement with dense float32


def rel_error(got, ref):
    return ((got.float() - ref).norm() / ref.norm()).item()


def every_pickable():
    """(dtype, quantized, kernel, tolerance on the relative logits error vs dense float32)."""
    cases = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.03)):
        for name in kernel_choice.candidates(CPU, dtype, "float"):
            cases.append((dtype, False, name, tol))
    for name in kernel_choice.candidates(CPU, torch.float32, "int8"):  # each with each way to prefill
        for prefill in kernel_choice.candidates(CPU, torch.float32, "int8-prefill"):
            cases.append((torch.float32, True, f"{name},{prefill}", 0.05))
    return cases


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,quantized,kernel,tol", every_pickable(), ids=lambda v: str(v).removeprefix("torch."))
def test_every_kernel_gives_dense_float32_logits(config, dtype, quantized, kernel, tol):
    args, reference = model(config)
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = reference.forward(tokens, 0)
    _, m = model(config, dtype)
    if quantized:
        quantize_model(m)
    override = kernel_choice.parse_override(kernel)
    shapes = kernel_choice.plan_shapes(m)
    prefill = [("int8-prefill", shape) for layout, shape in shapes if layout == "int8"]
    kernel_choice.apply(m, kernel_choice.choose(shapes + prefill, CPU, dtype, override))
    kernel = override["int8" if quantized else "float"]
    assert kernels_of(m) == {kernel} and is_packed(m) == (kernel == "packed")
    if quantized:  # the prompt (48 rows) runs the layers' prefill kernel
        assert {layer.prefill for _, layer in linear_layers(m)} == {override["int8-prefill"]}
    with torch.inference_mode():
        got = m.forward(tokens, 0)
    err = rel_error(got, want)
    print(f"{config} {dtype} {kernel}: relative logits error vs dense float32 {err:.2e}")
    assert err < tol
    # decoding reads the same kernels: one step after the prompt agrees too
    with torch.inference_mode():
        step = m.forward(tokens[:, :1], 24)
        want_step = reference.forward(tokens[:, :1], 24)
    step_err = rel_error(step, want_step)
    print(f"{config} {dtype} {kernel}: one decode step (2 rows) {step_err:.2e}")
    assert step_err < tol


def test_apply_switches_layouts_both_ways():
    if not packing_supported(CPU, torch.float32):
        pytest.skip("no oneDNN packing in this torch build")
    args, m = model()
    tokens = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.inference_mode():
        before = m.forward(tokens, 0)
    shapes = kernel_choice.plan_shapes(m)
    gemv = ("gemv",) if "gemv" in kernel_choice.candidates(CPU, torch.float32, "float") else ()
    for kernel in ("packed", *gemv, "dense", *gemv, "packed"):
        kernel_choice.apply(m, kernel_choice.choose(shapes, CPU, torch.float32, {"float": kernel}))
        assert kernels_of(m) == {kernel} and m.kernel_plan.kernel(*shapes[0]) == kernel
        with torch.inference_mode():
            assert torch.allclose(m.forward(tokens, 0), before, atol=1e-4)
    quantize_model(m)  # unpacks each layer as it goes
    shapes = kernel_choice.plan_shapes(m)
    int8_gemv = ("int8-gemv",) if "int8-gemv" in kernel_choice.candidates(CPU, torch.float32, "int8") else ()
    for kernel in ("int8-fp32", "int8", *int8_gemv, "int8"):
        assert kernel_choice.apply(m, kernel_choice.choose(shapes, CPU, torch.float32, {"int8": kernel})) == 7 * args.n_layers + 1
        assert kernels_of(m) == {kernel}
        with torch.inference_mode():  # within int8's tolerance of the float32 logits
            assert rel_error(m.forward(tokens, 0), before) < 0.05


# ----------------------------------------------------------------------------- model parallel

RANKS_WORKER = """
import json, os, sys
from pathlib import Path
from llama import Llama, kernel_choice, linear_kernels
from llama.parallel_layers import linear_layers
# rank 0 picks dense, rank 1 would pick packed wherever it can: both must run rank 0's kernels
# each rank its own cache, so rank 1 cannot find rank 0's decision there: it must measure and pick its own
os.environ[kernel_choice.CACHE_ENV] = str(Path(sys.argv[3], "kernels" + os.environ["RANK"] + ".json"))
kernel_choice.pick = lambda timings, default: "packed" if "packed" in timings and os.environ["RANK"] == "1" else default
llama = Llama.build(sys.argv[1], sys.argv[2], 32, 1, device="cpu")
kernels = sorted({linear_kernels.name_of(layer.kernel) for _, layer in linear_layers(llama.model)})
# a file per rank: two ranks printing at once interleave their lines (PYTHONUNBUFFERED writes each piece)
record = {"kernels": kernels, "choices": llama.model.kernel_plan.as_dict()["choices"]}
Path(sys.argv[3], "rank" + os.environ["RANK"] + ".json").write_text(json.dumps(record, sort_keys=True))
"""


def test_every_rank_runs_rank0s_choice(tmp_path, tiny_checkpoint, tiny_tokenizer_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "worker.py"
    script.write_text(RANKS_WORKER)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop(kernel_choice.KERNELS_ENV, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tiny_checkpoint), str(tiny_tokenizer_path), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=repo)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    import json

    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # the same kernels and plan on both ranks: rank 0's
    assert rank0["kernels"] == ["dense"]


# ----------------------------------------------------------------------------- the one-call step


def test_the_one_call_step_is_chosen_where_the_overhead_it_saves_outweighs_slower_products(monkeypatch, private_cache):
    """One shape picked packed (faster per call): the step goes to gemv everywhere, as one native call,
    where the estimate (products' times plus each way's overhead per step) says so; not otherwise."""
    from llama import native, native_step

    if native.unavailable(torch.float32, kernel_choice.cpu_facts()["flags"]) or native.decode_step_entry(torch.float32, False) is None:
        pytest.skip("no native decode step for float32 on this CPU")
    layers = [("float", (64, 32))] * 6 + [("float", (32, 64))] * 3
    measured = []
    monkeypatch.setattr(native_step, "step_overheads", lambda n_layers, dtype, int8, batches: measured.append(n_layers)
                        or ({b: (1.0, 0.05) for b in batches}, 1.0))  # ms per step: through the modules, one call; CPU share

    def plan_with(gemv_ms, attention="native-attention"):
        plan = kernel_choice.Plan("float32")
        plan.choices[("float", 64, 32)] = kernel_choice.Choice("packed", "measured", {"packed": {1: 0.01}, "gemv": {1: gemv_ms}})
        plan.choices[("float", 32, 64)] = kernel_choice.Choice("gemv", "measured", {"packed": {1: 0.012}, "gemv": {1: 0.01}})
        plan.choices[("attention", 4, 4, 32, 64)] = kernel_choice.Choice(attention, "measured")
        return plan

    def prefer(plan, override=None):
        return kernel_choice.prefer_one_call_step(plan, layers, 3, CPU, torch.float32, override, batches=(1,))

    # gemv 0.02 ms slower on 6 layers: 0.12 ms lost against 0.95 ms of overhead saved
    plan = prefer(plan_with(0.03))
    assert plan.step["one_call"] and plan.step["source"] == "measured" and measured == [3]
    assert {c.kernel for (layout, *_), c in plan.choices.items() if layout == "float"} == {"gemv"}
    assert plan.choices[("float", 64, 32)].source == "measured, for the one-call step"
    assert plan.step["estimate_ms"]["one_call"][1] < plan.step["estimate_ms"]["modules"][1]
    # 0.5 ms slower on 6 layers: 2.9 ms lost; the overheads come from the cache now
    plan = prefer(plan_with(0.5))
    assert not plan.step["one_call"] and plan.step["source"] == "cached" and measured == [3]
    assert plan.kernel("float", (64, 32)) == "packed"
    # not ours to change: an override for the linear layers, or torch's attention
    for plan in (prefer(plan_with(0.03), {"float": "packed"}), prefer(plan_with(0.03, "sdpa"))):
        assert not plan.step["one_call"] and plan.kernel("float", (64, 32)) == "packed" and measured == [3]
    # a measurement while other work took the cores is used, not cached
    private_cache.unlink()
    monkeypatch.setattr(native_step, "step_overheads", lambda n_layers, dtype, int8, batches: measured.append(n_layers)
                        or ({b: (1.0, 0.05) for b in batches}, 0.4))
    for _ in range(2):
        plan = prefer(plan_with(0.03))
        assert plan.step["one_call"] and "not cached" in plan.step["source"]
    assert measured == [3, 3, 3]
    # already every layer on gemv
    plan = plan_with(0.03)
    plan.choices[("float", 64, 32)].kernel = "gemv"
    assert prefer(plan).step == {"one_call": True, "why": "every layer picked gemv"}
