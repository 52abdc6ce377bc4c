"""A BER reader that accepts exactly what OpenSSL 3.0's ``d2i`` accepts for PKCS#7 messages.

libkmod reads a module's PKCS#7 signature with ``d2i_PKCS7_bio``: ``asn1_d2i_read_bio`` first
buffers one top-level element, then the template decoder (``crypto/asn1/tasn_dec.c``) walks it
with the ASN.1 templates of ``pk7_asn1.c``, ``x_name.c``, ``x_algor.c``, ``x_attrib.c``,
``x_x509.c`` and ``x_crl.c``. That decoder is BER, not DER: indefinite lengths, constructed
strings and non-minimal lengths are accepted; it also has quirks of its own (``SET OF`` headers
need not be constructed, at most 30 nested items, pieces of a constructed string at most 5 levels
deep, names must convert to UTF-8, a header read from the input must fit in 10 bytes). This module
mirrors those rules, and the templates, so the same bytes are accepted or rejected.

Every read is bounds-checked against the enclosing element; malformed input raises
:class:`DerError` and nothing else. Work and memory are linear in the input size.

Known simplification: certificates and CRLs embedded in a SignedData (module signing never
writes any) are checked against their ASN.1 structure only, not OpenSSL's post-decode callbacks.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple, Union

UNIVERSAL = 0x00
CONTEXT = 0x80

# Universal tag numbers, and OpenSSL's pseudo types for ANY and for non-universal classes.
EOC, BOOLEAN, INTEGER, BIT_STRING, OCTET_STRING, NULL, OBJECT = 0, 1, 2, 3, 4, 5, 6
ENUMERATED, UTF8STRING, SEQUENCE, SET = 10, 12, 16, 17
NUMERICSTRING, PRINTABLESTRING, T61STRING, IA5STRING = 18, 19, 20, 22
UTCTIME, GENERALIZEDTIME, VISIBLESTRING, UNIVERSALSTRING, BMPSTRING = 23, 24, 26, 28, 30
OTHER = -3
ANY = -4

_INT_MAX = 2**31 - 1
_LONG_MAX = 2**63 - 1
_UINT32_MAX = 2**32 - 1
_MAX_CONSTRUCTED_NEST = 30  # ASN1_MAX_CONSTRUCTED_NEST
_MAX_STRING_NEST = 5  # ASN1_MAX_STRING_NEST
# asn1_d2i_read_bio reads a header's bytes this many at a time: 10 (2 + sizeof(long)) in OpenSSL
# 3.0.22 as Debian ships it (3.0.22-1~deb12u2); 3.0.19 read 8 (and wanted a byte after a long-form
# length), so a top-level length in 6 to 8 bytes was rejected there and is accepted now.
_HEADER_SIZE = 10
_NAME_MAX = 1024 * 1024  # X509_NAME_MAX

# ASN1_tag2bit: which multi-string masks accept a universal tag (tags above 30 map to 0).
_TAG2BIT = (
    0,
    0,
    0,
    0x0400,
    0x0200,
    0,
    0,
    0x1000,
    0x1000,
    0x1000,
    0,
    0x1000,
    0x2000,
    0x1000,
    0x1000,
    0x1000,
    0x10000,
    0,
    0x0001,
    0x0002,
    0x0004,
    0x0008,
    0x0010,
    0x4000,
    0x8000,
    0x0020,
    0x0040,
    0x0080,
    0x0100,
    0x1000,
    0x0800,
)
_B_PRINTABLE = 0x0001 | 0x0002 | 0x0004 | 0x0010 | 0x0400 | 0x0100 | 0x0800 | 0x2000 | 0x10000 | 0x1000
_B_TIME = 0x4000 | 0x8000
_MASK_CANON = 0x2000 | 0x0800 | 0x0100 | 0x0002 | 0x0004 | 0x0010 | 0x0040


class DerError(ValueError):
    """The bytes are not an encoding OpenSSL's decoder accepts."""

    def __init__(self, problem: str, offset: int) -> None:
        super().__init__(f"{problem} at offset {offset}")
        self.problem = problem
        self.offset = offset


class Header(NamedTuple):
    start: int  # first byte of the identifier
    content: int  # first content byte
    length: int  # content length; for an indefinite length, the bytes left in the container
    tag: int
    cls: int  # UNIVERSAL, 0x40, CONTEXT or 0xC0
    constructed: bool
    indefinite: bool


