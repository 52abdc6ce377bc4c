"""kmod's binary index files (``modules.*.bin``), read like libkmod-index.c.

An index maps ASCII keys to prioritized string values through a Patricia trie::

    0   u32 magic 0xB007F457
    4   u32 version, major in the high 16 bits (only major 2 is read)
    8   u32 root node pointer
    node at (pointer & 0x0FFFFFFF), its fields present by the pointer's flag bits:
        0x80000000  prefix: bytes up to a NUL
        0x20000000  children: u8 first, u8 last, (last - first + 1) child pointers (0 = none)
        0x40000000  values: u32 count, count x (u32 priority, bytes up to a NUL)

All integers are big-endian. The arc to a child consumes one key byte; the child's prefix holds
the rest of its label.

Lookups follow libkmod exactly: :meth:`Index.lookup` is ``index_search`` (the first value of the
node at exactly the key), :meth:`Index.search_wildcard` is ``index_searchwild`` (stored keys are
glibc ``fnmatch`` patterns; every match is merged by priority) and :meth:`Index.items` walks the
trie in ``index_dump`` order. libkmod has two readers that differ only in the order of equal
priority values: the mmap reader (``kmod_load_resources``, used by modprobe) keeps the stored
order, the stdio reader (used by modinfo and others) re-inserts every value so that equal priorities
come out reversed. ``reader="mmap"`` or ``"file"`` picks one.

Every offset is bounds-checked and no traversal visits a node twice, so a truncated or corrupt file
raises :class:`IndexFormatError` rather than IndexError, a loop or unbounded memory use.
"""

from __future__ import annotations

import bisect
import mmap
import os
import re
import struct
from typing import Callable, Iterator, Literal, NamedTuple, Optional, Union

from kvc.kmod.errors import IndexFormatError

INDEX_MAGIC = 0xB007F457
INDEX_VERSION_MAJOR = 2
INDEX_VERSION = 0x00020001
HEADER_SIZE = 12
NODE_PREFIX = 0x80000000
NODE_VALUES = 0x40000000
NODE_CHILDS = 0x20000000
NODE_MASK = 0x0FFFFFFF

# depmod builds every key in a PATH_MAX buffer, so a longer key means a corrupt trie. It bounds
# the memory of a traversal and the cost of matching one stored pattern.
MAX_KEY_LENGTH = 4096
# Decoded nodes kept per index; beyond this the cache starts over.
_NODE_CACHE_SIZE = 65536

ReaderKind = Literal["mmap", "file"]
Data = Union[bytes, bytearray, mmap.mmap]

_STAR, _QUESTION, _LBRACKET = 0x2A, 0x3F, 0x5B
_U32 = struct.Struct(">I")


class IndexValue(NamedTuple):
    priority: int
    value: str


class IndexItem(NamedTuple):
    key: str
    value: str
    priority: int


def _text(raw: Union[bytes, bytearray]) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")


def _key_bytes(key: str) -> bytes:
    """A key as the C string libkmod would see: encoded, cut at the first NUL."""
    raw = key.encode("utf-8", "surrogateescape")
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


class _ValueList:
    """An ``index_value`` list under construction: add_value() keeps ascending priority and puts
    a value before the values of equal priority already present."""

    __slots__ = ("_priorities", "values")

    def __init__(self) -> None:
        self.values: list[IndexValue] = []
        self._priorities: list[int] = []

    def add(self, value: IndexValue) -> None:
        position = bisect.bisect_left(self._priorities, value.priority)
        self._priorities.insert(position, value.priority)
        self.values.insert(position, value)

    def extend(self, values: tuple[IndexValue, ...]) -> None:
        for value in values:
            self.add(value)


def reinserted(values: Union[list[IndexValue], tuple[IndexValue, ...]]) -> tuple[IndexValue, ...]:
    """Values in the order libkmod's stdio reader (index_read) builds them from the stored order."""
    merged = _ValueList()
    merged.extend(tuple(values))
    return tuple(merged.values)


