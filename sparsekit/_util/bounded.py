"""JSON and YAML from untrusted files, bounded: the path's length, the file's kind and its size
checked before a byte is read, a nesting limit, and (YAML) no anchors or aliases. Every failure is
one ``RefusedFile`` (a ValueError) naming the file, never a RecursionError, a memory blow-up or a
stall (issue 21, class 7: "bombs and giants").

- ``check_path_length(path, what)``: a path the file system could hold (at most PATH_MAX - 1 bytes,
  NAME_MAX per name), checked before anything touches the file system (where ENAMETOOLONG surfaces
  as a traceback from deep inside a library);
- ``read_text(path, max_bytes, what)``: the file's text, refused when it is not a regular file (a
  FIFO would block the open forever, /dev/zero never ends: it is opened with ``O_NONBLOCK`` and
  ``fstat``-ed), larger than ``max_bytes`` (checked before reading, and never more than the size
  it had then + 1 bytes read, so a file growing meanwhile is caught too), or not UTF-8;
- ``parse_json(text, where, max_depth)``: ``json.loads`` with the nesting checked (json's C parser
  stops itself with RecursionError near 1,000 levels; the parsed value is walked for the limit, and
  a refusal counts the exact depth with ``nesting_depth``) and numbers too long for Python's int
  conversion refused;
- ``load_json(path, max_bytes, max_depth)`` = both;
- ``load_yaml(path, max_bytes, max_depth)``: PyYAML's safe loader with anchors and aliases refused
  (a "billion laughs" file is 10 lines and expands to 10^9 nodes once anything walks it) and the
  nesting limited while the document is composed.
"""
from __future__ import annotations

import json
import os
import stat

MiB = 2**20
DEFAULT_DEPTH = 64  # far deeper than any file sparsekit writes (cfg.json, state.json: 3-4 levels)
PATH_MAX = 4096     # Linux's PATH_MAX: bytes in a whole path, its terminating NUL included
NAME_MAX = 255      # bytes in one path component (ext4, xfs, btrfs, tmpfs)
LINE_LIMIT = 2**16  # one metrics.jsonl line (a real one is a few hundred bytes)


class RefusedFile(ValueError):
    """A file (or a path) sparsekit will not read: too long a path, not a regular file, too large,
    not UTF-8, nested too deep, YAML anchors or aliases. The message is "<what><sep><reason>";
    ``reason`` alone is kept for callers that word their own line."""

    def __init__(self, what: str, reason: str, sep: str = ": "):
        super().__init__(f"{what}{sep}{reason}")
        self.what, self.reason = what, reason


def shown(path, width: int = 160) -> str:
    """A path for a message: as it is, or its head and tail around "..." when longer than width."""
    text = os.fsdecode(os.fspath(path))
    return text if len(text) <= width else f"{text[:width // 2]}...{text[-width // 2:]}"


def check_path_length(path, what: str | None = None) -> str:
    """The path as a string if a file system could hold it; RefusedFile naming `what` (a flag such as
    "--out", else "path") and the length otherwise."""
    text = os.fsdecode(os.fspath(path))
    where = what or "path"
    encoded = os.fsencode(text)
    if b"\0" in encoded:
        raise RefusedFile(where, "the path holds a NUL byte")
    if len(encoded) >= PATH_MAX:
        raise RefusedFile(where, f"the path is {len(encoded):,} bytes long; a path must be under {PATH_MAX:,} bytes "
                                 f"({shown(text, 60)})")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise RefusedFile(where, f"a folder or file name in the path is {len(longest):,} bytes long; names are "
                                 f"at most {NAME_MAX} bytes ({os.fsdecode(longest[:40])!r}...)")
    return text


