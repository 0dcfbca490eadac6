"""The example scripts end to end, in subprocesses: plain ``python`` and ``torch.distributed.run``.

Each run must exit 0 and print every prompt (or every message of every dialog) once.
The tiny tokenizer of the tests spends about one token per character, so the runs use
a ``max_seq_len`` that fits the longest example prompt (about 100 and 190 tokens).
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama.demo import DEMO_NOTICE

REPO = Path(__file__).resolve().parents[1]
SEPARATOR = "=================================="
TIMEOUT_S = 120

SCRIPTS = {
    "text": ("example_text_completion.py", "prompts", ["--max_seq_len", "128", "--max_gen_len", "8"]),
    "chat": ("example_chat_completion.py", "dialogs", ["--max_seq_len", "256", "--max_gen_len", "8"]),
}
LAUNCHERS = {
    "python": [sys.executable],
    # --standalone: a free port for the rendezvous, so concurrent test runs cannot collide.
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"],
}


def script_inputs(script: str, name: str) -> list:
    """The literal list assigned to ``name`` in the script (its prompts or dialogs)."""
    tree = ast.parse((REPO / script).read_text())
    for node in ast.walk(tree):
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
            isinstance(t, ast.Name) and t.id == name for t in targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{script} assigns no literal {name}")


def expected_lines(kind: str) -> list:
    script, name, _ = SCRIPTS[kind]
    inputs = script_inputs(script, name)
    if kind == "text":
        return inputs
    return [f"{m['role'].capitalize()}: {m['content']}" for dialog in inputs for m in dialog]


def run_example(kind: str, launcher: str, args: list, extra_env: dict = None) -> str:
    script, _, defaults = SCRIPTS[kind]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", **(extra_env or {}))
    cmd = LAUNCHERS[launcher] + [script] + args + defaults
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = proc.stdout
    n_items = len(script_inputs(script, SCRIPTS[kind][1]))
    assert out.count(SEPARATOR) == n_items, out  # one result per prompt, printed once (rank 0 only)
    for line in expected_lines(kind):
        assert out.count(line) == 1, f"{line!r} not printed once:\n{out}"
    return out


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("kind", sorted(SCRIPTS))
def test_example_with_checkpoint(kind, launcher, tiny_checkpoint, tiny_tokenizer_path):
    out = run_example(kind, launcher, ["--ckpt_dir", str(tiny_checkpoint), "--tokenizer_path", str(tiny_tokenizer_path)])
    assert "Loaded in" in out
    assert DEMO_NOTICE not in out


@pytest.fixture(scope="session")
def demo_cache(demo_model) -> Path:
    """The LLAMA_DEMO_CACHE folder holding the session's demo model (see conftest.py)."""
    ckpt_dir, tokenizer_path = demo_model
    assert (Path(ckpt_dir) / "params.json").is_file() and Path(tokenizer_path).is_file()
    return Path(ckpt_dir)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("kind", sorted(SCRIPTS))
def test_example_with_demo_model(kind, launcher, demo_cache):
    out = run_example(kind, launcher, [], {"LLAMA_DEMO_CACHE": str(demo_cache)})
    assert out.count(DEMO_NOTICE) == 1


def test_example_compile_flag_prints_the_same_text(tiny_checkpoint, tiny_tokenizer_path):
    args = ["--ckpt_dir", str(tiny_checkpoint), "--tokenizer_path", str(tiny_tokenizer_path), "--temperature", "0"]
    eager = run_example("text", "python", args)
    compiled = run_example("text", "python", args + ["--compile"])
    assert "Compiled the decode step" in compiled and "Compiled the decode step" not in eager

    def text(out: str) -> list:  # without the timing lines
        return [line for line in out.splitlines() if not line.startswith(("Loaded in", "Compiled the decode step"))]

    assert text(compiled) == text(eager)