class _Node:
    __slots__ = ("children_at", "first", "last", "offset", "prefix", "values", "values_at")

    def __init__(self, offset: int, prefix: bytes, first: int, last: int, children_at: int, values_at: int) -> None:
        self.offset = offset
        self.prefix = prefix
        self.first = first
        self.last = last
        self.children_at = children_at
        self.values_at = values_at
        self.values: Optional[tuple[IndexValue, ...]] = None


class _Frame:
    """A node being walked: the next child byte to try, and the pattern length to restore."""

    __slots__ = ("mark", "next_char", "node")

    def __init__(self, node: _Node, mark: int) -> None:
        self.node = node
        self.next_char = node.first
        self.mark = mark


class Index:
    """One ``modules.*.bin`` file.

    ``data`` is the whole file (bytes or an mmap); ``path`` only names it in errors. Opening checks
    the header; nodes are decoded on demand, so a lookup touches only the nodes on its path.
    """

    def __init__(self, path: str, data: Data, *, reader: ReaderKind = "mmap") -> None:
        if reader not in ("mmap", "file"):
            raise ValueError(f"reader must be 'mmap' or 'file', not {reader!r}")
        self.path = path
        self.reader: ReaderKind = reader
        self._data = data
        self._size = len(data)
        self._nodes: dict[int, _Node] = {}
        if self._size < HEADER_SIZE:
            raise IndexFormatError(path, f"{self._size} bytes is shorter than the {HEADER_SIZE}-byte index header")
        magic, version, root = struct.unpack_from(">III", data, 0)
        if magic != INDEX_MAGIC:
            raise IndexFormatError(path, f"bad magic 0x{magic:08X} (expected 0x{INDEX_MAGIC:08X})")
        if version >> 16 != INDEX_VERSION_MAJOR:
            raise IndexFormatError(
                path,
                f"unsupported index version 0x{version:08X} (major {version >> 16}, expected {INDEX_VERSION_MAJOR})",
            )
        self.version = version
        self.root = root

    @classmethod
    def open(cls, path: str, *, reader: ReaderKind = "mmap") -> Index:
        """Map an index file. A missing file raises FileNotFoundError; an empty or corrupt one
        IndexFormatError."""
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data: Data
            if size == 0:
                data = b""
            else:
                try:
                    data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):
                    data = handle.read()
        try:
            return cls(path, data, reader=reader)
        except IndexFormatError:
            if isinstance(data, mmap.mmap):
                data.close()
            raise

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            self._data.close()
        self._nodes.clear()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- node decoding ---------------------------------------------------------------------

    def _fail(self, problem: str) -> IndexFormatError:
        return IndexFormatError(self.path, problem)

    def _node(self, pointer: int) -> Optional[_Node]:
        offset = pointer & NODE_MASK
        if offset == 0:
            return None
        node = self._nodes.get(pointer)
        if node is not None:
            return node
        data, size = self._data, self._size
        if offset < HEADER_SIZE:
            raise self._fail(f"node pointer 0x{pointer:08X} points into the header")
        if offset > size:
            raise self._fail(f"node pointer 0x{pointer:08X} points past the end of the {size}-byte file")
        position = offset
        prefix = b""
        if pointer & NODE_PREFIX:
            end = data.find(b"\0", position)
            if end < 0:
                raise self._fail(f"the prefix of the node at {offset} runs past the end of the file")
            prefix = bytes(data[position:end])
            position = end + 1
        first, last, children_at = 128, 0, 0
        if pointer & NODE_CHILDS:
            if position + 2 > size:
                raise self._fail(f"the child range of the node at {offset} is cut off by the end of the file")
            first, last = data[position], data[position + 1]
            if first > last:
                raise self._fail(f"the node at {offset} has the child range {first}..{last}")
            children_at = position + 2
            position = children_at + 4 * (last - first + 1)
            if position > size:
                raise self._fail(f"the child table of the node at {offset} is cut off by the end of the file")
        values_at = -1
        if pointer & NODE_VALUES:
            if position + 4 > size:
                raise self._fail(f"the value count of the node at {offset} is cut off by the end of the file")
            values_at = position
        node = _Node(offset, prefix, first, last, children_at, values_at)
        if len(self._nodes) >= _NODE_CACHE_SIZE:
            self._nodes.clear()
        self._nodes[pointer] = node
        return node

    def _child_pointer(self, node: _Node, char: int) -> int:
        if node.first <= char <= node.last:
            (pointer,) = _U32.unpack_from(self._data, node.children_at + 4 * (char - node.first))
            return int(pointer)
        return 0

    def _child(self, node: _Node, char: int) -> Optional[_Node]:
        return self._node(self._child_pointer(node, char))

    def _key_child(self, node: _Node, char: int) -> Optional[_Node]:
        """The child for a byte of a searched key: libkmod passes a (signed) char, so bytes of
        128 and up never find a child."""
        return None if char >= 128 else self._child(node, char)

    def _values(self, node: _Node) -> tuple[IndexValue, ...]:
        if node.values is not None:
            return node.values
        if node.values_at < 0:
            node.values = ()
            return node.values
        data, size = self._data, self._size
        position = node.values_at
        (count,) = _U32.unpack_from(data, position)
        position += 4
        if count > (size - position) // 5:
            raise self._fail(f"the node at {node.offset} claims {count} values, more than the file can hold")
        stored: list[IndexValue] = []
        for _ in range(count):
            if position + 4 > size:
                raise self._fail(f"a value of the node at {node.offset} is cut off by the end of the file")
            (priority,) = _U32.unpack_from(data, position)
            end = data.find(b"\0", position + 4)
            if end < 0:
                raise self._fail(f"a value of the node at {node.offset} runs past the end of the file")
            stored.append(IndexValue(int(priority), _text(data[position + 4 : end])))
            position = end + 1
        node.values = tuple(stored) if self.reader == "mmap" else reinserted(stored)
        return node.values

    def _root_node(self) -> Optional[_Node]:
        return self._node(self.root)

    # -- exact lookups ---------------------------------------------------------------------

    def _find(self, key: str) -> Optional[_Node]:
        wanted = _key_bytes(key)
        node = self._root_node()
        position = 0
        while node is not None:
            prefix = node.prefix
            if prefix:
                if wanted[position : position + len(prefix)] != prefix:
                    return None
                position += len(prefix)
            if position == len(wanted):
                return node
            node = self._key_child(node, wanted[position])
            position += 1
        return None

    def lookup(self, key: str) -> Optional[str]:
        """libkmod's index_search: the first value stored under exactly ``key``, or None."""
        node = self._find(key)
        if node is None:
            return None
        values = self._values(node)
        return values[0].value if values else None

    def lookup_all(self, key: str) -> list[IndexValue]:
        """Every value stored under exactly ``key``, in the reader's order (lowest priority first)."""
        node = self._find(key)
        return list(self._values(node)) if node is not None else []

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.lookup(key) is not None

    # -- wildcard search -------------------------------------------------------------------

    def search_wildcard(self, key: str) -> list[IndexValue]:
        """libkmod's index_searchwild: the values of every stored key that, read as an fnmatch
        pattern, matches ``key``, merged by ascending priority (a later match goes before earlier
        ones of equal priority).

        The walk follows the key through the trie. A ``*``, ``?`` or ``[`` inside a node's prefix
        ends the walk: that node's subtree is matched against the rest of the key. At every node
        reached, the subtrees behind the arcs ``*``, ``?`` and ``[`` (in that order) are matched
        against the rest of the key, then the walk takes the arc of the next key byte; where the
        key ends, the node's own values are added.
        """
        wanted = _key_bytes(key)
        out = _ValueList()
        node = self._root_node()
        position = 0
        while node is not None:
            for offset, char in enumerate(node.prefix):
                if char in (_STAR, _QUESTION, _LBRACKET):
                    self._match_subtree(node, offset, b"", wanted[position + offset :], out)
                    return out.values
                if position + offset >= len(wanted) or char != wanted[position + offset]:
                    return out.values
            position += len(node.prefix)
            for wildcard in (_STAR, _QUESTION, _LBRACKET):
                child = self._child(node, wildcard)
                if child is not None:
                    self._match_subtree(child, 0, bytes((wildcard,)), wanted[position:], out)
            if position == len(wanted):
                out.extend(self._values(node))
                return out.values
            node = self._key_child(node, wanted[position])
            position += 1
        return out.values

    def _match_subtree(self, start: _Node, skip: int, arc: bytes, subkey: bytes, out: _ValueList) -> None:
        """index_searchwild__all: every node below ``start`` spells a pattern (``arc`` plus
        ``start``'s prefix from ``skip`` on, then the labels down to it); a node with values whose
        pattern matches ``subkey`` adds them. Children come before their parent, in byte order."""
        buffer = bytearray(arc)
        buffer += start.prefix[skip:]
        seen = {start.offset}
        stack = [_Frame(start, 0)]
        while stack:
            frame = stack[-1]
            child = self._next_child(frame)
            if child is not None:
                self._enter(child, seen, buffer, stack, frame.next_char - 1)
                continue
            stack.pop()
            node = frame.node
            if node.values_at >= 0:
                values = self._values(node)
                if values:
                    pattern = bytes(buffer)
                    if 0 in pattern:  # fnmatch sees a C string
                        pattern = pattern[: pattern.index(0)]
                    matcher = _MATCHERS.get(pattern) or _matcher(pattern)
                    if matcher(subkey):
                        out.extend(values)
            del buffer[frame.mark :]

    def _next_child(self, frame: _Frame) -> Optional[_Node]:
        """The frame's next existing child, by ascending byte (its byte is next_char - 1)."""
        node = frame.node
        char = frame.next_char
        while char <= node.last:
            pointer = self._child_pointer(node, char)
            char += 1
            if pointer & NODE_MASK:
                frame.next_char = char
                return self._node(pointer)
        frame.next_char = char
        return None

    def _enter(self, child: _Node, seen: set[int], buffer: bytearray, stack: list[_Frame], arc: int) -> None:
        if child.offset in seen:
            raise self._fail(f"the node at {child.offset} is reached twice (the trie has a loop)")
        seen.add(child.offset)
        stack.append(_Frame(child, len(buffer)))
        buffer.append(arc)
        buffer += child.prefix
        if len(buffer) > MAX_KEY_LENGTH:
            raise self._fail(f"a key is longer than {MAX_KEY_LENGTH} bytes (the trie is corrupt)")

    # -- dump ------------------------------------------------------------------------------

    def items(self) -> Iterator[IndexItem]:
        """Every (key, value, priority) in index_dump order: a node's values (in the reader's
        order), then its children by ascending byte. ``modprobe -c`` prints these."""
        root = self._root_node()
        if root is None:
            return
        buffer = bytearray(root.prefix)
        seen = {root.offset}
        stack = [_Frame(root, 0)]
        for value in self._values(root):
            yield IndexItem(_text(buffer), value.value, value.priority)
        while stack:
            frame = stack[-1]
            child = self._next_child(frame)
            if child is None:
                stack.pop()
                del buffer[frame.mark :]
                continue
            self._enter(child, seen, buffer, stack, frame.next_char - 1)
            values = self._values(child)
            if values:
                key = _text(buffer)
                for value in values:
                    yield IndexItem(key, value.value, value.priority)

    def dump(self, prefix: str = "") -> Iterator[str]:
        """index_dump's lines: ``prefix + key + " " + value`` (no newline)."""
        for item in self.items():
            yield f"{prefix}{item.key} {item.value}"

    def to_dict(self) -> dict[str, list[tuple[int, str]]]:
        """The whole content as {key: [(priority, value), ...]}, for comparing two indexes by what
        they say rather than by layout (depmod v30 writes nodes post-order, v34 pre-order)."""
        content: dict[str, list[tuple[int, str]]] = {}
        for item in self.items():
            content.setdefault(item.key, []).append((item.priority, item.value))
        return content

    def __iter__(self) -> Iterator[IndexItem]:
        return self.items()


