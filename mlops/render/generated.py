"""Generated files (`model-settings/`, `seldon/`, the dashboards): read, compared and written one way.

Everything is computed in memory first; `--check` diffs it against what is on disk, and writing never
leaves a half-written state: a folder is written beside the old one and swapped in, a file is written
beside itself and renamed over it.
"""

from __future__ import annotations

import difflib
import shutil
import tempfile
from pathlib import Path


def read_tree(path: Path) -> dict[str, str]:
    if not path.is_dir():
        return {}
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def diff_tree(prefix: str, current: dict[str, str], wanted: dict[str, str]) -> list[str]:
    """Unified diff of two {relative path: text} trees, paths shown under `prefix`."""
    lines: list[str] = []
    for rel in sorted(set(current) | set(wanted)):
        a, b = current.get(rel), wanted.get(rel)
        if a == b:
            continue
        lines += difflib.unified_diff(
            (a or "").splitlines(keepends=True),
            (b or "").splitlines(keepends=True),
            fromfile=f"a/{prefix}{rel}" if a is not None else "/dev/null",
            tofile=f"b/{prefix}{rel}" if b is not None else "/dev/null",
        )
    return lines


def _stage(root: Path, name: str, files: dict[str, str]) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.new.", dir=root))
    try:
        for rel, text in files.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _swap_in(root: Path, name: str, staged: Path) -> None:
    target = root / name
    old = root / f"{staged.name.replace('.new.', '.old.')}"
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_folders(root: Path, folders: dict[str, dict[str, str]]) -> None:
    """Replace each folder under `root` with exactly these files; every folder is fully written before
    any is swapped in."""
    staged: dict[str, Path] = {}
    try:
        for name, files in folders.items():
            staged[name] = _stage(root, name, files)
    except BaseException:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name, tmp in staged.items():
        _swap_in(root, name, tmp)


def write_files(root: Path, files: dict[str, str | None]) -> None:
    """Write each file under `root` (None removes it), each by an atomic rename."""
    for rel, text in files.items():
        path = root / rel
        if text is None:
            path.unlink(missing_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
