"""kvc kmod depmod against Debian's kmod 30 depmod: the full Debian 6.1 trees of amd64 and arm64
(every output byte for byte), small trees of real modules under depmod.d configs using every
directive, dependency cycles of synthetic modules, error paths, compressed modules, the parse
cache, and fuzzing of the config parser and of the index writer against the reader."""

from __future__ import annotations

import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvc.kmod import module as module_reader
from kvc.kmod.depmod import Log, load_config
from kvc.kmod.depmodparse import MAX_MODULE_FILE, fast_record, parse_elf, read_module, unpack_imports
from kvc.kmod.elf import ElfFile
from kvc.kmod.index import Index, decode_index
from kvc.kmod.indexwrite import IndexBuilder, IndexCharacterError
from kvc.kmod.module import ModuleFile
from support.debian_kernel import DebianKernel
from support.modbuild import Export, ModuleSpec, build_module
from support.oracle import Result, run_kmod, run_kmod_bounded

OUTPUTS = (
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.softdep",
    "modules.symbols",
    "modules.symbols.bin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.devname",
)
KVER = "1.2.3"


def run_ours(args: list[str], cache: Path | None = None) -> Result:
    env = dict(os.environ)
    env["KVC_DEPMOD_CACHE"] = str(cache) if cache is not None else "off"
    proc = subprocess.run([sys.executable, "-m", "kvc", "kmod", "depmod", *args], capture_output=True, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def link_tree(source: Path, target: Path) -> None:
    """A hard-link copy of a module directory without depmod's outputs."""
    shutil.copytree(source, target, copy_function=os.link)
    for name in OUTPUTS:
        (target / name).unlink(missing_ok=True)


def outputs(moddir: Path) -> dict[str, bytes]:
    return {name: (moddir / name).read_bytes() for name in OUTPUTS if (moddir / name).exists()}


def assert_same_outputs(ours: Path, theirs: Path, swap: tuple[str, str] = ("", "")) -> None:
    """Same outputs; ``swap`` (our root, kmod's root) is replaced in ours first, for external
    modules whose absolute paths name the root. Indexes are compared decoded, and byte for byte
    when no path had to be replaced."""
    mine, kmod = outputs(ours), outputs(theirs)
    assert sorted(mine) == sorted(kmod)
    old, new = swap
    for name in kmod:
        renamed = mine[name].replace(old.encode(), new.encode()) if old else mine[name]
        if name.endswith(".bin") and kmod[name]:
            decoded = {
                key: [(p, v.replace(old, new) if old else v) for p, v in values]
                for key, values in decode_index(str(ours / name)).items()
            }
            assert decoded == decode_index(str(theirs / name)), name
            if renamed == mine[name]:
                assert mine[name] == kmod[name], name
        else:
            assert renamed == kmod[name], name


def same_run(tmp: Path, build: object, args: list[str], kver: str = KVER) -> tuple[Result, Result]:
    """Build the same root twice (``build(root)``), run kmod on one and ours on the other with
    ``-b ROOT``; compare stdout, stderr (with the root names made equal), status and outputs."""
    assert callable(build)
    roots = [tmp / "kmod", tmp / "ours"]
    for root in roots:
        build(root)
    theirs = run_kmod("depmod", ["-b", str(roots[0]), *[a.replace("@ROOT@", str(roots[0])) for a in args], kver])
    ours = run_ours(["-b", str(roots[1]), *[a.replace("@ROOT@", str(roots[1])) for a in args], kver])
    normalized = ours.stderr.replace(str(roots[1]).encode(), str(roots[0]).encode())
    assert normalized.decode(errors="replace") == theirs.stderr.decode(errors="replace")
    assert ours.stdout.replace(str(roots[1]).encode(), str(roots[0]).encode()) == theirs.stdout
    assert ours.returncode == theirs.returncode
    moddirs = [root / "lib" / "modules" / kver for root in roots]
    if moddirs[0].is_dir():
        assert_same_outputs(moddirs[1], moddirs[0], (str(roots[1]), str(roots[0])))
    return theirs, ours


# ---- the full Debian tree --------------------------------------------------------------------


@pytest.mark.oracle
def test_full_debian_tree_is_byte_identical(arch_tree: DebianKernel, tmp_path: Path) -> None:
    roots = {}
    for who in ("kmod", "ours"):
        root = tmp_path / who
        link_tree(arch_tree.moddir, root / "lib" / "modules" / arch_tree.release)
        roots[who] = root
    theirs = run_kmod("depmod", ["-C", "/dev/null", "-b", str(roots["kmod"]), arch_tree.release])
    ours = run_ours(["-C", "/dev/null", "-b", str(roots["ours"]), arch_tree.release], cache=tmp_path / "cache")
    assert theirs.returncode == ours.returncode == 0
    assert ours.stderr == theirs.stderr
    ours_dir = roots["ours"] / "lib" / "modules" / arch_tree.release
    theirs_dir = roots["kmod"] / "lib" / "modules" / arch_tree.release
    # Every .bin decodes to the same content and is byte-identical (kmod 30's post-order layout).
    assert_same_outputs(ours_dir, theirs_dir)
    assert len((ours_dir / "modules.dep").read_text().splitlines()) == len(arch_tree.modules())
    # A warm run (the cache kept) replays the same bytes.
    for name in OUTPUTS:
        (ours_dir / name).unlink()
    again = run_ours(["-C", "/dev/null", "-b", str(roots["ours"]), arch_tree.release], cache=tmp_path / "cache")
    assert again.returncode == 0 and again.stderr == theirs.stderr
    assert_same_outputs(ours_dir, theirs_dir)
    shown = run_ours(["-n", "-C", "/dev/null", "-b", str(roots["ours"]), arch_tree.release])
    kmod_shown = run_kmod("depmod", ["-n", "-C", "/dev/null", "-b", str(roots["kmod"]), arch_tree.release])
    assert shown.stdout == kmod_shown.stdout and shown.returncode == kmod_shown.returncode


@pytest.mark.oracle
def test_fast_symbol_reader_matches_the_elf_reader(arch_tree: DebianKernel) -> None:
    for path in arch_tree.modules()[::7]:
        record = read_module(str(path))
        module = ModuleFile.open(str(path))
        raw = [(s.name.encode("utf-8", "surrogateescape"), s.crc) for s in module.exported_symbols]
        assert [(name, crc) for name, crc, _h in record[1]] == raw
        imports = [
            (s.name.encode("utf-8", "surrogateescape"), s.crc, s.bind == "weak") for s in module.dependency_symbols
        ]
        assert unpack_imports(record[2]) == imports
        assert list(record[3]) == module.aliases
    assert MAX_MODULE_FILE == module_reader.MAX_MODULE_FILE
    for path in arch_tree.modules():
        data = path.read_bytes()
        assert fast_record(data) == parse_elf(ElfFile(data, str(path))), path


# ---- small trees of real modules -------------------------------------------------------------

FAT = "kernel/fs/fat"


def small_tree(kernel: DebianKernel, layout: dict[str, str], extra: dict[str, bytes] | None = None) -> object:
    """A builder for a root whose lib/modules/KVER holds real modules: layout maps a relative
    destination to a path relative to the Debian module directory."""

    def build(root: Path) -> None:
        moddir = root / "lib" / "modules" / KVER
        for target, source in layout.items():
            destination = moddir / target if not target.startswith("/") else root / target.lstrip("/")
            destination.parent.mkdir(parents=True, exist_ok=True)
            data = (kernel.moddir / source).read_bytes()
            if target.endswith(".xz"):
                data = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
            elif target.endswith(".zst"):
                data = zstandard.ZstdCompressor().compress(data)
            destination.write_bytes(data)
        for target, data in (extra or {}).items():
            destination = root / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(data)

    return build


PRIORITY_LAYOUT = {f"{d}/fat.ko": f"{FAT}/fat.ko" for d in ("kernel/a", "kernel/b", "updates", "extra", "ext1")}
PRIORITY_LAYOUT.update(
    {
        "kernel/a/vfat.ko": f"{FAT}/vfat.ko",
        "updates/msdos.ko": f"{FAT}/msdos.ko",
        "/ext/one/fat.ko": f"{FAT}/fat.ko",
        "/ext/two/vfat.ko": f"{FAT}/vfat.ko",
    }
)

CONFIGS = [
    "",
    "search extra updates\n",
    "search updates extra\n",
    "search extra\nsearch updates\n",
    "search built-in\n",
    "search built-in extra\n",
    "search extra built-in\n",
    "search kernel\n",
    "search kernel/a kernel/b\n",
    "search kernel/b kernel/a\n",
    "override fat * ext1\noverride fat * extra\n",
    "override fat * extra\noverride fat * ext1\n",
    "override fat 9.* ext1\noverride fat 1\\.2 extra\n",
    "external 1.2 @ROOT@/ext/one\nsearch external updates\n",
    "external 1.2 @ROOT@/ext/one\nexternal * @ROOT@/ext/two\nsearch updates external\n",
    "external 1.2 @ROOT@/ext/two\nexternal 1.2 @ROOT@/ext/one\nsearch external\n",
    "external 1.2 @ROOT@/ext/one\nsearch built-in updates\n",
    "external 1.2 @ROOT@/missing\n",
    "exclude updates extra\n",
    "exclude fat.ko b\n",
    "external\noverride fat\nexclude\nsearch\nexternal 1.2\nexternal 9 /x\ninclude foo\nmake_map_files\n",
    "bogus line\n  # indented comment\n#comment\n\n \t\nsearch\\\n extra\nfoo\\\n\\\nbar\n",
    "external [ @ROOT@/ext/one\nsearch external\noverride x ( y\n",
]


@pytest.mark.oracle
@pytest.mark.parametrize("config", CONFIGS)
def test_depmod_d_directives(kernel_tree: DebianKernel, tmp_path: Path, config: str) -> None:
    build = small_tree(kernel_tree, PRIORITY_LAYOUT)

    def with_config(root: Path) -> None:
        build(root)  # type: ignore[operator]
        (root / "depmod.conf").write_text(config.replace("@ROOT@", str(root)))

    same_run(tmp_path, with_config, ["-C", "@ROOT@/depmod.conf"])


@pytest.mark.oracle
def test_config_directories_and_verbose(kernel_tree: DebianKernel, tmp_path: Path) -> None:
    build = small_tree(
        kernel_tree,
        PRIORITY_LAYOUT,
        {
            "c1/x.conf": b"search extra\n",
            "c2/x.conf": b"bogus\n",
            "c2/a.conf": b"bogus2\n",
            "c2/b.txt": b"bogus3\n",
            "c2/.h.conf": b"bogus4\n",
            "c2/d.conf/f": b"",
        },
    )
    same_run(tmp_path, build, ["-C", "@ROOT@/c1", "-C", "@ROOT@/c2", "-C", "@ROOT@/none"])
    shutil.rmtree(tmp_path / "kmod")
    shutil.rmtree(tmp_path / "ours")
    same_run(tmp_path, build, ["-v", "-C", "@ROOT@/c1", "-C", "@ROOT@/c2"])


@pytest.mark.oracle
def test_modules_order_compressed_and_builtin(kernel_tree: DebianKernel, tmp_path: Path) -> None:
    layout = {
        "kernel/fs/fat/fat.ko.xz": f"{FAT}/fat.ko",
        "kernel/fs/fat/vfat.ko.zst": f"{FAT}/vfat.ko",
        "kernel/fs/fat/msdos.ko": f"{FAT}/msdos.ko",
        "kernel/fs/fat/ignored.ko.gz": f"{FAT}/msdos.ko",
        "kernel/fs/autofs/autofs4.ko": "kernel/fs/autofs/autofs4.ko",
        "kernel/fs/fuse/fuse.ko": "kernel/fs/fuse/fuse.ko",
    }
    order = b"kernel/fs/fat/vfat.ko\nkernel/fs/fuse/fuse.ko\nkernel/fs/fat/msdos.ko\nkernel/fs/fat/vfat.ko\n"
    moddir = kernel_tree.moddir
    extra = {
        f"lib/modules/{KVER}/modules.order": order,
        f"lib/modules/{KVER}/modules.builtin": (moddir / "modules.builtin").read_bytes() + b"#bad\n",
        f"lib/modules/{KVER}/modules.builtin.modinfo": (moddir / "modules.builtin.modinfo").read_bytes(),
    }
    same_run(tmp_path, small_tree(kernel_tree, layout, extra), ["-C", "/dev/null"])
    for name in ("kmod", "ours"):
        shutil.rmtree(tmp_path / name)
    extra[f"lib/modules/{KVER}/modules.order"] = order.rstrip(b"\n")
    same_run(tmp_path, small_tree(kernel_tree, layout, extra), ["-C", "/dev/null"])
    for name in ("kmod", "ours"):
        shutil.rmtree(tmp_path / name)
    theirs, _ours = same_run(tmp_path, small_tree(kernel_tree, layout, extra), ["-n", "-C", "/dev/null"])
    assert b"alias devname:fuse fuse" in theirs.stdout


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("flags", "tail"),
    [
        (["-e"], [KVER]),
        (["-w"], [KVER]),
        (["-q", "--root", "-m"], [KVER]),
        (["-P", "ab"], [KVER]),
        (["-Z"], [KVER]),
        ([], ["foo"]),
        ([], [KVER, "relative.ko"]),
        ([], [KVER, f"@ROOT@/lib/modules/{KVER}/updates/msdos.ko", "@ROOT@/ext/two/vfat.ko"]),
        ([], [KVER, "/nonexistent.ko"]),
        (["-a"], [KVER, "/nonexistent.ko"]),
        (["-A"], [KVER]),
        (["-h"], []),
        (["-V"], []),
        (["-n"], [KVER]),
    ],
)
def test_flags_and_errors(kernel_tree: DebianKernel, tmp_path: Path, flags: list[str], tail: list[str]) -> None:
    layout = {
        "updates/msdos.ko": f"{FAT}/msdos.ko",
        "kernel/fat.ko": f"{FAT}/fat.ko",
        "/ext/two/vfat.ko": f"{FAT}/vfat.ko",
    }
    extra = {f"lib/modules/{KVER}/kernel/bad.ko": b"not an ELF file\n"}
    _run_with_tail(tmp_path, kernel_tree, layout, extra, ["-C", "/dev/null", *flags], tail)


