"""modprobe's engine: probe lists, loading and removal as libkmod 30 and kmod 30's modprobe do them.

:class:`Modprobe` keeps libkmod's module objects: one per lookup key (the name, or the name and
the alias it was found by), with the ``visited``/``required``/``ignorecmd`` flags
``kmod_module_probe_insert_module`` (libkmod-module.c) sets on them. For one target it builds the
probe list (``__kmod_module_get_probe_list``): the modules.dep dependencies deepest first, each
preceded by its pre-softdeps' probe lists and followed by its post-softdeps', then the target the
same way. A module with softdeps never runs its install command; ``ignore_commands`` drops the
target's softdeps and install command only. Softdep failures are ignored, a dependency's stop the
load. :meth:`Modprobe.remove` is modprobe's ``rmmod_do_module``: post-softdeps (reverse), holders
(with ``remove_holders``), the module or its ``remove`` command, dependencies left unused, then
pre-softdeps (reverse).

Install and remove commands run through ``/bin/sh -c`` (:func:`run_shell`) with
``MODPROBE_MODULE`` set, like ``system()``; ``$CMDLINE_OPTS`` in an install command becomes the
module's options. :func:`load_plan` is the side-effect-free entry point for callers that want
the list of modules to insert.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

from kvc.kmod.config import ModprobeConfig
from kvc.kmod.kernel.libkmod import KMOD_MODULE_BUILTIN, KMOD_MODULE_LIVE, LOG_ERR, LibkmodLog, LibkmodView
from kvc.kmod.kernel.protocol import (
    MODULE_INIT_IGNORE_MODVERSIONS,
    MODULE_INIT_IGNORE_VERMAGIC,
    REMOVE_FORCE,
    Kernel,
    KernelError,
)
from kvc.kmod.moddir import (
    STEP_ALIAS,
    STEP_BUILTIN_ALIAS,
    STEP_CONFIG_ALIAS,
    STEP_SYMBOLS,
    ModuleDirectory,
    ModuleEntry,
    normalize_alias,
)
from kvc.kmod.names import modname_from_path

_MODULE_C = "../libkmod/libkmod-module.c"
_ALIAS_STEPS = (STEP_CONFIG_ALIAS, STEP_SYMBOLS, STEP_ALIAS, STEP_BUILTIN_ALIAS)
CMDLINE_OPTS = "$CMDLINE_OPTS"

# What kmod_module_probe_insert_module returns for a blacklisted target (a positive flag value,
# which modprobe treats as success).
BLACKLISTED = 1

ACTION_INSMOD = "insmod"
ACTION_INSTALL = "install"
ACTION_BUILTIN = "builtin"


class PlannedModule(NamedTuple):
    """One step of a load plan, as ``modprobe --show-depends`` prints it.

    ``action`` is ``insmod`` (insert ``path`` with ``options``), ``install`` (run ``command``,
    the raw install command with ``$CMDLINE_OPTS`` not yet expanded, with ``options``) or
    ``builtin`` (nothing to do). ``options`` is what modprobe passes: the configured options
    (files and kernel command line) followed by the caller's extra options; ``target`` marks the
    module that was asked for (the others are dependencies and softdeps); ``required`` is False
    for softdeps, whose failures modprobe ignores."""

    name: str
    action: str
    path: Optional[str]
    options: str
    command: Optional[str] = None
    target: bool = False
    required: bool = True

    def show(self) -> str:
        """The ``--show-depends`` line, without its newline."""
        if self.action == ACTION_INSTALL:
            return f"install {self.command} {self.options}"
        if self.action == ACTION_BUILTIN:
            return f"builtin {self.name}"
        return f"insmod {self.path} {self.options}"


class ModuleObject:
    """A libkmod ``struct kmod_module``: the directory's entry plus the flags probing sets."""

    def __init__(self, entry: ModuleEntry, alias: Optional[str]) -> None:
        self.entry = entry
        self.name = entry.name
        self.alias = alias
        self.visited = False
        self.required = False
        self.ignorecmd = False

    @property
    def path(self) -> Optional[str]:
        return self.entry.path


def run_shell(command: str, env: Mapping[str, str]) -> int:
    """``system(command)``: ``/bin/sh -c command``; returns the exit status (0 when the shell
    was killed by a signal, as WEXITSTATUS reads it), or -1 when the shell cannot start."""
    import subprocess  # here: only install commands run one, and a load plan imports this module

    try:
        proc = subprocess.run(["/bin/sh", "-c", command], env=dict(env))
    except OSError:
        return -1
    return proc.returncode if proc.returncode >= 0 else 0


