"""Progress lines of the long commands: on a terminal only, rank 0 only, and right."""

import io
import threading

import pytest

from llama import progress
from llama.progress import Progress, format_duration, format_size


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_forcing(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


def test_draws_on_a_terminal_and_ends_with_a_summary():
    out = Terminal()
    with Progress("loading demo", total_bytes=4 * 10**9, total_items=2, item_name="shards", stream=out,
                  min_interval_s=0) as p:
        p.update(10**9, note="consolidated.00.pth")
        p.update(10**9, items=1)
        line = p.line()
    text = out.getvalue()
    assert "\r\x1b[K" in text and text.endswith("\n")
    assert "loading demo [consolidated.00.pth]: 1/2 shards  2.00 GB / 4.00 GB   50%" in line and "B/s  ETA" in line
    assert "loading demo: 1 shards, 2.00 GB in" in text.splitlines()[-1].split("\r\x1b[K")[-1]


def test_quiet_when_not_a_terminal_or_not_rank_0(monkeypatch):
    out = io.StringIO()
    with Progress("x", total_bytes=10, stream=out, min_interval_s=0) as p:
        p.update(5)
    assert out.getvalue() == ""
    monkeypatch.setenv("RANK", "1")
    out = Terminal()
    with Progress("x", total_bytes=10, stream=out, min_interval_s=0) as p:
        p.update(5)
    assert out.getvalue() == ""


def test_environment_forces_it(monkeypatch):
    monkeypatch.setenv(progress.ENV, "1")
    out = io.StringIO()
    with Progress("x", total_bytes=10, stream=out, min_interval_s=0) as p:
        p.update(5)
    assert "x:" in out.getvalue()
    monkeypatch.setenv(progress.ENV, "0")
    out = Terminal()
    with Progress("x", total_bytes=10, stream=out, min_interval_s=0) as p:
        p.update(5)
    assert out.getvalue() == ""


def test_redraws_at_most_every_interval():
    out = Terminal()
    with Progress("x", total_bytes=10**6, stream=out, min_interval_s=60) as p:
        for _ in range(1000):
            p.update(1000)
    assert out.getvalue().count("\r") == 2  # the first update and the summary


def test_failure_leaves_no_summary():
    out = Terminal()
    with pytest.raises(RuntimeError):
        with Progress("x", total_bytes=10, stream=out, min_interval_s=0) as p:
            p.update(5)
            raise RuntimeError("boom")
    assert "in " not in out.getvalue().splitlines()[-1] and out.getvalue().endswith("\n")


def test_current_is_readable_from_another_thread():
    assert progress.current() is None
    seen = []
    with Progress("loading", total_bytes=100, total_items=4, item_name="shards", stream=io.StringIO()) as p:
        p.update(25, items=1)
        t = threading.Thread(target=lambda: seen.append(progress.current()))
        t.start()
        t.join()
    assert seen == [{"what": "loading", "elapsed_s": seen[0]["elapsed_s"], "done_bytes": 25, "total_bytes": 100,
                     "fraction": 0.25, "done_shards": 1, "total_shards": 4}]
    assert progress.current() is None


def test_print_goes_above_the_line():
    out, lines = Terminal(), io.StringIO()
    with Progress("verifying", total_bytes=10, stream=out, min_interval_s=0) as p:
        p.update(5)
        p.print("file: OK", file=lines)
    assert lines.getvalue() == "file: OK\n" and "\r\x1b[K" in out.getvalue()


def test_formats():
    assert [format_duration(s) for s in (0.4, 42, 187, 3723)] == ["0 s", "42 s", "3:07", "1:02:03"]
    assert [format_size(n) for n in (512, 41.3e6, 1.234e9, 137.9e9)] == ["0.51 KB", "41.3 MB", "1.23 GB", "138 GB"]


# ------------------------------------------------------------------------------ the commands


def test_commands_report_progress_on_a_terminal_only(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from llama import convert, reshard, verify

    assert convert.main(["--to", "hf", str(tiny_checkpoint), str(tmp_path / "hf")]) == 0
    assert reshard.main([str(tiny_checkpoint), str(tmp_path / "mp2"), "-n", "2"]) == 0
    assert verify.main([str(tmp_path / "mp2")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "OK" in out  # not a terminal: nothing but the results

    monkeypatch.setenv(progress.ENV, "1")
    assert convert.main(["--to", "meta", str(tmp_path / "hf"), str(tmp_path / "meta")]) == 0
    assert reshard.main([str(tiny_checkpoint), str(tmp_path / "mp4"), "-n", "4"]) == 0
    assert verify.main([str(tmp_path / "mp4")]) == 0
    assert convert.main(["--to", "hf", str(tiny_checkpoint), str(tmp_path / "hf2")]) == 0
    out, err = capsys.readouterr()
    assert "writing hf as 1 shard(s)" in err and "writing ckpt" in err and "as 4 shard(s)" in err
    assert "verifying mp4" in err and "converting ckpt" in err and "to hf" in err
    assert err.count("B in ") == 4 and err.count("\n") == 4  # one summary line per command
    assert out.count(": OK") == 5 and "\x1b" not in out  # the results stay clean on stdout


def test_for_loading_names_the_checkpoint(tiny_checkpoint, monkeypatch):
    from llama.checkpoint import open_checkpoint

    monkeypatch.setenv(progress.ENV, "1")
    source = open_checkpoint(tiny_checkpoint)
    out = Terminal()
    p = progress.for_loading(source, 1000)
    p.stream = out
    with p:
        p.update(1000)
    source.close()
    assert f"loading {tiny_checkpoint.name} (1 file): 1.00 KB in" in out.getvalue()


def test_llama_build_reports_loading_progress(tiny_checkpoint, tiny_tokenizer_path, capsys, monkeypatch):
    from llama import Llama
    from llama.checkpoint import rank_bytes

    monkeypatch.setenv(progress.ENV, "1")
    llama = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), 32, 1, device="cpu")
    err = capsys.readouterr().err
    total = rank_bytes(llama.model.params, 0, 1, lambda key: 4)
    assert f"loading {tiny_checkpoint.name}" in err and format_size(total) in err.splitlines()[-1]
    monkeypatch.setenv(progress.ENV, "0")
    Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), 32, 1, device="cpu")
    assert "loading" not in capsys.readouterr().err
