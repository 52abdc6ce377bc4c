"""kmod's binary index files (``modules.*.bin``): a Patricia trie mapping keys to prioritized values.

Reading follows libkmod-index.c: exact lookups return the lowest-priority value, wildcard lookups
treat the stored keys as fnmatch patterns and merge every match by priority, and a dump walks the
trie in key order. Every offset is bounds-checked, every traversal refuses to visit a node twice,
so a corrupt file raises :class:`IndexFormatError` instead of looping or reading past the end.
"""

from __future__ import annotations

import bisect
import fnmatch
import mmap
import os
import re
import struct
from functools import lru_cache
from typing import Iterator, NamedTuple, Optional, Union

from kvc.kmod.errors import IndexFormatError

INDEX_MAGIC = 0xB007F457
INDEX_VERSION_MAJOR = 2
NODE_PREFIX = 0x80000000
NODE_VALUES = 0x40000000
NODE_CHILDS = 0x20000000
NODE_MASK = 0x0FFFFFFF
_WILDCARDS = b"*?["
_MAX_DEPTH = 4096
_U32 = struct.Struct(">I")


class IndexValue(NamedTuple):
    priority: int
    value: str


class _Node(NamedTuple):
    offset: int
    prefix: bytes
    first: int
    children: tuple[int, ...]
    values: tuple[IndexValue, ...]

    def child(self, char: int) -> int:
        position = char - self.first
        if 0 <= position < len(self.children):
            return self.children[position]
        return 0


def add_value(values: list[IndexValue], value: IndexValue) -> None:
    """Insert by ascending priority; a value goes before existing ones of equal priority."""
    position = bisect.bisect_left([v.priority for v in values], value.priority)
    values.insert(position, value)


@lru_cache(maxsize=256)
def _fnmatch_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern), re.DOTALL)


def fnmatch_c(pattern: str, name: str) -> bool:
    """fnmatch(3) with flags 0: case-sensitive, '*' also matches '/'."""
    return _fnmatch_regex(pattern).match(name) is not None