class Value(NamedTuple):
    """A decoded primitive (or ANY) as OpenSSL stores it in an ASN1_STRING-like object."""

    utype: int  # universal tag, OTHER, or the tag of an ANY
    data: bytes  # content octets; SEQUENCE/SET/OTHER keep their whole encoding
    span: Optional[Tuple[int, int]]  # where ``data`` lies in the input, when it is one piece

    def text_bytes(self) -> bytes:
        """``ASN1_STRING_get0_data`` as a C string: the data up to its first NUL.

        A BIT STRING's data is its bits with the unused ones cleared; OpenSSL stores it without
        a terminating NUL, so C code reading it as a string runs on into the heap. Here it ends
        with the data.
        """
        data = self.data
        if self.utype == BIT_STRING:
            unused = data[0]
            data = data[1:]
            if data:
                data = data[:-1] + bytes([data[-1] & (0xFF << unused) & 0xFF])
        end = data.find(b"\0")
        return data if end < 0 else data[:end]


class Record(NamedTuple):
    """A decoded SEQUENCE: field name to value (None for an absent OPTIONAL field)."""

    fields: Dict[str, Optional[Node]]


class Items(NamedTuple):
    """A decoded SET OF or SEQUENCE OF."""

    items: List[Node]


class Name(NamedTuple):
    """A decoded X509_NAME: its entries flattened in order, as (OID content, value)."""

    entries: List[Tuple[bytes, Value]]


Node = Union[Value, Record, Items, Name]


# --- ASN.1 templates, after OpenSSL's ASN1_ITEM / ASN1_TEMPLATE -----------------------------


class Item:
    """One ASN1_ITEM. Subclasses say how it decodes."""

    def __init__(self, name: str) -> None:
        self.name = name


class Primitive(Item):
    def __init__(self, name: str, utype: int) -> None:
        super().__init__(name)
        self.utype = utype


class MultiString(Item):
    def __init__(self, name: str, mask: int) -> None:
        super().__init__(name)
        self.mask = mask


class Sequence(Item):
    def __init__(self, name: str, fields: Tuple[Field, ...] = ()) -> None:
        super().__init__(name)
        self.fields = fields


class ItemTemplate(Item):
    """An item that is just a template (used for X509_NAME's SEQUENCE OF SET OF)."""

    def __init__(self, name: str, template: Field) -> None:
        super().__init__(name)
        self.template = template


class Extern(Item):
    """X509_NAME and X509_PUBKEY: decoded by their own function, with a fresh depth count."""

    def __init__(self, name: str, inner: Item) -> None:
        super().__init__(name)
        self.inner = inner


class Field:
    """One ASN1_TEMPLATE: a field of a SEQUENCE, with its tagging and OPTIONAL/SET OF flags."""

    def __init__(
        self,
        name: str,
        item: Item,
        *,
        optional: bool = False,
        explicit: Optional[int] = None,
        implicit: Optional[int] = None,
        set_of: bool = False,
        sequence_of: bool = False,
        adb: Optional[Adb] = None,
    ) -> None:
        self.name = name
        self.item = item
        self.optional = optional
        self.explicit = explicit
        self.implicit = implicit
        self.set_of = set_of
        self.sequence_of = sequence_of
        self.adb = adb


class Adb:
    """ANY DEFINED BY: the template is chosen by the OID in an earlier field."""

    def __init__(self, selector: str, table: Dict[bytes, Field], default: Field) -> None:
        self.selector = selector
        self.table = table
        self.default = default


# --- the decoder -------------------------------------------------------------------------


