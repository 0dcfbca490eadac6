"""Our own matrix-vector kernels (llama/native.py, llama/csrc/gemv.cpp): every instruction set
this CPU has, against F.linear in float32, on shapes with ragged edges; the fallbacks; the build cache."""

import pytest
import torch
import torch.nn.functional as F

from llama import kernel_choice, native

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
    assert entries[dtype][0].__name__ == native.ISAS[isa][2][dtype][0]  # this set's kernel is the one called
    step = entries[dtype][1]
    gen = torch.Generator().manual_seed(0)
    # rows 1 (the M == 1 path), 2-3 (one row tile plus a remainder), up to MAX_ROWS; outputs that
    # are not a multiple of the row tile (the last rows one at a time); inner sizes of several steps
    for rows, out_features, in_features in [(1, 8, step), (1, 13, 3 * step), (2, 37, 2 * step), (3, 100, 4 * step),
                                             (5, 8, step), (8, 96, 24 * step), (16, 17, 2 * step), (2, 1, step)]:
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
    step = native._library(FLAGS)[1][dtype][1]
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