def _run_with_tail(
    tmp_path: Path,
    kernel: DebianKernel,
    layout: dict[str, str],
    extra: dict[str, bytes],
    flags: list[str],
    tail: list[str],
) -> None:
    """Like same_run, with positional arguments (version first) given explicitly."""
    roots = [tmp_path / "kmod", tmp_path / "ours"]
    build = small_tree(kernel, layout, extra)
    for root in roots:
        build(root)  # type: ignore[operator]
    results = []
    for root, runner in zip(roots, ("kmod", "ours")):
        argv = ["-b", str(root), *flags, *[a.replace("@ROOT@", str(root)) for a in tail]]
        results.append(run_kmod("depmod", argv) if runner == "kmod" else run_ours(argv))
    theirs, ours = results
    assert ours.stderr.replace(str(roots[1]).encode(), str(roots[0]).encode()) == theirs.stderr
    assert ours.stdout == theirs.stdout
    assert ours.returncode == theirs.returncode
    assert_same_outputs(
        roots[1] / "lib" / "modules" / KVER, roots[0] / "lib" / "modules" / KVER, (str(roots[1]), str(roots[0]))
    )


# ---- cycles from synthetic modules -----------------------------------------------------------


def synthetic(name: str, exports: list[str], imports: list[str], aliases: tuple[str, ...] = ()) -> bytes:
    spec = ModuleSpec(
        name=name,
        vermagic=f"{KVER} SMP mod_unload modversions ",
        imports=[(sym, 0x1000 + len(sym)) for sym in imports],
        exports=[Export(sym, crc=0x1000 + len(sym)) for sym in exports],
        modinfo=[("license", "GPL"), *[("alias", alias) for alias in aliases]],
    )
    return build_module(spec)