def get_object(data: bytes, pos: int, omax: int) -> Tuple[Header, bool]:
    """ASN1_get_object: the header at ``pos`` with ``omax`` bytes available, and whether its
    content runs past them ("too long"). A malformed header raises."""
    if omax <= 0:
        raise DerError("no room for a header", pos)
    first = data[pos]
    constructed = bool(first & 0x20)
    cls = first & 0xC0
    p = pos + 1
    left = omax - 1
    if first & 0x1F == 0x1F:
        if left == 0:
            raise DerError("truncated tag", pos)
        tag = 0
        while data[p] & 0x80:
            tag = (tag << 7) | (data[p] & 0x7F)
            p += 1
            left -= 1
            if left == 0 or tag > (_INT_MAX >> 7):
                raise DerError("bad tag number", pos)
        tag = (tag << 7) | (data[p] & 0x7F)
        p += 1
        left -= 1
    else:
        tag = first & 0x1F
    if left == 0:
        raise DerError("truncated header", pos)
    # asn1_get_length
    byte = data[p]
    p += 1
    left -= 1
    indefinite = False
    if byte == 0x80:
        indefinite = True
        length = 0
    elif byte & 0x80:
        count = byte & 0x7F
        if left < count:
            raise DerError("truncated length", pos)
        while count > 0 and data[p] == 0:
            p += 1
            count -= 1
        if count > 8:
            raise DerError("length too large", pos)
        length = int.from_bytes(data[p : p + count], "big")
        p += count
        if length > _LONG_MAX:
            raise DerError("length too large", pos)
    else:
        length = byte
    if indefinite and not constructed:
        raise DerError("indefinite length on a primitive element", pos)
    header = Header(pos, p, length, tag, cls, constructed, indefinite)
    return header, length > omax - (p - pos)


