"""Tests for download.sh, run against a loopback HTTP server (no network).

The server plays the part of Meta's download host: it serves a fake tree of
small random files with true checklists behind a "signed" URL, and can be told
to misbehave for a given path (403, 404, an HTML page, a corrupted body, a
connection cut in the middle of the file).  Each test runs the real script in
a subprocess, configured through environment variables only.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "download.sh"
BASH = shutil.which("bash")

HAVE_WGET = shutil.which("wget") is not None
HAVE_CURL = shutil.which("curl") is not None

pytestmark = [
    pytest.mark.skipif(not (HAVE_WGET or HAVE_CURL), reason="download.sh needs wget or curl; neither is installed"),
    pytest.mark.skipif(BASH is None, reason="bash is not installed"),
    pytest.mark.skipif(
        shutil.which("md5sum") is None and shutil.which("md5") is None,
        reason="download.sh needs md5sum or md5; neither is installed",
    ),
]

# folder -> number of shards, as on Meta's server.
MODELS = {
    "llama-2-7b": 1,
    "llama-2-13b": 2,
    "llama-2-70b": 8,
    "llama-2-7b-chat": 1,
    "llama-2-13b-chat": 2,
    "llama-2-70b-chat": 8,
}
TOP_LEVEL = ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"]
QUERY = "?Policy=eyJTdGF0ZW1lbnQiOlt7fV19&Signature=abc~def_&Key-Pair-Id=K123"
SHARD_SIZE = 48 * 1024  # big enough to cut in the middle, small enough to be fast
CUT_AT = 10_000
HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Link expired</title></head>"
    b"<body><p>This link has expired.</p></body></html>\n"
)
XML_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>AccessDenied</Code><Message>Access denied</Message></Error>"
)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_tree(seed: int = 1234) -> dict[str, bytes]:
    """Fake download tree: server path -> content, with true checklists."""
    rng = random.Random(seed)
    tree: dict[str, bytes] = {
        "LICENSE": b"FAKE LLAMA 2 COMMUNITY LICENSE (test fixture)\n",
        "USE_POLICY.md": b"# Fake acceptable use policy (test fixture)\n",
        "tokenizer.model": rng.randbytes(3000),
    }
    tree["tokenizer_checklist.chk"] = f"{md5(tree['tokenizer.model'])}  tokenizer.model\n".encode()
    for folder, shards in MODELS.items():
        lines = []
        for i in range(shards):
            name = f"consolidated.{i:02d}.pth"
            data = rng.randbytes(SHARD_SIZE + rng.randrange(1000))
            tree[f"{folder}/{name}"] = data
            lines.append(f"{md5(data)}  {name}\n")
        params = b'{"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}'
        tree[f"{folder}/params.json"] = params
        lines.append(f"{md5(params)}  params.json\n")
        tree[f"{folder}/checklist.chk"] = "".join(lines).encode()
    return tree


class FakeMetaServer:
    """Loopback HTTP server standing in for the signed-URL download host.

    ``behaviour[path]`` may be one of:
      "403", "404"  -- answer with that HTTP error
      "html"        -- answer 200 with an HTML page instead of the file
      "corrupt"     -- serve the file with one byte changed (same length)
      "cut"         -- for requests *without* a Range header, send the headers
                       and the first CUT_AT bytes, then drop the connection
      "norange"     -- ignore Range headers (always answer 200 with everything)
    ``requests`` records (path, Range header or None) for every GET.
    """

    def __init__(self, tree: dict[str, bytes]):
        self.tree = tree
        self.behaviour: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                raw_path, _, query = self.path.partition("?")
                m = re.fullmatch(r"/dl/(.+)", raw_path)
                rng_header = self.headers.get("Range")
                path = m.group(1) if m else raw_path
                with server.lock:
                    server.requests.append((path, rng_header))
                how = server.behaviour.get(path)
                if "?" + query != QUERY:  # the signature must travel with every request
                    return self._send(403, XML_DENIED, "application/xml")
                if how == "403":
                    return self._send(403, XML_DENIED, "application/xml")
                if how == "404" or not m or path not in server.tree:
                    return self._send(404, b"<html><body>Not Found</body></html>", "text/html")
                if how == "html":
                    return self._send(200, HTML_PAGE, "text/html; charset=utf-8")
                data = server.tree[path]
                if how == "corrupt":
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                if how == "cut" and rng_header is None:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:CUT_AT])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if rng_header and how != "norange":
                    rm = re.fullmatch(r"bytes=(\d+)-(\d*)", rng_header.strip())
                    if rm:
                        start = int(rm.group(1))
                        end = int(rm.group(2)) if rm.group(2) else len(data) - 1
                        if start >= len(data):
                            return self._send(
                                416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"}
                            )
                        end = min(end, len(data) - 1)
                        return self._send(
                            206,
                            data[start : end + 1],
                            "application/octet-stream",
                            {"Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"},
                        )
                return self._send(200, data, "application/octet-stream", {"Accept-Ranges": "bytes"})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dl/*{QUERY}"

    def requests_for(self, path: str) -> list[str | None]:
        with self.lock:
            return [r for p, r in self.requests if p == path]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------

TREE = make_tree()
DOWNLOADERS = [
    pytest.param("wget", marks=pytest.mark.skipif(not HAVE_WGET, reason="wget is not installed")),
    pytest.param("curl", marks=pytest.mark.skipif(not HAVE_CURL, reason="curl is not installed")),
]
ENV_KEYS = ("PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "DOWNLOADER", "MD5TOOL", "DOWNLOAD_TRIES", "DOWNLOAD_RETRY_WAIT")


@pytest.fixture
def server():
    with FakeMetaServer(dict(TREE)) as srv:
        yield srv


@pytest.fixture(params=DOWNLOADERS)
def downloader(request):
    return request.param


def run_script(
    tmp_path: Path,
    url: str | None,
    models: str | None = None,
    *,
    target: str | None = "weights",
    downloader: str | None = None,
    stdin: str | None = None,
    path: str | None = None,
    **extra: str,
) -> subprocess.CompletedProcess:
    """Run download.sh in tmp_path with the given settings; stdout+stderr merged."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env["DOWNLOAD_RETRY_WAIT"] = "0"
    if url is not None:
        env["PRESIGNED_URL"] = url
    if models is not None:
        env["MODEL_SIZE"] = models
    if target is not None:
        env["TARGET_FOLDER"] = target
    if downloader is not None:
        env["DOWNLOADER"] = downloader
    if path is not None:
        env["PATH"] = path
    env.update(extra)
    proc = subprocess.run(
        [BASH, str(SCRIPT)],
        cwd=tmp_path,
        env=env,
        input=stdin if stdin is not None else "",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=60,
    )
    proc.out = proc.stdout  # type: ignore[attr-defined]
    return proc


