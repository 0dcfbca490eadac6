"""Generation speed of ``llama`` against transformers' ``LlamaForCausalLM``, side by side.

Both run in one process on the same weights, prompt, device, dtype and threads,
greedy, for exactly ``--gen-tokens`` new tokens (ours: a tokenizer stand-in whose EOS
id never occurs; theirs: ``min_new_tokens = max_new_tokens``). The measurements of the
two (and of ``ours-int8`` with ``--quantize int8``) are interleaved: every repeat
times each implementation once per batch size, so a change in machine load hits all
of them alike. Reported per implementation and batch size (median of the repeats, best
in brackets):

* TTFT: time of a one-token generation (prefill of the prompt + the first token);
* prefill tok/s: batch x prompt length / TTFT;
* decode tok/s: batch x (N - 1) / (time of an N-token generation - TTFT), all rows;
* % of limit: decode steps/s x bytes of weights read per step / read bandwidth.

Decoding a token reads every weight once (the embedding excepted: one row), so at
batch 1 the speed cannot exceed read bandwidth / bytes of weights; the read bandwidth
is measured here (best of several reductions of a 1 GiB array, 4 GiB on GPU), on the
CPU before the run (in a child process) and after it, and the higher reading counts.
The KV cache read per step is not counted (small at these lengths).

Models: random weights of a named ``--shape`` (or ``--params params.json``) written as
a Meta checkpoint and converted to a Hugging Face directory in a temporary directory
by a child process (so that the peak RSS reported is the models' own); ours loads
with ``Llama.build`` and theirs with ``from_pretrained``, both timed. A real checkpoint
is given with ``--ckpt-dir`` and ``--tokenizer-path``. ``--no-checkpoint`` builds both
models in memory on the device instead (random weights generated there, shared by
the two models; no load time), which is how 7B is measured on a GPU in seconds.

Examples::

    python benchmarks/bench.py --shape 110m --threads 2 --repeats 3 --out benchmarks/results/cpu_110m_fp32.json
    python benchmarks/bench.py --shape 110m --threads 2 --quantize int8 --dtype bfloat16
    python benchmarks/bench.py --shape 7b --device cuda --dtype bfloat16 --no-checkpoint --compile
    python benchmarks/bench.py --shape tiny --gen-tokens 8 --repeats 1 --skip-hf   # smoke test

Prints a table, then the results as one JSON line (the last line of stdout);
``--out FILE`` also writes them, with a description of the machine, to FILE.
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from rss import peak_rss, rss_now  # benchmarks/rss.py: scripts run from this folder

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from a checkout

SHAPES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=512, norm_eps=1e-5),
    "110m": dict(dim=768, n_layers=12, n_heads=12, multiple_of=256, vocab_size=32000, norm_eps=1e-5),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, vocab_size=32000, norm_eps=1e-5),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, vocab_size=32000, norm_eps=1e-5),
}
MB = 1e6
GB = 1e9


# ----------------------------------------------------------------------------- machine






def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device, threads: int) -> dict:
    import torch

    info = {
        "cpu": _cpu_model(),
        "cpu_facts": cpu_facts(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "commit": _git_commit(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / GB, 1), cuda=torch.version.cuda)
    return info


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device, repeats: int = 7) -> float:
    """Read bandwidth in bytes/s: best of ``repeats`` sums of a 1 GiB (CPU) or 4 GiB (GPU) float32 array."""
    from llama.kernel_choice import read_bandwidth as measure

    return measure(device, repeats)


def read_bandwidth_in_child(threads: int) -> Optional[float]:
    """:func:`read_bandwidth` on the CPU in a child process (its 1 GiB array counts in no peak of this
    one), before anything is loaded; None if it fails."""
    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
            "from llama.kernel_choice import read_bandwidth; print(read_bandwidth(torch.device('cpu'), 7))")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(threads)], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parents[1])
        return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def cpu_facts() -> dict:
    """What the kernel choice sees of the CPU (llama.kernel_choice), and torch's CPU capability."""
    import torch

    from llama import kernel_choice

    facts = dict(kernel_choice.cpu_facts())
    facts["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else None
    return facts


# ----------------------------------------------------------------------------- random checkpoints


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _pb_bytes(number: int, data: bytes) -> bytes:
    return _pb_field(number, 2, _varint(len(data)) + data)


def write_placeholder_tokenizer(path: Path, n_words: int) -> Path:
    """A SentencePiece model with exactly ``n_words`` pieces, for random-weight checkpoints.

    ``<unk>``, ``<s>``, ``</s>`` (ids 0, 1, 2), the 256 byte pieces, then ``t0, t1, ...``:
    it loads with the real ``Tokenizer`` (BPE, byte fallback) but carries no language.
    Written directly in SentencePiece's protobuf format (``ModelProto``), so that no
    vocabulary-sized training run is needed and any vocabulary size works.
    """
    if n_words < 3:
        raise ValueError(f"a tokenizer needs at least 3 pieces (unk, bos, eos), got {n_words}")
    unknown, control, normal, byte = 2, 3, 1, 6  # SentencePiece.Type
    pieces = [("<unk>", 0.0, unknown), ("<s>", 0.0, control), ("</s>", 0.0, control)]
    pieces += [(f"<0x{i:02X}>", 0.0, byte) for i in range(256)][: max(0, n_words - 3)]
    pieces += [(f"\u2581t{i}", -float(i), normal) for i in range(n_words - len(pieces))]
    model = b"".join(
        _pb_bytes(1, _pb_bytes(1, piece.encode()) + _pb_field(2, 5, struct.pack("<f", score)) + _pb_field(3, 0, _varint(kind)))
        for piece, score, kind in pieces
    )
    byte_fallback = len(pieces) >= 259
    trainer = _pb_field(3, 0, _varint(2)) + _pb_field(4, 0, _varint(n_words)) + _pb_field(35, 0, _varint(int(byte_fallback)))
    normalizer = _pb_bytes(1, b"identity") + _pb_field(3, 0, _varint(0))  # no dummy prefix
    path = Path(path)
    path.write_bytes(model + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer))
    return path