def decode_index(path: str, *, reader: ReaderKind = "mmap") -> dict[str, list[tuple[int, str]]]:
    """The canonical content of an index file (see :meth:`Index.to_dict`)."""
    with Index.open(path, reader=reader) as index:
        return index.to_dict()


# -- glibc fnmatch(3) with flags 0, in the C locale ----------------------------------------------
#
# libkmod calls fnmatch(pattern, key, 0) and kmod's tools never call setlocale, so patterns are
# matched byte by byte: '*' and '?' match any byte ('/' and a leading '.' included), a backslash
# quotes the next byte, and a bracket expression accepts '!' or '^' for negation, ranges by byte
# value, [:class:], [=c=] and [.c.]. Malformed brackets behave as glibc's fnmatch_loop.c does: an
# unterminated '[' that matches nothing is an ordinary '[' (its contents then read as pattern),
# while other malformations fail the match where they are reached.

_BACKSLASH, _COLON, _EQUALS, _PERIOD, _DASH, _RBRACKET = 0x5C, 0x3A, 0x3D, 0x2E, 0x2D, 0x5D
_EXCLAMATION, _CARET = 0x21, 0x5E
_CHAR_CLASS_MAX_LENGTH = 256


def _class_members(test: Callable[[int], bool]) -> frozenset[int]:
    return frozenset(byte for byte in range(128) if test(byte))


