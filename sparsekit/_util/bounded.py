"""Bounded readers for JSON and YAML files sparsekit does not control (a ``--config`` file, a
dictionary's cfg.json, a run's state.json, ``*_features.json`` reports, metrics.jsonl lines).

Every limit is checked before the work it bounds: the path's length before it is opened; the file
kind (a FIFO or a device such as /dev/zero would block or never end) and its size before a byte is
read, and never more than ``limit`` + 1 bytes read (a file growing while read); YAML aliases refused
as they are met (an alias-built "billion laughs" document is small on disk and enormous once
expanded or printed); nesting refused past ``max_depth`` (deep documents exhaust Python's stack or
an error message's repr). Whatever is wrong becomes one ``RefusedFile`` (a ValueError) whose message
names the file and the reason, and quotes none of the file's content beyond a position.
"""
from __future__ import annotations

import json
import os
import stat

MAX_DEPTH = 32             # containers inside containers; sparsekit's own files nest at most 6 deep
PATH_MAX = 4096            # Linux's PATH_MAX: bytes in a whole path, its terminating NUL included
NAME_MAX = 255             # bytes in one path component (ext4, xfs, btrfs, tmpfs)
CONFIG_LIMIT = 1 << 20     # a `sparsekit train --config` YAML file
SMALL_JSON_LIMIT = 4 << 20  # a dictionary's cfg.json and similar settings files
REPORT_LIMIT = 64 << 20    # a *_features.json report (a real one is a few MiB)
LINE_LIMIT = 1 << 16       # one metrics.jsonl line (a real one is a few hundred bytes)


class RefusedFile(ValueError):
    """A file sparsekit will not read: too large, not a regular file, not UTF-8, not valid JSON or
    YAML, YAML aliases, or nested too deep. The message is "<what><sep><reason>": the file (or the
    flag, for a path) and the reason, which ``reason`` holds alone for callers that word their own."""

    def __init__(self, what: str, reason: str, sep: str = " "):
        super().__init__(f"{what}{sep}{reason}")
        self.what, self.reason = what, reason


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.3g} {unit}"
    return f"{count} bytes"


def shown(path, width: int = 120) -> str:
    """A path for a message: as it is, or its head and tail around "..." when longer than width."""
    text = os.fsdecode(os.fspath(path))
    return text if len(text) <= width else f"{text[:width // 2]}...{text[-width // 2:]}"


def _first_clause(error: Exception) -> str:
    """An error's first line up to "; " (Python's int-digits error ends in advice on raising the limit)."""
    return str(error).splitlines()[0].split("; ")[0][:200] if str(error) else type(error).__name__


def check_path_length(path, what: str | None = None) -> str:
    """The path as a string, if the file system could hold it: at most PATH_MAX - 1 bytes in all and
    NAME_MAX bytes in each component; otherwise a RefusedFile (a ValueError) naming `what` (e.g.
    "--out") and the lengths, raised before anything touches the file system (where ENAMETOOLONG
    would surface as a traceback from deep inside a library)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    where = what or "path"
    encoded = os.fsencode(text)
    if b"\0" in encoded:
        raise RefusedFile(where, "the path holds a NUL byte", ": ")
    if len(encoded) >= PATH_MAX:
        raise RefusedFile(where, f"the path is {len(encoded):,} bytes long; a path must be under {PATH_MAX:,} bytes "
                                 f"({shown(text, 60)})", ": ")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise RefusedFile(where, f"a folder or file name in the path is {len(longest):,} bytes long; names are "
                                 f"at most {NAME_MAX} bytes ({os.fsdecode(longest[:40])!r}...)", ": ")
    return text


def read_bytes(path, limit: int, what: str | None = None) -> bytes:
    """The bytes of regular file `path`, refused (RefusedFile) when it is longer than `limit` bytes
    or is not a regular file (a FIFO, a device, a folder), before it is read. OSErrors of opening
    (a missing file, no permission) propagate as they are, for the caller to word."""
    name = what or shown(path)
    check_path_length(path, name)
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, socket or device)"
            raise RefusedFile(name, f"is {kind}")
        if info.st_size > limit:
            raise RefusedFile(name, f"is {_size(info.st_size)}, over the {_size(limit)} limit for this file")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while being read
        raise RefusedFile(name, f"grew past the {_size(limit)} limit for this file while it was read")
    return data


def decode_text(data: bytes, what: str, kind: str) -> str:
    """data as UTF-8 text; RefusedFile saying `what` is not valid `kind` (JSON, YAML) otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RefusedFile(what, f"is not valid {kind}: it is not UTF-8 (byte {error.start:,})") from None