def write_random_checkpoint(workdir: Path, params: dict, dtype_name: str, seed: int, with_hf: bool) -> dict:
    """Meta checkpoint (+ tokenizer, + Hugging Face copy) of random weights under ``workdir``."""
    import torch

    from llama.checkpoint import InMemoryState, random_state_dict, save_checkpoint
    from llama.distributed import select_dtype
    from llama.model import ModelArgs

    dtype = select_dtype(dtype_name, torch.device("cpu"))
    args = ModelArgs(**params)
    meta, hf_dir = workdir / "meta", workdir / "hf"
    tokenizer = write_placeholder_tokenizer(workdir / "tokenizer.model", args.vocab_size)
    state = random_state_dict(args, seed=seed, dtype=dtype)
    save_checkpoint(InMemoryState(args, [state]), meta, 1, params)
    del state
    paths = {"ckpt_dir": str(meta), "tokenizer": str(tokenizer)}
    if with_hf:
        from llama.convert import convert_to_hf

        convert_to_hf(meta, hf_dir, tokenizer=tokenizer)
        paths["hf_dir"] = str(hf_dir)
    return paths


# ----------------------------------------------------------------------------- models


class NoEosTokenizer:
    """What ``Llama.generate`` needs of a tokenizer: an EOS id that never occurs, so every row runs N tokens."""

    pad_id, eos_id, bos_id = -1, -100, 1