def _is_space(byte: int) -> bool:
    return byte == 32 or 9 <= byte <= 13


def _is_alnum(byte: int) -> bool:
    return chr(byte).isalnum()


_CLASSES: dict[bytes, frozenset[int]] = {
    b"alnum": _class_members(_is_alnum),
    b"alpha": _class_members(lambda b: chr(b).isalpha()),
    b"blank": _class_members(lambda b: b in (9, 32)),
    b"cntrl": _class_members(lambda b: b < 32 or b == 127),
    b"digit": _class_members(lambda b: 48 <= b <= 57),
    b"graph": _class_members(lambda b: 33 <= b <= 126),
    b"lower": _class_members(lambda b: 97 <= b <= 122),
    b"print": _class_members(lambda b: 32 <= b <= 126),
    b"punct": _class_members(lambda b: 33 <= b <= 126 and not _is_alnum(b)),
    b"space": _class_members(_is_space),
    b"upper": _class_members(lambda b: 65 <= b <= 90),
    b"xdigit": _class_members(lambda b: chr(b) in "0123456789abcdefABCDEF"),
}

# Outcomes of matching one byte against a bracket expression.
_FAIL, _MATCH, _LITERAL = 0, 1, 2


def _collating_symbol(at: Callable[[int], int], p: int) -> Optional[tuple[int, int]]:
    """Scan a ``[.x.]`` whose '.' is at ``p``: (position after ``.]``, symbol length), or None
    when the pattern ends first."""
    length = 0
    while True:
        p += 1
        c = at(p)
        if c == _PERIOD and at(p + 1) == _RBRACKET:
            return p + 2, length
        if c == 0:
            return None
        length += 1