def read_bio_extent(data: bytes) -> int:
    """How many bytes ``asn1_d2i_read_bio`` buffers for the first element of ``data``: headers
    are parsed from at most ``_HEADER_SIZE`` buffered bytes, indefinite lengths are followed to their EOC, and
    content must be fully present. Trailing bytes after the element are never read."""
    size = len(data)
    buffered = off = eos = 0
    want = _HEADER_SIZE
    while True:
        if want >= buffered - off:
            want -= buffered - off
            buffered += min(want, size - buffered)
        header, _too_long = get_object(data, off, buffered - off)
        off = header.content
        if header.indefinite:
            if eos == _UINT32_MAX:
                raise DerError("too many nested indefinite lengths", header.start)
            eos += 1
            want = _HEADER_SIZE
            continue
        if eos and header.length == 0 and header.tag == EOC:
            eos -= 1
            if eos == 0:
                break
            want = _HEADER_SIZE
            continue
        if header.length > buffered - off:
            missing = header.length - (buffered - off)
            if missing > _INT_MAX or buffered + missing > size:
                raise DerError("element runs past the end of the data", header.start)
            buffered += missing
        off += header.length
        if eos == 0:
            break
        want = _HEADER_SIZE
    if off > _INT_MAX:
        raise DerError("element too long", 0)
    return off


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.data = data

    # asn1_check_tlen
    def tlen(self, pos: int, length: int, exptag: int, expclass: int, opt: bool) -> Optional[Header]:
        if length <= 0:
            raise DerError("element expected but none left", pos)
        header, too_long = get_object(self.data, pos, length)
        if too_long:
            raise DerError("element runs past its container", pos)
        if exptag >= 0 and (exptag != header.tag or expclass != header.cls):
            if opt:
                return None
            raise DerError(f"wrong tag (expected {expclass:#x}:{exptag}, found {header.cls:#x}:{header.tag})", pos)
        if header.indefinite:
            header = header._replace(length=length - (header.content - pos))
        return header

    def eoc(self, pos: int, length: int) -> bool:
        return length >= 2 and self.data[pos] == 0 and self.data[pos + 1] == 0

    # asn1_item_embed_d2i
    def item(
        self, item: Item, pos: int, length: int, tag: int, aclass: int, opt: bool, depth: int
    ) -> Optional[Tuple[Node, int]]:
        if length <= 0:
            raise DerError(f"{item.name} expected but none left", pos)
        depth += 1
        if depth > _MAX_CONSTRUCTED_NEST:
            raise DerError("nested too deep", pos)
        if isinstance(item, ItemTemplate):
            if tag != -1 or opt:
                raise DerError("illegal options on item template", pos)
            return self.template(item.template, pos, length, opt, depth)
        if isinstance(item, Primitive):
            return self.primitive(item.utype, pos, length, tag, aclass, opt)
        if isinstance(item, MultiString):
            header = self.tlen(pos, length, -1, 0, True)
            assert header is not None
            if header.cls != UNIVERSAL or not (header.tag <= 30 and _TAG2BIT[header.tag] & item.mask):
                if opt:
                    return None
                raise DerError(f"{item.name} of the wrong type ({header.cls:#x}:{header.tag})", pos)
            return self.primitive(header.tag, pos, length, -1, 0, False)
        if isinstance(item, Extern):
            return self.extern(item, pos, length, tag, aclass, opt)
        if isinstance(item, Sequence):
            return self.sequence(item, pos, length, tag, aclass, opt, depth)
        raise TypeError(item)  # pragma: no cover - templates are fixed

    def sequence(
        self, item: Sequence, pos: int, length: int, tag: int, aclass: int, opt: bool, depth: int
    ) -> Optional[Tuple[Node, int]]:
        if tag == -1:
            tag, aclass = SEQUENCE, UNIVERSAL
        header = self.tlen(pos, length, tag, aclass, opt)
        if header is None:
            return None
        if not header.constructed:
            raise DerError(f"{item.name} is not constructed", pos)
        p, left, seq_eoc = header.content, header.length, header.indefinite
        values: Dict[str, Optional[Node]] = {}
        fields = item.fields
        index = 0
        while index < len(fields):
            field = self.resolve(fields[index], values)
            if not left:
                break
            if self.eoc(p, left):
                if not seq_eoc:
                    raise DerError("unexpected end-of-contents", p)
                p += 2
                left -= 2
                seq_eoc = False
                break
            isopt = False if index == len(fields) - 1 else field.optional
            result = self.template(field, p, left, isopt, depth)
            index += 1
            if result is None:
                values[field.name] = None
                continue
            values[field.name], end = result
            left -= end - p
            p = end
        if seq_eoc:
            if not self.eoc(p, left):
                raise DerError(f"missing end-of-contents in {item.name}", p)
            p += 2
        elif not header.indefinite and left:
            raise DerError(f"{item.name} has data after its last field", p)
        for field in fields[index:]:
            field = self.resolve(field, values)
            if not field.optional:
                raise DerError(f"{item.name} is missing {field.name}", p)
            values[field.name] = None
        return Record(values), p

    def resolve(self, field: Field, values: Dict[str, Optional[Node]]) -> Field:
        if field.adb is None:
            return field
        selector = values.get(field.adb.selector)
        if not isinstance(selector, Value):
            raise DerError("ANY DEFINED BY without its selector", 0)  # pragma: no cover
        return field.adb.table.get(selector.data, field.adb.default)

    # asn1_template_ex_d2i
    def template(self, field: Field, pos: int, length: int, opt: bool, depth: int) -> Optional[Tuple[Node, int]]:
        if field.explicit is None:
            return self.template_noexp(field, pos, length, opt, depth)
        header = self.tlen(pos, length, field.explicit, CONTEXT, opt)
        if header is None:
            return None
        if not header.constructed:
            raise DerError(f"explicit tag of {field.name} is not constructed", pos)
        result = self.template_noexp(field, header.content, header.length, False, depth)
        assert result is not None
        node, end = result
        left = header.length - (end - header.content)
        if header.indefinite:
            if not self.eoc(end, left):
                raise DerError(f"missing end-of-contents after {field.name}", end)
            end += 2
        elif left:
            raise DerError(f"explicit tag of {field.name} has data after it", end)
        return node, end

    # asn1_template_noexp_d2i
    def template_noexp(self, field: Field, pos: int, length: int, opt: bool, depth: int) -> Optional[Tuple[Node, int]]:
        if field.set_of or field.sequence_of:
            if field.implicit is not None:
                sktag, skclass = field.implicit, CONTEXT
            else:
                sktag, skclass = (SET if field.set_of else SEQUENCE), UNIVERSAL
            header = self.tlen(pos, length, sktag, skclass, opt)  # constructed-ness is not checked
            if header is None:
                return None
            p, left, sk_eoc = header.content, header.length, header.indefinite
            items: List[Node] = []
            while left > 0:
                if self.eoc(p, left):
                    if not sk_eoc:
                        raise DerError("unexpected end-of-contents", p)
                    p += 2
                    sk_eoc = False
                    break
                result = self.item(field.item, p, left, -1, 0, False, depth)
                assert result is not None
                node, end = result
                left -= end - p
                p = end
                items.append(node)
            if sk_eoc:
                raise DerError(f"missing end-of-contents in {field.name}", p)
            return Items(items), p
        if field.implicit is not None:
            return self.item(field.item, pos, length, field.implicit, CONTEXT, opt, depth)
        return self.item(field.item, pos, length, -1, 0, opt, depth)

    # asn1_d2i_ex_primitive + asn1_ex_c2i
    def primitive(
        self, utype: int, pos: int, length: int, tag: int, aclass: int, opt: bool
    ) -> Optional[Tuple[Node, int]]:
        if utype == ANY:
            if tag >= 0 or opt:
                raise DerError("illegal tagged or optional ANY", pos)  # pragma: no cover
            header = self.tlen(pos, length, -1, 0, False)
            assert header is not None
            utype = header.tag if header.cls == UNIVERSAL else OTHER
        if tag == -1:
            tag, aclass = utype, UNIVERSAL
        header = self.tlen(pos, length, tag, aclass, opt)
        if header is None:
            return None
        data = self.data
        span: Optional[Tuple[int, int]] = None
        if utype in (SEQUENCE, SET, OTHER):
            if utype != OTHER and not header.constructed:
                raise DerError("SEQUENCE or SET is not constructed", pos)
            end = self.find_end(header.content, header.length) if header.indefinite else header.content + header.length
            content = data[pos:end]
        elif header.constructed:
            if utype in (NULL, BOOLEAN, OBJECT, INTEGER, ENUMERATED):
                raise DerError("constructed encoding of a primitive type", pos)
            parts: List[bytes] = []
            end = self.collect(parts, header.content, header.length, header.indefinite, 0)
            content = b"".join(parts)
        else:
            end = header.content + header.length
            content = data[header.content : end]
            span = (header.content, end)
        _check_content(utype, content, pos)
        return Value(utype, content, span), end

    # asn1_find_end
    def find_end(self, pos: int, length: int) -> int:
        expected = 1
        p = pos
        while length > 0:
            if self.eoc(p, length):
                p += 2
                expected -= 1
                if expected == 0:
                    break
                length -= 2
                continue
            header = self.tlen(p, length, -1, 0, False)
            assert header is not None
            if header.indefinite:
                if expected == _UINT32_MAX:
                    raise DerError("too many nested indefinite lengths", p)  # pragma: no cover
                expected += 1
                end = header.content
            else:
                end = header.content + header.length
            length -= end - p
            p = end
        if expected:
            raise DerError("missing end-of-contents", p)
        return p

    # asn1_collect: the pieces of a constructed string, whatever their tags.
    def collect(self, parts: List[bytes], pos: int, length: int, indefinite: bool, depth: int) -> int:
        p = pos
        while length > 0:
            start = p
            if self.eoc(p, length):
                if not indefinite:
                    raise DerError("unexpected end-of-contents", p)
                p += 2
                indefinite = False
                break
            header = self.tlen(p, length, -1, UNIVERSAL, False)
            assert header is not None
            if header.constructed:
                if depth >= _MAX_STRING_NEST:
                    raise DerError("constructed string nested too deep", p)
                p = self.collect(parts, header.content, header.length, header.indefinite, depth + 1)
            else:
                p = header.content + header.length
                parts.append(self.data[header.content : p])
            length -= p - start
        if indefinite:
            raise DerError("missing end-of-contents", p)
        return p

    def extern(
        self, item: Extern, pos: int, length: int, tag: int, aclass: int, opt: bool
    ) -> Optional[Tuple[Node, int]]:
        if item is X509_NAME:
            # x509_name_ex_d2i: decode SEQUENCE OF SET OF entry, then canonicalise (which
            # converts every string entry to UTF-8 and fails where that fails).
            result = self.item(item.inner, pos, min(length, _NAME_MAX), tag, aclass, opt, 0)
            if result is None:
                return None
            node, end = result
            entries: List[Tuple[bytes, Value]] = []
            assert isinstance(node, Items)
            for rdn in node.items:
                assert isinstance(rdn, Items)
                for entry in rdn.items:
                    assert isinstance(entry, Record)
                    oid, value = entry.fields["object"], entry.fields["value"]
                    assert isinstance(oid, Value) and isinstance(value, Value)
                    _check_canonical(value, pos)
                    entries.append((oid.data, value))
            return Name(entries), end
        return self.item(item.inner, pos, length, tag, aclass, opt, 0)


