"""kvc.kmod.index against kmod's own output: every index depmod (kmod 30) wrote for the real Debian
tree reads back as the text files beside it, glibc's fnmatch agrees with ours, synthetic indexes in
both on-disk layouts round-trip, and corrupt indexes raise IndexFormatError only."""

from __future__ import annotations

import ctypes
import locale
import random
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvc.kmod.errors import IndexFormatError
from kvc.kmod.index import (
    INDEX_MAGIC,
    MAX_KEY_LENGTH,
    NODE_CHILDS,
    NODE_PREFIX,
    NODE_VALUES,
    Index,
    IndexItem,
    IndexValue,
    _compile,
    _match_from,
    decode_index,
    fnmatch_bytes,
    fnmatch_c,
    reinserted,
)
from support.debian_kernel import DebianKernel
from support.indexmodel import Content, build_index, concrete
from support.oracle import kmod_tool

# -- a test-side index writer (depmod's format) ---------------------------------------------------


def index_of(content: Content, layout: str = "post", reader: str = "mmap", root_prefix: bool = False) -> Index:
    return Index("<test>", build_index(content, layout, root_prefix), reader=reader)  # type: ignore[arg-type]


# -- glibc's fnmatch, the oracle ------------------------------------------------------------------

_libc = ctypes.CDLL("libc.so.6")
_libc.fnmatch.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
_libc.fnmatch.restype = ctypes.c_int


@contextmanager
def c_locale() -> Iterator[None]:
    """kmod's tools never call setlocale: compare in the C locale (Python sets LC_CTYPE)."""
    saved = {category: locale.setlocale(category) for category in (locale.LC_CTYPE, locale.LC_COLLATE)}
    try:
        for category in saved:
            locale.setlocale(category, "C")
        yield
    finally:
        for category, value in saved.items():
            locale.setlocale(category, value)


def glibc_fnmatch(pattern: bytes, string: bytes) -> bool:
    return int(_libc.fnmatch(pattern, string, 0)) == 0


PATTERN_PIECES = [bytes((b,)) for b in b"ab[]!^-*?\\:.=/z"] + [
    b"[:alpha:]",
    b"[:digit:]",
    b"[:upper:]",
    b"[:foo:]",
    b"[:space:]",
    b"[=a=]",
    b"[=",
    b"[.a.]",
    b"[.-.]",
    b"[.",
    b"[:",
    b"a-c",
    b"\xe9",
    b"[!a]",
    b"[^a]",
    b"[]a]",
    b"[a-]",
    b"[--z]",
    b"*?",
    b"\\*",
]
STRING_BYTES = b"ab[]!^-:.=/cz9A \t\xe9*?\\"


def random_pattern(rng: random.Random) -> bytes:
    return b"".join(rng.choice(PATTERN_PIECES) for _ in range(rng.randrange(0, 9)))


def random_string(rng: random.Random) -> bytes:
    return bytes(rng.choice(STRING_BYTES) for _ in range(rng.randrange(0, 7)))


def test_fnmatch_agrees_with_glibc_on_random_patterns() -> None:
    rng = random.Random(20261124)
    mismatches = []
    with c_locale():
        for _ in range(15000):
            pattern, string = random_pattern(rng), random_string(rng)
            expected = glibc_fnmatch(pattern, string)
            interpreted = _match_from(pattern, 0, string, 0, None)
            memo: dict[tuple[int, int], tuple[int, int]] = {}
            remembered = _match_from(pattern, 0, string, 0, None, memo)
            assert _match_from(pattern, 0, string, 0, None, memo) == remembered
            compiled = _compile(pattern)(string)
            if not expected == interpreted == remembered == compiled:
                mismatches.append((pattern, string, expected, interpreted, compiled))
    assert mismatches == []


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(PATTERN_PIECES), max_size=10).map(b"".join),
    st.lists(st.sampled_from([bytes((b,)) for b in STRING_BYTES]), max_size=10).map(b"".join),
)
def test_fnmatch_agrees_with_glibc_hypothesis(pattern: bytes, string: bytes) -> None:
    with c_locale():
        expected = glibc_fnmatch(pattern, string)
    assert fnmatch_bytes(pattern, string) == expected
    assert _match_from(pattern, 0, string, 0, None) == expected


