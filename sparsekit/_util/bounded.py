"""JSON and YAML from untrusted files, bounded: a size cap checked before reading, a nesting limit, and
(YAML) no anchors or aliases. Every failure is one ValueError naming the file, never a RecursionError,
a memory blow-up or a stall (issue 21, class 7: "bombs and giants").

- ``read_text(path, max_bytes, what)``: the file's text, refused when it is larger than ``max_bytes``
  (checked with ``stat`` before a byte is read) or not UTF-8;
- ``parse_json(text, where, max_depth)``: ``json.loads`` with the nesting checked first (a scan of
  brackets outside strings, so a 100,000-deep array never reaches the recursive parser) and numbers
  too long for Python's int conversion refused;
- ``load_json(path, max_bytes, max_depth)`` = both;
- ``load_yaml(path, max_bytes, max_depth)``: PyYAML's safe loader with anchors and aliases refused
  (a "billion laughs" file is 10 lines and expands to 10^9 nodes once anything walks it) and the
  nesting limited while the document is composed.
"""
from __future__ import annotations

import json
from pathlib import Path

MiB = 2**20
DEFAULT_DEPTH = 64  # far deeper than any file sparsekit writes (cfg.json, state.json: 3-4 levels)


def read_text(path, max_bytes: int, what: str = "file") -> str:
    """The text of ``path`` (UTF-8), at most ``max_bytes`` bytes; ValueError naming it otherwise."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {what} of {size:,} bytes is larger than the {max_bytes:,} allowed; "
                         "it is not one sparsekit wrote")
    try:
        return path.read_bytes()[:max_bytes + 1].decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: {what} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text, counting only brackets outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, where, max_depth: int = DEFAULT_DEPTH):
    """``json.loads(text)`` with its nesting at most ``max_depth``; ValueError naming ``where``."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise ValueError(f"{where}: JSON nested {depth} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from None
    except (ValueError, RecursionError) as error:  # an integer too long to convert, say
        raise ValueError(f"{where} is not usable JSON: {str(error)[:120]}") from None


def load_json(path, max_bytes: int, max_depth: int = DEFAULT_DEPTH, what: str = "JSON file"):
    """The JSON value in ``path``: at most ``max_bytes`` bytes and ``max_depth`` levels deep."""
    return parse_json(read_text(path, max_bytes, what), path, max_depth)


def load_yaml(path, max_bytes: int = MiB, max_depth: int = 16, what: str = "YAML file"):
    """The YAML document in ``path`` (PyYAML's safe loader): no anchors or aliases, at most
    ``max_depth`` levels of nesting, at most ``max_bytes`` bytes; ValueError naming the file for
    those, PyYAML's own ``YAMLError`` (with its line and column) for text that is not YAML."""
    import yaml

    text = read_text(path, max_bytes, what)

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ValueError(f"{path}: line {mark.line + 1}: YAML aliases (*name) are not accepted here")
            event = self.peek_event()
            if getattr(event, "anchor", None):
                raise ValueError(f"{path}: line {event.start_mark.line + 1}: YAML anchors (&{event.anchor}) "
                                 "are not accepted here")
            self.depth += 1
            try:
                if self.depth > max_depth:
                    raise ValueError(f"{path}: line {event.start_mark.line + 1}: YAML nested more than "
                                     f"{max_depth} levels deep")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    loader = BoundedLoader(text)  # a SafeLoader: plain data only, never arbitrary objects
    try:
        return loader.get_single_data()
    except RecursionError:
        raise ValueError(f"{path}: YAML nested too deeply") from None
    finally:
        loader.dispose()