def synthetic_tree(modules: dict[str, bytes]) -> object:
    def build(root: Path) -> None:
        moddir = root / "lib" / "modules" / KVER / "kernel"
        moddir.mkdir(parents=True, exist_ok=True)
        for name, data in modules.items():
            (moddir / f"{name}.ko").write_bytes(data)

    return build


@pytest.mark.oracle
def test_dependency_cycles_fail_like_kmod(tmp_path: Path) -> None:
    modules = {
        "mod-loop-a": synthetic("mod_loop_a", ["sym_a"], ["sym_b"]),
        "mod-loop-b": synthetic("mod_loop_b", ["sym_b"], ["sym_c"]),
        "mod-loop-c": synthetic("mod_loop_c", ["sym_c"], ["sym_a"]),
        "mod-loop-d": synthetic("mod_loop_d", ["sym_d"], ["sym_e"]),
        "mod-loop-e": synthetic("mod_loop_e", ["sym_e"], ["sym_d", "sym_f"]),
        "mod-below": synthetic("mod_below", ["sym_f"], []),
        "mod-user": synthetic("mod_user", [], ["sym_a", "sym_missing"]),
    }
    theirs, _ours = same_run(tmp_path, synthetic_tree(modules), ["-C", "/dev/null"])
    assert theirs.returncode == 1 and b"Cycle detected" in theirs.stderr
    assert not (tmp_path / "ours" / "lib" / "modules" / KVER / "modules.dep").exists()