@pytest.mark.parametrize(
    ("pattern", "string", "expected"),
    [
        ("pci:v*d*sv*sd*bc03sc*i*", "pci:v00008086d00001234sv0sd0bc03sc00i00", True),
        ("pci:v*d*sv*sd*bc03sc*i*", "pci:v00008086d00001234sv0sd0bc02sc00i00", False),
        ("usb:v13FDp3940d0[0-2]*dc*", "usb:v13FDp3940d01XXdc", True),
        ("usb:v13FDp3940d0[0-2]*dc*", "usb:v13FDp3940d03XXdc", False),
        ("mdio:0000????", "mdio:00001010", True),
        ("a/*", "a/b/c", True),  # flags 0: '*' crosses '/'
        ("*", ".hidden", True),
        ("[!a]", "b", True),
        ("[^a]", "a", False),  # '^' negates too (glibc without POSIXLY_CORRECT)
        ("\\*", "*", True),
        ("\\*", "x", False),
        ("a\\", "a", False),
        ("[[:digit:]]x", "7x", True),
        ("[[:foo:]]", "f", False),
        ("[a", "[a", True),
        ("[a", "a", False),  # an unterminated '[' is an ordinary character
        ("[a-", "[a-", False),
        ("x\0yz", "x", True),  # C strings end at NUL
    ],
)
def test_fnmatch_examples(pattern: str, string: str, expected: bool) -> None:
    assert fnmatch_c(pattern, string) is expected
    with c_locale():
        assert glibc_fnmatch(pattern.split("\0")[0].encode(), string.encode()) is expected


def test_fnmatch_has_no_catastrophic_backtracking() -> None:
    pattern = b"*a" * 12 + b"*b"
    started = time.monotonic()
    assert not fnmatch_bytes(pattern, b"a" * 400)
    assert not _match_from(pattern, 0, b"a" * 60, 0, None)
    # many brackets go to the interpreter, which remembers bracket outcomes
    brackets = b"*" + b"[ab]" * 40 + b"*[!a]"
    assert fnmatch_bytes(brackets, b"x" + b"b" * 40 + b"c") and not fnmatch_bytes(brackets, b"a" * 500)
    assert time.monotonic() - started < 2


def test_pathological_stored_patterns_stay_bounded() -> None:
    index = index_of({"*" + "[" * (MAX_KEY_LENGTH - 200): [(0, "m")], "*" + "[a" * 1800 + "*": [(1, "n")]})
    started = time.monotonic()
    assert [v.value for v in index.search_wildcard("[" * 4000)] == ["m"]  # unterminated: literal '['s
    assert index.search_wildcard("[" * 3000) == []
    assert [v.value for v in index.search_wildcard("[a" * 1900)] == ["n"]
    assert time.monotonic() - started < 10


# -- the real indexes depmod wrote --------------------------------------------------------------


def text_lines(path: Path, prefix: str) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.startswith(prefix)]


def modname(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".", 1)[0].replace("-", "_")


def test_dep_index_matches_modules_dep(indexed_kernel_tree: DebianKernel) -> None:
    moddir = indexed_kernel_tree.moddir
    lines = (moddir / "modules.dep").read_text().splitlines()
    assert len(lines) > 3500
    with Index.open(str(moddir / "modules.dep.bin")) as index:
        assert index.version == 0x00020001
        mismatches = [line for line in lines if index.lookup(modname(line.split(":")[0])) != line]
        assert mismatches == []
        content = index.to_dict()
    assert content == {modname(line.split(":")[0]): [(number, line)] for number, line in enumerate(lines)}
    assert Index.open(str(moddir / "modules.dep.bin"), reader="file").to_dict() == content


def test_alias_index_matches_modules_alias(indexed_kernel_tree: DebianKernel) -> None:
    moddir = indexed_kernel_tree.moddir
    dep_names = [modname(line.split(":")[0]) for line in (moddir / "modules.dep").read_text().splitlines()]
    priority = {name: number for number, name in enumerate(dep_names)}
    expected: dict[str, list[tuple[int, str]]] = {}
    for _alias, pattern, module in text_lines(moddir / "modules.alias", "alias "):
        key = normalize(pattern)
        expected.setdefault(key, []).append((priority[module], module))
    content = decode_index(str(moddir / "modules.alias.bin"))
    assert sorted(content) == sorted(expected)
    assert {key: sorted(values) for key, values in content.items()} == {
        key: sorted(values) for key, values in expected.items()
    }
    # values are stored by ascending priority
    assert all(values == sorted(values, key=lambda v: v[0]) for values in content.values())
    items = list(Index.open(str(moddir / "modules.alias.bin")).items())
    keys = [item.key.encode() for item in items]
    assert keys == sorted(keys)  # index_dump order is byte order of the keys


