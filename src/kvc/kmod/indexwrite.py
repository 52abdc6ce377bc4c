"""Writing kmod's binary index files (``modules.*.bin``) the way kmod 30's depmod lays them out.

The format is described in :mod:`kvc.kmod.index`. depmod builds a Patricia trie whose root always
has an empty prefix (every other node is path-compressed) and writes it post-order: children first,
in ascending byte order, then their parent, so the root comes last and the header's root pointer is
patched in at the end. Building the same trie from the sorted key set and emitting it in the same
order gives byte-identical files.

Values of one key are ordered by ascending priority; among equal priorities the value added last
comes first, because depmod's ``index_add_value`` inserts before the first value of equal or higher
priority.
"""

from __future__ import annotations

import struct
from typing import Iterable, Optional

from kvc.kmod.errors import KmodError
from kvc.kmod.index import INDEX_MAGIC, INDEX_VERSION, NODE_CHILDS, NODE_PREFIX, NODE_VALUES

_HEADER = struct.Struct(">III")
_U32 = struct.Struct(">I")


class IndexCharacterError(KmodError):
    """A key or value holds a byte outside 7-bit ASCII, which the index format cannot store."""

    def __init__(self, text: bytes) -> None:
        super().__init__(f"Module index: bad character in {text!r}: only 7-bit ASCII is supported")
        self.text = text


def _check(text: bytes) -> None:
    if not text.isascii() or b"\0" in text:
        raise IndexCharacterError(text)


class IndexBuilder:
    """Collects (key, value, priority) insertions and serializes them as one index file."""

    def __init__(self) -> None:
        self._values: dict[bytes, list[tuple[int, int, bytes]]] = {}
        self._count = 0

    def add(self, key: bytes, value: bytes, priority: int) -> bool:
        """Insert a value; returns True when the key already held the same value (depmod's
        duplicate report)."""
        _check(key)
        _check(value)
        found = self._values.setdefault(key, [])
        duplicate = any(stored == value for _p, _n, stored in found)
        self._count += 1
        # Sorting by (priority, -insertion number) puts the newest of equal priorities first.
        found.append((priority, -self._count, value))
        return duplicate

    def __len__(self) -> int:
        return len(self._values)

    def to_bytes(self) -> bytes:
        keys = sorted(self._values)
        out = bytearray(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, 0))
        root = self._write(keys, out)
        _HEADER.pack_into(out, 0, INDEX_MAGIC, INDEX_VERSION, root)
        return bytes(out)

    def _node(self, out: bytearray, prefix: bytes, key: Optional[bytes], children: list[tuple[int, int]]) -> int:
        offset = len(out)
        if prefix:
            out += prefix + b"\0"
            offset |= NODE_PREFIX
        if children:
            first, last = children[0][0], children[-1][0]
            table = [0] * (last - first + 1)
            for char, pointer in children:
                table[char - first] = pointer
            out.append(first)
            out.append(last)
            out += struct.pack(f">{len(table)}I", *table)
            offset |= NODE_CHILDS
        if key is not None:
            values = sorted(self._values[key])
            out += _U32.pack(len(values))
            for priority, _order, value in values:
                out += _U32.pack(priority)
                out += value + b"\0"
            offset |= NODE_VALUES
        return offset

    def _write(self, keys: list[bytes], out: bytearray) -> int:
        """Emit the trie over sorted ``keys`` post-order; returns the root pointer. The walk is
        iterative because a key may be thousands of bytes long."""
        stack = [_Frame(keys, 0, len(keys), 0, root=True)]
        pointer = 0
        while stack:
            frame = stack[-1]
            if frame.next < frame.hi:
                start = frame.next
                char = keys[start][frame.end]
                frame.next = _group_end(keys, start, frame.hi, frame.end, char)
                frame.pending = char
                stack.append(_Frame(keys, start, frame.next, frame.end + 1, root=False))
                continue
            pointer = self._node(out, frame.prefix, frame.ending, frame.children)
            stack.pop()
            if stack:
                parent = stack[-1]
                parent.children.append((parent.pending, pointer))
        return pointer


class _Frame:
    """A trie node being written: keys[lo:hi] below it share their first ``end`` bytes, the
    node's own label is key[depth:end], and ``ending`` is the key that ends exactly here."""

    __slots__ = ("children", "end", "ending", "hi", "next", "pending", "prefix")

    def __init__(self, keys: list[bytes], lo: int, hi: int, depth: int, *, root: bool) -> None:
        # depmod never gives the root a prefix; every other node is path-compressed.
        end = depth
        if not root and lo < hi:
            end = len(keys[lo]) if hi - lo == 1 else _common_end(keys[lo], keys[hi - 1], depth)
        self.prefix = keys[lo][depth:end] if lo < hi else b""
        self.ending: Optional[bytes] = None
        if lo < hi and len(keys[lo]) == end:
            self.ending = keys[lo]
            lo += 1
        self.end = end
        self.hi = hi
        self.next = lo
        self.pending = 0
        self.children: list[tuple[int, int]] = []


def _common_end(first: bytes, last: bytes, depth: int) -> int:
    """The length of the common prefix of two keys known to share their first ``depth`` bytes
    (a binary search over slice comparisons, which run at C speed)."""
    lo, hi = depth, min(len(first), len(last))
    while lo < hi:
        middle = (lo + hi + 1) // 2
        if first[lo:middle] == last[lo:middle]:
            lo = middle
        else:
            hi = middle - 1
    return lo


def _group_end(keys: list[bytes], start: int, hi: int, end: int, char: int) -> int:
    """The first index in keys[start:hi] whose byte at ``end`` is not ``char`` (binary search:
    the keys are sorted and share keys[start][:end])."""
    lo = start + 1
    while lo < hi:
        middle = (lo + hi) // 2
        if keys[middle][end] == char:
            lo = middle + 1
        else:
            hi = middle
    return lo


def build_index(entries: Iterable[tuple[bytes, bytes, int]]) -> bytes:
    """One index file from (key, value, priority) insertions in depmod's insertion order."""
    builder = IndexBuilder()
    for key, value, priority in entries:
        builder.add(key, value, priority)
    return builder.to_bytes()
