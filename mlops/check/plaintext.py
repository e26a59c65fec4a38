"""Plaintext secrets in the repository or in what Flux would apply, found before they are pushed.

Two scans, both run by `mlops validate`:

- every file git tracks or would track (`git ls-files --cached --others --exclude-standard`):
  private key blocks, AWS access key ids and secret keys, credentials in URLs
  (`scheme://user:password@host`) in any text file; in YAML, JSON and env-style files
  (`.env`, `.ini`, `.cfg`, `.toml`, `.properties`, Dockerfile) also password/token/secret keys
  with a literal value;
- every rendered object of every `clusters/<env>` (see mlops/check/validate.py): the same patterns in
  any string, and secret-named fields or `env` entries with literal values. Secret objects' data
  are the `no plaintext Secret` rule's, and SOPS-encrypted ones are fine.

Not findings: empty values, references (`${VAR}`, `$VAR`, `{{ .Values.x }}`, `secretKeyRef`,
keys naming a Secret or a key in one such as `existingSecret` or `passwordKey`), SOPS `ENC[...]`
values, numbers, and the placeholders documentation and code use (`...`, `<password>`, `{password}`,
`changeme`, `password`).
Each finding is one line: `<file>:<line>: <problem>` or `<rendered path> (<Kind>/<name>): <field>: <problem>`.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

PRIVATE_KEY = re.compile(r"-----BEGIN[A-Z ]{0,24} PRIVATE KEY( BLOCK)?-----")
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b")
AWS_SECRET = re.compile(r"(?i)aws.{0,20}?(?:secret|private).{0,20}?['\"]?\s*[:=]\s*['\"]?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])")
URL_CREDENTIALS = re.compile(r"\b[a-z][a-z0-9+.-]*://([^\s:/@'\"<>]+):([^\s/@'\"<>]+)@[^\s/'\"<>]")

# Key names (lower-cased, without _ - .) that hold a secret, and those that only name where one is.
SECRET_KEY = re.compile(r"password|passwd|passphrase|secret|token|apikey|accesskey|privatekey|credential")
REFERENCE_KEY = re.compile(r"(ref|refs|name|names|file|path|existingsecret|(password|user|username|token)key|secretkeyref|arn)$")
PLACEHOLDER = re.compile(
    r"(?i)^(|~|null|none|true|false|\.\.\.|\*+|x+|changeme|change-me|password|passwd|pass|pw|secret|token|"
    r"<[^>]*>|\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\{\{.*\}\}|\{\w*\}|%\(?\w*\)?s|ENC\[.*\])$"
)

NUMBER = re.compile(r"^-?\d+(\.\d+)?$")  # a TTL or a size, not a secret
ENV_SUFFIXES = (".env", ".ini", ".cfg", ".conf", ".toml", ".properties")
ENV_LINE = re.compile(r"^\s*(?:export\s+|ENV\s+|ARG\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*(?:=|:=|\?=|:)\s*(.*?)\s*$")
JSON_PAIR = re.compile(r'"([^"\\]+)"\s*:\s*"((?:[^"\\]|\\.)*)"')
SKIP_LARGER_THAN = 5 * 2**20  # bytes; a file this large in this repository is data, not configuration


def _norm(key: str) -> str:
    return re.sub(r"[_\-.\s]", "", key.lower())


def secret_key(key) -> bool:
    """A key whose value would be the secret itself (`password`, `apiKey`), not a reference to one."""
    if not isinstance(key, str):
        return False
    k = _norm(key)
    return bool(SECRET_KEY.search(k)) and not REFERENCE_KEY.search(k)


def literal(value) -> bool:
    """A value that is the secret itself rather than empty, a number, a placeholder or a reference."""
    if not isinstance(value, str):
        return False
    text = value.strip().strip("'\"").strip()
    return not PLACEHOLDER.match(text) and not NUMBER.match(text)


def _yaml_literal(node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str" and literal(node.value)


def text_findings(text: str):
    """(line number, problem) for the patterns that are secrets wherever they appear."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if PRIVATE_KEY.search(line):
            yield lineno, "private key block"
        for m in AWS_KEY_ID.finditer(line):
            if "EXAMPLE" not in m.group(0):
                yield lineno, f"AWS access key id {m.group(0)[:8]}…"
        if AWS_SECRET.search(line):
            yield lineno, "AWS secret access key"
        for m in URL_CREDENTIALS.finditer(line):
            if literal(m.group(2)):
                yield lineno, f"password in URL for user '{m.group(1)}'"