def normalize(alias: str) -> str:
    """alias_normalize for well-formed aliases (depmod's key for modules.alias.bin)."""
    out, depth = [], 0
    for char in alias:
        depth += char == "["
        depth -= char == "]"
        out.append("_" if char == "-" and not depth else char)
    return "".join(out)


def test_symbol_index_matches_modules_symbols(indexed_kernel_tree: DebianKernel) -> None:
    moddir = indexed_kernel_tree.moddir
    pairs = [(fields[1], fields[2]) for fields in text_lines(moddir / "modules.symbols", "alias symbol:")]
    assert len(pairs) > 10000
    with Index.open(str(moddir / "modules.symbols.bin")) as index:
        assert [index.lookup(key) for key, _owner in pairs] == [owner for _key, owner in pairs]
        assert sorted(index.to_dict()) == sorted(key for key, _owner in pairs)
        assert index.lookup("symbol:no_such_symbol_anywhere") is None
        assert index.lookup("symbol:") is None


def test_builtin_index_matches_modules_builtin(indexed_kernel_tree: DebianKernel) -> None:
    moddir = indexed_kernel_tree.moddir
    names = [modname(line) for line in (moddir / "modules.builtin").read_text().splitlines()]
    with Index.open(str(moddir / "modules.builtin.bin")) as index:
        assert all(index.lookup(name) == "" for name in names)
        assert index.to_dict() == {name: [(0, "")] for name in names}
        assert index.lookup("ext4") is None
    aliases = decode_index(str(moddir / "modules.builtin.alias.bin"))
    records = (moddir / "modules.builtin.modinfo").read_bytes().split(b"\0")
    expected: dict[str, list[tuple[int, str]]] = {}
    for record in records:
        module, _dot, rest = record.decode().partition(".")
        if rest.startswith("alias="):
            expected.setdefault(normalize(rest[6:]), []).insert(0, (0, module))
    assert aliases == expected


def test_wildcard_search_matches_the_fnmatch_model(indexed_kernel_tree: DebianKernel) -> None:
    """For keys without wildcard bytes, index_searchwild finds exactly the stored keys whose
    literal head equals the key's and whose pattern tail fnmatches the key's tail."""
    moddir = indexed_kernel_tree.moddir
    index = Index.open(str(moddir / "modules.alias.bin"))
    content = index.to_dict()
    rng = random.Random(3)
    queries = [concrete(pattern, rng) for pattern in rng.sample(sorted(content), 300)]
    heads = [(key.encode(), wildcard_cut(key.encode()), values) for key, values in content.items()]
    for query in queries:
        raw = query.encode()
        expected = sorted(
            (prio, module)
            for key, cut, values in heads
            if raw.startswith(key[:cut]) and model_match(key, raw)
            for prio, module in values
        )
        found = index.search_wildcard(query)
        assert sorted(found) == expected, query
        assert [v.priority for v in found] == [p for p, _m in expected]


def wildcard_cut(key: bytes) -> int:
    return min((key.find(w) for w in (b"*", b"?", b"[") if w in key), default=len(key))


def model_match(key: bytes, query: bytes) -> bool:
    cut = wildcard_cut(key)
    if cut == len(key):
        return key == query
    return query[:cut] == key[:cut] and fnmatch_bytes(key[cut:], query[cut:])


# -- synthetic indexes ----------------------------------------------------------------------------