def expected_files(folders: list[str]) -> set[str]:
    files = set(TOP_LEVEL)
    for folder in folders:
        files |= {p for p in TREE if p.startswith(folder + "/")}
    return files


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def assert_complete(root: Path, folders: list[str]) -> None:
    assert files_under(root) == expected_files(folders)
    for rel in expected_files(folders):
        assert (root / rel).read_bytes() == TREE[rel], rel


def path_without(tmp_path: Path, *missing: str) -> str:
    """A PATH (one directory of symlinks) with every program of the current
    PATH except those named in `missing`."""
    farm = tmp_path / ("bin-without-" + "-".join(missing))
    farm.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            src = os.path.join(d, name)
            if name in missing or (farm / name).exists() or (farm / name).is_symlink():
                continue
            if os.path.isfile(src) and os.access(src, os.X_OK):
                (farm / name).symlink_to(src)
    return str(farm)


def fake_macos_md5(bindir: Path) -> None:
    """Install a stand-in for macOS `md5` (only `md5 -r FILE...`) into bindir."""
    md5sum = shutil.which("md5sum")
    assert md5sum, "the md5 stand-in needs md5sum"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "md5"
    shim.write_text(
        "#!/bin/sh\n"
        "# stand-in for macOS md5: supports only -r FILE...\n"
        '[ "$1" = -r ] || { echo "fake md5: only -r is supported" >&2; exit 64; }\n'
        "shift\n"
        'for f in "$@"; do\n'
        f'  sum=$("{md5sum}" < "$f") || exit 1\n'
        '  printf \'%s %s\\n\' "${sum%% *}" "$f"\n'
        "done\n"
    )
    shim.chmod(0o755)