def expand_cmdline_opts(command: str, options: str) -> str:
    """Every ``$CMDLINE_OPTS`` in an install command replaced by the module's options."""
    return command.replace(CMDLINE_OPTS, options)


def options_concat(configured: Optional[str], extra: Optional[str]) -> Optional[str]:
    """module_options_concat: configured options, a space, the extra ones (so configured
    options alone keep a trailing space); None when both are empty."""
    if not configured and not extra:
        return None
    head = f"{configured} " if configured is not None else ""
    return head + (extra or "")


Logger = Callable[[LibkmodLog], None]
ActionPrinter = Callable[[ModuleObject, bool, str], None]


class Modprobe:
    """libkmod's context for modprobe: a module directory, a configuration, the kernel state."""

    def __init__(
        self,
        directory: ModuleDirectory,
        config: ModprobeConfig,
        *,
        view: Optional[LibkmodView] = None,
        kernel: Optional[Kernel] = None,
        log: Optional[Logger] = None,
        runner: Callable[[str, Mapping[str, str]], int] = run_shell,
        environ: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.directory = directory
        self.config = config
        self.view = view
        self.kernel = kernel
        self.log: Logger = log or (lambda _record: None)
        self.runner = runner
        self.environ = dict(os.environ if environ is None else environ)
        self._objects: dict[str, ModuleObject] = {}

    # -- module objects ------------------------------------------------------------------------

    def _object(self, entry: ModuleEntry, alias: Optional[str] = None) -> ModuleObject:
        key = entry.name if alias is None else f"{entry.name}\\{alias}"
        found = self._objects.get(key)
        if found is None:
            found = self._objects[key] = ModuleObject(entry, alias)
        return found

    def lookup(self, name_or_alias: str) -> Optional[list[ModuleObject]]:
        """kmod_module_new_from_lookup; None when the alias cannot be normalized (-EINVAL)."""
        try:
            key = normalize_alias(name_or_alias)
        except ValueError:
            return None
        return [
            self._object(entry, key if entry.step in _ALIAS_STEPS else None)
            for entry in self.directory.resolve(name_or_alias, self.config)
        ]

    def dependencies(self, mod: ModuleObject) -> list[ModuleObject]:
        """kmod_module_get_dependencies: the modules.dep line, deepest first."""
        deps = []
        for path in reversed(mod.entry.dependencies):
            name = modname_from_path(path)
            entry = self.directory.module(name)
            deps.append(self._object(ModuleEntry(name, path, entry.dependencies, entry.builtin, "")))
        return deps

    def softdeps(self, mod: ModuleObject) -> tuple[list[ModuleObject], list[ModuleObject]]:
        """kmod_module_get_softdeps: the first matching softdep's names, each fully looked up."""
        dep = self.config.softdep(mod.name)
        if dep is None:
            return [], []
        return self._lookup_softdep(dep.pre), self._lookup_softdep(dep.post)

    def _lookup_softdep(self, names: Sequence[str]) -> list[ModuleObject]:
        found: list[ModuleObject] = []
        for name in names:
            mods = self.lookup(name)
            if mods is None:
                self.log(
                    LibkmodLog(
                        LOG_ERR,
                        _MODULE_C,
                        1567,
                        "lookup_softdep",
                        f"failed to lookup soft dependency '{name}', continuing anyway.\n",
                    )
                )
                continue
            found += mods
        return found

    # -- state ----------------------------------------------------------------------------------

    def initstate(self, mod: ModuleObject) -> int:
        """kmod_module_get_initstate: built-in first, then /sys/module (-errno when absent)."""
        if mod.entry.builtin:
            return KMOD_MODULE_BUILTIN
        if self.view is None:
            return -errno.ENOENT
        state = self.view.initstate(mod.name)
        self._flush_view()
        return state

    def in_kernel(self, mod: ModuleObject) -> bool:
        return self.initstate(mod) in (KMOD_MODULE_LIVE, KMOD_MODULE_BUILTIN)

    def refcnt(self, mod: ModuleObject) -> int:
        if self.view is None:
            return -errno.ENOENT
        count = self.view.refcnt(mod.name)
        self._flush_view()
        return count

    def holders(self, mod: ModuleObject) -> list[ModuleObject]:
        if self.view is None:
            return []
        names = self.view.holders(mod.name)
        self._flush_view()
        return [self._object(self.directory.module(name)) for name in names]

    def _flush_view(self) -> None:
        if self.view is not None:
            for record in self.view.take_logs():
                self.log(record)

    # -- probe lists ---------------------------------------------------------------------------

    def probe_list(self, mod: ModuleObject, ignore_commands: bool = False) -> list[ModuleObject]:
        """kmod_module_get_probe_list: every module to load for ``mod``, in order."""
        for obj in self._objects.values():
            obj.visited = False
            obj.required = False
        found: list[ModuleObject] = []
        self._probe_list(mod, True, ignore_commands, found)
        return found

    def _probe_list(self, mod: ModuleObject, required: bool, ignore_commands: bool, found: list[ModuleObject]) -> None:
        if mod.visited:
            return
        mod.visited = True
        deps = self.dependencies(mod)
        if required:
            mod.required = True
            for dep in deps:
                dep.required = True
        for dep in deps:
            self._fill_softdep(dep, found)
        if ignore_commands:
            found.append(mod)
            mod.ignorecmd = True
        else:
            self._fill_softdep(mod, found)

    def _fill_softdep(self, mod: ModuleObject, found: list[ModuleObject]) -> None:
        pre, post = self.softdeps(mod)
        for dep in pre:
            self._probe_list(dep, False, False, found)
        found.append(mod)
        mod.ignorecmd = bool(pre or post)
        for dep in post:
            self._probe_list(dep, False, False, found)

    def plan(
        self,
        mod: ModuleObject,
        *,
        extra_options: Optional[str] = None,
        ignore_commands: bool = False,
        ignore_loaded: bool = True,
    ) -> list[PlannedModule]:
        """The probe list of ``mod`` as :class:`PlannedModule` steps (modules already in the
        kernel are left out unless ``ignore_loaded``; built-in ones then appear as ``builtin``,
        and modules with neither a file nor a built-in entry are dropped, as modprobe prints
        nothing for them)."""
        steps = []
        for item in self.probe_list(mod, ignore_commands):
            if not ignore_loaded and self.in_kernel(item):
                continue
            options = self.options(item, extra_options if item is mod else None)
            command = self.install_command(item)
            if command is not None and not item.ignorecmd:
                steps.append(
                    PlannedModule(item.name, ACTION_INSTALL, item.path, options, command, item is mod, item.required)
                )
            elif item.path is not None:
                steps.append(
                    PlannedModule(item.name, ACTION_INSMOD, item.path, options, None, item is mod, item.required)
                )
            elif self.initstate(item) == KMOD_MODULE_BUILTIN:
                steps.append(PlannedModule(item.name, ACTION_BUILTIN, None, options, None, item is mod, item.required))
        return steps

    def options(self, mod: ModuleObject, extra: Optional[str] = None) -> str:
        return options_concat(self.config.module_options(mod.name, mod.alias), extra) or ""

    def install_command(self, mod: ModuleObject) -> Optional[str]:
        return self.config.install_command(mod.name)

    # -- loading ---------------------------------------------------------------------------------

    def probe_insert(
        self,
        mod: ModuleObject,
        *,
        extra_options: Optional[str] = None,
        force_vermagic: bool = False,
        force_modversion: bool = False,
        ignore_commands: bool = False,
        ignore_loaded: bool = False,
        dry_run: bool = False,
        fail_on_loaded: bool = False,
        blacklist: bool = False,
        show: Optional[ActionPrinter] = None,
    ) -> int:
        """kmod_module_probe_insert_module as modprobe calls it (the blacklist applies to a
        target found by alias, or to any target with ``blacklist``). Returns 0, BLACKLISTED or
        -errno."""
        if not ignore_loaded and self.in_kernel(mod):
            return -errno.EEXIST if fail_on_loaded else 0
        if (mod.alias is not None or blacklist) and self.config.is_blacklisted(mod.name):
            return BLACKLISTED
        err = 0
        for item in self.probe_list(mod, ignore_commands):
            if not ignore_loaded and self.in_kernel(item):
                err = -errno.EEXIST
            else:
                options = (
                    options_concat(
                        self.config.module_options(item.name, item.alias), extra_options if item is mod else None
                    )
                    or ""
                )
                command = self.install_command(item)
                if command is not None and not item.ignorecmd:
                    if show is not None:
                        show(item, True, options)
                    if not dry_run:
                        err = self._run_install(item, expand_cmdline_opts(command, options))
                else:
                    if show is not None:
                        show(item, False, options)
                    if not dry_run:
                        err = self._insert(item, options, force_vermagic, force_modversion)
            if err == -errno.EEXIST and item is mod and fail_on_loaded:
                break
            if err == -errno.EEXIST or not item.required:
                err = 0
            elif err < 0:
                break
        return err

    def _insert(self, mod: ModuleObject, options: str, force_vermagic: bool, force_modversion: bool) -> int:
        if mod.path is None:
            self.log(
                LibkmodLog(
                    LOG_ERR,
                    _MODULE_C,
                    895,
                    "kmod_module_insert_module",
                    f"could not find module by name='{mod.name}'\n",
                )
            )
            return -errno.ENOENT
        if self.kernel is None:
            return -errno.ENOSYS
        flags = (MODULE_INIT_IGNORE_VERMAGIC if force_vermagic else 0) | (
            MODULE_INIT_IGNORE_MODVERSIONS if force_modversion else 0
        )
        try:
            self.kernel.insert(mod.path, options, flags)
        except KernelError as exc:
            return -exc.errno
        return 0

    def _run_install(self, mod: ModuleObject, command: str) -> int:
        """libkmod's command_do for an install command."""
        status = self.runner(command, {**self.environ, "MODPROBE_MODULE": mod.name})
        if status == -1:
            self.log(
                LibkmodLog(
                    LOG_ERR,
                    _MODULE_C,
                    1041,
                    "command_do",
                    f"Could not run install command '{command}' for module {mod.name}: {os.strerror(errno.ECHILD)}\n",
                )
            )
            return -errno.EINVAL
        if status:
            self.log(
                LibkmodLog(
                    LOG_ERR,
                    _MODULE_C,
                    1047,
                    "command_do",
                    f"Error running install command '{command}' for module {mod.name}: retcode {status}\n",
                )
            )
            return -errno.EINVAL
        return 0

    def run_command(self, mod: ModuleObject, command: str) -> int:
        """modprobe's own command_do (remove commands): the exit status as -status, or -1."""
        status = self.runner(command, {**self.environ, "MODPROBE_MODULE": mod.name})
        return -1 if status == -1 else -status

    def remove_module(self, mod: ModuleObject, force: bool = False) -> int:
        """kmod_module_remove_module: delete_module(name, O_NONBLOCK[|O_TRUNC]); 0 or -errno."""
        if self.kernel is None:
            return -errno.ENOSYS
        try:
            self.kernel.remove(mod.name, REMOVE_FORCE if force else 0)
        except KernelError as exc:
            self.log(
                LibkmodLog(
                    LOG_ERR,
                    _MODULE_C,
                    856,
                    "kmod_module_remove_module",
                    f"could not remove '{mod.name}': {os.strerror(exc.errno)}\n",
                )
            )
            return -exc.errno
        return 0


def load_plan(
    directory: ModuleDirectory,
    config: ModprobeConfig,
    name: str,
    *,
    extra_options: Optional[str] = None,
    ignore_commands: bool = False,
    view: Optional[LibkmodView] = None,
) -> list[PlannedModule]:
    """What ``modprobe --show-depends NAME`` lists, as data: for every module NAME resolves to
    (libkmod's lookup order, config aliases first), its probe list in load order -- dependencies
    deepest first, softdeps around the module they belong to, then the module -- each with the
    options modprobe would pass (``options`` lines, then ``MOD.param`` from the kernel command
    line, then ``extra_options`` for the target). A blacklisted module reached by alias gives
    nothing. Without ``view`` nothing counts as loaded; with one, modules already live (or
    built in) are left out, as a real ``modprobe NAME`` skips them. Raises LookupError when NAME
    resolves to nothing."""
    engine = Modprobe(directory, config, view=view)
    mods = engine.lookup(name)
    if not mods:
        raise LookupError(f"module {name} not found in directory {directory.path}")
    steps: list[PlannedModule] = []
    for mod in mods:
        if mod.alias is not None and config.is_blacklisted(mod.name):
            continue
        if view is not None and engine.in_kernel(mod):
            continue
        steps += engine.plan(
            mod, extra_options=extra_options, ignore_commands=ignore_commands, ignore_loaded=view is None
        )
    return steps