def _bracket(pattern: bytes, start: int, byte: int) -> tuple[int, int]:
    """Match ``byte`` against the bracket expression whose '[' precedes ``start``.

    Returns (_MATCH, position after the expression), (_FAIL, 0), or (_LITERAL, 0) when the
    expression is unterminated and matched nothing, so that glibc reads its '[' literally.
    """
    size = len(pattern)

    def at(index: int) -> int:
        return pattern[index] if index < size else 0

    p = start
    negate = at(p) in (_EXCLAMATION, _CARET)
    if negate:
        p += 1
    c = at(p)
    p += 1
    matched = False
    while True:
        plain = False  # glibc's "normal_bracket": c is an ordinary member, maybe a range start
        ranged = False  # c is the byte after a member; a '-' there may start a range
        cold = 0
        if c == _BACKSLASH:
            if at(p) == 0:
                return _FAIL, 0
            c = at(p)
            p += 1
            plain = True
        elif c == _LBRACKET and at(p) == _COLON:
            startp = p
            name = bytearray()
            while True:
                if len(name) == _CHAR_CLASS_MAX_LENGTH:
                    return _FAIL, 0
                p += 1
                c = at(p)
                if c == _COLON and at(p + 1) == _RBRACKET:
                    p += 2
                    break
                if c < 0x61 or c >= 0x7A:  # not 'a' <= c < 'z': not a class name after all
                    p = startp
                    c = _LBRACKET
                    plain = True
                    break
                name.append(c)
            if not plain:
                members = _CLASSES.get(bytes(name))
                if members is None:
                    return _FAIL, 0
                if byte in members:
                    matched = True
                    break
                c = at(p)
                p += 1
        elif c == _LBRACKET and at(p) == _EQUALS:
            startp = p
            p += 1
            c = at(p)
            if c == 0:
                p, c, plain = startp, _LBRACKET, True
            else:
                symbol = c
                p += 1
                c = at(p)
                if c != _EQUALS or at(p + 1) != _RBRACKET:
                    p, c, plain = startp, _LBRACKET, True
                else:
                    p += 2
                    if byte == symbol:
                        matched = True
                        break
                    c = at(p)
                    p += 1
        elif c == 0:
            return _LITERAL, 0
        elif c == _LBRACKET and at(p) == _PERIOD:
            startp = p
            scanned = _collating_symbol(at, p)
            if scanned is None:
                return _FAIL, 0
            p, length = scanned
            is_range = at(p) == _DASH and at(p + 1) != 0
            if length != 1:
                return _FAIL, 0
            if not is_range and byte == at(startp + 1):
                matched = True
                break
            cold = at(startp + 1)
            c = at(p)
            p += 1
            ranged = True
        else:
            plain = True
        if plain:
            is_range = at(p) == _DASH and at(p + 1) != 0 and at(p + 1) != _RBRACKET
            if not is_range and c == byte:
                matched = True
                break
            cold = c
            c = at(p)
            p += 1
            ranged = True
        if ranged and c == _DASH and at(p) != _RBRACKET:
            cend = at(p)
            p += 1
            if cend == _LBRACKET and at(p) == _PERIOD:
                startp = p
                scanned = _collating_symbol(at, p)
                if scanned is None:
                    return _FAIL, 0
                p, length = scanned
                if length != 1:
                    return _FAIL, 0
                cend = at(startp + 1)
            else:
                if cend == _BACKSLASH:
                    cend = at(p)
                    p += 1
                if cend == 0:
                    return _FAIL, 0
            if cold <= byte <= cend:
                matched = True
                break
            c = at(p)
            p += 1
        if c == _RBRACKET:
            break
    if not matched:
        return (_MATCH, p) if negate else (_FAIL, 0)
    # Skip the rest of the expression that already matched.
    while True:
        c = at(p)
        p += 1
        if c == _RBRACKET:
            break
        if c == 0:
            return _LITERAL, 0
        if c == _BACKSLASH:
            if at(p) == 0:
                return _FAIL, 0
            p += 1
        elif c == _LBRACKET and at(p) == _COLON:
            startp = p
            length = 0
            while True:
                p += 1
                c = at(p)
                length += 1
                if length == _CHAR_CLASS_MAX_LENGTH:
                    return _FAIL, 0
                if c == _COLON and at(p + 1) == _RBRACKET:
                    break
                if c < 0x61 or c >= 0x7A:
                    p = startp - 2
                    break
            p += 2
        elif c == _LBRACKET and at(p) == _EQUALS:
            p += 1
            if at(p) == 0:
                return _FAIL, 0
            p += 1
            if at(p) != _EQUALS or at(p + 1) != _RBRACKET:
                return _FAIL, 0
            p += 2
        elif c == _LBRACKET and at(p) == _PERIOD:
            while True:
                p += 1
                c = at(p)
                if c == 0:
                    return _FAIL, 0
                if c == _PERIOD and at(p + 1) == _RBRACKET:
                    break
            p += 2
    return (_FAIL, 0) if negate else (_MATCH, p)