# --------------------------------------------------------------------------
# success paths
# --------------------------------------------------------------------------


def test_two_models_into_folder_with_space(tmp_path, server, downloader):
    target = "my weights/llama 2"
    proc = run_script(tmp_path, server.url, "7B,13B-chat", target=target, downloader=downloader)
    assert proc.returncode == 0, proc.out
    assert f"using {downloader}" in proc.out
    root = tmp_path / target
    assert_complete(root, ["llama-2-7b", "llama-2-13b-chat"])
    assert not list(root.rglob("*.part"))
    # the checklists saved next to the weights are the real ones, and they hold
    for folder in ["llama-2-7b", "llama-2-13b-chat"]:
        r = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=root / folder, capture_output=True, text=True)
        assert r.returncode == 0 or shutil.which("md5sum") is None, r.stdout + r.stderr
    # every request carried the signature (otherwise the server answers 403)
    assert server.requests_for("llama-2-13b-chat/consolidated.01.pth") == [None]


def test_rerun_after_success_checks_again_without_downloading(tmp_path, server):
    assert run_script(tmp_path, server.url, "7B").returncode == 0
    n_before = len(server.requests_for("llama-2-7b/consolidated.00.pth"))
    proc = run_script(tmp_path, server.url, "7B")
    assert proc.returncode == 0, proc.out
    assert "earlier run" in proc.out
    assert len(server.requests_for("llama-2-7b/consolidated.00.pth")) == n_before
    assert_complete(tmp_path / "weights", ["llama-2-7b"])


def test_model_names_are_case_insensitive_and_deduplicated(tmp_path, server):
    proc = run_script(tmp_path, server.url, " 7b-CHAT , 7B-chat,")
    assert proc.returncode == 0, proc.out
    assert_complete(tmp_path / "weights", ["llama-2-7b-chat"])


def test_interactive_prompts_and_enter_means_all(tmp_path, server):
    proc = run_script(tmp_path, None, None, stdin=f"{server.url}\n\n")
    assert proc.returncode == 0, proc.out
    assert "Enter the URL from email:" in proc.out
    assert "press Enter for all" in proc.out
    assert_complete(tmp_path / "weights", list(MODELS))


def test_interactive_with_model_list(tmp_path, server):
    proc = run_script(tmp_path, None, None, stdin=f"  {server.url}  \n13b\n")
    assert proc.returncode == 0, proc.out
    assert_complete(tmp_path / "weights", ["llama-2-13b"])


def test_non_interactive_never_prompts(tmp_path, server):
    # PRESIGNED_URL set, MODEL_SIZE unset: no prompt, all models (same as Enter)
    proc = run_script(tmp_path, server.url, None, target=None)
    assert proc.returncode == 0, proc.out
    assert "Enter" not in proc.out
    assert_complete(tmp_path, list(MODELS))  # TARGET_FOLDER defaults to "."


def test_curl_fallback_when_wget_is_missing(tmp_path, server):
    if not HAVE_CURL:
        pytest.skip("curl is not installed")
    proc = run_script(tmp_path, server.url, "7B", path=path_without(tmp_path, "wget"))
    assert proc.returncode == 0, proc.out
    assert "using curl" in proc.out
    assert_complete(tmp_path / "weights", ["llama-2-7b"])