def _yaml_findings(text: str):
    """(line, problem) for secret-named keys with literal values, and plaintext Secret objects, from YAML nodes."""
    try:
        documents = list(yaml.compose_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    except yaml.YAMLError:
        yield from _pair_findings(text, ENV_LINE)  # templated or broken YAML: judge it line by line
        return
    for doc in documents:
        if doc is None:
            continue
        nodes = [doc]
        while nodes:
            node = nodes.pop()
            if isinstance(node, yaml.SequenceNode):
                nodes += node.value
            if not isinstance(node, yaml.MappingNode):
                continue
            scalars = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode)}
            if (
                scalars.get("kind") is not None
                and scalars["kind"].value == "Secret"
                and not any(isinstance(k, yaml.ScalarNode) and k.value == "sops" for k, _ in node.value)
            ):
                for k, v in node.value:
                    if k.value in ("data", "stringData") and isinstance(v, yaml.MappingNode) and v.value:
                        yield k.start_mark.line + 1, f"plaintext Secret {k.value} in Git: keep the Secret in the cluster, or encrypt it with SOPS"
                continue
            name = scalars.get("name")
            if name is not None and "value" in scalars and secret_key(name.value) and _yaml_literal(scalars["value"]):
                yield scalars["value"].start_mark.line + 1, f"literal value for '{name.value}': reference a Secret (secretKeyRef) instead"
            for k, v in node.value:
                if isinstance(v, yaml.ScalarNode) and isinstance(k, yaml.ScalarNode) and secret_key(k.value) and _yaml_literal(v):
                    yield v.start_mark.line + 1, f"literal value for '{k.value}': reference a Secret or an environment variable instead"
                elif not isinstance(v, yaml.ScalarNode):
                    nodes.append(v)


def _pair_findings(text: str, pattern: re.Pattern):
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("#", ";", "//")):
            continue
        for m in pattern.finditer(line):
            if secret_key(m.group(1)) and literal(m.group(2)):
                yield lineno, f"literal value for '{m.group(1)}': reference a Secret or an environment variable instead"


def file_findings(name: str, text: str) -> list[tuple[int, str]]:
    base = os.path.basename(name).lower()
    findings = list(text_findings(text))
    if base.endswith((".yaml", ".yml")):
        findings += _yaml_findings(text)
    elif base.endswith(".json"):
        findings += _pair_findings(text, JSON_PAIR)
    elif base.endswith(ENV_SUFFIXES) or base.startswith((".env", "dockerfile")):
        findings += _pair_findings(text, ENV_LINE)
    first = {}  # one finding per line: a line matching a pattern and a key rule is one secret
    for lineno, problem in findings:
        first.setdefault(lineno, problem)
    return sorted(first.items())


def repository_files(root: Path) -> list[str]:
    """What git tracks or would track under root; outside a git work tree, every file but hidden ones."""
    try:
        proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, capture_output=True, timeout=60)
    except FileNotFoundError:  # no git on this machine
        proc = None
    if proc is not None and proc.returncode == 0:
        return sorted({p for p in proc.stdout.decode().split("\0") if p and (root / p).is_file()})
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def scan_repository(root: Path, files: list[str] | None = None) -> list[str]:
    """`<file>:<line>: <problem>` for every plaintext secret in the repository's files (`files`, if listed already)."""
    errors = []
    for rel in repository_files(root) if files is None else files:
        path = root / rel
        if path.stat().st_size > SKIP_LARGER_THAN:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for lineno, problem in file_findings(rel, data.decode(errors="replace")):
            errors.append(f"{rel}:{lineno}: {problem}")
    return errors


def walk(node, path=()):
    """(path, node) for a parsed YAML/JSON tree and everything in it, depth first."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from walk(value, (*path, key))


def check_object(data: dict):
    """(field path, problem) for a rendered object; a validate.py rule."""
    if data.get("kind") == "Secret" and (data.get("apiVersion") == "v1"):
        return  # plaintext data is the Secret rule's finding; SOPS-encrypted data is fine
    for path, node in walk(data):
        if isinstance(node, str):
            for _, problem in text_findings(node):
                yield path, problem
        elif isinstance(node, dict):
            if secret_key(node.get("name")) and "value" in node and literal(node["value"]):
                yield (*path, "value"), f"literal value for '{node['name']}': reference a Secret (secretKeyRef) instead"
            for key, value in node.items():
                if secret_key(key) and literal(value):
                    yield (*path, key), f"literal value for '{key}': reference a Secret instead"
