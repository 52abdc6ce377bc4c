"""Debian's ``*-dkms`` packages as test inputs: downloaded with ``apt-get download`` (never
installed on the test host), what each one builds, and a smoke test that exercises it a little on
the real kernel in ``kvc verify``'s VM.

Written against bookworm's packages of 2026-12: v4l2loopback-dkms 0.12.7-2, acpi-call-dkms
1.2.2-2.1, xtables-addons-dkms 3.23-1, jool-dkms 4.1.9-1, vpoll-dkms 0.1-3. Versions are read
from the packages, not assumed; module lists are the packages' own dkms.conf records."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DkmsPackage:
    deb: str  # the Debian package
    modules: tuple[str, ...]  # KMOD_NAMES kvc dkms import must write (DEST_MODULE_NAME, in order)
    location: str  # DEST_MODULE_LOCATION, below /lib/modules/KVER
    smoke_test: str  # KVC_SMOKE_TEST: run in the image once every module is loaded
    extra: tuple[str, ...] = ()  # .ko files the build makes that dkms.conf does not list


XTABLES_MODULES = (
    *("xt_ACCOUNT", "compat_xtables", "xt_pknock", "xt_CHAOS", "xt_DELUDE", "xt_DHCPMAC", "xt_DNETMAP"),
    *("xt_ECHO", "xt_IPMARK", "xt_LOGMARK", "xt_PROTO", "xt_SYSRQ", "xt_TARPIT", "xt_condition", "xt_fuzzy"),
    *("xt_geoip", "xt_iface", "xt_ipp2p", "xt_ipv4options", "xt_length2", "xt_lscan", "xt_psd", "xt_quota2"),
)

PACKAGES = (
    # A loopback video device: videodev (in-tree) comes first; /dev/video0 appears with its name.
    DkmsPackage(
        "v4l2loopback-dkms",
        ("v4l2loopback",),
        "/extra",
        "grep -qx 'Dummy video device (0x0000)' /sys/devices/virtual/video4linux/video0/name && test -c /dev/video0",
    ),
    # ACPI method calls through /proc/acpi/call: evaluate the root PCI bus's _ADR and read the result.
    DkmsPackage(
        "acpi-call-dkms",
        ("acpi_call",),
        "/extra",
        "echo '\\_SB.PCI0._ADR' > /proc/acpi/call && grep -q '^0x0' /proc/acpi/call",
    ),
    # Netfilter extensions (x_tables from the tree); xt_CHAOS asks the kernel for xt_TARPIT and
    # xt_DELUDE, which kvc's modprobe finds in the tree delivery, and holds one reference on each;
    # xt_quota2 and xt_pknock register their /proc/net directories. The build also makes xt_asn,
    # which dkms.conf does not list.
    DkmsPackage(
        "xtables-addons-dkms",
        XTABLES_MODULES,
        "/updates",
        "test -d /proc/net/xt_quota && test -d /proc/net/xt_pknock"
        " && grep -q '^xt_TARPIT [0-9]* 1 ' /proc/modules && grep -q '^xt_DELUDE [0-9]* 1 ' /proc/modules",
        extra=("xt_asn.ko",),
    ),
    # NAT64/SIIT: jool and jool_siit both use jool_common's symbols, so it loads first and both hold it.
    DkmsPackage(
        "jool-dkms",
        ("jool_common", "jool", "jool_siit"),
        "/extra",
        "dmesg | grep -q 'NAT64 Jool v.* module inserted' && grep -Eq '^jool_common [0-9]+ 2 ' /proc/modules",
    ),
    # A character device whose poll events user space sets: registered, and it opens and closes.
    DkmsPackage(
        "vpoll-dkms", ("vpoll",), "/extra", "grep -q ' vpoll$' /proc/devices && test -c /dev/vpoll && : <> /dev/vpoll"
    ),
)


def download(package: str, directory: Path) -> Path:
    """``apt-get download PACKAGE`` into ``directory`` (once per directory): the .deb's path."""
    directory.mkdir(parents=True, exist_ok=True)
    found = sorted(directory.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", "-q", package], cwd=directory, check=True, capture_output=True)
        found = sorted(directory.glob(f"{package}_*.deb"))
    assert len(found) == 1, found
    return found[0]
