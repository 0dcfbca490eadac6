"""llama.cpp beside ours: batch-1 decode tok/s and prefill tok/s on the same weights, prompt and threads, in one run.

A benchmark-only step, kept out of CI: building llama.cpp takes about 25 minutes on 2 cores.
Everything slow is done once and cached under ``--cache-dir`` (default ``~/.cache/llama/llamacpp``):

1. the source archive: ``pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`` (PyPI);
2. a wheel built from it for this machine (``pip wheel --no-deps``: CMake and a C++ compiler,
   plus scikit-build-core from PyPI unless already installed; ``--cmake-args`` goes to CMake,
   e.g. ``-DGGML_NATIVE=OFF`` for a build that does not use every instruction of this CPU);
   wheels are kept per version, CMake arguments and CPU;
3. that wheel installed into a private folder (``pip install --no-deps --target``), with the
   few pure-Python packages it imports where this Python lacks them;
4. the weights as GGUF, converted with the ``convert_hf_to_gguf.py`` that ships in the same
   archive (``vendor/llama.cpp``, with its ``conversion/`` and ``gguf-py/``: no gguf package
   needed, works offline), from a Hugging Face copy of the weights (``llama.convert --to hf``).

Then, for each GGUF type, the pair measured (interleaved repeats, median reported):

    llama.cpp F32   vs ours float32          (Llama.build's default kernels)
    llama.cpp F16   vs ours bfloat16
    llama.cpp Q8_0  vs ours int8             (quantize="int8", float32 model)

llama.cpp runs in a child process per type (``Llama(n_threads=T, n_threads_batch=T)``,
``create_completion`` on the prompt's token ids, greedy, EOS forbidden, the context reset before
each call so no prefix is reused); ours in this process (``torch.set_num_threads(T)``). Both are
timed the way ``bench.py`` times: TTFT = a 1-token generation (prefill + first token),
prefill tok/s = prompt / TTFT, decode tok/s = (N - 1) / (N-token generation - TTFT).
A child that crashes (e.g. "Illegal instruction" from a native build on a VM whose CPU
flags lie) is reported with its signal and last output lines, and the other types go on.

    python benchmarks/llamacpp.py --shape 110m --threads 2 --out benchmarks/results/cpu_110m_llamacpp_<cpu>.json
    python benchmarks/llamacpp.py --ckpt-dir weights/llama-2-7b --tokenizer-path weights/tokenizer.model --types q8_0
    python benchmarks/llamacpp.py --prepare-only     # download, build and install once, measure nothing
"""

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench import (  # noqa: E402
    SHAPES, NoEosTokenizer, machine, ours_generate, parser_for, read_bandwidth, write_checkpoint_in_child,
)

VERSION = "0.3.36"  # the version the issue's figures were taken with
TYPES = {"f32": ("F32", "float32", None), "f16": ("F16", "bfloat16", None), "q8_0": ("Q8_0", "float32", "int8")}
RUNTIME_DEPS = ("numpy", "typing_extensions", "diskcache", "jinja2")  # what llama_cpp imports
GB = 1e9


# ----------------------------------------------------------------------------- build once


def _run(cmd: List[str], what: str, env: Optional[dict] = None, timeout: Optional[float] = None) -> None:
    print(f"[llamacpp] {what}: {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd, env=env, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"[llamacpp] {what} failed (exit {result.returncode}); see the output above")


def ensure_sdist(cache: Path, version: str) -> Path:
    found = sorted(cache.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache),
          f"llama-cpp-python=={version}"], "downloading the source archive (needs PyPI)")
    found = sorted(cache.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"[llamacpp] pip saved no llama_cpp_python-{version}.tar.gz in {cache}")
    return found[0]