def _check_content(utype: int, content: bytes, pos: int) -> None:
    """The content checks of asn1_ex_c2i (OpenSSL 3.0: no minimum length for times)."""
    if utype == OBJECT:
        if not content or content[-1] & 0x80:
            raise DerError("malformed object identifier", pos)
        if content[0] == 0x80 or _oid_has_padding(content):
            raise DerError("malformed object identifier", pos)
    elif utype == NULL:
        if content:
            raise DerError("NULL with content", pos)
    elif utype == BOOLEAN:
        if len(content) != 1:
            raise DerError("BOOLEAN is not one byte", pos)
    elif utype == BIT_STRING:
        if not content or content[0] > 7:
            raise DerError("malformed BIT STRING", pos)
    elif utype in (INTEGER, ENUMERATED):
        if not content:
            raise DerError("empty INTEGER", pos)
        if len(content) > 1:
            first, second = content[0], content[1]
            if (first == 0 and not second & 0x80) or (first == 0xFF and second & 0x80):
                raise DerError("INTEGER is not minimally encoded", pos)
    elif utype == BMPSTRING and len(content) & 1:
        raise DerError("BMPString of odd length", pos)
    elif utype == UNIVERSALSTRING and len(content) & 3:
        raise DerError("UniversalString length is not a multiple of 4", pos)


