"""Kernel headers of another Debian kernel series (bookworm's 6.12 kernels), for building a module
"for another kernel release" without installing anything: Debian's 6.12 headers package depends
on its kernel image, so the three packages kbuild needs (headers, their -common part, kbuild) are
fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the test cache once.

(Modules built for another 6.1 ABI are no use: with modversions Linux compares only
``module_layout``'s CRC and ignores the release in the vermagic, and it is the same across 6.1.)
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

from support.debian_kernel import DebianKernel, cache_dir, kernel_package, unpacked_packages

SERIES = re.compile(r"^linux-headers-(6\.12\.\d+\+deb12)-amd64$")


def newest_foreign_release() -> str:
    """The newest bookworm 6.12 ABI, e.g. ``6.12.115+deb12`` (without the flavour)."""
    out = subprocess.run(
        ["apt-cache", "search", "--names-only", r"^linux-headers-6\.12\.[0-9]+\+deb12-amd64$"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    versions = [m.group(1) for m in (SERIES.match(line.split(" ", 1)[0]) for line in out.splitlines()) if m]
    if not versions:
        raise RuntimeError("the apt sources name no linux-headers-6.12.*+deb12-amd64 package")
    return max(versions, key=lambda v: [int(x) for x in re.findall(r"\d+", v)])


def foreign_kernel() -> DebianKernel:
    """Debian's newest bookworm 6.12 kernel image (its modules are ``.ko.xz``), unpacked."""
    return kernel_package(f"{newest_foreign_release()}-amd64")


@cache
def foreign_headers() -> Path:
    """A kbuild tree (``.../usr/src/linux-headers-RELEASE``) of a 6.12 kernel."""
    abi = newest_foreign_release()
    release = f"{abi}-amd64"
    root = unpacked_packages(
        cache_dir() / "headers" / release,
        [f"linux-headers-{release}", f"linux-headers-{abi}-common", f"linux-kbuild-{abi}"],
    )
    # The flavour's Makefile includes the common one by its installed, absolute path.
    makefile = root / "usr" / "src" / f"linux-headers-{release}" / "Makefile"
    include = f"include {root / 'usr' / 'src' / f'linux-headers-{abi}-common' / 'Makefile'}\n"
    if makefile.read_text() != include:
        makefile.write_text(include)
    return makefile.parent