class Index:
    """One ``modules.*.bin`` file, memory-mapped."""

    def __init__(self, path: str, data: Union[bytes, mmap.mmap]) -> None:
        self.path = path
        self._data = data
        if len(data) < 12:
            raise IndexFormatError(path, "shorter than the index header")
        magic, version, root = struct.unpack_from(">III", data, 0)
        if magic != INDEX_MAGIC:
            raise IndexFormatError(path, f"bad magic 0x{magic:08X}")
        if version >> 16 != INDEX_VERSION_MAJOR:
            raise IndexFormatError(path, f"unsupported index version 0x{version:08X}")
        self._root = root

    @classmethod
    def open(cls, path: str) -> Index:
        """Open an index; a missing file raises FileNotFoundError."""
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data: Union[bytes, mmap.mmap] = (
                mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b"")
        return cls(path, data)

    def _fail(self, problem: str) -> IndexFormatError:
        return IndexFormatError(self.path, problem)

    def _node(self, offset: int) -> Optional[_Node]:
        position = offset & NODE_MASK
        if position == 0:
            return None
        data = self._data
        size = len(data)
        if position >= size:
            raise self._fail(f"node offset {position} is past the end")
        prefix = b""
        if offset & NODE_PREFIX:
            end = data.find(b"\0", position)
            if end < 0:
                raise self._fail(f"unterminated prefix at {position}")
            prefix = bytes(data[position:end])
            position = end + 1
        first = 128
        children: tuple[int, ...] = ()
        if offset & NODE_CHILDS:
            if position + 2 > size:
                raise self._fail(f"truncated child range at {position}")
            first, last = data[position], data[position + 1]
            position += 2
            if first > last:
                raise self._fail(f"bad child range {first}..{last} at {position - 2}")
            count = last - first + 1
            if position + 4 * count > size:
                raise self._fail(f"truncated child table at {position}")
            children = struct.unpack_from(f">{count}I", data, position)
            position += 4 * count
        values: list[IndexValue] = []
        if offset & NODE_VALUES:
            if position + 4 > size:
                raise self._fail(f"truncated value count at {position}")
            (count,) = _U32.unpack_from(data, position)
            position += 4
            if count > (size - position) // 5:
                raise self._fail(f"value count {count} at {position - 4} cannot fit the file")
            for _ in range(count):
                if position + 4 > size:
                    raise self._fail(f"truncated value at {position}")
                (priority,) = _U32.unpack_from(data, position)
                end = data.find(b"\0", position + 4)
                if end < 0:
                    raise self._fail(f"unterminated value at {position + 4}")
                add_value(values, IndexValue(priority, _text(data[position + 4:end])))
                position = end + 1
        return _Node(offset & NODE_MASK, prefix, first, children, tuple(values))

    def lookup(self, key: str) -> Optional[str]:
        """The first (lowest-priority) value stored under exactly ``key``."""
        values = self.lookup_all(key)
        return values[0].value if values else None

    def lookup_all(self, key: str) -> list[IndexValue]:
        wanted = key.encode("utf-8", "surrogateescape")
        node = self._node(self._root)
        position = 0
        steps = 0
        while node is not None:
            steps += 1
            if steps > _MAX_DEPTH:
                raise self._fail("trie is deeper than any key")
            prefix = node.prefix
            if wanted[position:position + len(prefix)] != prefix:
                return []
            position += len(prefix)
            if position == len(wanted):
                return list(node.values)
            node = self._node(node.child(wanted[position]))
            position += 1
        return []

    def search_wildcard(self, key: str) -> list[IndexValue]:
        """Values of every stored pattern that matches ``key``, merged by priority
        (libkmod's index_searchwild)."""
        wanted = key.encode("utf-8", "surrogateescape")
        out: list[IndexValue] = []
        seen: set[int] = set()
        node = self._node(self._root)
        position = 0
        pattern = bytearray()
        while node is not None:
            self._visit(seen, node)
            prefix = node.prefix
            for j, char in enumerate(prefix):
                if char in _WILDCARDS:
                    self._match_all(node, j, pattern, wanted[position + j:], out, seen, 0)
                    return out
                if position + j >= len(wanted) or char != wanted[position + j]:
                    return out
            position += len(prefix)
            for wildcard in _WILDCARDS:
                child = self._node(node.child(wildcard))
                if child is not None:
                    pattern.append(wildcard)
                    self._match_all(child, 0, pattern, wanted[position:], out, seen, 0)
                    pattern.pop()
            if position == len(wanted):
                for value in node.values:
                    add_value(out, value)
                return out
            node = self._node(node.child(wanted[position]))
            position += 1
        return out

    def _visit(self, seen: set[int], node: _Node) -> None:
        if node.offset in seen:
            raise self._fail(f"node at {node.offset} is reached twice")
        seen.add(node.offset)

    def _match_all(self, node: _Node, j: int, pattern: bytearray, subkey: bytes, out: list[IndexValue],
                   seen: set[int], depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise self._fail("trie is deeper than any key")
        if j == 0:
            self._visit(seen, node)
        pushed = len(node.prefix) - j
        pattern += node.prefix[j:]
        for char in range(node.first, node.first + len(node.children)):
            child = self._node(node.children[char - node.first])
            if child is not None:
                pattern.append(char)
                self._match_all(child, 0, pattern, subkey, out, seen, depth + 1)
                pattern.pop()
        if node.values and fnmatch_c(_text(pattern), _text(subkey)):
            for value in node.values:
                add_value(out, value)
        del pattern[len(pattern) - pushed:]

    def items(self) -> Iterator[tuple[str, IndexValue]]:
        """Every (key, value) in trie order, as ``index_dump`` writes them."""
        seen: set[int] = set()
        stack: list[tuple[int, bytes]] = [(self._root, b"")]
        while stack:
            offset, key = stack.pop()
            node = self._node(offset)
            if node is None:
                continue
            self._visit(seen, node)
            full = key + node.prefix
            if len(full) > _MAX_DEPTH:
                raise self._fail("key longer than any real key")
            text = _text(full)
            for value in node.values:
                yield text, value
            for position in range(len(node.children) - 1, -1, -1):
                if node.children[position] & NODE_MASK:
                    stack.append((node.children[position], full + bytes([node.first + position])))

    def to_dict(self) -> dict[str, list[tuple[int, str]]]:
        """The whole content, for comparing two indexes by what they say rather than by layout."""
        content: dict[str, list[tuple[int, str]]] = {}
        for key, value in self.items():
            content.setdefault(key, []).append((value.priority, value.value))
        return content


def _text(raw: Union[bytes, bytearray]) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")
