"""kvc.kmod.moddir against kmod 30: lookups over the real Debian tree agree with depmod's text files,
``modprobe -R`` and ``modinfo``, and synthetic module directories (indexes written by the test
writer) resolve exactly as Debian's modprobe resolves them, in both libkmod index readers."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable, Optional

import pytest

from kvc.kmod.errors import IndexFormatError
from kvc.kmod.moddir import (
    BuiltinModinfo,
    DepLine,
    ModuleDirectory,
    ModuleEntry,
    normalize_alias,
    parse_alias_lines,
    parse_dep_line,
    parse_modules_builtin,
)
from kvc.kmod.module import ModinfoEntry
from kvc.kmod.names import modname_normalize
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel
from support.indexmodel import build_index, concrete
from support.oracle import kmod_tool

pytestmark = pytest.mark.oracle


def modprobe_resolve(root: Path, release: str, queries: Sequence[str]) -> dict[str, list[str]]:
    """``modprobe -R`` for each query, in one shell loop. No config (-C /dev/null); -R only
    resolves, so /proc/cmdline (options, blacklist) cannot change its answer."""
    script = (
        'while IFS= read -r a; do echo "== $a"; '
        f'"{kmod_tool("modprobe")}" -C /dev/null -d "{root}" -S "{release}" -R -- "$a" 2>/dev/null; done; exit 0'
    )
    proc = subprocess.run(
        ["sh", "-c", script], input="".join(f"{q}\n" for q in queries), capture_output=True, text=True, check=True
    )
    found: dict[str, list[str]] = {}
    current: Optional[str] = None
    for line in proc.stdout.splitlines():
        if line.startswith("== "):
            current = line[3:]
            found[current] = []
        else:
            assert current is not None
            found[current].append(line)
    assert list(found) == list(queries)
    return found


def names(entries: Sequence[ModuleEntry]) -> list[str]:
    return [entry.name for entry in entries]


# -- the real tree ------------------------------------------------------------------------------


def test_lookup_module_matches_modules_dep(indexed_kernel_tree: DebianKernel, tmp_path: Path) -> None:
    moddir = indexed_kernel_tree.moddir
    directory = ModuleDirectory(str(moddir))
    dep_lines = directory.modules_dep()
    assert len(dep_lines) > 3500
    for dep in dep_lines:
        entry = directory.lookup_module(dep.name)
        assert entry is not None
        assert entry.path == f"{moddir}/{dep.path}"
        assert entry.dependencies == tuple(f"{moddir}/{path}" for path in dep.dependencies)
        assert not entry.builtin
        assert Path(entry.path).is_file()
    e1000e = directory.lookup_module("e1000e")
    assert e1000e is not None and e1000e.path is not None and e1000e.path.endswith("/e1000e.ko")
    assert directory.lookup_module("snd-hda-intel") == directory.lookup_module("snd_hda_intel")
    assert directory.lookup_module("no_such_module") is None
    # without the binary index the text modules.dep answers the same
    shutil.copy(moddir / "modules.dep", tmp_path / "modules.dep")
    text_only = ModuleDirectory(str(tmp_path))
    for dep in dep_lines[::7]:
        assert text_only.dep_line(dep.name) == directory.dep_line(dep.name)
    assert ModuleDirectory(str(tmp_path), text_fallback=False).lookup_module(dep_lines[0].name) is None
    from_host = ModuleDirectory.from_host(HostPaths(str(indexed_kernel_tree.root)), indexed_kernel_tree.release)
    assert from_host.lookup_module("e1000e") == e1000e
    assert from_host.reader == "mmap"
    assert ModuleDirectory(str(moddir), preload=False).reader == "file"


def test_symbol_and_builtin_lookups_match_text_files(indexed_kernel_tree: DebianKernel) -> None:
    moddir = indexed_kernel_tree.moddir
    directory = ModuleDirectory(str(moddir))
    symbols = directory.modules_symbols()
    assert len(symbols) > 10000
    for key, owner in symbols:
        assert directory.lookup_symbol_owner(key.removeprefix("symbol:")) == owner
    for key, owner in symbols[::50]:
        assert names(directory.resolve(key)) == [owner]
        assert directory.resolve(key)[0].step == "modules.symbols"
    builtin = directory.modules_builtin()
    assert len(builtin) > 150
    for name in builtin:
        assert directory.is_builtin(name)
        entry = ModuleEntry(name, None, (), True, "modules.builtin")
        assert directory.lookup_name(name) == [entry]
        # the name of a built-in module can also be a module alias, which resolve() tries first
        resolved = directory.resolve(name)
        assert resolved == [entry] or {e.step for e in resolved} == {"modules.alias"}
    assert names(directory.resolve("crc32")) == ["crc32_pclmul", "crc32_generic"]
    assert not directory.is_builtin("e1000e")
    aliases = directory.modules_alias()
    assert len(aliases) > 20000 and aliases[0][1] == "intel_uncore"


def test_resolve_matches_modprobe(indexed_kernel_tree: DebianKernel) -> None:
    """About 700 lookups (device aliases made concrete, module names, symbols, built-in names and
    aliases, malformed input) resolve to what Debian's modprobe -R prints, order and duplicates
    included."""
    moddir = indexed_kernel_tree.moddir
    directory = ModuleDirectory(str(moddir))
    rng = random.Random(20261124)
    patterns = sorted({pattern for pattern, _module in directory.modules_alias()})
    queries = {concrete(pattern, rng, ("", "0", "1A", "X")) for pattern in rng.sample(patterns, 520)}
    queries |= {concrete(pattern, rng, ("*", "?")) for pattern in rng.sample(patterns, 30)}
    dep_names = [dep.name for dep in directory.modules_dep()]
    queries |= {name.replace("_", "-") if rng.random() < 0.3 else name for name in rng.sample(dep_names, 80)}
    queries |= {key for key, _owner in rng.sample(directory.modules_symbols(), 40)}
    queries |= set(rng.sample(directory.modules_builtin(), 25))
    records = (moddir / "modules.builtin.modinfo").read_bytes().split(b"\0")
    queries |= {record.decode().split(".alias=", 1)[1] for record in records if b".alias=" in record}
    queries |= {
        "nonexistent",
        "symbol:nonexistent",
        "symbol:drm_*",
        "a]",
        "x[y",
        "pci:*",
        "fs-ext4",
        "crypto-sha256",
        "pci:v00008086d000015FAsv0sd0bc02sc00i00",
        "usb:v*",
        "cpu:type:x86,ven0000fam0006mod006A:feature:,XYZ",
    }
    ordered = sorted(q for q in queries if q and not q.startswith("-") and "\n" not in q)
    expected = modprobe_resolve(indexed_kernel_tree.root, indexed_kernel_tree.release, ordered)
    mismatches = {
        q: (names(directory.resolve(q)), expected[q]) for q in ordered if names(directory.resolve(q)) != expected[q]
    }
    assert mismatches == {}
    assert sum(1 for q in ordered if expected[q]) > 550
    assert sum(1 for q in ordered if len(expected[q]) > 1) > 5


def test_resolved_entries_carry_paths_and_flags(indexed_kernel_tree: DebianKernel) -> None:
    moddir = indexed_kernel_tree.moddir
    directory = ModuleDirectory(str(moddir))
    (by_alias,) = directory.resolve("pci:v00008086d000015FAsv0sd0bc02sc00i00")
    assert by_alias.step == "modules.alias" and by_alias.name == "e1000e" and not by_alias.builtin
    assert by_alias == ModuleEntry(
        "e1000e",
        f"{moddir}/kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko",
        by_alias.dependencies,
        False,
        "modules.alias",
    )
    (with_deps,) = directory.resolve("snd-hda-intel")
    line = (moddir / "modules.dep").read_text().split("/snd-hda-intel.ko:", 1)[1].split("\n", 1)[0]
    assert with_deps.dependencies == tuple(f"{moddir}/{dep}" for dep in line.split())
    assert len(with_deps.dependencies) > 3
    builtin_alias = directory.resolve("fs-debugfs")
    assert builtin_alias == [ModuleEntry("debugfs", None, (), True, "modules.builtin.alias")]


def modinfo_strings(root: Path, release: str, name: str) -> list[str]:
    out = subprocess.run(
        [kmod_tool("modinfo"), "-0", "-m", "-b", str(root), "-k", release, name], capture_output=True, check=True
    ).stdout
    records = out.decode().split("\0")[:-1]
    assert records[0].split() == ["name:", name] and records[1].split() == ["filename:", "(builtin)"]
    return [record for record in records[2:] if not record.startswith("parm:")]


def test_builtin_modinfo_matches_modinfo(indexed_kernel_tree: DebianKernel) -> None:
    moddir = indexed_kernel_tree.moddir
    directory = ModuleDirectory(str(moddir), preload=False)
    builtin = directory.modules_builtin()
    for name in random.Random(1).sample(builtin, 60):
        ours = directory.find_builtin_modinfo(name)
        assert ours is not None
        expected = modinfo_strings(indexed_kernel_tree.root, indexed_kernel_tree.release, name)
        assert [f"{key}={value}" for key, value in ours if key not in ("parm", "parmtype")] == expected
    zswap = directory.builtin_modinfo("zswap")
    assert zswap[:4] == [
        ModinfoEntry("description", "Compressed cache for swap pages"),
        ModinfoEntry("author", "Seth Jennings <sjennings@variantweb.net>"),
        ModinfoEntry("license", "GPL"),
        ModinfoEntry("file", "mm/zswap"),
    ]
    assert ModinfoEntry("parmtype", "max_pool_percent:uint") in zswap
    assert directory.find_builtin_modinfo("e1000e") is None
    assert directory.builtin_modinfo("e1000e") == []


# -- synthetic module directories against modprobe ----------------------------------------------

RELEASE = "9.9.9-kvc"


def make_tree(
    root: Path,
    *,
    dep: Optional[Mapping[str, str]] = None,
    alias: Optional[Mapping[str, Sequence[tuple[int, str]]]] = None,
    symbols: Optional[Mapping[str, Sequence[tuple[int, str]]]] = None,
    builtin: Optional[Sequence[str]] = None,
    builtin_alias: Optional[Mapping[str, Sequence[tuple[int, str]]]] = None,
    missing: Sequence[str] = (),
    empty: Sequence[str] = (),
) -> Path:
    moddir = root / "lib" / "modules" / RELEASE
    moddir.mkdir(parents=True)
    files = {
        "modules.dep.bin": {name: [(n, line)] for n, (name, line) in enumerate((dep or {}).items())},
        "modules.alias.bin": alias or {},
        "modules.symbols.bin": symbols or {},
        "modules.builtin.bin": {name: [(0, "")] for name in builtin or ()},
        "modules.builtin.alias.bin": builtin_alias or {},
    }
    for name, content in files.items():
        if name in missing:
            continue
        (moddir / name).write_bytes(b"" if name in empty else build_index(content))
    return moddir


def test_random_wildcard_tries_resolve_like_modprobe(tmp_path: Path) -> None:
    """Stored keys full of '*', '?', '[', '\\' and equal priorities: the walk, the fnmatch calls
    and the priority merge agree with modprobe in both index readers."""
    rng = random.Random(7)
    pieces = ["a", "b", "c", "*", "?", "[ab]", "[!a]", "[a-c]", "\\", ":", "_", "[", "]"]
    for case in range(4):
        alias: dict[str, list[tuple[int, str]]] = {}
        for number in range(60):
            key = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 6)))
            values = alias.setdefault(key, [])
            values.append((rng.randrange(4), f"m{number}"))
            values.sort(key=lambda v: v[0])
        queries = sorted(
            {
                "".join(rng.choice(["a", "b", "c", ":", "_", "-", "*", "?", "["]) for _ in range(rng.randrange(1, 6)))
                for _ in range(70)
            }
        )
        queries = [q for q in queries if not q.startswith("-")]
        for empty_builtin in (False, True):
            root = tmp_path / f"{case}-{empty_builtin}"
            empty = ["modules.builtin.bin"] if empty_builtin else []
            moddir = make_tree(root, alias=alias, builtin=["zz"], empty=empty)
            directory = ModuleDirectory(str(moddir))
            assert directory.reader == ("file" if empty_builtin else "mmap")
            expected = modprobe_resolve(root, RELEASE, queries)
            assert {q: names(directory.resolve(q)) for q in queries} == expected


def test_readers_order_ties_like_modprobe(tmp_path: Path) -> None:
    alias = {"x*": [(1, "first"), (1, "second"), (2, "third")], "x?": [(1, "fourth")]}
    mapped = make_tree(tmp_path / "mm", alias=alias)
    read = make_tree(tmp_path / "file", alias=alias, missing=["modules.builtin.bin"])
    assert names(ModuleDirectory(str(mapped)).resolve("xy")) == ["fourth", "second", "first", "third"]
    assert names(ModuleDirectory(str(read)).resolve("xy")) == ["fourth", "first", "second", "third"]
    assert modprobe_resolve(tmp_path / "mm", RELEASE, ["xy"])["xy"] == ["fourth", "second", "first", "third"]
    assert modprobe_resolve(tmp_path / "file", RELEASE, ["xy"])["xy"] == ["fourth", "first", "second", "third"]


def test_lookup_order_like_modprobe(tmp_path: Path) -> None:
    root = tmp_path / "order"
    moddir = make_tree(
        root,
        dep={"real": "kernel/real.ko: kernel/dep.ko", "dep": "kernel/dep.ko:", "b_mod": "/abs/b-mod.ko:"},
        alias={"real": [(0, "aliased")], "blt*": [(3, "alias_wins")], "symbol:s*": [(0, "alias_sym")]},
        symbols={"symbol:s1": [(0, "real")], "symbol:s?": [(1, "dep")]},
        builtin=["blt", "bi", "b_mod"],
        builtin_alias={"bi*": [(0, "via_builtin_alias")], "only*": [(0, "ba1")], "onl?": [(0, "ba2")]},
    )
    directory = ModuleDirectory(str(moddir))
    queries = [
        "real",
        "dep",
        "symbol:s1",
        "symbol:s2",
        "symbol:x",
        "blt",
        "bi",
        "bix",
        "only",
        "b-mod",
        "real:x",
        "nothing",
    ]
    expected = modprobe_resolve(root, RELEASE, queries)
    assert {q: names(directory.resolve(q)) for q in queries} == expected
    assert expected["real"] == ["real"]  # modules.dep before modules.alias
    assert expected["symbol:s1"] == ["real", "dep"]  # symbols, wildcards included, before aliases
    assert expected["blt"] == ["alias_wins"]  # aliases before modules.builtin
    assert expected["bi"] == ["bi"]  # modules.builtin before modules.builtin.alias
    assert expected["only"] == ["ba1", "ba2"]  # equal priorities: the later match goes first
    real = directory.resolve("real")[0]
    assert real.path == f"{moddir}/kernel/real.ko" and real.dependencies == (f"{moddir}/kernel/dep.ko",)
    (b_mod,) = directory.resolve("b-mod")
    assert b_mod == ModuleEntry("b_mod", "/abs/b-mod.ko", (), True, "modules.dep")
    (via,) = directory.resolve("bix")
    assert via == ModuleEntry("via_builtin_alias", None, (), True, "modules.builtin.alias")
    assert directory.lookup_name("bix") == [via]
    assert directory.lookup_name("b-mod.ko") == [b_mod]
    assert directory.lookup_name("aliased") == []


def test_missing_indexes_like_modprobe(tmp_path: Path) -> None:
    cases: dict[str, Callable[[Path], Path]] = {
        "no-alias": lambda root: make_tree(root, builtin=["blt"], missing=["modules.alias.bin"]),
        "empty-alias": lambda root: make_tree(root, builtin=["blt"], empty=["modules.alias.bin"]),
        "no-symbols": lambda root: make_tree(root, alias={"symbol:s": [(0, "m")]}, missing=["modules.symbols.bin"]),
        "no-builtin-alias": lambda root: make_tree(root, builtin=["blt"], missing=["modules.builtin.alias.bin"]),
        "no-dep": lambda root: make_tree(root, alias={"x": [(0, "m")]}, builtin=["blt"], missing=["modules.dep.bin"]),
    }
    for name, make in cases.items():
        root = tmp_path / name
        moddir = make(root)
        directory = ModuleDirectory(str(moddir))
        queries = ["blt", "symbol:s", "x", "zz"]
        expected = modprobe_resolve(root, RELEASE, queries)
        assert {q: names(directory.resolve(q)) for q in queries} == expected, name
    # a missing index only skips its step
    assert modprobe_resolve(tmp_path / "no-alias", RELEASE, ["blt"])["blt"] == ["blt"]
    assert modprobe_resolve(tmp_path / "no-symbols", RELEASE, ["symbol:s"])["symbol:s"] == ["m"]


def test_corrupt_index_in_a_directory_raises(tmp_path: Path) -> None:
    moddir = make_tree(tmp_path / "bad", builtin=["blt"])
    (moddir / "modules.alias.bin").write_bytes(build_index({"ab": [(0, "m")]})[:-3])
    directory = ModuleDirectory(str(moddir))
    with pytest.raises(IndexFormatError):
        directory.resolve("ab")
    (moddir / "modules.dep.bin").unlink()
    (moddir / "modules.dep.bin").mkdir()
    with pytest.raises(IndexFormatError, match="is a directory"):
        ModuleDirectory(str(moddir)).lookup_module("x")


class Config:
    def __init__(self, aliases: Mapping[str, Sequence[str]], commands: Sequence[str]) -> None:
        self.aliases = aliases
        self.commands = commands

    def alias_targets(self, name: str) -> Sequence[str]:
        return self.aliases.get(name, ())

    def has_command(self, name: str) -> bool:
        return name in self.commands


def test_config_steps_have_their_place(tmp_path: Path) -> None:
    moddir = make_tree(tmp_path / "cfg", dep={"real": "kernel/real.ko:"}, alias={"cmd": [(0, "from_index")]})
    directory = ModuleDirectory(str(moddir))
    config = Config({"real": ["other", "real"]}, ["cmd", "real"])
    assert [(e.name, e.step) for e in directory.resolve("real", config)] == [
        ("other", "config-alias"),
        ("real", "config-alias"),
    ]
    assert directory.resolve("real", config)[1].path == f"{moddir}/kernel/real.ko"
    assert [(e.name, e.step) for e in directory.resolve("cmd", config)] == [("cmd", "command")]
    assert names(directory.resolve("cmd")) == ["from_index"]


# -- parsing units ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "normalized"),
    [
        ("snd-hda-intel", "snd_hda_intel"),
        ("a-[b-c]-d", "a_[b-c]_d"),
        ("[[-]-", "[[-]_"),
        ("pci:v*d*", "pci:v*d*"),
        ("x\0y-z", "x"),
        ("", ""),
        ("a" * 5000, "a" * 4095),
    ],
)
def test_normalize_alias(alias: str, normalized: str) -> None:
    assert normalize_alias(alias) == normalized


@pytest.mark.parametrize("alias", ["a]", "a[b", "[a]]", "a-[", "]"])
def test_normalize_alias_refuses_unbalanced_brackets(alias: str) -> None:
    with pytest.raises(ValueError, match="unmatched"):
        normalize_alias(alias)


def test_text_parsers() -> None:
    assert parse_dep_line("kernel/a/b-c.ko.xz: kernel/d.ko\t /abs/e.ko\n") == DepLine(
        "b_c", "kernel/a/b-c.ko.xz", ("kernel/d.ko", "/abs/e.ko")
    )
    assert parse_dep_line("no colon") is None
    assert parse_dep_line("x.ko:") == DepLine("x", "x.ko", ())
    assert modname_normalize("snd-hda.ko") == "snd_hda"
    assert parse_alias_lines("# header\nalias a* m1\nalias b m2 extra\nsoftdep x pre: y\nalias broken\n") == [
        ("a*", "m1"),
        ("b", "m2"),
    ]
    assert parse_modules_builtin("kernel/mm/zbud.ko\n\n# comment\n/abs/x.ko\nkernel/a-b.ko\n") == ["zbud", "a_b"]


def test_builtin_modinfo_walk() -> None:
    data = b"a.x=1\0a.y=2\0b.license=GPL\0a.z=late\0c.k\0c.alias=v=w\0"
    info = BuiltinModinfo.parse(data)
    assert info.strings("a") == ("x=1", "y=2")  # only the first run counts
    assert info.strings("c") == ("k", "alias=v=w")
    assert info.strings("nope") is None
    stopped = BuiltinModinfo.parse(b"a.x=1\0junk\0b.y=2\0")
    assert stopped.strings("a") == ("x=1",) and stopped.strings("b") is None
    cut = BuiltinModinfo.parse(b"a.x=1\0b.y=2\0b.z=3", "/m/modules.builtin.modinfo")
    assert cut.strings("a") == ("x=1",)
    with pytest.raises(IndexFormatError, match=re.escape("/m/modules.builtin.modinfo")):
        cut.strings("b")
    assert BuiltinModinfo.parse(b"").blocks == ()


def test_builtin_modinfo_from_a_directory(tmp_path: Path) -> None:
    (tmp_path / "modules.builtin.modinfo").write_bytes(b"m.license=GPL\0m.parm=p:desc\0m.flag\0")
    directory = ModuleDirectory(str(tmp_path))
    assert directory.find_builtin_modinfo("m") == [
        ModinfoEntry("license", "GPL"),
        ModinfoEntry("parm", "p:desc"),
        ModinfoEntry("flag", ""),
    ]
    assert ModuleDirectory(str(tmp_path / "missing")).find_builtin_modinfo("m") is None