keys_strategy = st.text(alphabet="abc*?[]!-_:xyz", min_size=0, max_size=8)
content_strategy = st.dictionaries(
    keys_strategy,
    st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["m1", "m2", "m3", ""])), min_size=1, max_size=3),
    max_size=25,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content_strategy,
    st.sampled_from(["post", "pre"]),
    st.booleans(),
    st.lists(st.text(alphabet="abc*?[]!-_:xyz", max_size=9), max_size=6),
)
def test_synthetic_round_trip(
    content: dict[str, list[tuple[int, str]]], layout: str, root_prefix: bool, queries: list[str]
) -> None:
    for values in content.values():
        values.sort(key=lambda v: v[0])
    index = index_of(content, layout, root_prefix=root_prefix)
    stored = {key: values for key, values in content.items() if values}
    assert index.to_dict() == stored
    assert [item.key.encode() for item in index.items()] == sorted(
        key.encode() for key, values in stored.items() for _v in values
    )
    other = index_of(content, "pre" if layout == "post" else "post")
    assert other.to_dict() == index.to_dict()
    for key, values in stored.items():
        assert index.lookup(key) == values[0][1]
        assert index.lookup_all(key) == [IndexValue(*v) for v in values]
    for query in [*queries, *stored]:
        if query not in stored:
            assert index.lookup(query) is None
        if not any(w in query for w in "*?["):
            expected = sorted(
                v for key, values in stored.items() if model_match(key.encode(), query.encode()) for v in values
            )
            assert sorted(index.search_wildcard(query)) == [IndexValue(*v) for v in expected]


def test_empty_index() -> None:
    data = bytes.fromhex("B007F457 00020001 0000000C")
    index = Index("<empty>", data)
    assert index.lookup("") is None
    assert index.lookup("x") is None
    assert index.search_wildcard("x") == []
    assert list(index.items()) == []
    assert build_index({}) == data


def test_readers_differ_only_in_the_order_of_equal_priorities() -> None:
    content = {"k": [(1, "a"), (1, "b"), (2, "c"), (2, "d")], "k*": [(1, "e")]}
    mapped, read = index_of(content, reader="mmap"), index_of(content, reader="file")
    assert mapped.lookup_all("k") == [IndexValue(*v) for v in content["k"]]
    assert read.lookup_all("k") == [IndexValue(1, "b"), IndexValue(1, "a"), IndexValue(2, "d"), IndexValue(2, "c")]
    assert mapped.lookup("k") == "a" and read.lookup("k") == "b"
    # searchwild: '*' subtree first, then the exact node, each value merged before equal ones
    assert [v.value for v in mapped.search_wildcard("k")] == ["b", "a", "e", "d", "c"]
    assert [v.value for v in read.search_wildcard("k")] == ["a", "b", "e", "c", "d"]
    assert [tuple(item) for item in read.items()][:2] == [("k", "b", 1), ("k", "a", 1)]
    assert reinserted([IndexValue(2, "x"), IndexValue(1, "y"), IndexValue(1, "z")]) == (
        IndexValue(1, "z"),
        IndexValue(1, "y"),
        IndexValue(2, "x"),
    )


def test_wildcard_walk_quirks() -> None:
    content = {
        "ab*": [(1, "star")],
        "ab": [(2, "exact")],
        "a?c": [(3, "q")],
        "a[bx]c": [(4, "br")],
        "abc": [(5, "abc")],
        "a\\*": [(6, "esc")],
        "x*y*": [(7, "xy")],
    }
    index = index_of(content)
    assert [v.value for v in index.search_wildcard("ab")] == ["star", "exact"]
    assert [v.value for v in index.search_wildcard("abc")] == ["star", "q", "br", "abc"]
    # the walk compares literal heads byte for byte: a backslash is not an escape there
    assert [v.value for v in index.search_wildcard("a*")] == []
    assert [v.value for v in index.search_wildcard("a\\*")] == ["esc"]
    assert [v.value for v in index.search_wildcard("xzzyq")] == ["xy"]
    # a key holding '*' walks into the '*' subtree a second time, literally
    assert [v.value for v in index.search_wildcard("ab*")] == ["star", "star"]
    assert index.search_wildcard("") == []
    assert index.lookup("ab*") == "star"


def test_non_ascii_key_bytes_never_take_an_arc() -> None:
    content = {"ab\u00e9": [(1, "x")], "ab\u00e8": [(1, "y")], "\u00e9": [(1, "z")], "c\u00e9": [(1, "w")]}
    index = index_of(content)
    # libkmod passes a (signed) char: a byte of 128 or more never matches a child range...
    assert index.lookup("ab\u00e9") is None
    assert index.lookup("\u00e9") is None
    assert index.search_wildcard("ab\u00e8") == []
    # ...but inside a prefix the bytes simply compare equal
    assert index.lookup("c\u00e9") == "w"
    assert index.to_dict() == content