def build_key(version: str, cmake_args: str) -> str:
    from llama.kernel_choice import cpu_facts

    facts = cpu_facts()
    text = json.dumps([version, cmake_args, facts["model"], facts["id"], facts["flags"], sys.version_info[:2]])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_wheel(cache: Path, sdist: Path, version: str, cmake_args: str, build: bool) -> Path:
    """The wheel for this version, CMake arguments, CPU and Python, built once (slow)."""
    folder = cache / f"wheel-{build_key(version, cmake_args)}"
    found = sorted(folder.glob("llama_cpp_python-*.whl"))
    if found:
        return found[0]
    if not build:
        raise SystemExit(f"[llamacpp] no wheel in {folder} and --no-build: run once without --no-build "
                         "(about 25 minutes on 2 cores)")
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    start = time.time()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(folder), str(sdist)],
         f"building llama-cpp-python {version} (CMAKE_ARGS={cmake_args!r}; tens of minutes)", env=env)
    (folder / "build.json").write_text(json.dumps({"version": version, "cmake_args": cmake_args,
                                                   "seconds": round(time.time() - start), "when": time.ctime()}) + "\n")
    return sorted(folder.glob("llama_cpp_python-*.whl"))[0]


def ensure_installed(wheel: Path) -> Path:
    """A folder to put on PYTHONPATH that imports this wheel's llama_cpp (and what it needs)."""
    site = wheel.parent / "site"
    if not (site / "llama_cpp").is_dir():
        _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], "installing the wheel")
    missing = [m for m in RUNTIME_DEPS if subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True).returncode]
    extra = [m for m in missing if not any(site.glob(f"{m}*"))]
    if extra:
        _run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), *[m.replace("_", "-") for m in extra]],
             "installing llama_cpp's pure-Python dependencies (PyPI)")
    return site


