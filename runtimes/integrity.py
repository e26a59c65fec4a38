"""The sha256 of each file of a model artifact, recorded on its registry version and checked at load.

`mlops train` records `{file: sha256}` of the logged model's files as the version tag `mlops.sha256`;
the runtime compares the files it fetched with it before it loads any of them, so bytes changed in the
artifact store after registration (by accident or not) are refused, naming the file and both digests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TAG = "mlops.sha256"


def digests(model_dir: Path) -> dict[str, str]:
    """{path relative to the model folder: sha256 hex} for every file in it."""
    out = {}
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[path.relative_to(model_dir).as_posix()] = h.hexdigest()
    return out


def tag_value(model_dir: Path) -> str:
    return json.dumps(digests(model_dir), sort_keys=True, separators=(",", ":"))


def mismatches(model_dir: Path, recorded: str) -> list[str]:
    """One line per recorded file that is missing or whose bytes differ; empty when all match."""
    expected = json.loads(recorded)
    actual = digests(model_dir)
    problems = []
    for name, digest in sorted(expected.items()):
        got = actual.get(name)
        if got is None:
            problems.append(f"{model_dir / name}: missing (recorded sha256 {digest})")
        elif got != digest:
            problems.append(f"{model_dir / name}: sha256 {got} differs from the {digest} recorded at registration")
    return problems