def check_depth(value, what: str, max_depth: int = MAX_DEPTH) -> None:
    """RefusedFile when JSON-like `value` nests containers more than `max_depth` deep. Iterative (no
    recursion to exhaust) and visiting each container once: shared containers (YAML anchors, which
    ``load_yaml`` refuses anyway) are not walked twice."""
    stack, seen = [(value, 1)], set()
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise RefusedFile(what, f"nests lists and objects more than {max_depth} deep")
        if id(item) in seen:
            continue
        seen.add(id(item))
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))


def parse_json(text: str | bytes, what: str, max_depth: int = MAX_DEPTH):
    """json.loads(text) with every failure as one RefusedFile naming `what`: invalid JSON (with its
    position), nesting past `max_depth` (json's C parser raises RecursionError near 1,000; the
    result is checked for the limit), an integer of more digits than Python converts."""
    if isinstance(text, bytes):
        text = decode_text(text, what, "JSON")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise RefusedFile(what, f"is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}") \
            from None
    except RecursionError:
        raise RefusedFile(what, f"nests lists and objects more than {max_depth} deep") from None
    except ValueError as error:  # e.g. an integer literal over sys.get_int_max_str_digits() digits
        raise RefusedFile(what, f"is not usable JSON: {_first_clause(error)}") from None
    check_depth(value, what, max_depth)
    return value


def load_json(path, limit: int = SMALL_JSON_LIMIT, max_depth: int = MAX_DEPTH, what: str | None = None):
    """The JSON value in file `path`, read under `limit` bytes and `max_depth` nesting (RefusedFile
    naming the file otherwise; OSErrors of opening propagate)."""
    what = what or shown(path)
    return parse_json(read_bytes(path, limit, what), what, max_depth)


def _bounded_loader(max_depth: int):
    """A yaml.SafeLoader subclass that refuses aliases and nesting past max_depth while it composes
    the document, before any Python object is built."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", mark)
            collection = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
            self.depth += collection  # containers only, as check_depth counts them
            try:
                if self.depth > max_depth:
                    raise yaml.composer.ComposerError(None, None, f"nested more than {max_depth} deep",
                                                      self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= collection

    return BoundedLoader


def load_yaml(path, limit: int = CONFIG_LIMIT, max_depth: int = MAX_DEPTH, what: str | None = None):
    """The YAML value in file `path` (YAML's safe subset), read under `limit` bytes, with no aliases
    and no nesting past `max_depth`; RefusedFile naming the file, the problem and its line otherwise
    (OSErrors of opening propagate)."""
    import yaml

    what = what or shown(path)
    text = decode_text(read_bytes(path, limit, what), what, "YAML")
    try:
        loader = _bounded_loader(max_depth)(text)  # what yaml.safe_load does, with the limits added
        try:
            value = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RefusedFile(what, f"not valid YAML: {problem}{line}", ": ") from None
    except RecursionError:
        raise RefusedFile(what, f"not valid YAML: nested more than {max_depth} deep", ": ") from None
    except ValueError as error:  # an integer over sys.get_int_max_str_digits() digits, a bad date
        raise RefusedFile(what, f"not valid YAML: {_first_clause(error)}", ": ") from None
    check_depth(value, what, max_depth)
    return value
