"""What a dkms.conf says, as kvc's driver printed it from inside a container: NUL-terminated records
(variable, index, value), read here into arrays and checked the way DKMS 3.0's ``read_conf`` checks
them (module records, names, locations), so that ``kvc dkms import`` fails on the host with one
clear line instead of in the middle of a build."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from kvc.config import check_module_name
from kvc.errors import ConfigError

# What DKMS accepts as a name or version in its tree (/var/lib/dkms/NAME/VERSION) and kvc can put
# into a path, a Containerfile and its conf: no quotes, no spaces, no shell.
_PACKAGE_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~:-]*")
_DEST_PREFIXES = ("/kernel", "/updates", "/extra")
# Directives kvc does not carry out: it installs nothing on the host while building.
NOT_RUN = ("PRE_INSTALL", "POST_INSTALL", "POST_ADD", "POST_REMOVE")


def parse_records(data: bytes, source: str) -> dict[str, dict[int, str]]:
    """{variable: {index: value}} from the driver's ``eval`` output."""
    fields = data.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    if len(fields) % 3:
        raise ConfigError(f"{source}: the dkms.conf evaluation printed a truncated record", hint="report this")
    values: dict[str, dict[int, str]] = {}
    for at in range(0, len(fields), 3):
        name = fields[at].decode("ascii", "replace")
        try:
            index = int(fields[at + 1])
        except ValueError:
            raise ConfigError(f"{source}: {name} has a non-numeric index", hint="use indexed arrays NAME[0]") from None
        values.setdefault(name, {})[index] = fields[at + 2].decode("utf-8", "replace")
    return values


@dataclass(frozen=True)
class ModuleRecord:
    """One BUILT_MODULE_NAME[i] record, with DKMS's defaults filled in."""

    built_name: str
    built_location: str
    dest_name: str
    dest_location: str
    strip: bool


@dataclass(frozen=True)
class DkmsConf:
    """A dkms.conf evaluated for one kernel."""

    kernel_release: str
    values: Mapping[str, Mapping[int, str]]

    def first(self, name: str) -> str:
        return self.values.get(name, {}).get(0, "")

    def array(self, name: str) -> list[str]:
        entries = self.values.get(name, {})
        return [entries[index] for index in sorted(entries) if entries[index]]

    @property
    def package_name(self) -> str:
        return self.first("PACKAGE_NAME")

    @property
    def package_version(self) -> str:
        return self.first("PACKAGE_VERSION")

    def modules(self, source: str) -> tuple[ModuleRecord, ...]:
        """The module records as DKMS's read_conf makes them: as many as the highest index of the
        four name and location arrays, a lone unnamed record named after the package, DEST_MODULE_NAME
        defaulting to BUILT_MODULE_NAME, STRIP to the first record's (else yes)."""
        where = f"{source} (for kernel {self.kernel_release})"
        indexes = [
            index
            for name in ("BUILT_MODULE_NAME", "BUILT_MODULE_LOCATION", "DEST_MODULE_NAME", "DEST_MODULE_LOCATION")
            for index in self.values.get(name, {})
        ]
        count = max(indexes, default=-1) + 1
        if count == 0:
            raise ConfigError(f"{where}: no BUILT_MODULE_NAME", hint="dkms.conf must list the modules it builds")
        records: list[ModuleRecord] = []
        first_strip = True
        for index in range(count):

            def value(name: str, at: int = index) -> str:
                return self.values.get(name, {}).get(at, "")

            built = value("BUILT_MODULE_NAME") or (self.package_name if count == 1 else "")
            if not built:
                raise ConfigError(f"{where}: no BUILT_MODULE_NAME[{index}]", hint="name every module record")
            dest = value("DEST_MODULE_NAME") or built
            for key, name in (("BUILT_MODULE_NAME", built), ("DEST_MODULE_NAME", dest)):
                if name.endswith((".o", ".ko")):
                    raise ConfigError(f"{where}: {key}[{index}]={name!r} ends in .o or .ko", hint="give the bare name")
                check_module_name(name, f"{where}: {key}[{index}]")
            location = value("BUILT_MODULE_LOCATION")
            if location.startswith("/") or ".." in location.split("/"):
                raise ConfigError(
                    f"{where}: BUILT_MODULE_LOCATION[{index}]={location!r} is outside the build tree",
                    hint="give a path relative to the source tree",
                )
            dest_location = value("DEST_MODULE_LOCATION")
            if not dest_location.startswith(_DEST_PREFIXES) or ".." in dest_location.split("/"):
                raise ConfigError(
                    f"{where}: DEST_MODULE_LOCATION[{index}]={dest_location!r} does not begin with "
                    "/kernel, /updates or /extra",
                    hint="DKMS refuses it too; set it to e.g. /extra",
                )
            flag = value("STRIP")[:1].lower()
            strip = flag == "y" or (flag != "n" and first_strip)
            if index == 0:
                first_strip = strip
            records.append(ModuleRecord(built, location, dest, dest_location, strip))
        return tuple(records)

    def package(self, source: str) -> tuple[str, str]:
        """(PACKAGE_NAME, PACKAGE_VERSION), checked."""
        for key, text in (("PACKAGE_NAME", self.package_name), ("PACKAGE_VERSION", self.package_version)):
            if not text:
                raise ConfigError(f"{source}: dkms.conf sets no {key}", hint=f"set {key} in dkms.conf")
            if not _PACKAGE_WORD.fullmatch(text):
                raise ConfigError(
                    f"{source}: {key}={text!r} is not a name kvc can use",
                    hint="use letters, digits and . _ + ~ : - (as Debian versions do)",
                )
        return self.package_name, self.package_version