def test_dump_lines_like_modprobe_c() -> None:
    index = index_of({"b": [(0, "m2")], "a": [(1, "m1"), (2, "m3")]})
    assert list(index.dump("alias ")) == ["alias a m1", "alias a m3", "alias b m2"]
    assert list(index) == [IndexItem("a", "m1", 1), IndexItem("a", "m3", 2), IndexItem("b", "m2", 0)]


# -- corrupt indexes ------------------------------------------------------------------------------


def exercise(index: Index, queries: Sequence[str], dump: bool = True) -> None:
    for query in queries:
        index.lookup(query)
        index.lookup_all(query)
        index.search_wildcard(query)
    if dump:
        for _item in index.items():
            pass


def only_index_errors(make: Callable[[], Index], queries: Sequence[str], dump: bool = True) -> Optional[str]:
    started = time.monotonic()
    try:
        exercise(make(), queries, dump)
    except IndexFormatError as error:
        assert error.problem
        return error.problem
    finally:
        assert time.monotonic() - started < 5
    return None


def corrupt(name: str, data: bytes, queries: Sequence[str]) -> Optional[str]:
    return only_index_errors(lambda: Index(name, data), queries)


def test_header_errors(tmp_path: Path) -> None:
    good = build_index({"a": [(0, "x")]})
    cases = {
        "empty": b"",
        "short": good[:11],
        "magic": b"\xb0\x07\xfa\x57" + good[4:],
        "version": good[:4] + b"\x00\x03\x00\x01" + good[8:],
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(IndexFormatError) as caught:
            Index.open(str(path))
        assert str(path) in str(caught.value)
    minor = good[:4] + b"\x00\x02\x00\x07" + good[8:]
    assert Index("<minor>", minor).lookup("a") == "x"  # only the major version is checked
    with pytest.raises(FileNotFoundError):
        Index.open(str(tmp_path / "missing"))


def test_pointer_loops_and_explosions_are_refused() -> None:
    header = bytes.fromhex("B007F457 00020001")
    # root at 12: children 'a'..'a' pointing back at the root
    self_loop = header + struct.pack(">I", NODE_CHILDS | 12) + b"aa" + struct.pack(">I", NODE_CHILDS | 12)
    # 40 levels of nodes whose two children are the same next node (2^40 paths), then the root
    chain = bytearray(header + struct.pack(">I", NODE_CHILDS | 12))
    for level in range(40):
        following = NODE_CHILDS | (12 + 10 * (level + 1))
        chain += b"ab" + struct.pack(">II", following, following)
    chain += b"aa" + struct.pack(">I", NODE_CHILDS | 12)
    # the root's '*' arc leads back to the root: the wildcard walk must notice too
    star_loop = header + struct.pack(">I", NODE_CHILDS | 12) + b"**" + struct.pack(">I", NODE_CHILDS | 12)
    for data in (self_loop, bytes(chain), star_loop):
        index = Index("<loop>", data)
        with pytest.raises(IndexFormatError, match="reached twice"):
            list(index.items())
        assert index.lookup("a" * 100) is None  # exact lookups are bounded by the key
    with pytest.raises(IndexFormatError, match="reached twice"):
        Index("<loop>", star_loop).search_wildcard("x")
    assert Index("<loop>", bytes(chain)).search_wildcard("x") == []  # no wildcard arc on the way
    long_chain = bytearray(header + struct.pack(">I", NODE_PREFIX | NODE_CHILDS | 12))
    size = MAX_KEY_LENGTH // 8
    for level in range(20):
        following = NODE_PREFIX | NODE_CHILDS | (12 + (size + 7) * (level + 1))
        long_chain += b"p" * size + b"\0" + b"aa" + struct.pack(">I", following)
    with pytest.raises(IndexFormatError, match="longer than"):
        list(Index("<long>", bytes(long_chain)).items())


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (struct.pack(">III", INDEX_MAGIC, 0x00020001, NODE_VALUES | 8), "header"),
        (struct.pack(">III", INDEX_MAGIC, 0x00020001, NODE_VALUES | 99), "past the end"),
        (struct.pack(">III", INDEX_MAGIC, 0x00020001, NODE_PREFIX | 12) + b"abc", "prefix"),
        (struct.pack(">III", INDEX_MAGIC, 0x00020001, NODE_CHILDS | 12) + b"a", "child range"),
        (struct.pack(">III", INDEX_MAGIC, 0x00020001, NODE_CHILDS | 12) + b"ba", "child range"),
        (struct.pack(">III", INDEX_MAGIC, 0x00020001, NODE_CHILDS | 12) + b"az\0\0", "child table"),
        (struct.pack(">IIII", INDEX_MAGIC, 0x00020001, NODE_VALUES | 12, 0xFFFFFFFF), "claims"),
        (struct.pack(">IIIII", INDEX_MAGIC, 0x00020001, NODE_VALUES | 12, 1, 5) + b"abc", "value"),
        (struct.pack(">III", INDEX_MAGIC, 0x00020001, NODE_VALUES | 12) + b"\0\0", "value count"),
    ],
)
def test_each_corruption_names_its_problem(data: bytes, problem: str) -> None:
    found = only_index_errors(lambda: Index("<bad>", data), ["", "a", "abc"])
    assert found is not None and problem in found