def test_macos_md5_is_used_when_md5sum_is_missing(tmp_path, server):
    path = path_without(tmp_path, "md5sum", "md5")
    fake_macos_md5(tmp_path / "macbin")
    path = f"{tmp_path / 'macbin'}{os.pathsep}{path}"
    proc = run_script(tmp_path, server.url, "7B", path=path)
    assert proc.returncode == 0, proc.out
    assert "md5)" in proc.out  # "(using wget, md5)"
    assert_complete(tmp_path / "weights", ["llama-2-7b"])


def test_macos_md5_detects_corruption(tmp_path, server):
    fake_macos_md5(tmp_path / "macbin")
    path = f"{tmp_path / 'macbin'}{os.pathsep}{os.environ['PATH']}"
    server.behaviour["llama-2-7b/consolidated.00.pth"] = "corrupt"
    proc = run_script(tmp_path, server.url, "7B", path=path, MD5TOOL="md5")
    assert proc.returncode == 1, proc.out
    assert "llama-2-7b/consolidated.00.pth" in proc.out
    assert not (tmp_path / "weights/llama-2-7b/consolidated.00.pth").exists()


# --------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------


def test_corrupted_shard_is_never_moved_into_place(tmp_path, server, downloader):
    bad = "llama-2-13b-chat/consolidated.01.pth"
    server.behaviour[bad] = "corrupt"
    proc = run_script(tmp_path, server.url, "13B-chat", downloader=downloader)
    assert proc.returncode == 1, proc.out
    assert "did NOT match" in proc.out
    assert bad in proc.out
    folder = tmp_path / "weights/llama-2-13b-chat"
    # nothing of this model was renamed into place, the bad part was deleted,
    # the good parts are kept for the next run
    assert sorted(p.name for p in folder.iterdir()) == [
        "checklist.chk.part",
        "consolidated.00.pth.part",
        "params.json.part",
    ]
    # once the server behaves, a second run completes and does not fetch the good shard again
    del server.behaviour[bad]
    proc = run_script(tmp_path, server.url, "13B-chat", downloader=downloader)
    assert proc.returncode == 0, proc.out
    assert_complete(tmp_path / "weights", ["llama-2-13b-chat"])
    first, second = server.requests_for("llama-2-13b-chat/consolidated.00.pth")
    assert first is None and second == f"bytes={len(TREE['llama-2-13b-chat/consolidated.00.pth'])}-"


def test_http_403_says_to_request_a_new_link(tmp_path, server, downloader):
    server.behaviour["llama-2-7b/consolidated.00.pth"] = "403"
    proc = run_script(tmp_path, server.url, "7B", downloader=downloader)
    assert proc.returncode == 1, proc.out
    assert "HTTP 403" in proc.out
    assert "llama-2-7b/consolidated.00.pth" in proc.out
    assert "Request a new link" in proc.out
    assert "link text" in proc.out
    folder = tmp_path / "weights/llama-2-7b"
    assert not (folder / "consolidated.00.pth").exists()
    assert not (folder / "consolidated.00.pth.part").exists()
    assert len(server.requests_for("llama-2-7b/consolidated.00.pth")) == 1  # no pointless retries


def test_wrong_signature_fails_on_first_file(tmp_path, server):
    url = server.url.replace("Signature=abc", "Signature=xyz")
    proc = run_script(tmp_path, url, "7B")
    assert proc.returncode == 1, proc.out
    assert "LICENSE (HTTP 403)" in proc.out
    assert not (tmp_path / "weights/LICENSE").exists()


def test_http_404_says_to_copy_the_whole_url(tmp_path, server):
    server.behaviour["llama-2-7b/params.json"] = "404"
    proc = run_script(tmp_path, server.url, "7B")
    assert proc.returncode == 1, proc.out
    assert "HTTP 404" in proc.out and "llama-2-7b/params.json" in proc.out
    assert "copy the whole" in proc.out
    assert not (tmp_path / "weights/llama-2-7b/params.json").exists()
    assert not (tmp_path / "weights/llama-2-7b/consolidated.00.pth").exists()