BracketMemo = dict[tuple[int, int], tuple[int, int]]
_BRACKET_MEMO_SIZE = 65536


def _match_from(
    pattern: bytes, p: int, string: bytes, n: int, ends: Optional[list[int]], memo: Optional[BracketMemo] = None
) -> bool:
    """glibc's internal_fnmatch from pattern[p:] and string[n:]. With ``ends``, reaching a '*'
    succeeds at once and records where (the caller then continues from there): each stretch
    between stars is matched at the leftmost place it fits, without backtracking into earlier
    stars. ``memo`` caches bracket outcomes by (position, byte) across calls."""
    plen, slen = len(pattern), len(string)
    while p < plen:
        c = pattern[p]
        p += 1
        if c == _QUESTION:
            if n == slen:
                return False
        elif c == _BACKSLASH:
            if p == plen:
                return False
            c = pattern[p]
            p += 1
            if n == slen or string[n] != c:
                return False
        elif c == _STAR:
            if ends is not None:
                ends[0], ends[1] = p - 1, n
                return True
            while p < plen and pattern[p] in (_QUESTION, _STAR):
                if pattern[p] == _QUESTION:
                    if n == slen:
                        return False
                    n += 1
                p += 1
            if p == plen:
                return True
            end = [-1, -1]
            found = False
            c = pattern[p]
            if c == _LBRACKET:
                for m in range(n, slen):
                    if _match_from(pattern, p, string, m, end, memo):
                        found = True
                        break
            else:
                if c == _BACKSLASH:
                    c = pattern[p + 1] if p + 1 < plen else 0
                for m in range(n, slen):
                    if string[m] == c and _match_from(pattern, p, string, m, end, memo):
                        found = True
                        break
            if not found:
                return False
            if end[0] < 0:
                return True
            p, n = end[0], end[1]
            continue
        elif c == _LBRACKET:
            if n == slen:
                return False
            if memo is None:
                outcome, after = _bracket(pattern, p, string[n])
            else:
                cached = memo.get((p, string[n]))
                if cached is None:
                    cached = _bracket(pattern, p, string[n])
                    if len(memo) < _BRACKET_MEMO_SIZE:
                        memo[p, string[n]] = cached
                outcome, after = cached
            if outcome == _FAIL:
                return False
            if outcome == _LITERAL:
                if string[n] != _LBRACKET:
                    return False
            else:
                p = after
        elif n == slen or string[n] != c:
            return False
        n += 1
    return n == slen