def test_truncated_small_indexes_at_every_length(indexed_kernel_tree: DebianKernel) -> None:
    moddir = indexed_kernel_tree.moddir
    for name in ("modules.builtin.alias.bin", "modules.builtin.bin"):
        data = (moddir / name).read_bytes()
        queries = ["crypto-dh", "zbud", "fs-debugfs", "crypto-", ""]
        errors = 0
        for length in range(len(data)):
            errors += corrupt(name, data[:length], queries) is not None
        assert errors == len(data)  # v30 writes the root last: any cut loses it


@pytest.mark.parametrize("layout", ["post", "pre"])
def test_truncated_and_flipped_synthetic_alias_index(indexed_kernel_tree: DebianKernel, layout: str) -> None:
    moddir = indexed_kernel_tree.moddir
    content = Index.open(str(moddir / "modules.alias.bin")).to_dict()
    rng = random.Random(11)
    subset = {key: content[key] for key in rng.sample(sorted(content), 1500)}
    data = build_index(subset, layout)
    assert Index("<subset>", data).to_dict() == subset
    queries = [concrete(key, rng) for key in rng.sample(sorted(subset), 6)] + ["pci:v00008086d*", "acpi*:"]
    outcomes = {"error": 0, "fine": 0}
    for length in sorted(rng.sample(range(len(data)), 150)):
        found = corrupt("<cut>", data[:length], queries)
        outcomes["error" if found else "fine"] += 1
    for _case in range(250):
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 12)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        found = corrupt("<flip>", bytes(flipped), queries)
        outcomes["error" if found else "fine"] += 1
    assert outcomes["error"] > 150


@pytest.mark.parametrize("name", ["modules.alias.bin", "modules.dep.bin", "modules.symbols.bin"])
def test_real_indexes_truncated_and_flipped(indexed_kernel_tree: DebianKernel, tmp_path: Path, name: str) -> None:
    original = (indexed_kernel_tree.moddir / name).read_bytes()
    rng = random.Random(name)
    queries = ["pci:v00008086d000015FAsv0sd0bc02sc00i00", "e1000e", "symbol:drm_need_swiotlb", "acpi:PNP0A08:"]
    path = tmp_path / name
    for case in range(60):
        data = bytearray(original)
        if case % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randrange(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        only_index_errors(lambda: Index.open(str(path)), queries, dump=case < 6)


@pytest.mark.oracle
def test_dump_matches_modprobe_c(indexed_kernel_tree: DebianKernel) -> None:
    """modprobe -c ends with index_dump of modules.alias.bin and modules.symbols.bin."""
    proc = subprocess.run(
        [
            kmod_tool("modprobe"),
            "-C",
            "/dev/null",
            "-d",
            str(indexed_kernel_tree.root),
            "-S",
            indexed_kernel_tree.release,
            "-c",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    dumped = proc.stdout.split("\n# End of configuration files. Dumping indexes now:\n\n", 1)[1]
    moddir = indexed_kernel_tree.moddir
    ours = [
        *Index.open(str(moddir / "modules.alias.bin")).dump("alias "),
        *Index.open(str(moddir / "modules.symbols.bin")).dump("alias "),
    ]
    assert dumped.splitlines() == ours
