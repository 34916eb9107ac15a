"""YAML read safely: run configs and option values come from people and from files passed
around, so the loader bounds what a hostile or broken file can cost before it is trusted.

PyYAML's ``SafeLoader`` (no Python tags) plus, each named with the file and line:
duplicate keys (the last would silently win), aliases beyond a count or an expanded size
(the "billion laughs" of nested aliases), nesting beyond a depth, integers and floats of more
digits than a number needs, files over a size, and bytes that are not UTF-8 text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MAX_BYTES = 1 << 20          # a run config is a few kB; a MB is generous
MAX_DEPTH = 64               # nesting of mappings and lists
MAX_ALIASES = 100            # alias nodes (*name) in one document
MAX_EXPANDED_NODES = 100_000  # nodes once every alias is expanded
MAX_NUMBER_CHARS = 64        # digits of an integer or float


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and bounds depth, aliases and numbers."""

    def __init__(self, stream: str, where: str):
        super().__init__(stream)
        self.where = where
        self._depth = 0
        self._aliases = 0

    def _fail(self, mark: Any, message: str) -> ConfigError:
        line = f", line {mark.line + 1}" if mark is not None else ""
        return ConfigError(f"{self.where}{line}: {message}")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise self._fail(self.peek_event().start_mark, f"more than {MAX_ALIASES} aliases (*name); "
                                 "write the values out")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise self._fail(self.peek_event().start_mark, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then own keys is how merges work
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (dict, list)):
                raise self._fail(key_node.start_mark, "a mapping or list as a key")
            if key in seen:
                raise self._fail(key_node.start_mark, f"key {key!r} given twice (first on line "
                                 f"{seen[key].line + 1})")
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> int:
        self._check_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: Any) -> float:
        self._check_number(node)
        return super().construct_yaml_float(node)

    def _check_number(self, node: Any) -> None:
        if len(str(node.value)) > MAX_NUMBER_CHARS:
            raise self._fail(node.start_mark, f"a number of {len(str(node.value))} characters "
                             f"(at most {MAX_NUMBER_CHARS}); quote it if it is text")


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _BoundedLoader.construct_yaml_float)


def _expanded_nodes(node: Any, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once its aliases are expanded (shared nodes count
    at every place they are used, as a consumer that copies them pays)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a cycle (an alias inside its own anchor) counts once
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_nodes(v, memo) for v in node.value)
    else:
        total = 1
    memo[key] = min(total, MAX_EXPANDED_NODES + 1)
    return memo[key]


def _documents(text: str, where: str) -> list[Any]:
    loader = _BoundedLoader(text, where)
    try:
        out = []
        while loader.check_node():
            node = loader.get_node()
            if node is not None and _expanded_nodes(node, {}) > MAX_EXPANDED_NODES:
                raise loader._fail(node.start_mark, f"expands to more than {MAX_EXPANDED_NODES:,} values "
                                   "through its aliases (*name)")
            out.append(loader.construct_document(node) if node is not None else None)
        return out
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}{line}: not valid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deep to read") from None
    finally:
        loader.dispose()


def load_documents(path: str | Path) -> list[Any]:
    """Every YAML document of the file at ``path`` (empty ones as None)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes, more than a config file's {MAX_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start} is {exc.object[exc.start]:#04x})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return _documents(text, str(path))


def load_value(text: str, where: str) -> Any:
    """One value written on the command line (``-o KEY=VALUE``, ``--set``), read as YAML."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{where}: a value of {len(text):,} characters")
    docs = _documents(text, where)
    if len(docs) > 1:
        raise ConfigError(f"{where}: one value expected, found {len(docs)} YAML documents")
    return docs[0] if docs else None