def _oid_has_padding(content: bytes) -> bool:
    """A sub-identifier that starts with 0x80 (a byte 0x80 not preceded by a continuation)."""
    index = content.find(b"\x80", 1)
    while index > 0:
        if not content[index - 1] & 0x80:
            return True
        index = content.find(b"\x80", index + 1)
    return False


def _check_canonical(value: Value, pos: int) -> None:
    """asn1_string_canon: string types OpenSSL canonicalises must convert to UTF-8."""
    utype = value.utype
    if not (0 <= utype <= 30 and _TAG2BIT[utype] & _MASK_CANON):
        return
    data = value.data
    try:
        if utype == UTF8STRING:
            data.decode("utf-8")
        elif utype == BMPSTRING:
            # OpenSSL checks each UCS-2 unit on its own, so even paired surrogates fail.
            if any(0xD8 <= high <= 0xDF for high in data[0::2]):
                raise UnicodeError
        elif utype == UNIVERSALSTRING:
            data.decode("utf-32-be")  # rejects surrogates and values above U+10FFFF
    except UnicodeError:
        raise DerError("name entry is not a valid string of its type", pos) from None


# --- the templates of the types a PKCS#7 SignedData can contain ----------------------------

ASN1_INTEGER = Primitive("INTEGER", INTEGER)
ASN1_OBJECT = Primitive("OBJECT", OBJECT)
ASN1_OCTET_STRING = Primitive("OCTET STRING", OCTET_STRING)
ASN1_BIT_STRING = Primitive("BIT STRING", BIT_STRING)
ASN1_BOOLEAN = Primitive("BOOLEAN", BOOLEAN)
ASN1_ANY = Primitive("ANY", ANY)
ASN1_PRINTABLE = MultiString("ASN1_PRINTABLE", _B_PRINTABLE)
ASN1_TIME = MultiString("ASN1_TIME", _B_TIME)

X509_NAME_ENTRY = Sequence(
    "X509_NAME_ENTRY",
    (
        Field("object", ASN1_OBJECT),
        Field("value", ASN1_PRINTABLE),
    ),
)
X509_NAME_ENTRIES = ItemTemplate("RDNS", Field("RDNS", X509_NAME_ENTRY, set_of=True))
X509_NAME_INTERNAL = ItemTemplate("Name", Field("Name", X509_NAME_ENTRIES, sequence_of=True))
X509_NAME = Extern("X509_NAME", X509_NAME_INTERNAL)

