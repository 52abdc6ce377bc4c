"""A strict, bounds-checked reader for the DER subset that PKCS#7 module signatures use."""

from __future__ import annotations

from typing import NamedTuple, Union

CLASS_UNIVERSAL = 0
CLASS_CONTEXT = 2
TAG_INTEGER = 2
TAG_OCTET_STRING = 4
TAG_NULL = 5
TAG_OID = 6
TAG_SEQUENCE = 16
TAG_SET = 17

_MAX_DEPTH = 32


class DerError(ValueError):
    """The bytes are not well-formed DER."""


class Element(NamedTuple):
    cls: int
    constructed: bool
    tag: int
    start: int  # first content byte
    end: int  # one past the last content byte


Buffer = Union[bytes, memoryview]


def read_element(data: Buffer, pos: int, limit: int) -> Element:
    """The element whose header starts at ``pos``; its content must end by ``limit``."""
    if pos >= limit:
        raise DerError("element header past the end")
    first = data[pos]
    pos += 1
    tag = first & 0x1F
    if tag == 0x1F:
        tag = 0
        for _ in range(4):
            if pos >= limit:
                raise DerError("truncated tag")
            byte = data[pos]
            pos += 1
            tag = (tag << 7) | (byte & 0x7F)
            if not byte & 0x80:
                break
        else:
            raise DerError("tag number too large")
    if pos >= limit:
        raise DerError("truncated length")
    length = data[pos]
    pos += 1
    if length & 0x80:
        count = length & 0x7F
        if count == 0:
            raise DerError("indefinite length")
        if count > 4:
            raise DerError("length too large")
        if pos + count > limit:
            raise DerError("truncated length")
        length = int.from_bytes(bytes(data[pos:pos + count]), "big")
        pos += count
    if pos + length > limit:
        raise DerError("content runs past its container")
    return Element(first >> 6, bool(first & 0x20), tag, pos, pos + length)


def children(data: Buffer, parent: Element) -> list[Element]:
    if not parent.constructed:
        raise DerError("expected a constructed element")
    items = []
    pos = parent.start
    while pos < parent.end:
        item = read_element(data, pos, parent.end)
        items.append(item)
        pos = item.end
    return items


def expect(element: Element, tag: int, cls: int = CLASS_UNIVERSAL) -> Element:
    if element.cls != cls or element.tag != tag:
        raise DerError(f"expected tag {cls}:{tag}, found {element.cls}:{element.tag}")
    return element


def oid_text(data: Buffer, element: Element) -> str:
    """An OBJECT IDENTIFIER in dotted form."""
    raw = bytes(data[element.start:element.end])
    if not raw or raw[-1] & 0x80:
        raise DerError("malformed object identifier")
    arcs: list[int] = []
    value = 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(arc) for arc in head + arcs[1:])