def read_bytes(path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of regular file ``path``, at most ``max_bytes``; RefusedFile naming it otherwise.
    OSErrors of opening (a missing file, no permission) propagate for the caller to word."""
    check_path_length(path)
    name = shown(path)
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, socket or device)"
            raise RefusedFile(name, f"{what} is {kind}")
        if info.st_size > max_bytes:
            raise RefusedFile(name, f"{what} of {info.st_size:,} bytes is larger than the {max_bytes:,} allowed; "
                                    "it is not one sparsekit wrote")
        try:
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = handle.read(info.st_size + 1)  # read(n) allocates n bytes up front: not max_bytes
        except MemoryError:  # under the size cap, but more than this process may hold
            raise RefusedFile(name, f"{what} of {info.st_size:,} bytes does not fit in this process's memory") \
                from None
    finally:
        os.close(fd)
    if len(data) > info.st_size:
        raise RefusedFile(name, f"{what} grew while it was read (from {info.st_size:,} bytes)")
    return data


def decode(data: bytes, where, what: str = "file") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RefusedFile(shown(where), f"{what} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_text(path, max_bytes: int, what: str = "file") -> str:
    """The text of ``path`` (UTF-8), at most ``max_bytes`` bytes; RefusedFile naming it otherwise."""
    return decode(read_bytes(path, max_bytes, what), path, what)


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


def deeper_than(value, max_depth: int) -> bool:
    """Whether JSON-like ``value`` nests containers more than ``max_depth`` deep. Iterative (no
    recursion to exhaust), each container visited once."""
    if not isinstance(value, (dict, list, tuple)):
        return False
    stack, seen = [(value, 1)], set()
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return True
        if id(item) in seen:
            continue
        seen.add(id(item))
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return False


def parse_json(text: str | bytes, where, max_depth: int = DEFAULT_DEPTH):
    """``json.loads(text)`` with its nesting at most ``max_depth``; RefusedFile naming ``where``."""
    if isinstance(text, bytes):
        text = decode(text, where, "JSON")
    try:
        value = json.loads(text)
        too_deep = deeper_than(value, max_depth)
    except RecursionError:
        too_deep = True
    except MemoryError:
        raise RefusedFile(shown(where), f"JSON of {len(text):,} characters does not fit in this process's memory "
                                        "once parsed") from None
    except json.JSONDecodeError as error:
        raise RefusedFile(shown(where), f"is not valid JSON: {error}", " ") from None
    except ValueError as error:  # an integer too long to convert, say
        raise RefusedFile(shown(where), f"is not usable JSON: {str(error)[:120]}", " ") from None
    if too_deep:  # the exact figure, on the refusal path only (text is bounded by the size cap)
        raise RefusedFile(shown(where), f"JSON nested {nesting_depth(text)} levels deep, more than the "
                                        f"{max_depth} allowed")
    return value


def load_json(path, max_bytes: int, max_depth: int = DEFAULT_DEPTH, what: str = "JSON file"):
    """The JSON value in ``path``: at most ``max_bytes`` bytes and ``max_depth`` levels deep."""
    return parse_json(read_text(path, max_bytes, what), path, max_depth)


def load_yaml(path, max_bytes: int = MiB, max_depth: int = 16, what: str = "YAML file"):
    """The YAML document in ``path`` (PyYAML's safe loader): no anchors or aliases, at most
    ``max_depth`` levels of nesting, at most ``max_bytes`` bytes; RefusedFile naming the file for
    those (and for an integer too long to convert), PyYAML's own ``YAMLError`` (with its line and
    column) for text that is not YAML."""
    import yaml

    text = read_text(path, max_bytes, what)
    where = shown(path)

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise RefusedFile(where, f"line {mark.line + 1}: YAML aliases (*name) are not accepted here")
            event = self.peek_event()
            if getattr(event, "anchor", None):
                raise RefusedFile(where, f"line {event.start_mark.line + 1}: YAML anchors (&{event.anchor}) "
                                         "are not accepted here")
            self.depth += 1
            try:
                if self.depth > max_depth:
                    raise RefusedFile(where, f"line {event.start_mark.line + 1}: YAML nested more than "
                                             f"{max_depth} levels deep")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    loader = BoundedLoader(text)  # a SafeLoader: plain data only, never arbitrary objects
    try:
        return loader.get_single_data()
    except RecursionError:
        raise RefusedFile(where, "YAML nested too deeply") from None
    except RefusedFile:
        raise
    except ValueError as error:  # an integer over Python's 4,300-digit conversion limit
        raise RefusedFile(where, f"not valid YAML: {str(error).split('; ')[0][:120]}") from None
    finally:
        loader.dispose()