@pytest.mark.oracle
def test_synthetic_dependencies_aliases_and_brackets(tmp_path: Path) -> None:
    modules = {
        "base": synthetic("base", ["b1", "b2", "shared"], [], ("devname:dev-x", "char-major-10-200", "a-b[1-2]x")),
        "mid": synthetic("mid", ["m1", "shared"], ["b1"], ("bad]alias", "unclosed[x", "mid-alias-1")),
        "top": synthetic("top", [], ["m1", "b2", "shared", "unknown_sym"], ("devname:only",)),
        "dash-name": synthetic("dash_name", [], ["m1"], ("block-major-+3-4", "devname:d")),
    }
    same_run(tmp_path, synthetic_tree(modules), ["-C", "/dev/null", "-w"])


def graph_tree(graph: dict[str, list[str]], order: str | None = None) -> object:
    """Synthetic modules where each exports ``sym_<name>`` and imports its dependencies' symbols,
    in the order given (that is the order of depmod's dependency list); ``order`` is written as
    modules.order when given."""
    modules = {
        name.replace("_", "-"): synthetic(name, [f"sym_{name}"], [f"sym_{d}" for d in deps])
        for name, deps in graph.items()
    }
    build_modules = synthetic_tree(modules)

    def build(root: Path) -> None:
        assert callable(build_modules)
        build_modules(root)
        if order is not None:
            (root / "lib" / "modules" / KVER / "modules.order").write_text(order)

    return build


