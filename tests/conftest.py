"""Shared fixtures: tiny tokenizers and checkpoints made on the fly (no downloads)."""

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REAL_TOKENIZER = REPO.parent / "shared" / "llama2-tokenizer" / "tokenizer.model"

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests run with fixed kernels (packed float weights where supported, int8 with bfloat16
# activations for quantized ones, torch's attention): a choice measured on a busy machine could
# differ from run to run, and between the ranks of the torchrun tests and their one-rank
# references. The chooser itself is tested in test_kernel_choice.py, the native kernels against
# torch's in test_native.py. Its cache goes to a folder of this run, not ~/.cache.
os.environ.setdefault("LLAMA_KERNELS", "packed,int8,sdpa")
os.environ.setdefault("LLAMA_KERNEL_CACHE", str(Path(tempfile.mkdtemp(prefix="llama-kernels-")) / "kernels.json"))

from helpers import TRAINING_TEXT, make_checkpoint  # noqa: E402

from llama.demo import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than with several on a busy machine.
    A module that runs them says ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """A 320-piece BPE tokenizer with byte fallback, trained on a few paragraphs."""
    d = tmp_path_factory.mktemp("tokenizer")
    text = d / "text.txt"
    text.write_text(TRAINING_TEXT)
    return train_tokenizer(text, d / "tokenizer.model", vocab_size=320)


@pytest.fixture(scope="session")
def real_tokenizer_path() -> Path:
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"the real Llama 2 tokenizer is not at {REAL_TOKENIZER}")
    return REAL_TOKENIZER


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer_path):
    """A 2-layer Llama (dim 64, 4 heads) with random weights, one shard."""
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=-1), tiny_tokenizer_path)
    return d


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """SLOW (about 2 minutes on 2 cores): the built-in demo model, trained once per test session.

    Returns ``(ckpt_dir, tokenizer_path)``; ``ckpt_dir`` is also the folder that
    ``LLAMA_DEMO_CACHE`` must name for the example scripts to find it.
    """
    from llama.demo import ensure_demo_model

    cache = tmp_path_factory.mktemp("demo-cache") / "demo"
    return ensure_demo_model(cache_dir=cache, verbose=True)