def fnmatch_bytes(pattern: bytes, string: bytes) -> bool:
    """fnmatch(pattern, string, 0) == 0 as glibc computes it in the C locale, on C strings."""
    return _matcher(pattern.split(b"\0", 1)[0])(string.split(b"\0", 1)[0])


def fnmatch_c(pattern: str, name: str) -> bool:
    """fnmatch(3) with flags 0 as libkmod calls it (see :func:`fnmatch_bytes`)."""
    return fnmatch_bytes(_key_bytes(pattern), _key_bytes(name))


Matcher = Callable[[bytes], bool]
_MATCHERS: dict[bytes, Matcher] = {}
_MATCHER_CACHE_SIZE = 65536


def _never(_string: bytes) -> bool:
    return False


def _matcher(pattern: bytes) -> Matcher:
    """A fast, equivalent matcher for one pattern, cached."""
    matcher = _MATCHERS.get(pattern)
    if matcher is None:
        matcher = _compile(pattern)
        if len(_MATCHERS) >= _MATCHER_CACHE_SIZE:
            _MATCHERS.clear()
        _MATCHERS[pattern] = matcher
    return matcher


def _compile(pattern: bytes) -> Matcher:
    if not any(byte in pattern for byte in b"*?[\\"):
        return pattern.__eq__
    if not any(byte in pattern for byte in b"?[\\"):
        return _star_matcher(pattern.split(b"*"))
    # Writing a bracket expression as a byte class costs 255 evaluations: fine for real aliases,
    # not for a corrupt key full of '['; those go to the interpreter.
    segments = _regex_segments(pattern) if pattern.count(b"[") <= 32 else None
    if segments is None:
        memo: BracketMemo = {}
        return lambda string: _match_from(pattern, 0, string, 0, None, memo)
    if not segments:
        return _never
    regex = _segments_regex(segments)
    return lambda string: regex.match(string) is not None