# kmod 30's testsuite case depmod_detect_loop: module-playground/mod-loop-{a..k}.c, each calling
# the others' print functions in this order, under an empty modules.order.
DETECT_LOOP = {
    "mod_loop_a": ["mod_loop_b", "mod_loop_f", "mod_loop_g"],
    "mod_loop_b": ["mod_loop_c", "mod_loop_f", "mod_loop_g"],
    "mod_loop_c": ["mod_loop_a"],
    "mod_loop_d": ["mod_loop_e"],
    "mod_loop_e": ["mod_loop_d"],
    "mod_loop_f": [],
    "mod_loop_g": [],
    "mod_loop_h": ["mod_loop_i"],
    "mod_loop_i": ["mod_loop_j"],
    "mod_loop_j": ["mod_loop_h", "mod_loop_k"],
    "mod_loop_k": ["mod_loop_h"],
}
# Its expected stderr, testsuite/rootfs-pristine/test-depmod/detect-loop/correct.txt.
DETECT_LOOP_STDERR = b"""depmod: ERROR: Cycle detected: mod_loop_d -> mod_loop_e -> mod_loop_d
depmod: ERROR: Cycle detected: mod_loop_i -> mod_loop_j -> mod_loop_k -> mod_loop_h -> mod_loop_i
depmod: ERROR: Cycle detected: mod_loop_i -> mod_loop_j -> mod_loop_h -> mod_loop_i
depmod: ERROR: Cycle detected: mod_loop_c -> mod_loop_a -> mod_loop_b -> mod_loop_c
depmod: ERROR: Found 9 modules in dependency cycles!
"""


