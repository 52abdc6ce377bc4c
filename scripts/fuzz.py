#!/usr/bin/env python3
"""Mutation fuzzing of every reader kvc points at files it did not write itself.

Kinds of input, each from real seeds, each run through the entry points a user hits:

========== ===================================================== =====================================
kind       seeds                                                 entry points
========== ===================================================== =====================================
module     small modules of Debian's kernel tree (signed), and   ``kvc kmod modinfo FILE``,
           xz/gzip/zstd copies                                   :class:`ModuleFile`, depmod's reader
index      modules.{dep,alias,symbols,builtin,builtin.alias}.bin ``Index`` lookups and walks,
           modules.dep, modules.builtin.modinfo: Debian's        ``ModuleDirectory.resolve``,
           depmod run on a small tree of Debian's modules        ``load_plan`` (``modprobe -D``),
                                                                 ``kvc kmod modinfo/modprobe -D``
modprobe.d the host's /lib/modprobe.d and /etc/modprobe.d, and   ``parse_config``, ``load_plan``,
           one using every directive                             ``kvc kmod modprobe -C CONF -D/-c``
depmod.d   two using every directive                             ``kvc kmod depmod -n -C CONF``
kvc-conf   examples/*/*.conf, an instance conf using every key,  ``InstanceConfig.load``,
           a global conf                                         ``GlobalConfig.load``, ``kvc status``
dkms-rec   the records kvc's driver prints for the dkms.conf of  ``parse_records``, ``DkmsConf``
           the five Debian DKMS packages (tests/support/dkms.py)
           when cached, and synthetic ones
dkms-src   those packages when cached, tarballs (plain, gzip,    ``kvc.dkms.source.locate``
           xz, zstd, DKMS mktarball)
========== ===================================================== =====================================

Mutations: bit flips, bytes set to 0/0x7f/0x80/0xff, integers (structure fields of ELF headers and
section headers, index headers, or anywhere; both byte orders) set to 0, -1, INT_MAX, the file
size, ...; truncation; chunk duplication and removal; splicing two seeds; for text, tokens the
parsers treat specially; for compressed modules, mutating the ELF inside and compressing again.

Every case is a pure function of (seed, case number): ``--case N`` replays one in this process.
Cases run in batches in worker processes (``--jobs``) under an address-space cap (``--rss-cap``,
RLIMIT_AS); a case that takes longer than ``--timeout`` seconds is a hang (the worker is killed).
A case passes when it returns or raises the error type its reader documents (kvc.kmod's
``KmodError``, kvc's ``KvcError``, ``LookupError`` from ``load_plan``); anything else is a
traceback. Failing inputs are saved in ``--failures`` with their traceback. Exit status 1 when
any case failed.

Stdlib only (plus kvc and tests/support for the seeds): run it with the Python kvc is installed in.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import lzma
import os
import random
import re
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Optional

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "src", REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

if TYPE_CHECKING:
    from support.debian_kernel import DebianKernel

KINDS = ("module", "index", "modprobe.d", "depmod.d", "kvc-conf", "dkms-rec", "dkms-src")
# Share of the cases per kind (modules and indexes are the biggest parsers).
WEIGHTS = {"module": 30, "index": 22, "modprobe.d": 10, "depmod.d": 6, "kvc-conf": 12, "dkms-rec": 10, "dkms-src": 10}
BATCH = 250
FAKE_RELEASE = "6.1.0-fuzz"
INSTANCE = "fuzz"
# Modules of the small tree: these and their dependencies (small, with aliases, softdeps and exports).
TREE_TARGETS = ("dummy", "vxlan", "nf_nat_ftp", "usbserial", "snd_seq_dummy", "loop", "zram", "xt_conntrack")


# ---- the corpus ---------------------------------------------------------------------------------


def _kernel() -> DebianKernel:
    from support.debian_kernel import indexed_debian_kernel

    return indexed_debian_kernel()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def prepare_corpus(directory: Path, seed: int) -> None:
    """Seeds for every kind under ``directory`` (done once per run; workers only read it)."""
    kernel = _kernel()
    rng = random.Random(seed)
    _module_seeds(kernel, directory / "module", rng)
    _tree(kernel, directory / "tree")
    _modprobe_seeds(directory / "modprobe.d")
    _depmod_seeds(directory / "depmod.d")
    _kvc_conf_seeds(directory / "kvc-conf")
    debs = _cached_dkms_debs()
    _dkms_record_seeds(debs, directory / "dkms-rec")
    _dkms_source_seeds(debs, directory / "dkms-src")
    meta = {"release": kernel.release, "dkms_debs": [deb.name for deb in debs]}
    (directory / "meta.json").write_text(json.dumps(meta))


def _module_seeds(kernel: DebianKernel, into: Path, rng: random.Random) -> None:
    from kvc.kmod.compression import compress

    small = sorted((p for p in kernel.modules() if p.stat().st_size < 48_000), key=str)
    chosen = rng.sample(small, 20)
    for number, path in enumerate(chosen):
        _write(into / f"{number:02d}-{path.name}", path.read_bytes())
    for number, kind in enumerate(("xz", "gzip", "zstd")):
        raw = chosen[number].read_bytes()
        suffix = {"xz": ".xz", "gzip": ".gz", "zstd": ".zst"}[kind]
        _write(into / f"c{number}-{chosen[number].name}{suffix}", compress(kind, raw, "seed"))


def _tree(kernel: DebianKernel, root: Path) -> None:
    """A small module tree (TREE_TARGETS and their dependencies, copied from Debian's tree) with
    Debian's depmod's indexes, and the kernel's own modules.builtin* files."""
    from kvc.kmod.moddir import ModuleDirectory

    moddir = root / "lib" / "modules" / kernel.release
    source = ModuleDirectory(str(kernel.moddir))
    wanted: set[str] = set()
    for name in TREE_TARGETS:
        entry = source.lookup_module(name)
        if entry is not None and entry.path is not None:
            wanted.update([entry.path, *entry.dependencies])
    for path in sorted(wanted):
        relative = os.path.relpath(path, kernel.moddir)
        _write(moddir / relative, Path(path).read_bytes())
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (kernel.moddir / name).exists():
            shutil.copy(kernel.moddir / name, moddir / name)
    (moddir / "modules.softdep").write_text("# Soft dependencies\nsoftdep vxlan pre: dummy post: loop\n")
    subprocess.run(["depmod", "-C", "/dev/null", "-b", str(root), kernel.release], check=True, capture_output=True)


SYNTHETIC_MODPROBE = b"""# every directive modprobe.d knows
alias net-pf-99 dummy
alias pci:v00008086d*sv*sd*bc*sc*i* vxlan
alias my[-_]loop* loop
options dummy numdummies=2 "quoted=a b"
options vxlan udp_port=4789 \\
    log_ecn_error=1
install zram /sbin/modprobe --ignore-install zram $CMDLINE_OPTS && echo done
remove zram /sbin/modprobe -r --ignore-remove zram
blacklist usbserial
softdep nf_nat_ftp pre: nf_conntrack_ftp dummy post: loop
softdep loop pre: zram
include /etc/modprobe.d/other.conf
config legacy
weakdep dummy loop
  # an indented comment is a bad line
"""

SYNTHETIC_DEPMOD = (
    b"# depmod.d\nsearch updates extra built-in external\nsearch kernel\n"
    b"override dummy * extra\noverride loop 6\\.1.* updates\n"
    b"external * /nonexistent/kvc-fuzz\nexternal 6\\..* extra-modules\nexclude .git build\n"
    b"make_map_files no\ninclude /dev/null\n",
    b"search kernel/drivers updates\noverride vxlan " + FAKE_RELEASE.encode() + b" kernel/drivers/net\n",
)


def _modprobe_seeds(into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for directory in ("/lib/modprobe.d", "/etc/modprobe.d"):
        if os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                if name.endswith(".conf") and os.path.isfile(path):
                    shutil.copy(path, into / f"host-{name}")
    _write(into / "synthetic.conf", SYNTHETIC_MODPROBE)


def _depmod_seeds(into: Path) -> None:
    for number, text in enumerate(SYNTHETIC_DEPMOD):
        _write(into / f"synthetic{number}.conf", text)


SYNTHETIC_INSTANCE = """# every key of an instance conf
export KMOD_CONTAINER_BUILD_CONTEXT="https://example.invalid/kmods.git"
KMOD_CONTAINER_BUILD_FILE=Containerfile.kvc
KMOD_SOFTWARE_VERSION=1.2.3+git
BASE=demo
KMOD_NAMES="${BASE}-one demo_two"
KVC_MODULE_PARAMS_demo_two='debug=1 name="x y"'
KVC_WRAPPER_TOOLS="democtl demo-tool"
KVC_BUILD_ARGS="ARCH=x86_64 FLAVOUR=$BASE"
KVC_SMOKE_TEST="test -d /sys/module/demo_two && echo \\"ok\\""
KVC_KEEP_KERNELS=2
KVC_REGISTRY_FALLBACK=build
KVC_DELIVERY=tree
KVC_FIRMWARE="vendor/demo.bin vendor/dir"
KVC_MODPROBE_CONF="/etc/demo/demo.conf"
KVC_MODULES_LOAD=yes
KVC_UDEV_RULES=/usr/lib/udev/rules.d/99-demo.rules
KVC_INTREE_MODULES="dummy loop"
KVC_VERIFY_DEVICES="edu e1000,netdev=n0"
KVC_VERIFY_REQUIRED=no
KVC_SIGN_KEY=/etc/kvc/keys/mok.key
KVC_SIGN_CERT=/etc/kvc/keys/mok.der
KVC_SIGN_HASH=sha256
KVC_DKMS=demo/1.2.3
"""

SYNTHETIC_REGISTRY_INSTANCE = """KMOD_SOFTWARE_VERSION=2.0
KMOD_NAMES=demo
KVC_REGISTRY=registry.invalid/kmods/demo
KVC_REGISTRY_FALLBACK=fail
KVC_REGISTRY_DIGESTS="6.1.0-1-amd64=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
"""

SYNTHETIC_GLOBAL = """KVC_CONTAINER_RUNTIME=podman
KVC_RUNTIME_ARGS="--log-level=error --root=/var/lib/kvc-containers"
KVC_REGISTRY_AUTH_FILE=/etc/kvc/auth.json
KVC_REGISTRY_CERTS_DIR=/etc/kvc/certs.d
KVC_REGISTRY_TLS_VERIFY=yes
"""


def _kvc_conf_seeds(into: Path) -> None:
    for conf in sorted((REPO / "examples").glob("*/*.conf")):
        _write(into / "instance" / conf.name, conf.read_bytes())
    _write(into / "instance" / "synthetic.conf", SYNTHETIC_INSTANCE.encode())
    _write(into / "instance" / "registry.conf", SYNTHETIC_REGISTRY_INSTANCE.encode())
    _write(into / "global" / "kmods-via-containers.conf", SYNTHETIC_GLOBAL.encode())


def _cached_dkms_debs() -> list[Path]:
    """The five Debian DKMS packages if tests/framework/test_dkms.py has downloaded them into the
    test cache (never fetched here: without them the dkms kinds use synthetic seeds)."""
    from support.debian_kernel import cache_dir
    from support.dkms import PACKAGES

    found = []
    for package in PACKAGES:
        debs = sorted((cache_dir() / "dkms").glob(f"{package.deb}_*.deb"))
        if debs:
            found.append(debs[-1])
    return found


# The assignments kvc's driver prints as records: NAME=value and NAME[i]=value, quotes removed
# (the packages' dkms.conf files are plain assignments; values with $ stay as written).
_ASSIGNMENT = re.compile(rb'^\s*([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?=(?:"([^"]*)"|\'([^\']*)\'|(\S*))', re.M)

SYNTHETIC_RECORDS = (
    [
        ("PACKAGE_NAME", 0, "demo"),
        ("PACKAGE_VERSION", 0, "1.0+1"),
        ("BUILT_MODULE_NAME", 0, "demo"),
        ("BUILT_MODULE_NAME", 1, "demo_extra"),
        ("BUILT_MODULE_LOCATION", 1, "extra/"),
        ("DEST_MODULE_LOCATION", 0, "/updates"),
        ("DEST_MODULE_LOCATION", 1, "/extra/demo"),
        ("DEST_MODULE_NAME", 1, "demo-x"),
        ("STRIP", 0, "no"),
        ("MAKE", 0, "make -C $kernel_source_dir M=$PWD"),
        ("AUTOINSTALL", 0, "yes"),
        ("BUILD_EXCLUSIVE_KERNEL", 0, "^6\\."),
    ],
    [("PACKAGE_NAME", 0, "solo"), ("PACKAGE_VERSION", 0, "0.1"), ("DEST_MODULE_LOCATION", 0, "/kernel/drivers")],
)


def _records(entries: list[tuple[str, int, str]]) -> bytes:
    return b"".join(f"{name}\0{index}\0{value}\0".encode() for name, index, value in entries)


def _dkms_record_seeds(debs: list[Path], into: Path) -> None:
    for number, entries in enumerate(SYNTHETIC_RECORDS):
        _write(into / f"synthetic{number}.rec", _records(entries))
    from kvc.dkms.source import locate

    for deb in debs:
        with tempfile.TemporaryDirectory() as scratch:
            tree = locate(str(deb), scratch).tree
            text = Path(tree, "dkms.conf").read_bytes()
        entries = []
        for match in _ASSIGNMENT.finditer(text):
            value = next((group for group in match.groups()[2:] if group is not None), b"")
            entries.append((match.group(1).decode(), int(match.group(2) or 0), value.decode("utf-8", "replace")))
        _write(into / f"{deb.name.split('_')[0]}.rec", _records(entries))


def _dkms_source_seeds(debs: list[Path], into: Path) -> None:
    for deb in debs:
        _write(into / deb.name, deb.read_bytes())
    files = {
        "demo-1.0/dkms.conf": b"PACKAGE_NAME=demo\nPACKAGE_VERSION=1.0\nBUILT_MODULE_NAME[0]=demo\n",
        "demo-1.0/Makefile": b"obj-m += demo.o\n",
        "demo-1.0/demo.c": b'#include <linux/module.h>\nMODULE_LICENSE("GPL");\n',
    }

    def tar_bytes(members: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("demo-1.0/link.c")
            link.type = tarfile.SYMTYPE
            link.linkname = "demo.c"
            tar.addfile(link)
        return out.getvalue()

    _write(into / "demo.tar", tar_bytes(files))
    _write(into / "demo.tar.gz", gzip.compress(tar_bytes(files), mtime=0))
    _write(into / "demo.tar.xz", lzma.compress(tar_bytes(files)))
    mktarball = {name.replace("demo-1.0/", "dkms_source_tree/"): data for name, data in files.items()}
    _write(into / "demo-mktarball.tar.gz", gzip.compress(tar_bytes(mktarball), mtime=0))
    from kvc.kmod.compression import compress

    _write(into / "demo.tar.zst", compress("zstd", tar_bytes(files), "seed"))
    packaged = {f"usr/src/{name}": data for name, data in files.items()}
    for suffix, payload in (
        (".zst", compress("zstd", tar_bytes(packaged), "seed")),
        (".gz", gzip.compress(tar_bytes(packaged), mtime=0)),
    ):
        _write(into / f"demo-dkms_1.0_all{suffix}.deb", _ar({"debian-binary": b"2.0\n", f"data.tar{suffix}": payload}))


def _ar(members: dict[str, bytes]) -> bytes:
    """A Debian package's ar container."""
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    return out


class Corpus:
    """The seeds of one kind, read from the prepared corpus directory."""

    def __init__(self, directory: Path, kind: str) -> None:
        self.directory = directory
        self.kind = kind
        self.meta = json.loads((directory / "meta.json").read_text())
        self.release: str = self.meta["release"]
        self.tree = directory / "tree"
        self.moddir = self.tree / "lib" / "modules" / self.release
        if kind == "index":
            names = ["modules.dep.bin", "modules.alias.bin", "modules.symbols.bin", "modules.builtin.bin"]
            names += ["modules.builtin.alias.bin", "modules.dep", "modules.builtin.modinfo", "modules.softdep"]
            self.seeds = [(name, (self.moddir / name).read_bytes()) for name in names if (self.moddir / name).exists()]
        elif kind == "kvc-conf":
            self.seeds = [
                (f"instance/{p.name}", p.read_bytes()) for p in sorted((directory / kind / "instance").iterdir())
            ]
            self.seeds += [
                (f"global/{p.name}", p.read_bytes()) for p in sorted((directory / kind / "global").iterdir())
            ]
        else:
            self.seeds = [(p.name, p.read_bytes()) for p in sorted((directory / kind).iterdir())]
        self.lookups = self._lookups() if kind in ("index", "modprobe.d") else []

    def _lookups(self) -> list[str]:
        """Names to resolve: the tree's modules, some of their aliases and symbols."""
        from kvc.kmod.index import Index

        names = [name.replace("-", "_") for name in TREE_TARGETS]
        for index_name, take in (("modules.alias.bin", 12), ("modules.symbols.bin", 8), ("modules.dep.bin", 40)):
            with Index.open(str(self.moddir / index_name)) as index:
                keys = [item.key for item in index.items()]
            names += random.Random(index_name).sample(keys, min(take, len(keys)))
        names += ["pci:v00008086d00001234sv00000000sd00000000bc02sc00i00", "net-pf-99", "symbol:nosuch", "my-loop0"]
        return names


# ---- mutations ------------------------------------------------------------------------------------

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x20, 0x0A, 0x3D, 0x5C, 0x22)
TEXT_TOKENS = (
    b"\\",
    b"\\\n",
    b"\n",
    b"\0",
    b'"',
    b"'",
    b"$",
    b"${",
    b"}",
    b"$(",
    b"`",
    b"[",
    b"]",
    b"#",
    b"=",
    b" ",
    b"\t",
    b"*",
    b"?",
    b"-",
    b"..",
    b"/",
    b":",
    b",",
    b"\xff\xfe",
    b"\xc3",
    b"\xed\xa0\x80",
    b"pre:",
    b"post:",
    b"softdep",
    b"alias",
    b"options",
    b"install",
    b"blacklist",
    b"search",
    b"override",
    b"external",
    b"KMOD_NAMES=",
    b"KVC_REGISTRY=",
    b"export ",
    b"A" * 300,
    b"9" * 25,
    b"-1",
    b"[0]",
    b"%s",
    b"\r\n",
    # Text that str methods treat unlike the C and shell parsers: other digits, spaces and line ends.
    "²".encode(),
    "٣".encode(),
    "\u00a0".encode(),
    "\u2028".encode(),
    "\u0085".encode(),
    b"\x0b",
    b"\x0c",
    b"\x1c",
)
DECIMALS = (b"-1", b"-60", b"0", b"+4", b"4_0", b" 7", b"99999999999", b"4294967296", "²".encode(), b"1" * 5000)
# Values for the value-substitution mutation of confs.
TEXT_VALUES = (
    b"",
    b"0",
    b"-0",
    b"+1",
    b"00",
    b"1e3",
    b"0x10",
    b"yes",
    b"no",
    b'""',
    b"''",
    b"-",
    b"--x",
    b"/",
    b"..",
    b"../..",
    b"a/../../b",
    b"$X",
    b"${X}",
    b"a b",
    b"\xff",
    "²".encode(),
    b"sha256:" + b"0" * 64,
    b"x" * 5000,
)


def _int_values(width: int, size: int, rng: random.Random) -> int:
    top = (1 << (8 * width)) - 1
    value = rng.choice([0, 1, 2, top, top >> 1, (top >> 1) + 1, size, size - 1, size + 1, rng.getrandbits(8 * width)])
    return value & top


def elf_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of the ELF header and section header fields that steer parsing."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    fields = [(4, 1), (5, 1), (0x12, 2), (0x28, 8), (0x3A, 2), (0x3C, 2), (0x3E, 2)]
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    (shnum,) = struct.unpack_from("<H", data, 0x3C)
    for index in range(min(shnum, 200)):
        base = shoff + index * 64
        if base + 64 <= len(data):
            fields += [(base, 4), (base + 4, 4), (base + 8, 8), (base + 0x18, 8), (base + 0x20, 8), (base + 0x28, 4)]
    # The signature trailer's struct module_signature (12 bytes before the 28-byte magic).
    if data.endswith(b"~Module signature appended~\n") and len(data) > 40:
        struct_at = len(data) - 28 - 12
        fields += [(struct_at + i, 1) for i in range(5)] + [(struct_at + 8, 4)]
    return fields


def mutate(data: bytes, rng: random.Random, *, fields: list[tuple[int, int]], other: bytes, text: bool) -> bytes:
    """One to three stacked mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(12)
        size = len(buf)
        if op == 0 and size:  # bit flips
            for _ in range(rng.randrange(1, 9)):
                buf[rng.randrange(size)] ^= 1 << rng.randrange(8)
        elif op == 1 and size:  # interesting byte values
            for _ in range(rng.randrange(1, 5)):
                buf[rng.randrange(size)] = rng.choice(INTERESTING_BYTES)
        elif op in (2, 3) and size >= 8:  # an integer field (structure-aware when we know the structure)
            if fields and rng.random() < 0.8:
                offset, width = rng.choice(fields)
                order: Literal["little", "big"] = "little"
            else:
                width = rng.choice((1, 2, 4, 8))
                offset = rng.randrange(max(1, size - width))
                order = rng.choice(("little", "big"))
            if offset + width <= size:
                buf[offset : offset + width] = _int_values(width, size, rng).to_bytes(width, order)
        elif op == 4:  # truncation
            del buf[rng.randrange(size + 1) :]
        elif op == 5 and size:  # duplicate a chunk somewhere
            start = rng.randrange(size)
            chunk = bytes(buf[start : start + rng.randrange(1, 256)])
            at = rng.randrange(size + 1)
            buf[at:at] = chunk * rng.choice((1, 1, 2, 16))
        elif op == 6 and size:  # remove a chunk
            start = rng.randrange(size)
            del buf[start : start + rng.randrange(1, 256)]
        elif op == 7 and other:  # splice with another seed
            cut = rng.randrange(len(buf) + 1)
            buf = buf[:cut] + other[rng.randrange(len(other) + 1) :]
        elif op == 8 and text:  # a token the parsers treat specially
            at = rng.randrange(size + 1)
            buf[at:at] = rng.choice(TEXT_TOKENS)
        elif op == 8 and size:  # a run of one value
            start = rng.randrange(size)
            run = rng.randrange(1, 64)
            buf[start : start + run] = bytes([rng.choice((0, 0xFF))]) * run
        elif op == 9 and text:  # line-level: duplicate, drop or swap lines
            lines = bytes(buf).split(b"\n")
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            choice = rng.randrange(3)
            if choice == 0:
                lines.insert(j, lines[i])
            elif choice == 1:
                del lines[i]
            else:
                lines[i], lines[j] = lines[j], lines[i]
            buf = bytearray(b"\n".join(lines))
        elif op == 10 and text and size:  # the value after a '=' or ' ' replaced
            separators = [m.end() for m in re.finditer(rb"[= ]", bytes(buf))]
            if separators:
                start = rng.choice(separators)
                end = start
                while end < size and buf[end] not in b" \n":
                    end += 1
                buf[start:end] = rng.choice(TEXT_VALUES)
        elif op == 11 and size:  # a decimal number written over the bytes (ar sizes, record indexes)
            token = rng.choice(DECIMALS)
            start = rng.randrange(size)
            buf[start : start + len(token)] = token
        elif op == 9 and size >= 2:  # signature/trailer region damage
            for _ in range(rng.randrange(1, 6)):
                buf[size - 1 - rng.randrange(min(size, 800))] = rng.randrange(256)
    return bytes(buf)


@dataclass
class Case:
    kind: str
    number: int
    seed_name: str
    data: bytes
    params: dict[str, Any] = field(default_factory=dict)


def case_kind(seed: int, number: int) -> str:
    rng = random.Random(f"{seed}:{number}:kind")
    return rng.choices(KINDS, weights=[WEIGHTS[kind] for kind in KINDS])[0]


def make_case(corpus: Corpus, seed: int, number: int) -> Case:
    """Case ``number`` of the run with ``seed``: the same bytes whoever generates it."""
    rng = random.Random(f"{seed}:{number}")
    kind = corpus.kind
    name, original = rng.choice(corpus.seeds)
    if kind == "index":  # splice only with the same file kind
        other = original
    else:
        other = rng.choice(corpus.seeds)[1]
    text = kind not in ("module", "index", "dkms-src") or name in ("modules.dep", "modules.softdep")
    params: dict[str, Any] = {}
    if kind == "module" and name.endswith((".xz", ".gz")) and rng.random() < 0.5:
        # Damage the ELF inside, then compress it again: the reader must survive both layers.
        inner = lzma.decompress(original) if name.endswith(".xz") else gzip.decompress(original)
        damaged = mutate(inner, rng, fields=elf_fields(inner), other=b"", text=False)
        data = lzma.compress(damaged, preset=0) if name.endswith(".xz") else gzip.compress(damaged, mtime=0)
    else:
        fields = elf_fields(original) if kind == "module" else [(0, 4), (4, 4), (8, 4)] if name.endswith(".bin") else []
        data = mutate(original, rng, fields=fields, other=other, text=text)
    if kind in ("index", "modprobe.d"):
        params["lookups"] = rng.sample(corpus.lookups, 3)
        params["preload"] = rng.random() < 0.5
    if kind == "modprobe.d":
        params["kcmdline"] = rng.choice([None, b'quiet dummy.numdummies=3 modprobe.blacklist=loop,zram vxlan.x="a b"'])
    return Case(kind, number, name, data, params)


# ---- running one case --------------------------------------------------------------------------


def documented_errors(kind: str) -> tuple[type[BaseException], ...]:
    """What each reader documents it raises on bad input."""
    from kvc.errors import KvcError
    from kvc.kmod.errors import KmodError

    if kind in ("module", "index", "modprobe.d", "depmod.d"):
        return (KmodError, LookupError) if kind in ("index", "modprobe.d") else (KmodError,)
    return (KvcError,)


class Runner:
    """Runs cases of one kind in this process (a worker, or ``--case``)."""

    def __init__(self, corpus: Corpus, scratch: Path) -> None:
        self.corpus = corpus
        self.scratch = scratch
        self.documented = documented_errors(corpus.kind)
        self.errors = 0
        self.root = scratch / "root"
        if corpus.kind in ("index", "modprobe.d", "depmod.d"):
            shutil.copytree(corpus.tree, self.root, symlinks=True)
        self.moddir = self.root / "lib" / "modules" / corpus.release
        if corpus.kind in ("index", "modprobe.d", "depmod.d", "kvc-conf"):
            from kvc.kmod.kernel.fake import FakeKernel
            from kvc.kmod.paths import HostPaths

            # The tools and kvc status look at this root's kernel (a fake one), never the host's.
            release = FAKE_RELEASE if corpus.kind == "kvc-conf" else corpus.release
            FakeKernel.create(HostPaths(str(self.root)), release)
            os.environ.update({"KVC_ROOT": str(self.root), "KVC_KERNEL": "fake"})
        if corpus.kind == "kvc-conf":
            (self.root / "etc" / "kvc").mkdir(parents=True)
            # A podman that has no images: the commands read the conf, find no image and go on;
            # none runs a container.
            bin_dir = scratch / "bin"
            bin_dir.mkdir()
            (bin_dir / "podman").write_text('#!/bin/sh\necho "Error: $3: image not known" >&2\nexit 125\n')
            (bin_dir / "podman").chmod(0o755)
            os.environ["PATH"] = f"{bin_dir}:/usr/bin:/bin"

    def attempt(self, action: Callable[..., object], *args: Any) -> None:
        """Run one entry point; a documented error counts, anything else propagates."""
        try:
            action(*args)
        except self.documented:
            self.errors += 1

    def tool(self, main: Callable[[list[str]], int], argv: list[str]) -> None:
        """Run a command's main(); a non-zero exit status is a documented error."""
        if main(argv) != 0:
            self.errors += 1

    def run(self, case: Case, plant: bool = False) -> str:
        """ "clean" or "error"; raises for a traceback. ``plant`` (the harness's self-test) makes
        even-numbered cases hang and odd-numbered ones raise."""
        self.errors = 0
        if plant:
            if case.number % 2 == 0:
                time.sleep(3600)
            raise RuntimeError("planted failure")
        getattr(self, "_" + case.kind.replace(".", "_").replace("-", "_"))(case)
        return "error" if self.errors else "clean"

    def _module(self, case: Case) -> None:
        from kvc.kmod.depmodparse import read_module
        from kvc.kmod.module import ModuleFile
        from kvc.kmod.tools import modinfo

        suffix = (
            "".join(Path(case.seed_name).suffixes[-2:]) if case.seed_name.endswith((".xz", ".gz", ".zst")) else ".ko"
        )
        path = self.scratch / f"case{suffix}"
        path.write_bytes(case.data)
        self.tool(modinfo.main, [str(path)])
        record = read_module(str(path))
        if record[0] is not None:
            self.errors += 1
        module: list[ModuleFile] = []
        self.attempt(lambda: module.append(ModuleFile.open(str(path))))
        if not module:
            return
        mod = module[0]
        for name in ("modinfo", "vermagic", "depends", "aliases", "softdeps", "parameters", "signature"):
            self.attempt(getattr, mod, name)
        for name in ("this_module_name", "exported_symbols", "dependency_symbols", "modversions"):
            self.attempt(getattr, mod, name)

    def _index(self, case: Case) -> None:
        from kvc.kmod.config import ModprobeConfig
        from kvc.kmod.index import Index
        from kvc.kmod.moddir import ModuleDirectory
        from kvc.kmod.modprobe import load_plan
        from kvc.kmod.tools import modinfo, modprobe

        path = self.moddir / case.seed_name
        original = path.read_bytes()
        path.write_bytes(case.data)
        # The text modules.dep is read only when modules.dep.bin is missing.
        binary = self.moddir / "modules.dep.bin"
        hidden = self.scratch / "modules.dep.bin"
        if case.seed_name == "modules.dep":
            binary.rename(hidden)
        try:
            lookups = case.params["lookups"]
            if case.seed_name.endswith(".bin"):

                def walk() -> None:
                    index = Index(str(path), case.data, reader="mmap" if case.params["preload"] else "file")
                    for key in lookups:
                        index.lookup(key)
                        index.search_wildcard(key)
                    sum(1 for _ in index.items())

                self.attempt(walk)
            directory = ModuleDirectory(str(self.moddir), preload=case.params["preload"])
            for key in lookups:
                self.attempt(directory.resolve, key)
                self.attempt(load_plan, directory, ModprobeConfig(), key)
                self.attempt(directory.find_builtin_modinfo, key)
            self.tool(modinfo.main, ["-b", str(self.root), "-k", self.corpus.release, lookups[0]])
            self.tool(modprobe.main, ["-d", str(self.root), "-S", self.corpus.release, "-D", lookups[1]])
        finally:
            path.write_bytes(original)
            if case.seed_name == "modules.dep":
                hidden.rename(binary)

    def _modprobe_d(self, case: Case) -> None:
        from kvc.kmod.config import parse_config
        from kvc.kmod.kernel.libkmod import LOG_ERR
        from kvc.kmod.moddir import ModuleDirectory
        from kvc.kmod.modprobe import load_plan
        from kvc.kmod.tools import modprobe

        config = parse_config([("/etc/modprobe.d/fuzz.conf", case.data)], case.params["kcmdline"])
        # libkmod refuses a bad line by logging it, and reads on.
        self.errors += sum(1 for record in config.logs if record.priority <= LOG_ERR)
        config.show_lines()
        directory = ModuleDirectory(str(self.moddir), preload=case.params["preload"])
        targets = case.params["lookups"] + [pattern for pattern, _module in config.aliases[:2]]
        for key in targets:
            self.attempt(load_plan, directory, config, key)
        path = self.scratch / "fuzz.conf"
        path.write_bytes(case.data)
        argv = ["-C", str(path), "-d", str(self.root), "-S", self.corpus.release]
        self.tool(modprobe.main, [*argv, "-D", targets[0]])
        self.tool(modprobe.main, [*argv, "-c"])

    def _depmod_d(self, case: Case) -> None:
        from kvc.kmod import depmod
        from kvc.kmod.tools import depmod as depmod_tool

        path = self.scratch / "fuzz.conf"
        path.write_bytes(case.data)
        logged: list[int] = []
        log = depmod.Log(lambda level, _message: logged.append(level))
        config, _digest = depmod.load_config([str(path)], self.corpus.release, log)
        # depmod refuses a bad line by logging it, and reads on.
        self.errors += sum(1 for level in logged if level <= depmod.ERROR)
        # A conf may name any directory as external: depmod runs unless one is a real directory
        # outside the fuzz root (scanning / is not what the case is about).
        inside = str(self.root) + "/"
        if not any(os.path.isdir(d) and not os.path.realpath(d).startswith(inside) for d in config.externals):
            argv = ["-n", "-b", str(self.root), "-C", str(path), "--no-cache", "--jobs=1", self.corpus.release]
            self.tool(depmod_tool.main, argv)

    def _kvc_conf(self, case: Case) -> None:
        from kvc import cli
        from kvc.config import GlobalConfig, InstanceConfig

        conf_dir = self.root / "etc" / "kvc"
        is_global = case.seed_name.startswith("global/")
        instance = conf_dir / f"{INSTANCE}.conf"
        global_conf = conf_dir / "kmods-via-containers.conf"
        if is_global:
            global_conf.write_bytes(case.data)
            instance.write_bytes((REPO / "examples" / "simple-kmod" / "simple-kmod.conf").read_bytes())
        else:
            instance.write_bytes(case.data)
        try:
            self.attempt(lambda: InstanceConfig.load(str(conf_dir), INSTANCE))
            self.attempt(lambda: GlobalConfig.load(str(conf_dir)))
            self.tool(cli.main, ["status", INSTANCE, "--json", "--kernel", FAKE_RELEASE])
            # The Kubernetes objects made from the conf (no cluster, no registry: printed only).
            k8s = ["--repository", "registry.invalid/kmods/fuzz", "--kernel", FAKE_RELEASE]
            self.tool(cli.main, ["k8s", "module", INSTANCE, *k8s])
            self.tool(cli.main, ["k8s", "daemonset", INSTANCE, *k8s, "--kvc-image", "registry.invalid/kvc:1"])
        finally:
            if is_global:
                global_conf.unlink()

    def _dkms_rec(self, case: Case) -> None:
        from kvc.dkms.conf import DkmsConf, parse_records

        def evaluate() -> None:
            conf = DkmsConf(FAKE_RELEASE, parse_records(case.data, "fuzz"))
            conf.array("BUILT_MODULE_NAME")
            conf.modules("fuzz")
            conf.package("fuzz")

        self.attempt(evaluate)

    def _dkms_src(self, case: Case) -> None:
        from kvc.dkms.source import locate

        suffix = "".join(Path(case.seed_name).suffixes[-2:]) or ".bin"
        path = self.scratch / f"case{suffix}"
        path.write_bytes(case.data)
        unpack = self.scratch / "unpacked"
        unpack.mkdir()
        try:
            self.attempt(lambda: locate(str(path), str(unpack)))
        finally:
            shutil.rmtree(unpack, ignore_errors=True)


# ---- workers -------------------------------------------------------------------------------------


def save_failure(failures: Path, case: Case, seed: int, what: str, details: str) -> Path:
    failures.mkdir(parents=True, exist_ok=True)
    stem = f"{case.kind}-{case.number:07d}-{what}"
    (failures / f"{stem}.input").write_bytes(case.data)
    (failures / f"{stem}.txt").write_text(
        f"kind: {case.kind}\ncase: {case.number}\nseed: {seed}\nfrom seed file: {case.seed_name}\n"
        f"params: {case.params!r}\nreplay: python3 scripts/fuzz.py --seed {seed} --case {case.number}\n\n{details}\n"
    )
    return failures / f"{stem}.input"


def worker_main(job: dict[str, Any]) -> None:
    """Run a batch of one kind; report on the protocol pipe (fd 3 before the redirect)."""
    cap = job["rss_cap_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        corpus = Corpus(Path(job["corpus"]), job["kind"])
        failures = Path(job["failures"])
        with tempfile.TemporaryDirectory(prefix="kvc-fuzz-") as scratch:
            run_batch(proto, corpus, Runner(corpus, Path(scratch)), job, failures)
    except Exception:
        proto.write("X " + json.dumps(traceback.format_exc()) + "\n")
        raise SystemExit(1) from None


def run_batch(proto: Any, corpus: Corpus, runner: Runner, job: dict[str, Any], failures: Path) -> None:
    for number in job["cases"]:
        case = make_case(corpus, job["seed"], number)
        proto.write(f"S {number}\n")
        started = time.perf_counter()
        try:
            status = runner.run(case, plant=number in job["plant"])
        except (Exception, SystemExit):  # the point of fuzzing: any other exception is a finding
            status = "traceback"
            save_failure(failures, case, job["seed"], "traceback", traceback.format_exc())
        elapsed = time.perf_counter() - started
        proto.write(f"R {number} {status} {elapsed:.6f}\n")
    proto.write(f"P {peak_rss_kb()}\n")


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@dataclass
class Tally:
    cases: int = 0
    clean: int = 0
    errors: int = 0
    tracebacks: int = 0
    hangs: int = 0
    peak_rss_kb: int = 0
    slowest: float = 0.0
    seconds: float = 0.0

    def add(self, status: str, elapsed: float) -> None:
        self.cases += 1
        self.seconds += elapsed
        self.slowest = max(self.slowest, elapsed)
        if status == "clean":
            self.clean += 1
        elif status == "error":
            self.errors += 1
        elif status == "hang":
            self.hangs += 1
        else:
            self.tracebacks += 1


class Worker:
    def __init__(self, job: dict[str, Any], remaining: list[int]) -> None:
        self.job = job
        self.remaining = list(remaining)
        self.current: Optional[int] = None
        self.started = 0.0
        self.buffer = b""
        self.problem = ""
        payload = dict(job, cases=self.remaining)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(payload)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)

    def lines(self) -> Iterator[str]:
        assert self.proc.stdout is not None
        try:
            chunk = self.proc.stdout.read()
        except BlockingIOError:
            chunk = None
        if chunk:
            self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            yield line.decode()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def run_campaign(args: argparse.Namespace, corpus_dir: Path) -> dict[str, Tally]:
    tallies = {kind: Tally() for kind in KINDS}
    by_kind: dict[str, list[int]] = {kind: [] for kind in KINDS}
    for number in range(args.start, args.start + args.cases):
        by_kind[case_kind(args.seed, number)].append(number)
    jobs = []
    for kind, numbers in by_kind.items():
        for at in range(0, len(numbers), args.batch):
            jobs.append(
                {
                    "kind": kind,
                    "seed": args.seed,
                    "cases": numbers[at : at + args.batch],
                    "corpus": str(corpus_dir),
                    "failures": str(args.failures),
                    "rss_cap_mb": args.rss_cap,
                    "plant": [args.start, args.start + 1] if args.plant else [],
                }
            )
    # Longest kinds first keeps both cores busy to the end.
    jobs.sort(key=lambda job: -len(job["cases"]))
    pending = list(jobs)
    running: list[Worker] = []
    corpora: dict[str, Corpus] = {}
    selector = selectors.DefaultSelector()

    def start(job: dict[str, Any], cases: list[int]) -> None:
        worker = Worker(job, cases)
        assert worker.proc.stdout is not None
        selector.register(worker.proc.stdout, selectors.EVENT_READ, worker)
        running.append(worker)

    def stop(worker: Worker) -> None:
        assert worker.proc.stdout is not None
        selector.unregister(worker.proc.stdout)
        running.remove(worker)

    def lost(worker: Worker, what: str, details: str) -> None:
        """The worker's current case hung or killed it: record it, go on with the rest."""
        number = worker.current
        kind = worker.job["kind"]
        if number is None:
            raise SystemExit(f"fuzz: a {kind} worker failed outside any case: {details}\n{worker.problem}")
        if kind not in corpora:
            corpora[kind] = Corpus(corpus_dir, kind)
        case = make_case(corpora[kind], args.seed, number)
        saved = save_failure(args.failures, case, args.seed, what, details)
        tallies[kind].add("hang" if what == "hang" else "traceback", time.perf_counter() - worker.started)
        print(f"fuzz: {kind} case {number}: {what} ({saved})", file=sys.stderr)
        rest = worker.remaining[worker.remaining.index(number) + 1 :]
        if rest:
            start(worker.job, rest)

    def consume(worker: Worker) -> None:
        tally = tallies[worker.job["kind"]]
        for line in worker.lines():
            tag, *rest = line.split()
            if tag == "S":
                worker.current, worker.started = int(rest[0]), time.perf_counter()
            elif tag == "R":
                tally.add(rest[1], float(rest[2]))
                worker.current = None
            elif tag == "P":
                tally.peak_rss_kb = max(tally.peak_rss_kb, int(rest[0]))
            elif tag == "X":
                worker.problem = json.loads(line[2:])

    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            start(job, job["cases"])
        for key, _events in selector.select(timeout=0.2):
            consume(key.data)
        now = time.perf_counter()
        for worker in list(running):
            if worker.current is not None and now - worker.started > args.timeout:
                stop(worker)
                worker.kill()
                lost(worker, "hang", f"no result after {args.timeout:g} s: the worker was killed")
            elif worker.proc.poll() is not None:
                consume(worker)
                stop(worker)
                if worker.proc.returncode != 0:
                    lost(worker, "crash", f"the worker died with status {worker.proc.returncode}")
    return tallies


def report(tallies: dict[str, Tally], args: argparse.Namespace, elapsed: float) -> str:
    head = f"{'kind':<11} {'cases':>7} {'clean':>7} {'doc. errors':>11} {'tracebacks':>10} {'hangs':>5} "
    head += f"{'peak RSS':>9} {'slowest':>8}"
    lines = [head, "-" * len(head)]
    total = Tally()
    for kind in KINDS:
        t = tallies[kind]
        lines.append(
            f"{kind:<11} {t.cases:>7} {t.clean:>7} {t.errors:>11} {t.tracebacks:>10} {t.hangs:>5} "
            f"{t.peak_rss_kb / 1024:>6.0f} MiB {t.slowest * 1000:>5.0f} ms"
        )
        total.cases += t.cases
        total.clean += t.clean
        total.errors += t.errors
        total.tracebacks += t.tracebacks
        total.hangs += t.hangs
        total.peak_rss_kb = max(total.peak_rss_kb, t.peak_rss_kb)
        total.slowest = max(total.slowest, t.slowest)
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<11} {total.cases:>7} {total.clean:>7} {total.errors:>11} {total.tracebacks:>10} {total.hangs:>5} "
        f"{total.peak_rss_kb / 1024:>6.0f} MiB {total.slowest * 1000:>5.0f} ms"
    )
    lines.append(
        f"seed {args.seed}, cases {args.start}..{args.start + args.cases - 1}, {args.jobs} workers, "
        f"timeout {args.timeout:g} s per case, address-space cap {args.rss_cap} MiB per worker, "
        f"{elapsed:.0f} s"
    )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=20261205)
    parser.add_argument("--start", type=int, default=0, help="number of the first case")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=BATCH, help="cases per worker process")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a case counts as a hang")
    parser.add_argument("--rss-cap", type=int, default=768, help="address-space cap per worker, MiB")
    parser.add_argument("--failures", type=Path, default=Path("fuzz-failures"), help="where failing inputs go")
    parser.add_argument("--corpus", type=Path, help="a corpus prepared by an earlier run (default: prepare one)")
    parser.add_argument("--case", type=int, help="replay one case here, with its traceback")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    parser.add_argument(
        "--plant", action="store_true", help="self-test: the first case hangs, the second raises (both must count)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    args.failures = args.failures.resolve()
    with tempfile.TemporaryDirectory(prefix="kvc-fuzz-corpus-") as scratch:
        corpus_dir = args.corpus.resolve() if args.corpus else Path(scratch)
        if not (corpus_dir / "meta.json").exists():
            prepare_corpus(corpus_dir, args.seed)
        if args.case is not None:
            kind = case_kind(args.seed, args.case)
            corpus = Corpus(corpus_dir, kind)
            case = make_case(corpus, args.seed, args.case)
            with tempfile.TemporaryDirectory(prefix="kvc-fuzz-") as work:
                print(f"{kind} case {args.case} from {case.seed_name}: {Runner(corpus, Path(work)).run(case)}")
            return 0
        started = time.perf_counter()
        tallies = run_campaign(args, corpus_dir)
        elapsed = time.perf_counter() - started
    print(report(tallies, args, elapsed))
    if args.json:
        args.json.write_text(
            json.dumps({kind: vars(t) for kind, t in tallies.items()} | {"seed": args.seed, "seconds": elapsed})
        )
    failed = sum(t.tracebacks + t.hangs for t in tallies.values())
    if failed:
        print(f"fuzz: {failed} failing cases, inputs in {args.failures}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
