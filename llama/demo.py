"""The built-in demo model: a tiny Llama trained on text that ships with this package.

Running the example scripts without ``--ckpt_dir`` uses this model. On first use it is
built into a cache folder (``$LLAMA_DEMO_CACHE``, else ``~/.cache/llama/demo-v1``) and
reused afterwards:

* a SentencePiece tokenizer with Llama 2's settings, trained on ``llama/demo_data/``;
* a tiny Llama (the real architecture: RMSNorm, RoPE, grouped-query attention, SwiGLU,
  scaled down) trained for about two minutes on the CPU on that same text and on a few
  dozen chat exchanges in the Llama 2 chat format, saved in Meta's checkpoint layout
  (``params.json``, ``consolidated.00.pth``, ``checklist.chk``) next to ``tokenizer.model``.

It has memorised its few pages of text, so that greedy continuation of a sentence from
them reproduces the text, and it answers its training questions; it knows nothing else.

The build never runs in the calling process, which may be one rank of a torchrun job:
:func:`ensure_demo_model` runs ``python -m llama.demo build DIR`` in a subprocess, under a
file lock, so that concurrent callers (all the ranks on a host, say) build it once.

Command line::

    python -m llama.demo build OUT_DIR [--seed N] [--quiet]   # build into OUT_DIR
    python -m llama.demo path                                 # print the cache folder
    python -m llama.demo ensure [--cache-dir DIR]             # build the cache if needed
"""

import argparse
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import sentencepiece as spm

DEMO_VERSION = "v1"  # the cache folder's suffix: bump it when the recipe changes
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
CORPUS_PATH = DEMO_DATA / "corpus.txt"
DIALOGS_PATH = DEMO_DATA / "dialogs.json"
DOC_SEPARATOR = "---"  # a line of its own between the documents of corpus.txt
CACHE_ENV = "LLAMA_DEMO_CACHE"
READY = "READY"  # marker written last into a complete build; holds the recipe hash
TOKENIZER_FILE = "tokenizer.model"
BUILD_FILES = ("params.json", "consolidated.00.pth", "checklist.chk", TOKENIZER_FILE)

# params.json of the demo model (vocab_size -1: taken from the tokenizer, as in Meta's files).
# 8 query heads sharing 4 key/value heads; model-parallel sizes 1, 2, 4 and 8 all work.
DEMO_PARAMS: Dict = {
    "dim": 256,
    "n_layers": 4,
    "n_heads": 8,
    "n_kv_heads": 4,
    "multiple_of": 32,
    "norm_eps": 1e-5,
    "vocab_size": -1,
}
DEMO_VOCAB_SIZE = 1024  # tokenizer pieces (256 of them bytes), a multiple of 8

# Training recipe: AdamW in float32 on the CPU, fixed seed and data order.
DEMO_TRAIN: Dict = {
    "steps": 180,
    "text_batch": 16,  # corpus windows per step: BOS + seq_len tokens from a sentence start
    "dialog_batch": 8,  # chat exchanges per step (the loss is on the answer)
    "seq_len": 128,
    "max_seq_len": 512,  # RoPE positions of the training model (dialogs may be longer than seq_len)
    "lr": 2e-3,
    "min_lr": 5e-4,
    "warmup": 15,
    "weight_decay": 0.0,
    "betas": (0.9, 0.95),
    "clip": 1.0,
    "space_prob": 0.5,  # windows with a lone space piece before a word, as a prompt ending in " " gives
    "space_window": 129,  # ... anywhere in the window (positions 2 .. space_window - 1)
    "system_prob": 0.3,  # dialogs without a system prompt that get one (a stock one or corpus sentences)
}

# Stock system prompts added to some training dialogs, so that a system prompt does not
# throw the model off its answer.
DEMO_SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a kind, careful and honest assistant. Answer as well as you can, keep your answers short "
    "and clear, and if you do not know something, say so instead of guessing.",
    "Answer the question.",
]