def test_detect_loop_matches_kmods_testsuite(tmp_path: Path) -> None:
    build = graph_tree(DETECT_LOOP, order="")
    assert callable(build)
    build(tmp_path)
    ours = run_ours(["-b", str(tmp_path), KVER])
    assert (ours.returncode, ours.stdout, ours.stderr) == (1, b"", DETECT_LOOP_STDERR)
    assert not (tmp_path / "lib" / "modules" / KVER / "modules.dep").exists()


CYCLE_SHAPES = {
    "detect-loop": DETECT_LOOP,
    "two disjoint": {"a": ["b"], "b": ["a"], "c": ["d"], "d": ["e"], "e": ["c"]},
    "tail below": {"a": ["b"], "b": ["c"], "c": ["a", "x"], "x": ["y"], "y": []},
    "tail above": {"r": ["a"], "a": ["b"], "b": ["a"]},
    "two through one": {"a": ["b", "c"], "b": ["a"], "c": ["a"]},
    "fan": {"a": ["b", "c", "d", "e"], "b": ["a"], "c": ["a"], "d": ["a"], "e": ["a"]},
    "nested": {"a": ["b"], "b": ["c", "a"], "c": ["d", "b"], "d": ["a"]},
    "figure eight": {"m": ["a", "c"], "a": ["m"], "c": ["m"]},
    "cycle below a cycle": {"a": ["b"], "b": ["a", "p"], "p": ["q"], "q": ["p"]},
}
LOOPS_FOREVER = re.compile(rb"depmod: ERROR: Cycles reached from \S+ cannot be reported \(kmod 30 loops forever\)\n")


@pytest.mark.oracle
@pytest.mark.parametrize("ordered", [False, True], ids=["hash order", "modules.order"])
@pytest.mark.parametrize("shape", sorted(CYCLE_SHAPES))
def test_cycle_reports_like_kmod(tmp_path: Path, shape: str, ordered: bool) -> None:
    """Every report in kmod's order. Where kmod's walk overruns the stack it sized by the number
    of roots, it dies on an assertion (SIGABRT) after its reports: ours prints the same and fails.
    Where the walk enters a cycle without its start, kmod never ends (printing ever longer
    reports, or nothing): ours prints kmod's first reports, then says so and fails."""
    graph = CYCLE_SHAPES[shape]
    order = "".join(f"kernel/{name.replace('_', '-')}.ko\n" for name in sorted(graph, reverse=True)) if ordered else ""
    roots = [tmp_path / "kmod", tmp_path / "ours"]
    for root in roots:
        build = graph_tree(graph, order)
        assert callable(build)
        build(root)
    theirs = run_kmod_bounded("depmod", ["-b", str(roots[0]), "-C", "/dev/null", KVER], seconds=3)
    ours = run_ours(["-b", str(roots[1]), "-C", "/dev/null", KVER])
    stderr = ours.stderr.replace(str(roots[1]).encode(), str(roots[0]).encode())
    assert (ours.returncode, ours.stdout) == (1, theirs.stdout)
    if theirs.returncode is None:
        *reports, last = stderr.splitlines(keepends=True)
        assert LOOPS_FOREVER.fullmatch(last)
        assert theirs.stderr.startswith(b"".join(reports))
    else:
        assert theirs.returncode in (1, -signal.SIGABRT)
        assert stderr == theirs.stderr
    assert not (roots[1] / "lib" / "modules" / KVER / "modules.dep").exists()


# ---- cache -------------------------------------------------------------------------------------


def test_cache_never_serves_a_changed_module(tmp_path: Path) -> None:
    root = tmp_path / "root"
    synthetic_tree({"a": synthetic("a", ["x"], []), "b": synthetic("b", [], ["x"])})(root)  # type: ignore[operator]
    moddir = root / "lib" / "modules" / KVER
    args = ["-C", "/dev/null", "-b", str(root), KVER]
    first = run_ours(args, cache=tmp_path / "cache")
    assert first.returncode == 0
    assert (moddir / "modules.dep").read_text() == "kernel/b.ko: kernel/a.ko\nkernel/a.ko:\n"
    (moddir / "kernel" / "b.ko").write_bytes(synthetic("b", [], []))
    second = run_ours(args, cache=tmp_path / "cache")
    assert second.returncode == 0
    assert (moddir / "modules.dep").read_text() == "kernel/b.ko:\nkernel/a.ko:\n"
    assert any((tmp_path / "cache").iterdir())