X509_ALGOR = Sequence(
    "X509_ALGOR",
    (
        Field("algorithm", ASN1_OBJECT),
        Field("parameter", ASN1_ANY, optional=True),
    ),
)
X509_ATTRIBUTE = Sequence(
    "X509_ATTRIBUTE",
    (
        Field("object", ASN1_OBJECT),
        Field("set", ASN1_ANY, set_of=True),
    ),
)
X509_EXTENSION = Sequence(
    "X509_EXTENSION",
    (
        Field("object", ASN1_OBJECT),
        Field("critical", ASN1_BOOLEAN, optional=True),
        Field("value", ASN1_OCTET_STRING),
    ),
)
X509_VAL = Sequence("X509_VAL", (Field("notBefore", ASN1_TIME), Field("notAfter", ASN1_TIME)))
X509_PUBKEY = Extern(
    "X509_PUBKEY",
    Sequence(
        "X509_PUBKEY",
        (
            Field("algor", X509_ALGOR),
            Field("public_key", ASN1_BIT_STRING),
        ),
    ),
)
X509_CINF = Sequence(
    "X509_CINF",
    (
        Field("version", ASN1_INTEGER, explicit=0, optional=True),
        Field("serialNumber", ASN1_INTEGER),
        Field("signature", X509_ALGOR),
        Field("issuer", X509_NAME),
        Field("validity", X509_VAL),
        Field("subject", X509_NAME),
        Field("key", X509_PUBKEY),
        Field("issuerUID", ASN1_BIT_STRING, implicit=1, optional=True),
        Field("subjectUID", ASN1_BIT_STRING, implicit=2, optional=True),
        Field("extensions", X509_EXTENSION, explicit=3, sequence_of=True, optional=True),
    ),
)
X509 = Sequence(
    "X509",
    (
        Field("cert_info", X509_CINF),
        Field("sig_alg", X509_ALGOR),
        Field("signature", ASN1_BIT_STRING),
    ),
)
X509_REVOKED = Sequence(
    "X509_REVOKED",
    (
        Field("serialNumber", ASN1_INTEGER),
        Field("revocationDate", ASN1_TIME),
        Field("extensions", X509_EXTENSION, sequence_of=True, optional=True),
    ),
)
X509_CRL_INFO = Sequence(
    "X509_CRL_INFO",
    (
        Field("version", ASN1_INTEGER, optional=True),
        Field("sig_alg", X509_ALGOR),
        Field("issuer", X509_NAME),
        Field("lastUpdate", ASN1_TIME),
        Field("nextUpdate", ASN1_TIME, optional=True),
        Field("revoked", X509_REVOKED, sequence_of=True, optional=True),
        Field("extensions", X509_EXTENSION, explicit=0, sequence_of=True, optional=True),
    ),
)
X509_CRL = Sequence(
    "X509_CRL",
    (
        Field("crl", X509_CRL_INFO),
        Field("sig_alg", X509_ALGOR),
        Field("signature", ASN1_BIT_STRING),
    ),
)

