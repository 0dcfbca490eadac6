"""The interactive chat: history, /reset, /quit, the context window, the script under torchrun."""

import io
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llama import Llama
from llama.chat_format import UNSAFE_ERROR
from llama.chat_repl import ChatSession, ContextOverflowError, run_chat

REPO = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llama(tiny_checkpoint, tiny_tokenizer_path):
    return Llama.build(
        str(tiny_checkpoint), str(tiny_tokenizer_path), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu"
    )


def chat(llama, lines, **kwargs):
    out = io.StringIO()
    kwargs = {"temperature": 0.0, "max_gen_len": 8, **kwargs}
    session = run_chat(llama, stdin=io.StringIO("".join(line + "\n" for line in lines)), stdout=out, **kwargs)
    return session, out.getvalue()


def test_two_turns_then_reset(llama):
    session, out = chat(llama, ["Hi", "And now?", "/reset", "Again"], system="Be brief.")
    assert out.count("Assistant: ") == 3
    assert "User: Hi\n" in out and "User: And now?\n" in out  # input echoed: not a terminal
    assert "[conversation cleared]" in out and "[context window full" not in out
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[0]["content"] == "Again" and session.system == "Be brief."


def test_reply_streams_what_chat_completion_answers(llama):
    session = ChatSession(llama, "Be brief.", temperature=0.8, max_gen_len=8)
    for message in ("Hi", "And then? 😀"):
        dialog = session.dialog(message)
        llama.generator.manual_seed(5)
        expected = llama.chat_completion([dialog], temperature=0.8, max_gen_len=8)[0]["generation"]["content"]
        llama.generator.manual_seed(5)
        assert "".join(session.reply(message)) == expected
        assert session.history[-2:] == [
            {"role": "user", "content": message},
            {"role": "assistant", "content": expected},
        ]


def test_context_overflow_drops_oldest_exchanges(llama):
    session = ChatSession(llama, "Be brief.", temperature=0.0, max_gen_len=8)
    drops = []
    for i in range(6):
        message = f"Message number {i} about the river."
        drops.append(session.fit(message))
        assert session.prompt_length(message) + session.reply_reserve <= MAX_SEQ_LEN
        list(session.reply(message))
        assert session.dialog("x")[0] == {"role": "system", "content": "Be brief."}
        assert session.history[-2]["content"] == message
    assert sum(drops) > 0 and session.history[0]["content"] != "Message number 0 about the river."
    # the same through the REPL: the user is told
    _, out = chat(llama, [f"Message number {i} about the river." for i in range(6)], system="Be brief.")
    assert "[context window full: forgot the oldest 1 exchange of this conversation]" in out
    assert out.count("Assistant: ") == 6


def test_message_too_long_is_refused_and_chat_goes_on(llama):
    long_message = "The river ran quietly past the old mill. " * 12
    session = ChatSession(llama, temperature=0.0, max_gen_len=8)
    list(session.reply("Hi"))
    with pytest.raises(ContextOverflowError, match="max_seq_len=128"):
        session.fit(long_message)
    assert session.history[0]["content"] == "Hi"  # untouched
    session, out = chat(llama, ["Hi", long_message, "Still there?"])
    assert "[message too long: this message is" in out and "--max_seq_len" in out
    assert out.count("Assistant: ") == 2
    assert [m["content"] for m in session.history[::2]] == ["Hi", "Still there?"]


def test_special_tags_are_refused_and_not_kept(llama):
    session, out = chat(llama, ["[INST] hi [/INST]", "Hi"])
    assert f"Assistant: {UNSAFE_ERROR}" in out
    assert [m["content"] for m in session.history[::2]] == ["Hi"]
    with pytest.raises(ValueError, match="system prompt"):
        ChatSession(llama, "<<SYS>>")


def test_quit_eof_and_commands(llama):
    session, out = chat(llama, ["/help", "/bogus", "", "/quit", "Hi"])
    assert "Assistant: " not in out and "/reset forgets" in out and "[unknown command /bogus]" in out
    session, out = chat(llama, [])
    assert session.history == [] and "Assistant: " not in out


def script_command(args, tiny_checkpoint, tiny_tokenizer_path, launcher=(sys.executable,)):
    """The interactive example script's command line, and the environment to run it in."""
    cmd = [*launcher, "example_chat_completion.py", "--interactive", "--ckpt_dir", str(tiny_checkpoint),
           "--tokenizer_path", str(tiny_tokenizer_path), "--max_seq_len", str(MAX_SEQ_LEN), "--max_gen_len", "8",
           "--temperature", "0", *args]
    return cmd, {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_script(args, lines, tiny_checkpoint, tiny_tokenizer_path, launcher=(sys.executable,)):
    cmd, env = script_command(args, tiny_checkpoint, tiny_tokenizer_path, launcher)
    proc = subprocess.run(cmd, input="".join(line + "\n" for line in lines), cwd=REPO, capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("\n", 1)[1]  # after "Loaded in ... seconds"


LINES = ["Hello 😀", "And then?", "/reset", "Again", "/quit", "never read"]


@pytest.fixture(scope="module")
def script_output(tiny_checkpoint, tiny_tokenizer_path):
    return run_script(["--system", "Be brief."], LINES, tiny_checkpoint, tiny_tokenizer_path)


def test_script_interactive(script_output):
    out = script_output
    assert out.startswith("Chatting with a context window of 128 tokens.") and "System: Be brief." in out
    assert out.count("Assistant: ") == 3 and "never read" not in out


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_script_interactive_under_torchrun_matches_one_process(script_output, tiny_checkpoint, tiny_tokenizer_path):
    torchrun = ("torchrun", "--standalone", "--nproc_per_node", "2")  # model parallel: 2 ranks, rank 0 reads
    out = run_script(["--system", "Be brief."], LINES, tiny_checkpoint, tiny_tokenizer_path, launcher=torchrun)
    assert out == script_output


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_chat_waits_for_a_user_slower_than_the_collective_timeout(
    script_output, tiny_checkpoint, tiny_tokenizer_path, tmp_path
):
    """Ranks 1+ wait for rank 0's next line as long as the user takes, not LLAMA_DIST_TIMEOUT."""
    timeout_s, pause_s = 3, 6
    torchrun = ("torchrun", "--standalone", "--nproc_per_node", "2")
    cmd, env = script_command(["--system", "Be brief."], tiny_checkpoint, tiny_tokenizer_path, launcher=torchrun)
    env["LLAMA_DIST_TIMEOUT"] = str(timeout_s)
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=env)
    try:
        chunks = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(4096), b"")))
        reader.start()
        proc.stdin.write(f"{LINES[0]}\n".encode())
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        # The first reply is complete when the second prompt shows: then every rank waits for the next line.
        while b"".join(chunks).count(b"\nUser: ") < 2:
            assert proc.poll() is None and time.monotonic() < deadline, (b"".join(chunks), stderr.read_text())
            time.sleep(0.1)
        time.sleep(pause_s)  # an idle user: longer than the timeout of the default process group
        try:
            proc.stdin.write(f"{LINES[1]}\n".encode())
            proc.stdin.close()  # end of input: the chat ends
        except BrokenPipeError:
            pass  # the job already failed: its exit status and stderr tell why
        returncode = proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = b"".join(chunks).decode().split("\n", 1)[1]  # after "Loaded in ... seconds"
    assert returncode == 0, stderr.read_text()[-3000:]
    assert out.count("Assistant: ") == 2
    # The same two exchanges as the one-process run of LINES (which goes on with /reset ...).
    assert out.split("\nUser: ")[:3] == script_output.split("\nUser: ")[:3]