def ensure_converter(cache: Path, sdist: Path) -> Path:
    """vendor/llama.cpp's convert_hf_to_gguf.py with the conversion/ and gguf-py/ it imports, from the sdist."""
    root = cache / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file() and (root / "conversion").is_dir() and (root / "gguf-py").is_dir():
        return script
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    wanted = (prefix + "convert_hf_to_gguf.py", prefix + "conversion/", prefix + "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        if not any(m.name == wanted[0] for m in members):
            raise SystemExit(f"[llamacpp] {sdist} has no {wanted[0]}")
        tar.extractall(cache, members=members)
    return script


def convert(script: Path, hf_dir: Path, out: Path, outtype: str) -> Path:
    if not out.exists():
        start = time.time()
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the archive's own gguf-py
        result = subprocess.run([sys.executable, str(script), str(hf_dir), "--outtype", outtype, "--outfile", str(out)],
                                capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit(f"[llamacpp] converting to {outtype} failed:\n{result.stderr[-3000:]}")
        print(f"[llamacpp] converted to {out.name} in {time.time() - start:.1f} s", flush=True)
    return out


# ----------------------------------------------------------------------------- the llama.cpp child


def child(gguf: str, threads: int, n_ctx: int, eos: int) -> None:
    """Load one GGUF, then answer each JSON line {"prompt": [...], "n": N} with one timed completion."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          seed=0, verbose=False)

    def no_eos(_input_ids, scores):
        scores[eos] = -np.inf
        return scores

    processors = llama_cpp.LogitsProcessorList([no_eos])
    print(json.dumps({"ready": True, "version": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        llm.reset()  # no prefix of the previous call is reused: the prompt is prefilled every time
        start = time.perf_counter()
        out = llm.create_completion(request["prompt"], max_tokens=request["n"], temperature=0.0, top_k=1,
                                    logits_processor=processors)
        seconds = time.perf_counter() - start
        print(json.dumps({"s": seconds, "tokens": out["usage"]["completion_tokens"]}), flush=True)


class Child:
    """A llama.cpp child process; ``None`` results once it has crashed (``self.crash`` says how)."""

    def __init__(self, site: Path, gguf: Path, threads: int, n_ctx: int, eos: int):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(HERE), str(REPO)])}
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(gguf), str(threads), str(n_ctx), str(eos)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)
        self.crash: Optional[str] = None
        self.version = self._read().get("version") if self.crash is None else None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if line:
            return json.loads(line)
        code = self.proc.wait()
        self.err.seek(0)
        tail = " | ".join(self.err.read().strip().splitlines()[-5:])
        why = f"signal {-code} ({signal.Signals(-code).name}" + (", Illegal instruction" if -code == signal.SIGILL else "") + ")" \
            if code < 0 else f"exit {code}"
        self.crash = f"llama.cpp child died: {why}; last output: {tail or '(none)'}"
        return {}

    def completion(self, prompt: List[int], n: int) -> Optional[dict]:
        if self.crash:
            return None
        try:
            self.proc.stdin.write(json.dumps({"prompt": prompt, "n": n}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        result = self._read()
        return result or None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = parser_for(__doc__)
    p.weights.add_argument("--ckpt-dir", type=Path, help="real weights: a Hugging Face directory, or a Meta one (converted first)")
    p.add_argument("--tokenizer-path", type=Path, help="tokenizer.model of --ckpt-dir")
    p.add_argument("--types", default="f32,f16,q8_0", help="GGUF types, comma-separated (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: torch's)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--version", default=VERSION, help="llama-cpp-python version (default %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "llama" / "llamacpp")
    p.add_argument("--cmake-args", default=os.environ.get("CMAKE_ARGS", ""), help="CMAKE_ARGS of the build "
                   "(default $CMAKE_ARGS or none: llama.cpp's native build)")
    p.add_argument("--no-build", action="store_true", help="fail rather than build a missing wheel")
    p.add_argument("--site", type=Path, help="a folder from which llama_cpp imports already (skips the download's "
                   "build and install; the converter still comes from the source archive)")
    p.add_argument("--prepare-only", action="store_true", help="download, build, install and extract; measure nothing")
    p.add_argument("--skip-ours", action="store_true", help="llama.cpp only")
    p.add_argument("--workdir", type=Path, help="where weights and GGUF files go (default: a temporary directory)")
    p.add_argument("--out", type=Path, help="write the results (rewritten after every measurement) to this JSON file")
    p.add_argument("--child", nargs=4, metavar=("GGUF", "THREADS", "N_CTX", "EOS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in args.types if t not in TYPES]
    if unknown:
        p.error(f"--types: unknown {unknown}; use some of {sorted(TYPES)}")
    if args.ckpt_dir and not args.tokenizer_path:
        p.error("--ckpt-dir needs --tokenizer-path")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        gguf, threads, n_ctx, eos = args.child
        child(gguf, int(threads), int(n_ctx), int(eos))
        return 0
    sdist = ensure_sdist(args.cache_dir, args.version)
    script = ensure_converter(args.cache_dir, sdist)
    site = args.site or ensure_installed(ensure_wheel(args.cache_dir, sdist, args.version, args.cmake_args, not args.no_build))
    if args.prepare_only:
        print(f"[llamacpp] ready: {site} (llama_cpp), {script}")
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from llama import Llama, native_step
    from llama.checkpoint import checkpoint_format
    from llama.convert import convert_to_hf
    from llama.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="llamacpp_", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if args.ckpt_dir:
            ckpt_dir, tokenizer = args.ckpt_dir, args.tokenizer_path
            hf_dir = ckpt_dir if checkpoint_format(ckpt_dir) == "hf" else None
            if hf_dir is None:
                convert_to_hf(ckpt_dir, tmp / "hf", tokenizer=tokenizer)
                hf_dir = tmp / "hf"
            shape = str(ckpt_dir)
        else:
            paths = write_checkpoint_in_child(tmp, dict(SHAPES[args.shape]), "float32", 0, True)
            ckpt_dir, tokenizer, hf_dir = Path(paths["ckpt_dir"]), Path(paths["tokenizer"]), Path(paths["hf_dir"])
            shape = args.shape
        ggufs = {t: convert(script, hf_dir, tmp / f"model-{t}.gguf", t) for t in args.types}

        info = machine(torch.device("cpu"), threads)
        n_ctx = args.prompt_len + args.gen_tokens + 8
        eos = 2
        result = {"benchmark": "llama.cpp beside ours", "shape": shape, "threads": threads, "prompt_len": args.prompt_len,
                  "gen_tokens": args.gen_tokens, "repeats": args.repeats, "llama_cpp_python": args.version,
                  "cmake_args": args.cmake_args, "machine": info, "pairs": {}}

        def write() -> None:
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=2) + "\n")

        for t in args.types:
            gguf_name, dtype, quantize = TYPES[t]
            runners = {}
            c = Child(site, ggufs[t], threads, n_ctx, eos)
            runners[f"llama.cpp {gguf_name}"] = c
            ours_name = f"ours {quantize or dtype}"
            built = None  # the previous type's model is freed before this one is built
            if not args.skip_ours:
                kwargs = {"quantize": quantize} if quantize else {}
                built = Llama.build(str(ckpt_dir), str(tokenizer), n_ctx, 1, device="cpu", dtype=dtype, **kwargs)
                built.tokenizer = NoEosTokenizer()
                runners[ours_name] = ours_generate(built)
            vocab = Tokenizer(str(tokenizer)).n_words
            prompt = [1] + torch.randint(3, vocab, (args.prompt_len - 1,), generator=torch.Generator().manual_seed(1)).tolist()
            times: Dict[str, Dict[str, list]] = {name: {"t1": [], "tn": []} for name in runners}
            pair = result["pairs"][t] = {"gguf": gguf_name, "ours": {"dtype": dtype, "quantize": quantize}, "rows": {}}
            if built is not None:  # what ours ran: its kernels, and whether the step was one native call
                plan = getattr(built.model, "kernel_plan", None)
                pair["ours"]["kernels"] = None if plan is None else plan.summary()
                pair["ours"]["decode_step"] = native_step.describe(native_step.why_not(built.model))

            def once(name, n):
                runner = runners[name]
                if isinstance(runner, Child):
                    r = runner.completion(prompt, n)
                    return None if r is None else r["s"]
                start = time.perf_counter()
                runner([prompt], n)
                return time.perf_counter() - start

            for name in runners:  # warm-up
                once(name, 1)
                once(name, args.gen_tokens)
            for _ in range(args.repeats):
                for name in runners:
                    t1, tn = once(name, 1), once(name, args.gen_tokens)
                    if t1 is None or tn is None:
                        continue
                    times[name]["t1"].append(t1)
                    times[name]["tn"].append(tn)
                    for row_name, tt in times.items():
                        if tt["tn"]:
                            ttft = statistics.median(tt["t1"])
                            decode = statistics.median(b - a for a, b in zip(tt["t1"], tt["tn"]))
                            pair["rows"][row_name] = {"ttft_s": ttft, "prefill_tok_s": args.prompt_len / ttft,
                                                      "decode_tok_s": (args.gen_tokens - 1) / decode, "repeats": len(tt["tn"])}
                    write()
            if c.crash:
                pair["llama_cpp_error"] = c.crash
            pair["llama_cpp_version"] = c.version
            rows = pair["rows"]
            if f"llama.cpp {gguf_name}" in rows and ours_name in rows:
                pair["ours_vs_llama_cpp_decode"] = rows[ours_name]["decode_tok_s"] / rows[f"llama.cpp {gguf_name}"]["decode_tok_s"]
                pair["ours_vs_llama_cpp_prefill"] = rows[ours_name]["prefill_tok_s"] / rows[f"llama.cpp {gguf_name}"]["prefill_tok_s"]
            c.close()
            runners.clear()  # frees ours before the next type's models
            write()

    result["read_bandwidth_gb_s"] = read_bandwidth(torch.device("cpu")) / GB
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write()
    print(f"\n{shape}, {threads} threads, prompt {args.prompt_len}, {args.gen_tokens} new tokens, median of {args.repeats}; "
          f"CPU {info['cpu']}; read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s")
    print(f"{'impl':<16} {'prefill tok/s':>14} {'decode tok/s':>13} {'ours / llama.cpp':>17}")
    for t, pair in result["pairs"].items():
        for name, row in pair["rows"].items():
            ratio = pair.get("ours_vs_llama_cpp_decode") if name.startswith("ours") else None
            print(f"{name:<16} {row['prefill_tok_s']:>14.1f} {row['decode_tok_s']:>13.1f} "
                  f"{'' if ratio is None else f'{ratio:.2f}x decode':>17}")
        if "llama_cpp_error" in pair:
            print(f"  {pair['gguf']}: {pair['llama_cpp_error']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