DEMO_NOTICE = (
    "NOTE: no --ckpt_dir given, so this runs the built-in DEMO model: a tiny Llama trained for two minutes "
    "on the few KB of text in llama/demo_data. It can only repeat and mix that text; its output just shows that "
    "the pipeline works. For real Llama 2 weights, request access from Meta, run ./download.sh, then pass "
    "e.g. --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model (llama-2-7b-chat/ for chat)."
)


def train_tokenizer(text_path: Union[str, Path], out_path: Union[str, Path], vocab_size: int) -> Path:
    """Train a SentencePiece BPE model with Llama 2's settings (byte fallback, split digits,
    ids unk=0, bos=1, eos=2, no pad) on ``text_path``; write it to ``out_path``."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(text_path),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        max_sentence_length=1 << 20,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=2,
        minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return out_path


# ----------------------------------------------------------------------------- data


def load_corpus(path: Union[str, Path] = CORPUS_PATH) -> List[str]:
    """The documents of ``corpus.txt``: blocks separated by lines holding only ``---``."""
    docs: List[str] = []
    lines: List[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines() + [DOC_SEPARATOR]:
        if line.strip() == DOC_SEPARATOR:
            doc = "\n".join(lines).strip()
            if doc:
                docs.append(doc)
            lines = []
        else:
            lines.append(line)
    return docs


def corpus_sentences(docs: Sequence[str]) -> List[str]:
    """The sentences of the documents (paragraphs and lines split at . ! ?)."""
    out = []
    for doc in docs:
        for line in doc.splitlines():
            out += [s for s in re.split(r"(?<=[.!?])\s+", line.strip()) if s]
    return out


def load_dialogs(path: Union[str, Path] = DIALOGS_PATH) -> List[List[Dict[str, str]]]:
    """The training chat exchanges: dialogs ``[system?, user, (assistant, user)*, assistant]``."""
    from .chat_format import has_special_tags, validate_dialog

    dialogs = json.loads(Path(path).read_text(encoding="utf-8"))
    for i, dialog in enumerate(dialogs):
        if not isinstance(dialog, list) or not dialog or dialog[-1].get("role") != "assistant":
            raise ValueError(f"{path}: dialog {i} must be a list of messages ending with the assistant's answer")
        validate_dialog(dialog[:-1], i)
        if has_special_tags(dialog):
            raise ValueError(f"{path}: dialog {i} contains chat-format tags")
    return dialogs


def dialog_tokens(tokenizer, dialog: Sequence[Dict[str, str]]) -> Tuple[List[int], int]:
    """Training sequence of a dialog ending with the assistant's answer, and where the answer starts.

    The sequence is exactly what ``chat_completion`` feeds the model for ``dialog[:-1]``
    (``encode_dialog``), followed by what it should generate: the answer and EOS, i.e.
    ``<s>[INST] question [/INST] answer</s>``.
    """
    from .chat_format import encode_dialog

    prompt = encode_dialog(tokenizer, dialog[:-1])
    return prompt + tokenizer.encode(dialog[-1]["content"].strip(), bos=False, eos=True), len(prompt)


def recipe_hash(seed: int = 0) -> str:
    """Hash of everything the demo model is made from: data, parameters, recipe, seed, version."""
    h = hashlib.sha256()
    recipe = [DEMO_VERSION, DEMO_PARAMS, DEMO_VOCAB_SIZE, DEMO_TRAIN, DEMO_SYSTEM_PROMPTS, seed]
    h.update(json.dumps(recipe, sort_keys=True).encode())
    for path in (CORPUS_PATH, DIALOGS_PATH):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _sentence_starts(tokenizer, ids: Sequence[int]) -> List[int]:
    """Indices of the tokens of one document that begin a sentence or a line."""
    starts = [0]
    for i in range(1, len(ids)):
        piece, prev = tokenizer.id_to_piece(ids[i]), tokenizer.id_to_piece(ids[i - 1])
        if piece == "<0x0A>":
            continue
        if prev == "<0x0A>" or (piece.startswith("\u2581") and prev.rstrip("\u2581")[-1:] in (".", "!", "?", ":")):
            starts.append(i)
    return starts


# ----------------------------------------------------------------------------- build


def build_demo_model(out_dir: Union[str, Path], seed: int = 0, verbose: bool = True, *, device: str = "cpu") -> Path:
    """Train the demo tokenizer and model and write them into ``out_dir``; returns ``out_dir``.

    Writes ``tokenizer.model``, a one-shard Meta-format checkpoint (``params.json``,
    ``consolidated.00.pth``, ``checklist.chk``) and, last, ``READY``. This trains in the
    calling process (and sets up a one-process model-parallel group there): applications
    call :func:`ensure_demo_model`, which runs it in a subprocess. Progress goes to stderr.
    ``device`` is for experiments with the recipe; the demo model is built on the CPU.
    """
    import torch
    import torch.nn.functional as F

    from .checkpoint import InMemoryState, random_state_dict, save_checkpoint
    from .model import ModelArgs, Transformer
    from .tokenizer import Tokenizer

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / READY).unlink(missing_ok=True)
    cfg = DEMO_TRAIN
    seq_len = cfg["seq_len"]

    def log(msg: str) -> None:
        if verbose:
            print(f"[demo model {time.time() - t0:5.1f}s] {msg}", file=sys.stderr, flush=True)

    # 1. The tokenizer, trained on the documents and the dialogs' text.
    docs, dialogs = load_corpus(), load_dialogs()
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        lines = [line for doc in docs for line in doc.splitlines() if line.strip()]
        lines += [line for d in dialogs for m in d for line in m["content"].splitlines() if line.strip()]
        lines += DEMO_SYSTEM_PROMPTS
        text.write_text("\n".join(lines) + "\n", encoding="utf-8")
        train_tokenizer(text, out_dir / TOKENIZER_FILE, DEMO_VOCAB_SIZE)
    tokenizer = Tokenizer(str(out_dir / TOKENIZER_FILE))
    log(f"tokenizer: {tokenizer.n_words} pieces")

    # 2. The data. The corpus is one stream <s> doc </s> <s> doc </s> ..., read in windows that
    #    start at a sentence start with BOS prepended (as text_completion encodes a prompt).
    rng = random.Random(seed)
    stream: List[int] = []
    starts: List[int] = []
    for doc in docs:
        ids = tokenizer.encode(doc, bos=False, eos=False)
        stream.append(tokenizer.bos_id)
        starts += [len(stream) + i for i in _sentence_starts(tokenizer, ids)]
        stream += ids + [tokenizer.eos_id]
    # A prompt ending with a space ("... states that ") ends with a lone "\u2581" piece, which the
    # corpus never has; in some windows one is put before a word, and the next tokens are unchanged.
    space_id = tokenizer.sp_model.piece_to_id("\u2581")
    word_start = {t for t in set(stream) if tokenizer.id_to_piece(t).startswith("\u2581") and t != space_id}
    sentences = corpus_sentences(docs)
    log(f"data: {len(docs)} documents, {len(stream)} tokens, {len(starts)} sentence starts; {len(dialogs)} dialogs")

    def text_row(s: int) -> Tuple[List[int], int]:
        """BOS + seq_len tokens from ``s``; the index of an inserted space (never a target), or -1."""
        seq = [tokenizer.bos_id] + stream[s : s + seq_len]
        if rng.random() < cfg["space_prob"]:
            where = [k for k in range(2, min(len(seq), cfg["space_window"])) if seq[k] in word_start]
            if where:
                k = rng.choice(where)
                return (seq[:k] + [space_id] + seq[k:])[: seq_len + 1], k
        return seq, -1

    def chat_row(dialog: List[Dict[str, str]]) -> Tuple[List[int], int]:
        """The dialog's tokens and where its answer starts; some get a system prompt."""
        if dialog[0]["role"] != "system" and rng.random() < cfg["system_prob"]:
            if rng.random() < 0.5:
                system = rng.choice(DEMO_SYSTEM_PROMPTS)
            else:
                system = " ".join(rng.sample(sentences, rng.randint(1, 2)))
            dialog = [{"role": "system", "content": system}] + dialog
        return dialog_tokens(tokenizer, dialog)

    def batch(rows: List[Tuple[List[int], List[bool]]]) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """Inputs and targets (-100 where not trained) for rows of (tokens, is-a-target flags)."""
        width = max(len(seq) for seq, _ in rows) - 1
        inp = torch.full((len(rows), width), tokenizer.eos_id, dtype=torch.long)
        tgt = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (seq, learn) in enumerate(rows):
            inp[r, : len(seq) - 1] = torch.tensor(seq[:-1])
            tgt[r, : len(seq) - 1] = torch.tensor([t if ok else -100 for t, ok in zip(seq[1:], learn[1:])])
        return inp.to(device), tgt.to(device)

    def text_batch(n: int):
        rows = []
        for _ in range(n):
            seq, space = text_row(starts[next(text_order)])
            rows.append((seq, [0 < k != space for k in range(len(seq))]))
        return batch(rows)

    def chat_batch(n: int):
        rows = []
        for _ in range(n):
            seq, answer = chat_row(dialogs[next(chat_order)])
            if len(seq) > cfg["max_seq_len"] + 1:
                raise ValueError(f"a demo dialog is {len(seq)} tokens, more than max_seq_len={cfg['max_seq_len']}")
            rows.append((seq, [k >= answer for k in range(len(seq))]))
        return batch(rows)

    def epochs(n: int):
        """Indices 0..n-1, epoch after epoch, each epoch in a fresh (seeded) order."""
        while True:
            order = list(range(n))
            rng.shuffle(order)
            yield from order

    text_order, chat_order = epochs(len(starts)), epochs(len(dialogs))

    # 3. The model, from the same random initialisation tests use, and the training loop.
    torch.manual_seed(seed)
    args = ModelArgs.from_dict(
        {**DEMO_PARAMS, "vocab_size": tokenizer.n_words}, max_seq_len=cfg["max_seq_len"], max_batch_size=1
    )
    model = Transformer(args, device=device)
    model.load_state_dict(random_state_dict(args, seed))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters ({', '.join(f'{k}={v}' for k, v in DEMO_PARAMS.items())})")
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": cfg["weight_decay"]}, {"params": vectors, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=tuple(cfg["betas"]),
    )
    steps = cfg["steps"]
    for step in range(steps):
        if step < cfg["warmup"]:
            lr = cfg["lr"] * (step + 1) / cfg["warmup"]
        else:
            progress = (step - cfg["warmup"]) / max(1, steps - 1 - cfg["warmup"])
            lr = cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        losses = []
        for inp, tgt in (text_batch(cfg["text_batch"]), chat_batch(cfg["dialog_batch"])):
            loss = F.cross_entropy(model.forward_train(inp).flatten(0, 1), tgt.flatten(), ignore_index=-100)
            loss.backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            log(f"step {step + 1:3d}/{steps}  lr {lr:.1e}  loss: text {losses[0]:.3f}, chat {losses[1]:.3f}")

    # 4. Meta's layout, then the marker.
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    save_checkpoint(InMemoryState(args, [state]), out_dir, 1, dict(DEMO_PARAMS))
    (out_dir / READY).write_text(recipe_hash(seed) + "\n")
    log(f"done: {out_dir}")
    return out_dir


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$LLAMA_DEMO_CACHE`` if set, else ``~/.cache/llama/demo-v1``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llama" / f"demo-{DEMO_VERSION}"