def random_models_in_memory(args, device, dtype, seed: int, std: float = 0.02):
    """Our float Transformer with random weights generated on ``device``, and its state dict."""
    import torch

    from llama.checkpoint import expected_keys, global_shape
    from llama.model import Transformer

    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for key in expected_keys(args):
        shape = global_shape(key, args)
        if key.endswith("norm.weight"):
            state[key] = torch.ones(shape, device=device, dtype=dtype)
            continue
        scale = std / (2 * args.n_layers) ** 0.5 if key.endswith(("wo.weight", "w2.weight")) else std
        state[key] = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, scale, generator=generator)
    model = Transformer(args, device="meta", dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.allocate_buffers(device, dtype)
    model.requires_grad_(False)
    return model, state


def transformer_sharing(state: dict, args, device, dtype):
    """Another Transformer on the same tensors as ``state`` (no copy)."""
    from llama.model import Transformer

    model = Transformer(args, device="meta", dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.allocate_buffers(device, dtype)
    model.requires_grad_(False)
    return model


def hf_model_from_state(state: dict, args, device, dtype, max_seq_len: int):
    """transformers' LlamaForCausalLM holding ``state``'s tensors (q/k permuted copies, the rest shared)."""
    import torch
    import transformers

    from llama.hf import hf_config, meta_to_hf_state_dict

    config = transformers.LlamaConfig(**hf_config(args, dtype=dtype, max_position_embeddings=max(4096, max_seq_len)))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(meta_to_hf_state_dict(state, args), strict=True, assign=True)
    # Non-persistent buffers (the rotary inverse frequencies) are still on meta: rebuild that module.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"this transformers version left {left} uninitialised; use checkpoint mode")
    return model.eval().requires_grad_(False)


def hf_from_pretrained(hf_dir: str, device, dtype):
    import transformers

    kwargs = {"device_map": str(device)} if device.type == "cuda" else {}
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype, **kwargs)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- timing


class Impl:
    """One implementation under test: ``generate(prompts, n) -> token lists`` and its weight bytes."""

    def __init__(self, name: str, generate: Callable, weight_bytes: int, notes: dict):
        self.name = name
        self.generate = generate
        self.weight_bytes = weight_bytes
        self.notes = notes
        self.times: Dict[int, Dict[str, List[float]]] = {}
        self.tokens: Dict[int, List[List[int]]] = {}


def ours_generate(llama):
    def generate(prompts, n):
        tokens, _ = llama.generate(prompts, max_gen_len=n, temperature=0.0)
        return tokens  # .tolist() inside: synchronised

    return generate


def hf_generate(model, device, cache: str, compile_config=None):
    import torch
    import transformers

    configs = {}

    def config_for(n: int):
        if n not in configs:
            config = transformers.GenerationConfig(
                max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, temperature=None, top_p=None,
                top_k=None, eos_token_id=None, pad_token_id=0, bos_token_id=1,
                cache_implementation="static" if cache == "static" else None,
            )
            if compile_config is not None:
                config.compile_config = compile_config
            else:
                config.disable_compile = True
            configs[n] = config
        return configs[n]

    @torch.inference_mode()
    def generate(prompts, n):
        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config_for(n))
        return out[:, ids.shape[1]:].tolist()

    return generate


def timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _prefix(a: List[int], b: List[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summarize(impl: Impl, bsz: int, prompt_len: int, n: int, bandwidth: float) -> dict:
    t1, tn = impl.times[bsz]["t1"], impl.times[bsz]["tn"]
    ttft, total = statistics.median(t1), statistics.median(tn)
    # median of the paired (adjacent in time) differences; best: from the best of each, the least disturbed runs
    decode_s = max(statistics.median(b - a for a, b in zip(t1, tn)), 1e-9)
    best_decode_s = max(min(tn) - min(t1), 1e-9)
    decode_tok_s = bsz * (n - 1) / decode_s
    steps_s = (n - 1) / decode_s
    return {
        "impl": impl.name,
        "batch": bsz,
        "ttft_s": ttft,
        "ttft_s_best": min(t1),
        "prefill_tok_s": bsz * prompt_len / ttft,
        "decode_tok_s": decode_tok_s,
        "decode_tok_s_best": bsz * (n - 1) / best_decode_s,
        "ms_per_step": 1000 / steps_s,
        "pct_of_bandwidth_limit": 100 * steps_s * impl.weight_bytes / bandwidth if bandwidth else None,
        "generate_s": total,
        "repeats": len(tn),
        "t1_s": t1,
        "tn_s": tn,
    }


# ----------------------------------------------------------------------------- main


def parser_for(doc: str) -> argparse.ArgumentParser:
    """A parser whose help is a script's docstring, with ``--shape`` in a group of ways to give the weights."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(doc.splitlines()[1:]))
    p.weights = p.add_mutually_exclusive_group()
    p.weights.add_argument("--shape", choices=sorted(SHAPES), default="110m", help="random weights of this shape (default %(default)s)")
    return p


def parse_args(argv=None):
    p = parser_for(__doc__)
    what = p.weights
    what.add_argument("--params", type=Path, help="random weights of the shape in this params.json (vocab_size must be set)")
    what.add_argument("--ckpt-dir", type=Path, help="a real checkpoint directory (Meta or Hugging Face format)")
    p.add_argument("--tokenizer-path", type=Path, help="tokenizer.model of --ckpt-dir")
    p.add_argument("--hf-dir", type=Path, help="Hugging Face copy of --ckpt-dir for transformers (default: "
                   "--ckpt-dir itself if it is one, else a converted copy in a temporary directory)")
    p.add_argument("--no-checkpoint", action="store_true", help="random weights made in memory on the device, shared by "
                   "both models (no checkpoint written or loaded; load time not measured)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="ours: Llama.compile() (CUDA graphs on CUDA, frozen "
                   "weights and autotuned C++ GEMMs on CPU); transformers: static cache + its generate auto-compile")
    p.add_argument("--quantize", choices=["int8"], help="also run ours with weight-only quantization (ours-int8)")
    p.add_argument("--kernels", default=None, help="ours: Llama.build(kernels=...): dense, gemv, packed, int8, int8-fp32, "
                   "int8-gemv, sdpa, native-attention (comma-separated, one per kind) or auto (default: $LLAMA_KERNELS, else auto: measured on this machine)")
    p.add_argument("--dense-too", action="store_true", help="also run ours with kernels='dense' (ours-dense)")
    p.add_argument("--packed-too", action="store_true", help="also run ours with kernels='packed' (ours-packed)")
    p.add_argument("--eager-too", action="store_true", help="with --compile: also run ours eager, with the kernels "
                   "Llama.build picks (ours-eager), to compare compiled and eager in one run")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (default %(default)s)")
    p.add_argument("--gen-tokens", type=int, default=64, help="new tokens per row, N (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; median and best reported (default %(default)s)")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    p.add_argument("--hf-eager-too", action="store_true", help="with --compile: also run transformers' default "
                   "(eager, dynamic cache) generate as hf-eager")
    p.add_argument("--hf-cache", choices=["dynamic", "static"], default=None,
                   help="transformers' KV cache (default: dynamic, its default; static with --compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="where random checkpoints are written (default: a temporary directory)")
    p.add_argument("--out", type=Path, help="also write the results (with a machine description) to this JSON file")
    p.add_argument("--write-checkpoint", nargs=4, metavar=("DIR", "PARAMS_JSON", "DTYPE", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ckpt_dir and not args.tokenizer_path:
        p.error("--ckpt-dir needs --tokenizer-path")
    if args.no_checkpoint and args.ckpt_dir:
        p.error("--no-checkpoint makes random weights; it cannot be combined with --ckpt-dir")
    if args.eager_too and not args.compile:
        p.error("--eager-too adds ours eager to a --compile run (without --compile, ours is eager)")
    try:
        args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be positive")
    if args.gen_tokens < 2 or args.prompt_len < 1 or args.repeats < 1:
        p.error("--gen-tokens must be >= 2, --prompt-len and --repeats >= 1")
    if (args.dense_too or args.packed_too) and args.compile:
        p.error("--dense-too and --packed-too are for eager runs: under --compile ours has dense weights")
    if args.hf_cache is None:
        args.hf_cache = "static" if args.compile else "dynamic"
    return args


def shape_params(args) -> dict:
    if args.params:
        params = json.loads(args.params.read_text())
        if params.get("vocab_size", -1) < 1:
            raise SystemExit(f"error: {args.params} must set vocab_size for random weights")
        return params
    return dict(SHAPES[args.shape])


def write_checkpoint_in_child(workdir: Path, params: dict, dtype: str, seed: int, with_hf: bool) -> dict:
    """Random checkpoint written by a child process, so its memory never counts in this one's peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--write-checkpoint", str(workdir), json.dumps(params), dtype, str(seed)]
    if not with_hf:
        cmd.append("--skip-hf")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"writing the random checkpoint failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_checkpoint:
        workdir, params, dtype, seed = args.write_checkpoint
        print(json.dumps(write_random_checkpoint(Path(workdir), json.loads(params), dtype, int(seed), not args.skip_hf)))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from llama import Llama
    from llama import distributed, kernel_choice, native_step
    from llama.model import ModelArgs
    from llama.packed_linear import is_packed
    from llama.quantize import quantize_model, weight_bytes

    device = distributed.select_device(args.device)
    dtype = distributed.select_dtype(args.dtype, device)
    override, _ = kernel_choice.resolve_override(args.kernels, None)
    dtype_name = str(dtype).removeprefix("torch.")
    max_bsz = max(args.batch_sizes)
    max_seq_len = args.prompt_len + args.gen_tokens
    run_hf = not args.skip_hf
    if run_hf:
        try:
            import transformers
            from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: F401 - imported before timing

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            print("transformers is not installed: running ours only (--skip-hf)", file=sys.stderr)
            run_hf = False

    info = machine(device, threads)
    # This VM's bandwidth has moved by 1.5x within minutes: read it before and after, and take the higher
    bandwidth_start = read_bandwidth_in_child(threads) if device.type == "cpu" else None
    import sentencepiece  # noqa: F401 - everything loading imports, before the baseline
    import llama.checkpoint  # noqa: F401
    import llama.quantize  # noqa: F401

    baseline_rss = rss_now()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    impls: List[Impl] = []
    load: Dict[str, dict] = {}
    rss: Dict[str, float] = {}
    shape_name = "ckpt" if args.ckpt_dir else ("params" if args.params else args.shape)

    variants: Dict[str, object] = {}  # ours-dense, ours-packed: Llama of the same checkpoint, other kernels
    with contextlib.ExitStack() as stack:
        # ---------------------------------------------------------------- build
        if args.no_checkpoint:
            params = shape_params(args)
            margs = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_bsz)
            start = time.perf_counter()
            float_model, state = random_models_in_memory(margs, device, dtype, args.seed)
            load["ours"] = {"how": "in memory: random weights generated on the device", "s": None}
            # what Llama.build does: the kernels measured fastest here (CPU); compiled, dense or ours (no packing)
            kernel_choice.apply(float_model, kernel_choice.plan_for(float_model, device, dtype, override, compile=args.compile))
            llama = Llama(float_model, NoEosTokenizer())
            llama_int8 = None
            if args.dense_too or args.packed_too or args.eager_too:
                raise SystemExit("--dense-too, --packed-too and --eager-too need a checkpoint (drop --no-checkpoint)")
            if args.quantize:
                start = time.perf_counter()
                int8_model = quantize_model(transformer_sharing(state, margs, device, dtype), args.quantize)
                if not args.compile:
                    kernel_choice.apply(int8_model, kernel_choice.plan_for(int8_model, device, dtype, override))
                llama_int8 = Llama(int8_model, NoEosTokenizer())
                _sync(device)
                load["ours-int8"] = {"how": "in memory: quantize_model of the same weights", "s": time.perf_counter() - start}
            hf_model = None
            if run_hf:
                hf_model = hf_model_from_state(state, margs, device, dtype, max_seq_len)
                load["hf"] = {"how": "in memory: LlamaForCausalLM on meta, load_state_dict(assign=True) of the same tensors", "s": None}
            del state
        else:
            if args.ckpt_dir:
                ckpt_dir, tokenizer = str(args.ckpt_dir), str(args.tokenizer_path)
                from llama.checkpoint import checkpoint_format

                hf_dir = str(args.hf_dir) if args.hf_dir else (ckpt_dir if checkpoint_format(args.ckpt_dir) == "hf" else None)
                if run_hf and hf_dir is None:
                    from llama.convert import convert_to_hf

                    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_hf_", dir=args.workdir)))
                    print(f"converting {ckpt_dir} for transformers into {tmp} ...", flush=True)
                    convert_to_hf(Path(ckpt_dir), tmp / "hf", tokenizer=Path(tokenizer))
                    hf_dir = str(tmp / "hf")
                how = f"Llama.build of {ckpt_dir}"
            else:
                params = shape_params(args)
                if args.workdir:
                    args.workdir.mkdir(parents=True, exist_ok=True)
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_", dir=args.workdir)))
                start = time.perf_counter()
                paths = write_checkpoint_in_child(tmp, params, dtype_name, args.seed, run_hf)
                print(f"wrote random {shape_name} checkpoint ({dtype_name}) in {time.perf_counter() - start:.1f} s", flush=True)
                ckpt_dir, tokenizer, hf_dir = paths["ckpt_dir"], paths["tokenizer"], paths.get("hf_dir")
                how = f"Llama.build of a random {dtype_name} .pth checkpoint (placeholder tokenizer)"

            def build(quantize=None, **kwargs):
                kwargs.update({"quantize": quantize} if quantize else {})
                start = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):
                    built = Llama.build(ckpt_dir, tokenizer, max_seq_len, max_bsz, device=device, dtype=dtype, **kwargs)
                _sync(device)
                return built, time.perf_counter() - start

            # --compile: the kernels Llama.build(compile=True) picks (dense, whose frozen GEMMs the compiled
            # CPU step packs itself, or ours), planned here because the warm-up sizes are this script's
            llama, seconds = build(**({"pack_weights": False} if args.compile else {"kernels": args.kernels}))
            if args.compile:
                kernel_choice.apply(llama.model, kernel_choice.plan_for(llama.model, device, dtype, override, compile=True))
            load["ours"] = {"how": how, "s": seconds}
            llama.tokenizer = NoEosTokenizer()  # never stops early
            llama_int8 = None
            if args.quantize:
                int8_kernels = {} if args.compile or not override.get("int8") else {"kernels": override["int8"]}
                llama_int8, seconds = build(args.quantize, **int8_kernels)
                llama_int8.tokenizer = NoEosTokenizer()
                load["ours-int8"] = {"how": how + f", quantize={args.quantize!r}", "s": seconds}
            for wanted, kernel in (("dense_too", "dense"), ("packed_too", "packed")):
                if getattr(args, wanted):
                    variants[f"ours-{kernel}"], seconds = build(kernels=kernel)
                    variants[f"ours-{kernel}"].tokenizer = NoEosTokenizer()
                    load[f"ours-{kernel}"] = {"how": how + f", kernels={kernel!r}", "s": seconds}
            if args.eager_too:  # not compiled: the eager kernels Llama.build picks
                variants["ours-eager"], seconds = build(kernels=args.kernels)
                variants["ours-eager"].tokenizer = NoEosTokenizer()
                load["ours-eager"] = {"how": how + ", eager", "s": seconds}
            hf_model = None
            if run_hf:
                start = time.perf_counter()
                hf_model = hf_from_pretrained(hf_dir, device, dtype)
                _sync(device)
                load["hf"] = {"how": f"LlamaForCausalLM.from_pretrained of safetensors ({hf_dir})", "s": time.perf_counter() - start}
        margs = llama.model.params

        # ---------------------------------------------------------------- compile
        compile_s: Dict[str, float] = {}
        hf_compile_config = None
        if args.compile:
            for name, built in (("ours", llama), ("ours-int8", llama_int8)):
                if built is None:
                    continue
                if not hasattr(built, "compile"):
                    print("this version of Llama has no compile(): running eager", file=sys.stderr)
                    break
                start = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):
                    try:
                        built.compile(warmup_batch_sizes=args.batch_sizes)
                    except TypeError:  # a compile() without warm-up batch sizes: the warm-up below compiles them
                        built.compile()
                compile_s[name] = time.perf_counter() - start
            if run_hf:
                import transformers

                if device.type == "cuda":
                    hf_compile_config = transformers.CompileConfig()  # mode="reduce-overhead": CUDA graphs, like ours
                else:
                    # Inductor's defaults: freezing needs Inductor's global config while Dynamo traces
                    # (options= are too late), and with it set, its compiled static cache read out of bounds.
                    hf_compile_config = transformers.CompileConfig(mode=None, dynamic=False)
                    hf_compile_config._compile_all_devices = True  # its generate compiles on CUDA only otherwise

        # ---------------------------------------------------------------- implementations
        if device.type == "cuda":
            _sync(device)
        def ours_notes(built, name: str) -> dict:
            plan = getattr(built.model, "kernel_plan", None)
            # compile() makes a graph, or keeps a step that is one native call (llama/native_step.py); eager:
            # that call, or the model's modules and why
            compiled = getattr(getattr(built, "runner", None), "compiled", name in compile_s)
            step = "a compiled graph" if compiled else native_step.describe(native_step.why_not(built.model))
            return {"kv_cache": "static (preallocated)", "compiled": compiled, "compile_called": name in compile_s,
                    "packed_weights": is_packed(built.model), "kernels": plan.as_dict() if plan is not None else None,
                    "decode_step": step}

        impls.append(Impl("ours", ours_generate(llama), weight_bytes(llama.model), ours_notes(llama, "ours")))
        for name, built in variants.items():
            impls.append(Impl(name, ours_generate(built), weight_bytes(built.model), ours_notes(built, name)))
        if llama_int8 is not None:
            impls.append(Impl("ours-int8", ours_generate(llama_int8), weight_bytes(llama_int8.model),
                              {**ours_notes(llama_int8, "ours-int8"), "quantize": args.quantize}))
        if hf_model is not None:
            hf_bytes = sum(p.numel() * p.element_size() for n, p in hf_model.named_parameters() if "embed_tokens" not in n)
            attention = getattr(hf_model.config, "_attn_implementation", None)
            impls.append(Impl("hf", hf_generate(hf_model, device, args.hf_cache, hf_compile_config), hf_bytes,
                              {"kv_cache": args.hf_cache, "compiled": hf_compile_config is not None, "attention": attention}))
            if args.hf_eager_too and hf_compile_config is not None:  # the same model, its default generate
                impls.append(Impl("hf-eager", hf_generate(hf_model, device, "dynamic"), hf_bytes,
                                  {"kv_cache": "dynamic", "compiled": False, "attention": attention}))

        gen = torch.Generator().manual_seed(args.seed + 1)
        prompts = {b: torch.randint(3, margs.vocab_size, (b, args.prompt_len), generator=gen).tolist() for b in args.batch_sizes}

        # Warm-up: the exact calls that are timed (compiles each batch size, fills caches), RSS after each.
        for impl in impls:
            start = time.perf_counter()
            for bsz in args.batch_sizes:
                seconds, _ = timed(lambda: impl.generate(prompts[bsz], 1), device)
                impl.notes.setdefault("first_ttft_s", seconds)  # cold: pages of a mapped checkpoint read in, etc.
                impl.tokens[bsz] = impl.generate(prompts[bsz], args.gen_tokens)
                impl.times[bsz] = {"t1": [], "tn": []}
            impl.notes["warmup_s"] = time.perf_counter() - start
            rss[impl.name] = rss_now()

        # ---------------------------------------------------------------- timed, interleaved
        n_params = sum(p.numel() for p in llama.model.parameters())

        def snapshot(bandwidth: Optional[float], stage: str, memory: Optional[dict] = None) -> dict:
            """The results so far (rows of the impls and batch sizes timed at least once)."""
            rows = []
            for bsz in args.batch_sizes:
                base = None
                for impl in impls:
                    if not impl.times[bsz]["tn"]:
                        continue
                    row = summarize(impl, bsz, args.prompt_len, args.gen_tokens, bandwidth)
                    if impl.name == "ours":
                        base = row["decode_tok_s"]
                    row["speedup_vs_ours"] = row["decode_tok_s"] / base if base else None
                    if impl.name != "ours":
                        ref = impls[0].tokens[bsz]
                        prefixes = [_prefix(a, b) for a, b in zip(ref, impl.tokens[bsz])]
                        row["tokens_equal_to_ours"] = sum(p == args.gen_tokens for p in prefixes) / len(prefixes)
                        row["mean_common_prefix"] = sum(prefixes) / len(prefixes)
                    rows.append(row)
            return {
                "benchmark": "generation",
                "stage": stage,
                "shape": shape_name,
                "params": {k: getattr(margs, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")},
                "n_params": n_params,
                "device": str(device),
                "dtype": dtype_name,
                "threads": threads,
                "compile": args.compile,
                "quantize": args.quantize,
                "prompt_len": args.prompt_len,
                "gen_tokens": args.gen_tokens,
                "batch_sizes": args.batch_sizes,
                "repeats": args.repeats,
                "weights": "no-checkpoint (in memory)" if args.no_checkpoint else ("checkpoint" if args.ckpt_dir else "random checkpoint"),
                "read_bandwidth_gb_s": bandwidth / GB if bandwidth else None,
                "weight_bytes_per_step": {impl.name: impl.weight_bytes for impl in impls},
                "bandwidth_limit_tok_s": {impl.name: bandwidth / impl.weight_bytes if bandwidth else None for impl in impls},
                "impl_notes": {impl.name: impl.notes for impl in impls},
                "load": load,
                "compile_s": compile_s,
                "memory": memory,
                "results": rows,
                "machine": info,
            }

        def write(result: dict) -> None:
            """Into --out now: a run stopped later (a time limit) keeps what it measured."""
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=2) + "\n")

        write(snapshot(None, "warmed up"))
        for repeat in range(args.repeats):
            for bsz in args.batch_sizes:
                for impl in impls:
                    t1, _ = timed(lambda: impl.generate(prompts[bsz], 1), device)
                    tn, _ = timed(lambda: impl.generate(prompts[bsz], args.gen_tokens), device)
                    impl.times[bsz]["t1"].append(t1)
                    impl.times[bsz]["tn"].append(tn)
                    write(snapshot(None, f"repeat {repeat + 1} of {args.repeats}: timing (no bandwidth yet)"))

        # ---------------------------------------------------------------- memory, then bandwidth
        memory = {"baseline_rss_mb": baseline_rss / MB}
        previous = baseline_rss
        for impl in impls:
            memory[f"{impl.name}_rss_added_mb"] = (rss[impl.name] - previous) / MB
            previous = rss[impl.name]
        del llama, llama_int8, variants, hf_model
        for impl in impls:
            impl.generate = None
        gc.collect()

    # The models are gone: the array of the bandwidth measurement counts in neither peak.
    memory["peak_rss_mb"] = peak_rss() / MB
    if device.type == "cuda":
        memory["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
        torch.cuda.empty_cache()
    bandwidth_end = read_bandwidth(device)
    bandwidth = max(bandwidth_end, bandwidth_start or 0.0)
    info["read_bandwidth_gb_s_start_end"] = [round(b / GB, 1) if b else None for b in (bandwidth_start, bandwidth_end)]

    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    result = snapshot(bandwidth, "complete", memory)
    print_table(result)
    if args.out:
        write(result)
        print(f"wrote {args.out}")
    print(json.dumps(result))
    return 0


def print_table(r: dict) -> None:
    m = r["machine"]
    where = m.get("gpu") or m["cpu"]
    print()
    print(f"{r['shape']} ({r['n_params'] / 1e6:.0f}M params)  {r['dtype']}  {r['device']} ({where})  threads={r['threads']}  "
          f"compile={r['compile']}  prompt={r['prompt_len']}  new tokens={r['gen_tokens']}  repeats={r['repeats']}")
    both = m.get("read_bandwidth_gb_s_start_end")
    print(f"read bandwidth {r['read_bandwidth_gb_s']:.1f} GB/s" + (f" (before the run / after: {both[0]} / {both[1]})" if both and both[0] else "")
          + f"; load average {m['load_average']} -> {m['load_average_end']}")
    for name, nbytes in r["weight_bytes_per_step"].items():
        notes = r["impl_notes"][name]
        print(f"  {name:<10} {nbytes / MB:9.1f} MB read per step -> batch-1 limit {r['bandwidth_limit_tok_s'][name]:8.1f} tok/s; "
              f"KV cache {notes['kv_cache']}, compiled {notes['compiled']}")
    facts = m.get("cpu_facts")
    if facts and r["device"] == "cpu":
        print(f"CPU {facts['model']} ({facts['id']}): {' '.join(facts['flags'])}; {facts['usable_cores']} physical cores "
              f"usable; torch CPU capability {facts.get('torch_cpu_capability')}")
    for name, notes in r["impl_notes"].items():
        plan = notes.get("kernels")
        if not plan:
            continue
        share = plan.get("cpu_share")
        busy = "" if share is None else f", {share:.0%} of the threads' time while timing"
        print(f"  {name:<10} kernels ({plan['dtype']}, {plan['threads']}, {plan['measure_s']:.1f} s to decide{busy}); "
              f"decode step: {notes.get('decode_step', '?')}:")
        for shape, c in plan["choices"].items():
            behind = ""
            if c["timings_ms"]:  # the timings behind the pick: ms per call at each decode batch size
                batches = "/".join(map(str, next(iter(c["timings_ms"].values()))))
                behind = f"; ms at batch {batches}: " + ", ".join(
                    f"{k} " + "/".join(f"{t:.3f}" for t in per.values()) for k, per in c["timings_ms"].items())
            print(f"    {shape:<16} {c['kernel']:<9} ({c['source']}{behind})")
    header = f"{'impl':<12} {'batch':>5} {'TTFT ms':>9} {'prefill tok/s':>14} {'decode tok/s':>13} {'(best)':>9} " \
             f"{'ms/step':>8} {'% of limit':>10} {'vs ours':>8} {'same tokens':>11}"
    print(header)
    print("-" * len(header))
    for row in r["results"]:
        same = "" if "tokens_equal_to_ours" not in row else f"{100 * row['tokens_equal_to_ours']:.0f}% rows"
        print(f"{row['impl']:<12} {row['batch']:>5} {1000 * row['ttft_s']:>9.1f} {row['prefill_tok_s']:>14.1f} "
              f"{row['decode_tok_s']:>13.1f} {row['decode_tok_s_best']:>9.1f} {row['ms_per_step']:>8.2f} "
              f"{row['pct_of_bandwidth_limit']:>9.0f}% {row['speedup_vs_ours']:>7.2f}x {same:>11}")
    loads = ", ".join(f"{k} {v['s']:.2f} s" for k, v in r["load"].items() if v["s"] is not None)
    if loads:
        print(f"load: {loads}")
    for k, v in r["load"].items():
        print(f"  {k}: {v['how']}")
    cold = ", ".join(f"{k} {1000 * v['first_ttft_s']:.0f} ms" for k, v in r["impl_notes"].items() if "first_ttft_s" in v)
    if cold:
        print(f"first TTFT after load (cold, batch {r['batch_sizes'][0]}): {cold}")
    if r["compile_s"]:
        print("compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items()))
    mem = r["memory"]
    print("memory: " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
    print()


if __name__ == "__main__":
    sys.exit(main())