def test_html_page_instead_of_shard_is_not_saved(tmp_path, server, downloader):
    server.behaviour["llama-2-7b/consolidated.00.pth"] = "html"
    proc = run_script(tmp_path, server.url, "7B", downloader=downloader)
    assert proc.returncode == 1, proc.out
    assert "web page (HTML) instead of llama-2-7b/consolidated.00.pth" in proc.out
    assert "Request a new link" in proc.out
    folder = tmp_path / "weights/llama-2-7b"
    assert not (folder / "consolidated.00.pth").exists()
    assert not (folder / "consolidated.00.pth.part").exists()


def test_html_page_instead_of_checklist(tmp_path, server):
    server.behaviour["tokenizer_checklist.chk"] = "html"
    proc = run_script(tmp_path, server.url, "7B")
    assert proc.returncode == 1, proc.out
    assert "web page (HTML) instead of tokenizer_checklist.chk" in proc.out
    assert not (tmp_path / "weights/tokenizer.model").exists()


def test_checklist_missing_an_entry_is_an_error(tmp_path, server):
    chk = "llama-2-7b/checklist.chk"
    server.tree[chk] = b"".join(l for l in TREE[chk].splitlines(True) if b"params.json" not in l)
    proc = run_script(tmp_path, server.url, "7B")
    assert proc.returncode == 1, proc.out
    assert "llama-2-7b/checklist.chk does not list params.json" in proc.out
    assert not server.requests_for("llama-2-7b/consolidated.00.pth")


def test_unknown_model_name_lists_valid_names_and_downloads_nothing(tmp_path, server):
    proc = run_script(tmp_path, server.url, "7B,14B,chat")
    assert proc.returncode == 2, proc.out
    assert "Unknown model name(s): 14B chat" in proc.out
    for name in ["7B", "13B", "70B", "7B-chat", "13B-chat", "70B-chat"]:
        assert name in proc.out
    assert server.requests == []
    assert not (tmp_path / "weights").exists()


@pytest.mark.parametrize(
    "url, hint",
    [
        ("http://127.0.0.1:{port}/dl/LICENSE" + QUERY, "no '*'"),
        ("https://eur01.safelinks.protection.outlook.com/?url=https%3A%2F%2Fdownload%2Fx%2A", "rewritten by your email client"),
        ("ftp://127.0.0.1/*", "must start with https://"),
        ("", "No URL given"),
    ],
)
def test_bad_url_is_rejected_before_downloading(tmp_path, server, url, hint):
    proc = run_script(tmp_path, url.format(port=server.port), "7B")
    assert proc.returncode == 2, proc.out
    assert hint in proc.out
    assert server.requests == []


def test_interrupted_download_resumes_on_second_run(tmp_path, server, downloader):
    shard = "llama-2-7b/consolidated.00.pth"
    server.behaviour[shard] = "cut"
    proc = run_script(tmp_path, server.url, "7B", downloader=downloader, DOWNLOAD_TRIES="1")
    assert proc.returncode == 1, proc.out
    assert "run download.sh again" in proc.out.lower()
    part = tmp_path / "weights" / (shard + ".part")
    assert part.stat().st_size == CUT_AT
    assert not (tmp_path / "weights" / shard).exists()

    proc = run_script(tmp_path, server.url, "7B", downloader=downloader, DOWNLOAD_TRIES="1")
    assert proc.returncode == 0, proc.out
    assert server.requests_for(shard) == [None, f"bytes={CUT_AT}-"]
    assert_complete(tmp_path / "weights", ["llama-2-7b"])