def is_ready(directory: Union[str, Path], seed: int = 0) -> bool:
    """Whether ``directory`` holds a complete demo build of the current recipe."""
    directory = Path(directory)
    marker = directory / READY
    try:
        ready = marker.read_text().strip() == recipe_hash(seed)
    except OSError:
        return False
    return ready and all((directory / name).is_file() for name in BUILD_FILES)


# Variables that would make the build subprocess join the caller's torchrun job.
_LAUNCHER_VARS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
)


def _run_build(out_dir: Path, verbose: bool) -> None:
    """``python -m llama.demo build out_dir`` in a fresh process, its output streamed to stderr."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # trained on the CPU; never touch the caller's GPUs
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "llama.demo", "build", str(out_dir)] + ([] if verbose else ["--quiet"])
    tail: deque = deque(maxlen=40)
    with subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            tail.append(line)
            if verbose:
                sys.stderr.write(line)
                sys.stderr.flush()
    if proc.returncode != 0:
        raise RuntimeError(
            f"building the demo model failed (exit status {proc.returncode}) running {' '.join(cmd)}:\n"
            + "".join(tail)
        )


def _replaceable(directory: Path) -> bool:
    """A folder we may delete to put a build in its place: missing, empty or an old/partial demo build."""
    if not directory.exists():
        return True
    if not directory.is_dir():
        return False
    return all(p.name in BUILD_FILES + (READY,) for p in directory.iterdir())


def ensure_demo_model(cache_dir: Union[None, str, Path] = None, verbose: bool = True) -> Tuple[Path, Path]:
    """The demo model's checkpoint folder and tokenizer path, building them on first use.

    ``cache_dir`` defaults to :func:`default_cache_dir`. A complete build of the current
    recipe (its ``READY`` marker holds the recipe's hash) is reused; otherwise the model is
    built in a subprocess into a temporary sibling folder that is then renamed into place.
    An exclusive lock on ``<cache_dir>.lock`` makes concurrent callers (e.g. every rank of a
    torchrun job) wait for one build and then reuse it. With ``verbose``, progress goes
    to stderr. Returns ``(ckpt_dir, tokenizer_path)`` for :meth:`llama.Llama.build`.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = cache.absolute()
    result = cache, cache / TOKENIZER_FILE
    if is_ready(cache):
        return result
    if not _replaceable(cache):
        raise FileExistsError(
            f"{cache} exists and is not a demo model folder; choose another cache folder "
            f"(cache_dir=... or ${CACHE_ENV})"
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    with _locked(cache.parent / f"{cache.name}.lock", verbose):
        if is_ready(cache):  # another process built it while we waited
            return result
        if verbose:
            print(f"Building the demo model into {cache} (once; about two minutes on 2 CPU cores) ...",
                  file=sys.stderr, flush=True)
        for stale in cache.parent.glob(f".{cache.name}.*-*"):  # left by a build that was killed
            if stale.is_dir() and stale.name.startswith((f".{cache.name}.build-", f".{cache.name}.old-")):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.build-", dir=cache.parent))
        try:
            _run_build(tmp, verbose)
            if not is_ready(tmp):
                raise RuntimeError(f"the demo model build in {tmp} finished without writing a complete model")
            if cache.exists():  # an old recipe or a partial folder: move it aside, then delete it
                old = Path(tempfile.mkdtemp(prefix=f".{cache.name}.old-", dir=cache.parent))
                os.replace(cache, old / cache.name)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


class _locked:
    """An exclusive ``flock`` on ``path`` (a no-op where fcntl does not exist)."""

    def __init__(self, path: Path, verbose: bool):
        self.path, self.verbose, self.file = path, verbose, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.verbose:
                print(f"Waiting for another process to finish building the demo model ({self.path}) ...",
                      file=sys.stderr, flush=True)
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # releases the lock
        return False


# ----------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.demo", description="The built-in demo model.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train the demo tokenizer and model into OUT_DIR (in this process)")
    build.add_argument("out_dir", type=Path)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quiet", action="store_true", help="no progress output")
    sub.add_parser("path", help="print the cache folder the example scripts use")
    ensure = sub.add_parser("ensure", help="build the cache folder unless it is complete; print its paths")
    ensure.add_argument("--cache-dir", type=Path, default=None)
    ensure.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "build":
        build_demo_model(args.out_dir, seed=args.seed, verbose=not args.quiet)
    elif args.command == "path":
        print(default_cache_dir())
    else:
        ckpt_dir, tokenizer_path = ensure_demo_model(args.cache_dir, verbose=not args.quiet)
        print(f"--ckpt_dir {ckpt_dir} --tokenizer_path {tokenizer_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