PKCS7 = Sequence("PKCS7")  # fields below: SignedData and DigestedData contain a PKCS7 again
PKCS7_ISSUER_AND_SERIAL = Sequence(
    "PKCS7_ISSUER_AND_SERIAL",
    (
        Field("issuer", X509_NAME),
        Field("serial", ASN1_INTEGER),
    ),
)
PKCS7_SIGNER_INFO = Sequence(
    "PKCS7_SIGNER_INFO",
    (
        Field("version", ASN1_INTEGER),
        Field("issuer_and_serial", PKCS7_ISSUER_AND_SERIAL),
        Field("digest_alg", X509_ALGOR),
        Field("auth_attr", X509_ATTRIBUTE, implicit=0, sequence_of=True, optional=True),
        Field("digest_enc_alg", X509_ALGOR),
        Field("enc_digest", ASN1_OCTET_STRING),
        Field("unauth_attr", X509_ATTRIBUTE, implicit=1, set_of=True, optional=True),
    ),
)
PKCS7_SIGNED = Sequence(
    "PKCS7_SIGNED",
    (
        Field("version", ASN1_INTEGER),
        Field("md_algs", X509_ALGOR, set_of=True),
        Field("contents", PKCS7),
        Field("cert", X509, implicit=0, sequence_of=True, optional=True),
        Field("crl", X509_CRL, implicit=1, set_of=True, optional=True),
        Field("signer_info", PKCS7_SIGNER_INFO, set_of=True),
    ),
)
PKCS7_RECIP_INFO = Sequence(
    "PKCS7_RECIP_INFO",
    (
        Field("version", ASN1_INTEGER),
        Field("issuer_and_serial", PKCS7_ISSUER_AND_SERIAL),
        Field("key_enc_algor", X509_ALGOR),
        Field("enc_key", ASN1_OCTET_STRING),
    ),
)
PKCS7_ENC_CONTENT = Sequence(
    "PKCS7_ENC_CONTENT",
    (
        Field("content_type", ASN1_OBJECT),
        Field("algorithm", X509_ALGOR),
        Field("enc_data", ASN1_OCTET_STRING, implicit=0, optional=True),
    ),
)
PKCS7_ENVELOPE = Sequence(
    "PKCS7_ENVELOPE",
    (
        Field("version", ASN1_INTEGER),
        Field("recipientinfo", PKCS7_RECIP_INFO, set_of=True),
        Field("enc_data", PKCS7_ENC_CONTENT),
    ),
)
PKCS7_SIGN_ENVELOPE = Sequence(
    "PKCS7_SIGN_ENVELOPE",
    (
        Field("version", ASN1_INTEGER),
        Field("recipientinfo", PKCS7_RECIP_INFO, set_of=True),
        Field("md_algs", X509_ALGOR, set_of=True),
        Field("enc_data", PKCS7_ENC_CONTENT),
        Field("cert", X509, implicit=0, set_of=True, optional=True),
        Field("crl", X509_CRL, implicit=1, set_of=True, optional=True),
        Field("signer_info", PKCS7_SIGNER_INFO, set_of=True),
    ),
)
PKCS7_ENCRYPT = Sequence(
    "PKCS7_ENCRYPT",
    (
        Field("version", ASN1_INTEGER),
        Field("enc_data", PKCS7_ENC_CONTENT),
    ),
)
PKCS7_DIGEST = Sequence(
    "PKCS7_DIGEST",
    (
        Field("version", ASN1_INTEGER),
        Field("md", X509_ALGOR),
        Field("contents", PKCS7),
        Field("digest", ASN1_OCTET_STRING),
    ),
)

_PKCS7_OID = bytes.fromhex("2a864886f70d0107")  # 1.2.840.113549.1.7
OID_DATA = _PKCS7_OID + b"\x01"
OID_SIGNED = _PKCS7_OID + b"\x02"
OID_ENVELOPED = _PKCS7_OID + b"\x03"
OID_SIGNED_AND_ENVELOPED = _PKCS7_OID + b"\x04"
OID_DIGEST = _PKCS7_OID + b"\x05"
OID_ENCRYPTED = _PKCS7_OID + b"\x06"

PKCS7.fields = (
    Field("type", ASN1_OBJECT),
    Field(
        "d",
        ASN1_ANY,
        adb=Adb(
            "type",
            {
                OID_DATA: Field("d", ASN1_OCTET_STRING, explicit=0, optional=True),
                OID_SIGNED: Field("d", PKCS7_SIGNED, explicit=0, optional=True),
                OID_ENVELOPED: Field("d", PKCS7_ENVELOPE, explicit=0, optional=True),
                OID_SIGNED_AND_ENVELOPED: Field("d", PKCS7_SIGN_ENVELOPE, explicit=0, optional=True),
                OID_DIGEST: Field("d", PKCS7_DIGEST, explicit=0, optional=True),
                OID_ENCRYPTED: Field("d", PKCS7_ENCRYPT, explicit=0, optional=True),
            },
            Field("d", ASN1_ANY, explicit=0, optional=True),
        ),
    ),
)


def d2i(item: Item, data: bytes, length: int) -> Node:
    """ASN1_item_d2i: decode ``item`` from the first ``length`` bytes of ``data``."""
    if length > len(data):
        raise DerError("length past the end of the data", 0)  # pragma: no cover
    result = _Decoder(data).item(item, 0, length, -1, 0, False, 0)
    assert result is not None
    return result[0]


def d2i_pkcs7_bio(data: bytes) -> Record:
    """d2i_PKCS7_bio over a memory BIO holding ``data``."""
    node = d2i(PKCS7, data, read_bio_extent(data))
    assert isinstance(node, Record)
    return node


def oid_text(content: bytes) -> str:
    """An OBJECT IDENTIFIER's content octets in dotted form (for messages; an absurdly long
    one is shown as hex rather than as numbers of thousands of digits)."""
    if len(content) > 64:
        return f"{content[:32].hex()}... ({len(content)}-byte OID)"
    arcs: List[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        return ""
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])