def test_interrupted_download_is_retried_and_resumed_in_the_same_run(tmp_path, server, downloader):
    shard = "llama-2-7b/consolidated.00.pth"
    server.behaviour[shard] = "cut"
    proc = run_script(tmp_path, server.url, "7B", downloader=downloader)
    assert proc.returncode == 0, proc.out
    assert "Retrying" in proc.out
    assert server.requests_for(shard) == [None, f"bytes={CUT_AT}-"]
    assert_complete(tmp_path / "weights", ["llama-2-7b"])


def test_server_that_cannot_resume_restarts_the_file(tmp_path, server, downloader):
    shard = "llama-2-7b/consolidated.00.pth"
    server.behaviour[shard] = "norange"
    part = tmp_path / "weights" / (shard + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(TREE[shard][:5000])  # a true prefix from an earlier, interrupted run
    proc = run_script(tmp_path, server.url, "7B", downloader=downloader)
    assert proc.returncode == 0, proc.out
    assert_complete(tmp_path / "weights", ["llama-2-7b"])


def test_garbage_part_file_is_caught_and_deleted(tmp_path, server, downloader):
    shard = "llama-2-7b/consolidated.00.pth"
    part = tmp_path / "weights" / (shard + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"not the start of the real file")
    proc = run_script(tmp_path, server.url, "7B", downloader=downloader)
    assert proc.returncode == 1, proc.out
    assert "did NOT match" in proc.out and shard in proc.out
    assert not part.exists() and not (tmp_path / "weights" / shard).exists()
    proc = run_script(tmp_path, server.url, "7B", downloader=downloader)
    assert proc.returncode == 0, proc.out
    assert_complete(tmp_path / "weights", ["llama-2-7b"])


def test_already_complete_part_file_is_accepted(tmp_path, server, downloader):
    shard = "llama-2-7b/consolidated.00.pth"
    part = tmp_path / "weights" / (shard + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(TREE[shard])
    proc = run_script(tmp_path, server.url, "7B", downloader=downloader)
    assert proc.returncode == 0, proc.out
    assert server.requests_for(shard) == [f"bytes={len(TREE[shard])}-"]  # answered 416
    assert_complete(tmp_path / "weights", ["llama-2-7b"])


def test_refuses_to_overwrite_the_projects_own_license(tmp_path, server):
    target = tmp_path / "checkout"
    target.mkdir()
    ours = "MIT License\n\nCopyright (c) 2026 The llama contributors\n"
    (target / "LICENSE").write_text(ours)
    proc = run_script(target, server.url, "7B", target=None)  # TARGET_FOLDER defaults to "."
    assert proc.returncode == 2, proc.out
    assert "would overwrite the project's files" in proc.out and "TARGET_FOLDER=" in proc.out
    assert (target / "LICENSE").read_text() == ours
    assert server.requests == []


def test_missing_downloader_is_reported(tmp_path, server):
    proc = run_script(tmp_path, server.url, "7B", path=path_without(tmp_path, "wget", "curl"))
    assert proc.returncode == 2, proc.out
    assert "wget or curl" in proc.out
    assert server.requests == []


def test_requested_downloader_must_exist(tmp_path, server):
    proc = run_script(tmp_path, server.url, "7B", downloader="curl", path=path_without(tmp_path, "curl"))
    assert proc.returncode == 2, proc.out
    assert "curl (requested with DOWNLOADER=curl)" in proc.out
    proc = run_script(tmp_path, server.url, "7B", downloader="aria2c")
    assert proc.returncode == 2 and "DOWNLOADER must be 'wget' or 'curl'" in proc.out


def test_missing_md5_tool_is_reported(tmp_path, server):
    proc = run_script(tmp_path, server.url, "7B", path=path_without(tmp_path, "md5sum", "md5"))
    assert proc.returncode == 2, proc.out
    assert "md5sum or md5" in proc.out
    assert server.requests == []


def test_script_is_executable_bash_with_strict_mode():
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -Eeuo pipefail" in text
    r = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