def _star_matcher(parts: list[bytes]) -> Matcher:
    """Literal text with '*': fixed head and tail, middle parts at their leftmost place."""
    head, middle, tail = parts[0], parts[1:-1], parts[-1]
    minimum = len(head) + len(tail)

    def match(string: bytes) -> bool:
        if len(string) < minimum or not string.startswith(head) or not string.endswith(tail):
            return False
        position = len(head)
        limit = len(string) - len(tail)
        for part in middle:
            found = string.find(part, position, limit)
            if found < 0:
                return False
            position = found + len(part)
        return True

    return match


def _regex_segments(pattern: bytes) -> Optional[list[list[bytes]]]:
    """The pattern as regex atoms grouped into star-separated segments, or None if some bracket
    expression cannot be written as a byte class (the interpreter handles those). An empty list
    means the pattern can never match (glibc fails wherever such a pattern is reached)."""
    segments: list[list[bytes]] = [[]]
    p, size = 0, len(pattern)
    while p < size:
        c = pattern[p]
        p += 1
        if c == _STAR:
            if segments[-1] or len(segments) == 1:
                segments.append([])
            continue
        if c == _QUESTION:
            segments[-1].append(b".")
        elif c == _BACKSLASH:
            if p == size:
                return []
            segments[-1].append(re.escape(pattern[p : p + 1]))
            p += 1
        elif c == _LBRACKET:
            outcomes = [_bracket(pattern, p, byte) for byte in range(1, 256)]
            kinds = {kind for kind, _after in outcomes}
            if _LITERAL in kinds and _MATCH in kinds:
                return None
            if _LITERAL in kinds:
                # Unterminated: nothing can match it, so only '[' itself, read literally, and
                # the expression's contents are read as pattern.
                if outcomes[_LBRACKET - 1][0] != _LITERAL:
                    return []
                segments[-1].append(rb"\[")
                continue
            members = [byte for byte, (kind, _after) in enumerate(outcomes, 1) if kind == _MATCH]
            if not members:
                return []
            afters = {after for kind, after in outcomes if kind == _MATCH}
            if len(afters) != 1:
                return None
            segments[-1].append(_byte_class(members))
            p = afters.pop()
        else:
            segments[-1].append(re.escape(bytes((c,))))
    return segments


def _byte_class(members: list[int]) -> bytes:
    return b"[" + b"".join(b"\\x%02x" % byte for byte in members) + b"]"


def _segments_regex(segments: list[list[bytes]]) -> re.Pattern[bytes]:
    """A regex for star-separated segments that never backtracks into an earlier star: every
    middle segment is matched atomically at its leftmost place, as glibc does."""
    pieces = [b"".join(segments[0])]
    for number, segment in enumerate(segments[1:-1]):
        group = b"s%d" % number
        pieces.append(b"(?=(?P<" + group + b">.*?" + b"".join(segment) + b"))(?P=" + group + b")")
    if len(segments) > 1:
        pieces.append(b".*" + b"".join(segments[-1]))
    return re.compile(b"(?s:" + b"".join(pieces) + b")\\Z")
