"""A fake kernel: a directory standing in for ``/proc`` and ``/sys`` that behaves like Linux.

It keeps ``proc/modules``, ``proc/sys/kernel/osrelease`` and ``sys/module/NAME/{initstate,refcnt,
coresize,taint,holders/,parameters/}`` under a root (``KVC_ROOT``), written the way the kernel
shows them, so kmod's own tools read the same state. Inserting refuses what the kernel refuses
(kernel/module/main.c, version.c): a file that is not a module (ENOEXEC), a vermagic for another
kernel (ENOEXEC), a disagreeing ``module_layout`` CRC (ENOEXEC), a second insert (EEXIST),
symbols nobody exports (ENOENT) or with the wrong CRC (EINVAL), and bad parameter values
(EINVAL) — logging the kernel's own lines to ``dmesg``. Using another module's symbols takes a
reference on it; removal of a module in use is refused (EWOULDBLOCK).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from kvc.kmod.elf import SHF_ALLOC
from kvc.kmod.errors import ModuleFormatError
from kvc.kmod.kernel import (
    MODULE_INIT_IGNORE_MODVERSIONS,
    MODULE_INIT_IGNORE_VERMAGIC,
    REMOVE_FORCE,
    KernelError,
    LoadedModule,
    ModuleState,
    parse_proc_modules,
    read_module_state,
    read_symvers,
    read_system_map_exports,
)
from kvc.kmod.module import ModuleFile
from kvc.kmod.paths import HostPaths

STATE_DIR = ".kvc-fake-kernel"
PAGE = 4096
_INT_TYPES = {"int", "uint", "long", "ulong", "short", "ushort", "byte", "hexint"}


@dataclass(frozen=True)
class KernelConfig:
    release: str
    vermagic: str
    symvers: str  # Module.symvers or System.map the core kernel's exports come from
    modversions: bool = True


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class FakeKernel:
    REMOVE_FORCE = REMOVE_FORCE

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        self.state_dir = paths.host(f"/{STATE_DIR}")
        self._exports_cache: Optional[dict[str, int]] = None

    @classmethod
    def create(cls, paths: HostPaths, release: str, *, symvers: str, vermagic: Optional[str] = None,
               modversions: bool = True) -> FakeKernel:
        """A fresh fake kernel under ``paths.root``: nothing loaded."""
        config = KernelConfig(release, vermagic or f"{release} SMP preempt mod_unload modversions ",
                              os.path.abspath(symvers), modversions)
        kernel = cls(paths)
        os.makedirs(paths.sys_module, exist_ok=True)
        _write_atomic(paths.host("/proc/sys/kernel/osrelease"), release + "\n")
        _write_atomic(os.path.join(kernel.state_dir, "config.json"), json.dumps(config.__dict__, indent=2))
        kernel._save({"modules": []})
        _write_atomic(os.path.join(kernel.state_dir, "dmesg"), "")
        return kernel

    # -- state -------------------------------------------------------------------------------

    @property
    def config(self) -> KernelConfig:
        try:
            with open(os.path.join(self.state_dir, "config.json"), encoding="utf-8") as handle:
                return KernelConfig(**json.load(handle))
        except (OSError, ValueError, TypeError) as exc:
            raise KernelError(errno.ENOSYS, f"no fake kernel under {self.paths.root}: {exc}") from None

    def _load(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.state_dir, "modules.json"), encoding="utf-8") as handle:
                data: dict[str, Any] = json.load(handle)
                return data
        except (OSError, ValueError) as exc:
            raise KernelError(errno.ENOSYS, f"no fake kernel under {self.paths.root}: {exc}") from None

    def _save(self, state: dict[str, Any]) -> None:
        """Persist the state, then render /proc/modules and /sys/module from it."""
        _write_atomic(os.path.join(self.state_dir, "modules.json"), json.dumps(state, indent=1))
        modules = state["modules"]
        lines = []
        for mod in modules:  # newest first, as the kernel lists them
            users = "".join(f"{user}," for user in mod["users"]) or "-"
            taint = f" ({mod['taint']})" if mod["taint"] else ""
            lines.append(f"{mod['name']} {mod['size']} {len(mod['users'])} {users} Live "
                         f"0x0000000000000000{taint}\n")
        _write_atomic(os.path.join(self.paths.proc, "modules"), "".join(lines))
        present = {mod["name"] for mod in modules}
        if os.path.isdir(self.paths.sys_module):
            for name in os.listdir(self.paths.sys_module):
                if name not in present and os.path.exists(os.path.join(self.paths.sys_module, name, "initstate")):
                    shutil.rmtree(os.path.join(self.paths.sys_module, name))
        for mod in modules:
            base = os.path.join(self.paths.sys_module, mod["name"])
            _write_atomic(os.path.join(base, "initstate"), "live\n")
            _write_atomic(os.path.join(base, "refcnt"), f"{len(mod['users'])}\n")
            _write_atomic(os.path.join(base, "coresize"), f"{mod['size']}\n")
            _write_atomic(os.path.join(base, "taint"), f"{mod['taint']}\n")
            holders = os.path.join(base, "holders")
            os.makedirs(holders, exist_ok=True)
            for entry in os.listdir(holders):
                if entry not in mod["users"]:
                    os.unlink(os.path.join(holders, entry))
            for user in reversed(mod["users"]):
                link = os.path.join(holders, user)
                if not os.path.lexists(link):
                    os.symlink(f"../../{user}", link)
            params_dir = os.path.join(base, "parameters")
            for pname, value in mod["params"].items():
                _write_atomic(os.path.join(params_dir, pname), f"{value}\n")

    def log(self, *lines: str) -> None:
        with open(os.path.join(self.state_dir, "dmesg"), "a", encoding="utf-8", errors="surrogateescape") as log:
            log.writelines(line + "\n" for line in lines)

    def dmesg(self) -> list[str]:
        try:
            with open(os.path.join(self.state_dir, "dmesg"), encoding="utf-8", errors="surrogateescape") as log:
                return log.read().splitlines()
        except OSError:
            return []

    # -- the Kernel protocol ------------------------------------------------------------------

    def release(self) -> str:
        return self.config.release

    def loaded_modules(self) -> list[LoadedModule]:
        try:
            with open(os.path.join(self.paths.proc, "modules"), encoding="utf-8") as handle:
                return parse_proc_modules(handle.read())
        except OSError:
            return []

    def module_state(self, name: str) -> Optional[ModuleState]:
        return read_module_state(self.paths.sys_module, name)

    def core_exports(self) -> dict[str, int]:
        if self._exports_cache is None:
            source = self.config.symvers
            exports = (read_system_map_exports(source) if "System.map" in os.path.basename(source)
                       else read_symvers(source))
            if exports is None:
                raise KernelError(errno.ENOSYS, f"fake kernel: cannot read its symbol table {source}")
            self._exports_cache = exports
        return self._exports_cache

    def exported_symbols(self) -> Mapping[str, int]:
        exports = dict(self.core_exports())
        for mod in self._load()["modules"]:
            exports.update(mod["exports"])
        return exports

    def _refuse(self, err: int, what: str, *log_lines: str) -> KernelError:
        if log_lines:
            self.log(*log_lines)
        return KernelError(err, f"{what}: {os.strerror(err)}", tuple(log_lines))

    def insert(self, path: str, params: str, flags: int) -> None:
        config = self.config
        what = f"init_module({path})"
        try:
            module = ModuleFile.open(path)
            name = module.this_module_name
            imports = module.elf.dependency_symbols(unmatched_versions=False)
            exports = module.exported_symbols
            versions = {sym.name: sym.crc for sym in module.modversions}
            sections = module.elf.sections
        except FileNotFoundError:
            raise self._refuse(errno.ENOENT, what) from None
        except ModuleFormatError:
            raise self._refuse(errno.ENOEXEC, what) from None
        if not name:
            raise self._refuse(errno.ENOEXEC, what, f"{module.name}: No module found in object")
        state = self._load()
        loaded = {mod["name"]: mod for mod in state["modules"]}
        core = self.core_exports()
        use_versions = config.modversions and bool(versions) and not flags & MODULE_INIT_IGNORE_MODVERSIONS
        if use_versions and "module_layout" in core and versions.get("module_layout", core["module_layout"]) != \
                core["module_layout"]:
            raise self._refuse(errno.ENOEXEC, what, f"{name}: disagrees about version of symbol module_layout")
        vermagic = module.vermagic
        taint = ""
        if vermagic is None:
            if not flags & MODULE_INIT_IGNORE_VERMAGIC:
                raise self._refuse(errno.ENOEXEC, what, f"{name}: no version magic")
            taint += "F"
        elif not flags & MODULE_INIT_IGNORE_VERMAGIC and not _same_magic(vermagic, config.vermagic,
                                                                           bool(versions)):
            raise self._refuse(errno.ENOEXEC, what,
                               f"{name}: version magic '{vermagic}' should be '{config.vermagic}'")
        elif flags & MODULE_INIT_IGNORE_VERMAGIC and vermagic != config.vermagic:
            taint += "F"
        if name in loaded:
            raise self._refuse(errno.EEXIST, what)
        providers = {}
        for mod in state["modules"]:
            for sym in mod["exports"]:
                providers[sym] = mod["name"]
        uses: list[str] = []
        log_lines = []
        failure = 0
        for sym in imports:
            owner = providers.get(sym.name)
            crc = core.get(sym.name) if owner is None else loaded[owner]["exports"][sym.name]
            if crc is None:
                if sym.bind == "weak":
                    continue
                log_lines.append(f"{name}: Unknown symbol {sym.name} (err -2)")
                failure = failure or errno.ENOENT
                continue
            if use_versions and sym.name in versions and versions[sym.name] != crc:
                log_lines += [f"{name}: disagrees about version of symbol {sym.name}",
                              f"{name}: Unknown symbol {sym.name} (err -22)"]
                failure = failure or errno.EINVAL
                continue
            if owner is not None and owner not in uses:
                uses.append(owner)
        if failure:
            raise self._refuse(failure, what, *log_lines)
        param_values, bad = _parse_params(module, params)
        if bad:
            raise self._refuse(errno.EINVAL, what, *bad)
        for pname in param_values.get("__unknown__", []):
            self.log(f"{name}: unknown parameter '{pname}' ignored")
        param_values.pop("__unknown__", None)
        if module.info_value("intree") != "Y":
            taint = "O" + taint
        if module.signature is None:
            taint += "E"
        size = sum(-(-sec.size // 16) * 16 for sec in sections
                   if sec.flags & SHF_ALLOC and not sec.name.startswith(".init"))
        entry = {"name": name, "size": -(-max(size, 1) // PAGE) * PAGE, "users": [],
                 "uses": uses, "taint": "".join(sorted(set(taint), key="POFCE".index)),
                 "exports": {sym.name: sym.crc for sym in exports},
                 "params": {**_default_params(module), **param_values}}
        for owner in uses:
            loaded[owner]["users"].insert(0, name)
        state["modules"].insert(0, entry)
        self._save(state)

    def remove(self, name: str, flags: int) -> None:
        """delete_module: a module others use stays, even with ``REMOVE_FORCE`` (``O_TRUNC``)
        — the kernel checks users before it looks at the force flag."""
        state = self._load()
        mod = next((m for m in state["modules"] if m["name"] == name), None)
        if mod is None:
            raise self._refuse(errno.ENOENT, f"delete_module({name})")
        if mod["users"]:
            raise self._refuse(errno.EWOULDBLOCK, f"delete_module({name})")
        state["modules"].remove(mod)
        for other in state["modules"]:
            if name in other["users"]:
                other["users"].remove(name)
        self._save(state)


def _same_magic(module_magic: str, kernel_magic: str, has_crcs: bool) -> bool:
    """The kernel's same_magic(): with symbol versions only the part after the release counts,
    because module_layout's CRC already vouches for the kernel."""
    if has_crcs:
        return module_magic[len(module_magic.split(" ", 1)[0]):] == kernel_magic[len(kernel_magic.split(" ", 1)[0]):]
    return module_magic == kernel_magic


def _param_types(module: ModuleFile) -> dict[str, str]:
    return {pname: kind or "" for pname, _desc, kind in module.parameters}


def _default_params(module: ModuleFile) -> dict[str, str]:
    return {pname: "0" if kind in _INT_TYPES else "" for pname, kind in _param_types(module).items()
            if kind in _INT_TYPES or kind in ("bool", "charp", "string")}


def _parse_params(module: ModuleFile, params: str) -> tuple[dict[str, Any], list[str]]:
    """Parameter values by name, plus the kernel's log lines for values it would refuse."""
    types = _param_types(module)
    values: dict[str, Any] = {}
    unknown: list[str] = []
    bad = []
    for token in params.split():
        pname, _sep, value = token.partition("=")
        pname = pname.replace("-", "_")
        kind = types.get(pname)
        if kind is None:
            unknown.append(pname)
            continue
        if kind in _INT_TYPES:
            try:
                int(value, 0)
            except ValueError:
                bad.append(f"{module.this_module_name}: `{value}' invalid for parameter `{pname}'")
                continue
        values[pname] = value
    if unknown:
        values["__unknown__"] = unknown
    return values, bad

