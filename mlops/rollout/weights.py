"""Rewrite traffic weights in the spec's text with the smallest diff: comments, key order and flow style stay.

`mlops promote` moves weight between a model's variants by editing `deployments.yaml`, a file people edit
and review. Dumping the parsed YAML back would drop its comments and reflow it, so the edit is made in the
text instead: PyYAML's composer gives each scalar's start and end offsets, and only the changed numbers are
spliced in. A weight that is not written yet (a variant's `weight` defaults to 0, an environment without an
override) is inserted in the style of the mapping around it. The result is parsed again and must equal the
old document with exactly the asked weights applied, and must still be a valid spec; otherwise nothing is
returned and a ValueError names the spec path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from runtimes.contract import SPEC_FILE

from ..domain.spec import DeploymentSpec, _format_error

SPEC_NAME = Path(SPEC_FILE)  # only its name appears in messages


def set_weights(text: str, model: str, weights: dict[str, int], env: str | None = None) -> str:
    """`text` with `model`'s weights set to `weights`: the variants' own (`env` None) or `env`'s override.

    Only variants named in `weights` are touched; a weight that already has the asked value (written, or
    in effect through a default or the variants' own weight) is left as it is, so a no-op returns `text`
    unchanged, byte for byte.
    """
    for vname, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int):
            raise ValueError(f"{_where(model, env, vname)}: weight must be an integer (got {w!r})")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{SPEC_NAME}: malformed YAML, weights not changed: {exc}") from None
    model_node = _mapping(_lookup(_mapping(root, ""), "models", "models"), "models")
    model_node = _mapping(_lookup(model_node, model, f"models.{model}"), f"models.{model}")
    variants = _mapping(_lookup(model_node, "variants", f"models.{model}.variants"), f"models.{model}.variants")
    order = [_key(k) for k, _ in variants.value]
    for vname in weights:
        if vname not in order:
            raise ValueError(f"models.{model}.variants.{vname}: no such variant (variants: {', '.join(order)})")
    wanted = {v: weights[v] for v in sorted(weights, key=order.index)}

    edits = _Edits(text, shared=_shared(root))
    expected = copy.deepcopy(data)
    want_model = expected["models"][model]
    if env is None:
        for vname, w in wanted.items():
            where = f"models.{model}.variants.{vname}"
            variant = _mapping(_lookup(variants, vname, where), where)
            if edits.set_scalar(variant, "weight", w, f"{where}.weight", absent=0):
                want_model["variants"][vname]["weight"] = w
    else:
        base = {v: _written_weight(data, model, v) for v in order}  # what the environment inherits
        differs = any(w != base[v] for v, w in wanted.items())  # an override not written yet is needed only then
        envs_at = f"models.{model}.environments"
        env_at, weights_at = f"{envs_at}.{env}", f"{envs_at}.{env}.weights"
        envs = _find(model_node, "environments", envs_at)
        override = _find(_mapping(envs, envs_at), env, env_at) if envs is not None else None
        wnode = _find(_mapping(override, env_at), "weights", weights_at) if override is not None else None
        if wnode is not None:
            wnode = _mapping(wnode, weights_at)
            for vname, w in wanted.items():
                if edits.set_scalar(wnode, vname, w, f"{weights_at}.{vname}", absent=base[vname]):
                    want_model["environments"][env]["weights"][vname] = w
        elif differs and override is not None:
            edits.add_pairs(override, [("weights", wanted)], weights_at)
            want_model["environments"][env]["weights"] = dict(wanted)
        elif differs and envs is not None:
            edits.add_pairs(envs, [(env, {"weights": wanted})], env_at)
            want_model["environments"][env] = {"weights": dict(wanted)}
        elif differs:
            edits.add_pairs(model_node, [("environments", {env: {"weights": wanted}})], envs_at, nest=True, after="variants")
            want_model["environments"] = {env: {"weights": dict(wanted)}}
    if not edits:
        return text
    new = edits.apply()
    _verify(new, expected, model, env, wanted)
    return new


def _where(model: str, env: str | None, vname: str) -> str:
    return f"models.{model}.environments.{env}.weights.{vname}" if env else f"models.{model}.variants.{vname}.weight"


def _verify(new: str, expected: object, model: str, env: str | None, wanted: dict[str, int]) -> None:
    """The edited text must parse to the old document with only the asked weights changed, and be a valid spec."""
    where = f"models.{model}" + (f".environments.{env}.weights" if env else ".variants")
    try:
        got = yaml.safe_load(new)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: editing the weights would break the YAML ({exc}); edit {SPEC_NAME} by hand") from None
    if got != expected:
        raise ValueError(f"{where}: editing the weights in place would change more than the weights; edit {SPEC_NAME} by hand")
    try:
        spec = DeploymentSpec.model_validate(got)
    except ValidationError as exc:
        raise ValueError(f"weights {wanted} would make the spec invalid: {_format_error(SPEC_NAME, exc)}") from None
    effective = spec.models[model].weights(env)
    if any(effective.get(v) != w for v, w in wanted.items()):
        raise ValueError(f"{where}: the edited spec serves {effective}, not {wanted}; edit {SPEC_NAME} by hand")


# --- reading the composed node tree ------------------------------------------------------------------


def _key(node: Node) -> str:
    if not isinstance(node, ScalarNode):
        raise ValueError(f"{SPEC_NAME}:{node.start_mark.line + 1}: a mapping key that is not a plain name")
    return node.value


def _find(mapping: MappingNode, key: str, where: str) -> Node | None:
    found = [v for k, v in mapping.value if isinstance(k, ScalarNode) and k.value == key]
    if len(found) > 1:
        raise ValueError(f"{where}: written {len(found)} times; cannot tell which one counts")
    return found[0] if found else None


def _lookup(mapping: MappingNode, key: str, where: str) -> Node:
    node = _find(mapping, key, where)
    if node is None:
        raise ValueError(f"{where}: not in the spec")
    return node


def _mapping(node: Node, where: str) -> MappingNode:
    if not isinstance(node, MappingNode):
        raise ValueError(f"{where or SPEC_NAME}: expected a mapping, cannot edit weights in it")
    if node.tag != "tag:yaml.org,2002:map":
        raise ValueError(f"{where}: a tagged mapping ({node.tag}); edit {SPEC_NAME} by hand")
    return node


def _written_weight(data: dict, model: str, vname: str) -> int:
    """A variant's own weight as the spec reads it (0 when unset); whether it is valid is the spec's to say."""
    variant = data["models"][model]["variants"][vname]
    weight = variant.get("weight", 0) if isinstance(variant, dict) else 0
    return weight if isinstance(weight, int) else 0


def _int(node: Node, where: str) -> int:
    if not isinstance(node, ScalarNode) or node.tag != "tag:yaml.org,2002:int":
        raise ValueError(f"{where}: not an integer weight; edit {SPEC_NAME} by hand")
    value = yaml.safe_load(node.value)
    if not isinstance(value, int):
        raise ValueError(f"{where}: not an integer weight; edit {SPEC_NAME} by hand")
    return value


def _shared(root: Node) -> set[int]:
    """Nodes reached more than once (through YAML aliases): editing one would edit every place that refers to it."""
    seen: set[int] = set()
    shared: set[int] = set()

    def walk(node: Node, ancestors: frozenset[int]) -> None:
        if id(node) in ancestors:  # a recursive alias
            shared.add(id(node))
            return
        (shared if id(node) in seen else seen).add(id(node))
        inner = ancestors | {id(node)}
        if isinstance(node, MappingNode):
            for key, value in node.value:
                walk(key, inner)
                walk(value, inner)
        elif isinstance(node, SequenceNode):
            for item in node.value:
                walk(item, inner)

    walk(root, frozenset())
    return shared


def _is_empty(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.value == "" and node.style is None


def _content_end(node: Node) -> int:
    """Offset just past the last character of `node`'s own text (a block collection's end mark lies past what follows it)."""
    if isinstance(node, MappingNode) and not node.flow_style and node.value:
        key, value = node.value[-1]
        return key.end_mark.index if _is_empty(value) else _content_end(value)
    if isinstance(node, SequenceNode) and not node.flow_style and node.value:
        return _content_end(node.value[-1])
    return node.end_mark.index


def _flow(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


# --- editing the text ----------------------------------------------------------------------------------


@dataclass
class _Edits:
    text: str
    shared: set[int] = field(default_factory=set)  # ids of nodes an alias refers to, see _shared
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, replacement)
    adds: dict[int, tuple[MappingNode, str, list[tuple[str, object]], bool, str | None]] = field(default_factory=dict)  # by mapping

    def __bool__(self) -> bool:
        return bool(self.spans or self.adds)

    def set_scalar(self, mapping: MappingNode, key: str, value: int, where: str, absent: int) -> bool:
        """Set `key` to `value` in `mapping`; True when that changes the text. `absent` is what an unwritten key means."""
        node = _find(mapping, key, where)
        if node is None:
            if value == absent:
                return False
            self.add_pairs(mapping, [(key, value)], where)
            return True
        if _int(node, where) == value:
            return False
        self._unshared(node, where)
        self.spans.append((node.start_mark.index, node.end_mark.index, str(value)))
        return True

    def add_pairs(self, mapping: MappingNode, pairs: list[tuple[str, object]], where: str, nest: bool = False, after: str | None = None) -> None:
        """Add `key: value` pairs after the `after` entry of `mapping`, else at its end (written by `apply`, a mapping's together)."""
        self._unshared(mapping, where)
        _, _, pending, _, _ = self.adds.setdefault(id(mapping), (mapping, where, [], nest, after))
        pending.extend(pairs)

    def _unshared(self, node: Node, where: str) -> None:
        if id(node) in self.shared:
            raise ValueError(f"{where}: shared with another place through a YAML anchor (&) and alias (*); edit {SPEC_NAME} by hand")

    def apply(self) -> str:
        spans = self.spans + [self._insertion(*add) for add in self.adds.values()]
        text = self.text
        for start, end, new in sorted(spans, key=lambda s: (s[0], s[1]), reverse=True):
            text = text[:start] + new + text[end:]
        return text

    def _insertion(self, mapping: MappingNode, where: str, pairs: list[tuple[str, object]], nest: bool, after: str | None) -> tuple[int, int, str]:
        """New pairs after the `after` entry of `mapping` (else its last), in its style.

        In a block mapping each pair is a line at the keys' indentation; with `nest`, a mapping value is
        written one block level deeper with its entries in flow style (as `environments:` is written).
        """
        text = self.text
        keys = [k.value if isinstance(k, ScalarNode) else None for k, _ in mapping.value]
        anchor = mapping.value[keys.index(after)] if after in keys else mapping.value[-1] if mapping.value else None
        end = None if anchor is None else anchor[0].end_mark.index if _is_empty(anchor[1]) else _content_end(anchor[1])
        if mapping.flow_style:
            entries = ", ".join(f"{k}: {_flow(v)}" for k, v in pairs)
            if end is not None:
                return (end, end, ", " + entries)
            at = mapping.end_mark.index - 1
            if text[at : at + 1] != "}":
                raise ValueError(f"{where}: cannot find the end of the mapping to add to; edit {SPEC_NAME} by hand")
            return (at, at, entries)
        assert end is not None  # a block mapping has entries (an empty one is a null scalar)
        first_key = mapping.value[0][0]
        indent = first_key.start_mark.column
        if text[first_key.start_mark.index - indent : first_key.start_mark.index].strip(" -"):
            raise ValueError(f"{where}: the mapping does not start its line; edit {SPEC_NAME} by hand")
        step = _indent_step(mapping)
        lines = []
        for k, v in pairs:
            if nest and isinstance(v, dict):
                lines.append(" " * indent + f"{k}:")
                lines += [" " * (indent + step) + f"{k2}: {_flow(v2)}" for k2, v2 in v.items()]
            else:
                lines.append(" " * indent + f"{k}: {_flow(v)}")
        nl = "\r\n" if "\r\n" in text else "\n"
        if end > 0 and text[end - 1] == "\n":  # a block scalar ends past its line break
            return (end, end, nl.join(lines) + nl)
        eol = text.find("\n", end)
        eol = len(text) if eol < 0 else eol - (text[eol - 1] == "\r")
        rest = text[end:eol].strip()
        if rest and not rest.startswith("#"):
            raise ValueError(f"{where}: unexpected text after the entry to add after; edit {SPEC_NAME} by hand")
        return (eol, eol, "".join(nl + line for line in lines))


def _indent_step(mapping: MappingNode) -> int:
    """How far this file indents a nested block mapping (from the first one under `mapping`), else 2."""
    for key, value in mapping.value:
        if isinstance(value, MappingNode) and not value.flow_style and value.value:
            step = value.value[0][0].start_mark.column - key.start_mark.column
            if step > 0:
                return step
    return 2
