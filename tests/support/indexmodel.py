"""A model writer for kmod's index format (to test the reader against) and a pattern concretizer;
shared by the index, moddir and modprobe tests."""

from __future__ import annotations

import random
import struct
from collections.abc import Mapping, Sequence

from kvc.kmod.index import (
    INDEX_MAGIC,
    NODE_CHILDS,
    NODE_PREFIX,
    NODE_VALUES,
)

Content = Mapping[str, Sequence[tuple[int, str]]]


class _WNode:
    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.children: dict[int, _WNode] = {}
        self.values: list[tuple[int, str]] = []


def _trie(entries: list[tuple[bytes, list[tuple[int, str]]]], compress: bool) -> _WNode:
    """A Patricia trie: a node's prefix is the longest common prefix of the keys reaching it
    (depmod never gives the root one; ``compress`` does, for the reader's sake)."""
    common = entries[0][0] if compress and entries else b""
    for key, _values in entries[1:] if compress else []:
        while not key.startswith(common):
            common = common[:-1]
    node = _WNode(common)
    groups: dict[int, list[tuple[bytes, list[tuple[int, str]]]]] = {}
    for key, values in entries:
        rest = key[len(common) :]
        if not rest:
            node.values.extend(values)
        else:
            groups.setdefault(rest[0], []).append((rest[1:], values))
    for char, group in groups.items():
        node.children[char] = _trie(group, True)
    return node


def build_index(content: Content, layout: str = "post", root_prefix: bool = False) -> bytes:
    """Index bytes for {key: [(priority, value), ...]} (values in stored order). ``post`` writes
    children before parents like depmod 30, ``pre`` the root first like depmod 34."""
    entries = [(key.encode(), list(values)) for key, values in content.items() if values]
    root = _trie(entries, root_prefix) if entries else _WNode(b"")
    if not entries:
        return struct.pack(">III", INDEX_MAGIC, 0x00020001, 12)

    def body(node: _WNode, pointers: Mapping[int, int]) -> bytes:
        out = b""
        if node.prefix:
            out += node.prefix + b"\0"
        if node.children:
            first, last = min(node.children), max(node.children)
            out += bytes((first, last))
            out += b"".join(struct.pack(">I", pointers.get(char, 0)) for char in range(first, last + 1))
        if node.values:
            out += struct.pack(">I", len(node.values))
            out += b"".join(struct.pack(">I", prio) + value.encode() + b"\0" for prio, value in node.values)
        return out

    def flags(node: _WNode) -> int:
        return (
            (NODE_PREFIX if node.prefix else 0)
            | (NODE_CHILDS if node.children else 0)
            | (NODE_VALUES if node.values else 0)
        )

    blob = bytearray(struct.pack(">III", INDEX_MAGIC, 0x00020001, 0))
    if layout == "post":

        def write(node: _WNode) -> int:
            pointers = {char: write(child) for char, child in sorted(node.children.items())}
            offset = len(blob)
            blob.extend(body(node, pointers))
            return offset | flags(node)

        root_pointer = write(root)
    else:
        order: list[_WNode] = []

        def walk(node: _WNode) -> None:
            order.append(node)
            for _char, child in sorted(node.children.items()):
                walk(child)

        walk(root)
        offsets: dict[int, int] = {}
        position = 12
        for node in order:
            offsets[id(node)] = position
            position += len(body(node, dict.fromkeys(node.children, 0)))
        for node in order:
            pointers = {char: offsets[id(child)] | flags(child) for char, child in node.children.items()}
            blob.extend(body(node, pointers))
        root_pointer = offsets[id(root)] | flags(root)
    struct.pack_into(">I", blob, 8, root_pointer)
    return bytes(blob)


def concrete(pattern: str, rng: random.Random, stars: Sequence[str] = ("", "0", "X1")) -> str:
    """A string the pattern (usually) matches: '*' and '?' filled, brackets resolved."""
    out, position = [], 0
    while position < len(pattern):
        char = pattern[position]
        if char == "*":
            out.append(rng.choice(stars))
        elif char == "?":
            out.append(rng.choice("07A"))
        elif char == "[" and "]" in pattern[position + 1 :]:
            close = pattern.index("]", position + 2)
            body = pattern[position + 1 : close]
            out.append(body[0] if body[0] not in "!^" else "~")
            position = close
        else:
            out.append(char)
        position += 1
    return "".join(out)