def test_unchanged_outputs_are_touched_and_changed_ones_rewritten(tmp_path: Path) -> None:
    """A rerun on an unchanged tree writes nothing (same inodes, times moved to now); an output
    that differs, has another mode or another link is written again, as kmod writes it."""
    root = tmp_path / "root"
    synthetic_tree({"a": synthetic("a", ["x"], [], ("a-alias",)), "b": synthetic("b", [], ["x"])})(root)  # type: ignore[operator]
    moddir = root / "lib" / "modules" / KVER
    args = ["-C", "/dev/null", "-b", str(root), KVER]
    assert run_ours(args, cache=tmp_path / "cache").returncode == 0
    written = outputs(moddir)
    before = {name: (moddir / name).stat() for name in written}
    for name in written:
        os.utime(moddir / name, ns=(1_000_000_000, 1_000_000_000))
    (moddir / "modules.alias").write_bytes(b"# changed\n")
    (moddir / "modules.symbols").chmod(0o600)
    os.link(moddir / "modules.softdep", tmp_path / "second-link")
    assert run_ours(args, cache=tmp_path / "cache").returncode == 0
    assert outputs(moddir) == written
    after = {name: (moddir / name).stat() for name in written}
    rewritten = {name for name in written if after[name].st_ino != before[name].st_ino}
    assert rewritten == {"modules.alias", "modules.symbols", "modules.softdep"}
    assert all(after[name].st_mtime_ns > 1_000_000_000 for name in written)
    assert (moddir / "modules.symbols").stat().st_mode & 0o777 == 0o644 & ~_umask()
    assert (tmp_path / "second-link").read_bytes() == written["modules.softdep"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- fuzzing -----------------------------------------------------------------------------------

_WORDS = st.sampled_from(
    [
        "search",
        "override",
        "external",
        "exclude",
        "include",
        "make_map_files",
        "built-in",
        "#",
        "*",
        "1.2",
        "[",
        "(",
        "updates",
        "extra",
        "kernel/a",
        "\\",
        "\t",
        " ",
        "fat",
    ]
)


@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_WORDS, st.text(max_size=8)), max_size=20), st.data())
def test_fuzz_config_parser(tmp_path_factory: pytest.TempPathFactory, words: list[str], data: st.DataObject) -> None:
    separators = data.draw(
        st.lists(st.sampled_from([" ", "\n", "\\\n", "\t"]), min_size=len(words), max_size=len(words))
    )
    text = "".join(w + s for w, s in zip(words, separators))
    directory = tmp_path_factory.getbasetemp() / "fuzzconf"
    directory.mkdir(exist_ok=True)
    path = directory / "f.conf"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    messages: list[str] = []
    config, _digest = load_config([str(path)], "1.2.3", Log(lambda _level, text: messages.append(text), 9))
    assert config.searches
    assert all(search.kind in ("path", "built-in", "external") for search in config.searches)
    assert all("\n" not in m[:-1] for m in messages if "ignoring bad line" in m)


_KEYS = st.binary(max_size=12).map(lambda b: bytes(c % 127 + 1 for c in b))


@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_KEYS, _KEYS, st.integers(0, 5)), max_size=30))
def test_fuzz_index_round_trip(entries: list[tuple[bytes, bytes, int]]) -> None:
    builder = IndexBuilder()
    expected: dict[str, list[tuple[int, str]]] = {}
    for key, value, priority in entries:
        builder.add(key, value, priority)
        values = expected.setdefault(key.decode(), [])
        position = 0
        while position < len(values) and values[position][0] < priority:
            position += 1
        values.insert(position, (priority, value.decode()))
    data = builder.to_bytes()
    index = Index("fuzz", data)
    assert index.to_dict() == expected
    for text, values in expected.items():
        assert index.lookup(text) == values[0][1]


def test_index_rejects_non_ascii() -> None:
    with pytest.raises(IndexCharacterError):
        IndexBuilder().add("é".encode(), b"x", 0)
    assert IndexBuilder().to_bytes() == bytes.fromhex("B007F457000200010000000C")
