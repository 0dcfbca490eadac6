"""Check a download against its ``checklist.chk`` (md5), on any OS, in Python.

Usage: ``python -m llama.verify DIR [DIR ...]`` prints one line per file and exits
non-zero on any mismatch or missing file.
"""

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Iterable, List, Tuple

CHECKLIST = "checklist.chk"


def md5_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
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


def verify(directory: Path, checklist: str = CHECKLIST, out=sys.stdout) -> bool:
    """Check every line of ``directory/checklist``; print one line per file; True when all match."""
    directory = Path(directory)
    path = directory / checklist
    if not path.is_file():
        print(f"{path}: checklist not found", file=out)
        return False
    ok = True
    for expected, name in read_checklist(path):
        target = directory / name
        if not target.is_file():
            print(f"{target}: MISSING", file=out)
            ok = False
        elif md5_file(target) != expected:
            print(f"{target}: FAILED (md5 mismatch; download it again)", file=out)
            ok = False
        else:
            print(f"{target}: OK", file=out)
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
