"""Check a download against its ``checklist.chk`` (md5), on any OS, in Python.

Usage: ``python -m llama.verify DIR [DIR ...]`` prints one line per file and exits
non-zero on any mismatch or missing file.
"""

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

from .progress import Progress

CHECKLIST = "checklist.chk"


def md5_file(path: Path, chunk_size: int = 1 << 22, on_read: Optional[Callable[[int], None]] = None) -> str:
    """The md5 hex digest of ``path``; ``on_read(n)`` is called after each chunk of ``n`` bytes."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
            if on_read is not None:
                on_read(len(chunk))
    return digest.hexdigest()


def read_checklist(path: Path) -> List[Tuple[str, str]]:
    """(md5, file name) pairs of an ``md5sum``-style checklist."""
    entries = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 32:
            raise ValueError(f"{path}:{n}: not an md5sum line: {line!r}")
        entries.append((parts[0].lower(), parts[1].strip().lstrip("*")))
    return entries


def write_checklist(directory: Path, names: Iterable[str], checklist: str = CHECKLIST) -> Path:
    directory = Path(directory)
    lines = [f"{md5_file(directory / name)}  {name}\n" for name in names]
    out = directory / checklist
    out.write_text("".join(lines))
    return out


def verify(directory: Path, checklist: str = CHECKLIST, out=None) -> bool:
    """Check every line of ``directory/checklist``; print one line per file (to ``out``, default
    stdout; progress on a terminal's stderr); True when all match."""
    out = sys.stdout if out is None else out
    directory = Path(directory)
    path = directory / checklist
    if not path.is_file():
        print(f"{path}: checklist not found", file=out)
        return False
    ok = True
    entries = read_checklist(path)
    sizes = [(directory / name).stat().st_size if (directory / name).is_file() else 0 for _, name in entries]
    with Progress(f"verifying {directory.name}", sum(sizes), len(entries), "files") as progress:
        for expected, name in entries:
            target = directory / name
            if not target.is_file():
                line = f"{target}: MISSING"
                ok = False
            elif md5_file(target, on_read=lambda n: progress.update(n, note=name)) != expected:
                line = f"{target}: FAILED (md5 mismatch; download it again)"
                ok = False
            else:
                line = f"{target}: OK"
            progress.print(line, file=out)
            progress.update(items=1)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.verify", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="directories holding a checklist")
    parser.add_argument("--checklist", default=CHECKLIST, help="checklist file name (default: %(default)s)")
    args = parser.parse_args(argv)
    ok = True
    for d in args.dirs:
        ok &= verify(d, args.checklist)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
