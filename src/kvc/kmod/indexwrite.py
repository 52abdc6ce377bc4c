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
from typing import Any, Iterable, Optional

from kvc.kmod.errors import KmodError
from kvc.kmod.index import INDEX_MAGIC, INDEX_VERSION, NODE_CHILDS, NODE_PREFIX, NODE_VALUES

_HEADER = struct.Struct(">III")
_U32 = struct.Struct(">I")
_ONE_VALUE = struct.Struct(">II")
_CHILD = struct.Struct(">BBI")


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
        self._count += 1
        # Sorting by (priority, -insertion number) puts the newest of equal priorities first.
        entry = (priority, -self._count, value)
        found = self._values.get(key)
        if found is None:
            self._values[key] = [entry]
            return False
        duplicate = any(stored == value for _p, _n, stored in found)
        found.append(entry)
        return duplicate

    def __len__(self) -> int:
        return len(self._values)

    def to_bytes(self) -> bytes:
        """Build the trie from the sorted keys with a stack of open nodes (the rightmost path):
        the longest common prefix of each key with the previous one says which nodes are
        complete, and a node is written the moment it is complete, which is post-order with
        children in ascending byte order. A node is [end, a key below it, children, its key]."""
        values = self._values
        chunks: list[bytes] = [b""]
        size = _HEADER.size

        def emit(node: list[Any], parent_end: int) -> int:
            nonlocal size
            end, sample, children, key = node
            pointer = size
            prefix = sample[parent_end + 1 : end]
            if prefix:
                chunks.append(prefix + b"\0")
                size += len(prefix) + 1
                pointer |= NODE_PREFIX
            if children:
                first, last = children[0][0], children[-1][0]
                if len(children) == 1:
                    table = _CHILD.pack(first, first, children[0][1])
                else:
                    pointers = [0] * (last - first + 1)
                    for char, child in children:
                        pointers[char - first] = child
                    table = bytes((first, last)) + struct.pack(f">{len(pointers)}I", *pointers)
                chunks.append(table)
                size += len(table)
                pointer |= NODE_CHILDS
            if key is not None:
                found = values[key]
                if len(found) == 1:
                    block = _ONE_VALUE.pack(1, found[0][0]) + found[0][2] + b"\0"
                else:
                    found.sort()
                    block = _U32.pack(len(found)) + b"".join([_U32.pack(p) + v + b"\0" for p, _n, v in found])
                chunks.append(block)
                size += len(block)
                pointer |= NODE_VALUES
            return pointer

        # depmod never gives the root a prefix: its label is empty whatever its keys share.
        stack: list[list[Any]] = [[0, b"", [], None]]
        previous: Optional[bytes] = None
        for key in sorted(values):
            common = 0 if previous is None else _common_prefix(previous, key)
            while stack[-1][0] > common:
                node = stack.pop()
                parent = stack[-1]
                if parent[0] < common:
                    # Two keys part inside this node's label: the shared part becomes a node.
                    parent = [common, node[1], [], None]
                    stack.append(parent)
                parent[2].append((node[1][parent[0]], emit(node, parent[0])))
            if len(key) == common:
                stack[-1][3] = key
            else:
                stack.append([len(key), key, [], key])
            previous = key
        while len(stack) > 1:
            node = stack.pop()
            parent = stack[-1]
            parent[2].append((node[1][parent[0]], emit(node, parent[0])))
        root = emit(stack[0], -1)
        chunks[0] = _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, root)
        return b"".join(chunks)


def _common_prefix(first: bytes, second: bytes) -> int:
    """The length of the common prefix of two keys: the highest differing bit of their XOR,
    computed on big integers at C speed."""
    length = min(len(first), len(second))
    diff = int.from_bytes(first[:length], "big") ^ int.from_bytes(second[:length], "big")
    return length - (diff.bit_length() + 7) // 8


def build_index(entries: Iterable[tuple[bytes, bytes, int]]) -> bytes:
    """One index file from (key, value, priority) insertions in depmod's insertion order."""
    builder = IndexBuilder()
    for key, value, priority in entries:
        builder.add(key, value, priority)
    return builder.to_bytes()
