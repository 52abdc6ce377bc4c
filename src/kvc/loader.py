"""Load and unload an instance's modules: preflight, plan, execute, roll back.

Preflight runs before any syscall: every module must be an ELF file of the kernel's architecture
(an arm64 image's modules are refused on an amd64 kernel with one line, as the kernel would refuse
them with "Invalid architecture in ELF header"), every module's vermagic must name the target kernel, and every
symbol it imports must come from the kernel, from another module of the instance, or from an
in-tree module of ``/lib/modules/KVER`` (found through kmod's indexes). The plan loads in-tree
dependencies first, each resolved as modprobe would (:func:`kvc.kmod.modprobe.load_plan`: its
dependencies deepest first, softdeps, ``options`` from modprobe.d and the kernel command line),
then the instance's modules in dependency order. In-tree modules the instance names
(``KVC_INTREE_MODULES``) come first, resolved the same way. An instance module's softdeps (its
modprobe.d ``softdep`` line, else its own ``MODULE_SOFTDEP``) are loaded around it as modprobe
loads them: ``pre:`` modules just before it, ``post:`` modules just after. If the kernel refuses
module k, everything this run loaded is unloaded again; a softdep the kernel refuses is skipped,
as modprobe skips it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
from typing import TYPE_CHECKING, AbstractSet, Mapping, NamedTuple, Optional, Sequence

from kvc.arch import arch_of_elf_machine
from kvc.atomic import write_json
from kvc.errors import LoadError, StateError
from kvc.kmod.config import ModprobeConfig, Softdep, load_config, parse_softdep
from kvc.kmod.kernel.protocol import Kernel, KernelError
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.modprobe import ACTION_BUILTIN, ACTION_INSTALL, PlannedModule, load_plan
from kvc.kmod.module import ModuleFile
from kvc.kmod.names import modname_normalize as normalize_name
from kvc.kmod.signature import signature_problem

if TYPE_CHECKING:
    import logging

    from kvc.keys import HostTrust

LOADED_RECORD = "loaded.json"


class Origin(str, enum.Enum):
    """Where a module to load comes from. A str, so the guest's JSON result carries the value."""

    IN_TREE = "in-tree"
    INSTANCE = "instance"


class LoadStep(NamedTuple):
    name: str
    path: str
    params: str
    origin: Origin
    required: bool = True  # False for softdeps: a refusal is skipped, as modprobe does

    def describe(self) -> str:
        params = f" {self.params}" if self.params else ""
        softdep = ", softdep" if not self.required else ""
        return f"insmod {self.path}{params}  ({self.origin.value}{softdep})"


class LoadPlan(NamedTuple):
    instance: str
    kernel_release: str
    steps: tuple[LoadStep, ...]
    already_loaded: tuple[str, ...] = ()

    def describe(self) -> str:
        lines = [f"load {self.instance} for {self.kernel_release}:"]
        lines += [f"  {step.describe()}" for step in self.steps]
        lines += [f"  skip {name} (already loaded)" for name in self.already_loaded]
        if not self.steps:
            lines.append("  nothing to load")
        return "\n".join(lines)


class UnloadPlan(NamedTuple):
    instance: str
    kernel_release: str
    names: tuple[str, ...]
    not_loaded: tuple[str, ...] = ()
    # In-tree modules this instance's loads pulled in (its loaded record) that are loaded now: each
    # is removed after the instance's modules once nothing uses it any more.
    in_tree: tuple[str, ...] = ()

    def describe(self) -> str:
        lines = [f"unload {self.instance} for {self.kernel_release}:"]
        lines += [f"  rmmod {name}" for name in self.names]
        lines += [f"  rmmod {name}  (in-tree, pulled in by {self.instance}; only once unused)" for name in self.in_tree]
        lines += [f"  skip {name} (not loaded)" for name in self.not_loaded]
        if not self.names and not self.in_tree:
            lines.append("  nothing to unload")
        return "\n".join(lines)


class _Candidate:
    def __init__(self, name: str, path: str, module: ModuleFile) -> None:
        self.name = name
        self.path = path
        self.module = module
        self.imports: list[str] = []
        # Instance modules to load before this one because of a softdep; ignored where that would
        # contradict a real dependency (modprobe, too, loads a dependency before its user).
        self.soft_before: list[str] = []


def _log() -> logging.Logger:
    """kvc's logger, imported when something is logged: the verification guest's agent plans and
    loads without logging (its start-up under emulation pays for every import)."""
    import logging

    return logging.getLogger("kvc")


def _vermagic_release(module: ModuleFile) -> str:
    vermagic = module.vermagic or ""
    return vermagic.split()[0] if vermagic.split() else ""


def _machine_name(machine: int) -> str:
    arch = arch_of_elf_machine(machine)
    return f"{arch.value} (ELF machine {machine})" if arch is not None else f"ELF machine {machine}"


def check_architecture(instance: str, kernel_release: str, modules: Mapping[str, ModuleFile], kernel: Kernel) -> None:
    """LoadError, with one line that says so, when a module is not of the kernel's architecture
    (``modules``: by name); nothing when the kernel's architecture is unknown."""
    wanted = kernel.elf_machine()
    if wanted is None:
        return
    foreign = {name: module.elf.machine for name, module in modules.items() if module.elf.machine != wanted}
    if not foreign:
        return
    machines = sorted(set(foreign.values()))
    raise LoadError(
        f"{instance}'s modules are built for {', '.join(map(_machine_name, machines))}, but kernel "
        f"{kernel_release} takes {_machine_name(wanted)} modules",
        hint="build the instance for this kernel and its architecture ('kvc build NAME --kernel KVER', "
        "--arch for a release that names none)",
    )


def plan_load(
    instance: str,
    kernel_release: str,
    module_paths: Sequence[str],
    params: Mapping[str, str],
    kernel: Kernel,
    moddir: Optional[ModuleDirectory],
    *,
    reload_loaded: bool = False,
    preflight: bool = True,
    modprobe_config: Optional[ModprobeConfig] = None,
    unloaded_first: AbstractSet[str] = frozenset(),
    intree_modules: Sequence[str] = (),
    trust: Optional[HostTrust] = None,
) -> LoadPlan:
    """Preflight and plan. ``module_paths`` are the instance's extracted module files in
    KMOD_NAMES order; ``params`` maps a module name (with '_') to its parameter string. Without
    ``preflight`` what it finds wrong is left for the kernel to refuse (verification wants the
    real kernel's verdict). ``modprobe_config`` is the host's modprobe configuration for the
    in-tree modules (None: only the module directory's own modules.softdep). ``unloaded_first``
    names loaded modules an unload runs before this plan (a reload's dry run). ``intree_modules``
    (KVC_INTREE_MODULES) are loaded first, each with what ``modprobe NAME`` would load. With
    ``trust`` (the host's keyrings and enforcement) a module the kernel will refuse for its
    signature is refused here, with how to enroll a key."""
    candidates: dict[str, _Candidate] = {}
    problems: list[str] = []
    for path in module_paths:
        module = ModuleFile.open(path)
        release = _vermagic_release(module)
        if release != kernel_release:
            problems.append(f"{module.name}: built for kernel {release or '(no vermagic)'}, not {kernel_release}")
        candidates[module.name] = _Candidate(module.name, path, module)
    if preflight:
        check_architecture(instance, kernel_release, {name: cand.module for name, cand in candidates.items()}, kernel)
    provided_by_instance = {sym.name: name for name, cand in candidates.items() for sym in cand.module.exported_symbols}
    kernel_symbols = kernel.exported_symbols()
    loaded = {entry.name for entry in kernel.loaded_modules()} - set(unloaded_first)
    in_tree: dict[str, list[str]] = {}
    missing: dict[str, list[str]] = {}
    for name, cand in candidates.items():
        for sym in cand.module.dependency_symbols:
            if sym.name in ("module_layout",) or sym.bind == "weak":
                continue
            if sym.name in provided_by_instance:
                provider = provided_by_instance[sym.name]
                if provider != name and provider not in cand.imports:
                    cand.imports.append(provider)
                continue
            if kernel_symbols is not None and sym.name in kernel_symbols:
                continue
            owner = moddir.lookup_symbol_owner(sym.name) if moddir is not None else None
            if owner is not None and owner not in loaded:
                in_tree.setdefault(owner, []).append(sym.name)
                continue
            if owner is not None or kernel_symbols is None:
                # Loaded already, or the kernel's export table is unknown: the kernel judges.
                continue
            missing.setdefault(name, []).append(sym.name)
        for dep in cand.module.depends:
            dep = normalize_name(dep)
            if dep in candidates:
                if dep not in cand.imports:
                    cand.imports.append(dep)
            elif dep not in in_tree and dep not in loaded:
                in_tree.setdefault(dep, [])
    for name, symbols in missing.items():
        problems.append(
            f"{name}: unknown symbols: {', '.join(sorted(set(symbols)))} "
            "(no provider in the kernel, the instance or the host's module tree)"
        )
    if problems and preflight:
        raise LoadError(
            f"preflight refused {instance} for {kernel_release}",
            details="\n".join(problems),
            hint="rebuild the instance for this kernel ('kvc build NAME --kernel KVER --force')",
        )
    if trust is not None and preflight:
        from kvc.keys import check_signatures, trust_error, unsigned_warnings

        # A signature kvc.kmod cannot read is left for the kernel to judge.
        signatures = {
            name: cand.module.signature
            for name, cand in candidates.items()
            if cand.module.signature is not None or signature_problem(cand.module.image) is None
        }
        refused = check_signatures(signatures, trust)
        if refused:
            raise trust_error(refused)
        for warning in unsigned_warnings(signatures, trust):
            _log().warning("%s", warning)
    if moddir is not None and modprobe_config is None:
        modprobe_config = load_config([], module_dir=moddir.path)
    softdeps = {name: _softdep(cand.module, modprobe_config) for name, cand in candidates.items()}
    for name, softdep in softdeps.items():
        for other in map(normalize_name, softdep.pre):
            if other in candidates and other != name:
                candidates[name].soft_before.append(other)
        for other in map(normalize_name, softdep.post):
            if other in candidates and other != name:
                candidates[other].soft_before.append(name)
    steps: list[LoadStep] = []
    seen: set[str] = set()

    def add(planned: Sequence[LoadStep]) -> None:
        for step in planned:
            if step.name not in seen and step.name not in loaded:
                seen.add(step.name)
                steps.append(step)

    for name in intree_modules:
        add(_in_tree_steps(moddir, modprobe_config, name, "KVC_INTREE_MODULES names it"))
    for owner in in_tree:
        add(_in_tree_steps(moddir, modprobe_config, owner))
    skipped = []
    for name in _dependency_order(candidates):
        if name in loaded and not reload_loaded:
            skipped.append(name)
            continue
        around = softdeps[name]
        for other in around.pre:
            add(_softdep_steps(moddir, modprobe_config, other, candidates))
        add([LoadStep(name, candidates[name].path, params.get(name, ""), Origin.INSTANCE)])
        for other in around.post:
            add(_softdep_steps(moddir, modprobe_config, other, candidates))
    return LoadPlan(instance, kernel_release, tuple(steps), tuple(skipped))


def _softdep(module: ModuleFile, config: Optional[ModprobeConfig]) -> Softdep:
    """The softdep modprobe would use for an instance module: a configuration line naming it
    first (libkmod takes the first match), else the module's own first ``softdep=`` entry, which
    depmod would have put in modules.softdep."""
    configured = config.softdep(module.name) if config is not None else None
    if configured is not None:
        return configured
    own = module.softdeps
    return parse_softdep(module.name, own[0]) if own else Softdep(module.name)


def _softdep_steps(
    moddir: Optional[ModuleDirectory], config: Optional[ModprobeConfig], name: str, candidates: Mapping[str, object]
) -> list[LoadStep]:
    """The in-tree load steps of one softdep (none of them required). A softdep on another of the
    instance's modules only orders them; one nobody has is skipped, as modprobe skips it."""
    if normalize_name(name) in candidates or moddir is None or config is None:
        return []
    try:
        planned = load_plan(moddir, config, name)
    except LookupError:
        return []
    return [step._replace(required=False) for step in _as_steps(planned)]


def _in_tree_steps(
    moddir: Optional[ModuleDirectory], config: Optional[ModprobeConfig], name: str, why: str = ""
) -> list[LoadStep]:
    """What ``modprobe NAME`` would insert, as load steps (modprobe's order and options)."""
    because = f" ({why})" if why else ""
    if moddir is None or config is None:
        raise LoadError(f"in-tree module {name} is needed{because} but the host has no module directory")
    try:
        planned = load_plan(moddir, config, name)
    except LookupError:
        raise LoadError(
            f"in-tree module {name} is needed{because} but not found in {moddir.path}",
            hint="install the kernel's modules package or run depmod"
            + (", or correct KVC_INTREE_MODULES" if why else ""),
        ) from None
    return _as_steps(planned)


def _as_steps(planned: Sequence[PlannedModule]) -> list[LoadStep]:
    steps = []
    for item in planned:
        if item.action == ACTION_BUILTIN:
            continue
        if item.action == ACTION_INSTALL or item.path is None:
            raise LoadError(
                f"in-tree module {item.name} has an install command in the modprobe configuration: {item.command}",
                hint=f"kvc does not run install commands: load it with 'modprobe {item.name}' "
                "first, or remove the install line",
            )
        steps.append(LoadStep(item.name, item.path, item.options.strip(), Origin.IN_TREE, item.required))
    return steps


class _Visit(enum.Enum):
    ACTIVE = enum.auto()
    DONE = enum.auto()


def _needs(needs: Mapping[str, list[str]], start: str, target: str) -> bool:
    """Whether ``start`` (transitively) has to come after ``target``."""
    pending, seen = [start], set()
    while pending:
        name = pending.pop()
        if name == target:
            return True
        if name not in seen:
            seen.add(name)
            pending += needs[name]
    return False


def _dependency_order(candidates: Mapping[str, _Candidate]) -> list[str]:
    """Providers before users, then softdep order where it contradicts no dependency; otherwise
    the instance's own order (KMOD_NAMES)."""
    needs = {name: list(cand.imports) for name, cand in candidates.items()}
    for name, cand in candidates.items():
        for dep in cand.soft_before:
            if dep not in needs[name] and not _needs(needs, dep, name):
                needs[name].append(dep)
    order: list[str] = []
    state: dict[str, _Visit] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) is _Visit.DONE:
            return
        if state.get(name) is _Visit.ACTIVE:
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            raise LoadError(f"dependency cycle between the instance's modules: {cycle}")
        state[name] = _Visit.ACTIVE
        for dep in needs[name]:
            visit(dep, [*trail, name])
        state[name] = _Visit.DONE
        order.append(name)

    for name in candidates:
        visit(name, [])
    return order


def execute_load(plan: LoadPlan, kernel: Kernel, record_path: Optional[str]) -> list[str]:
    """Load every step; on a refusal unload what this run loaded (reverse order) and raise."""
    done: list[LoadStep] = []
    for step in plan.steps:
        try:
            kernel.insert(step.path, step.params, 0)
        except KernelError as exc:
            if exc.errno == errno.EEXIST:
                # Another loader (udev, modprobe, a racing kvc) loaded it after planning: skipped as
                # the plan skips a module loaded before, and not ours to roll back or unload.
                _log().info("%s was loaded meanwhile by someone else: skipped", step.name)
                continue
            if not step.required:
                continue
            rollback_errors = []
            for loaded in reversed(done):
                try:
                    kernel.remove(loaded.name, 0)
                except KernelError as undo:
                    rollback_errors.append(f"could not unload {loaded.name}: {undo}")
            details = [str(exc), *exc.log_lines]
            details += rollback_errors
            rolled = ", ".join(s.name for s in reversed(done)) or "nothing"
            raise LoadError(
                f"the kernel refused {step.name} ({step.path}); unloaded again: {rolled}",
                details="\n".join(details),
                hint="see the kernel log lines above; 'kvc status' shows what is loaded",
            ) from None
        done.append(step)
    names = [step.name for step in done]
    if record_path is not None:
        try:
            _record_loaded(record_path, plan, done, kernel.boot_id())
        except OSError:
            # No space or a read-only /var/lib/kvc: without the record unload could not tell what
            # this load pulled in, so it is taken back (the error says why).
            for loaded in reversed(done):
                with contextlib.suppress(KernelError):
                    kernel.remove(loaded.name, 0)
            raise
    return names


def _record_loaded(path: str, plan: LoadPlan, done: Sequence[LoadStep], boot: Optional[str]) -> None:
    """Remember which in-tree modules this instance pulled in, so unload can drop them again."""
    previous = read_loaded_record(path, boot)
    in_tree = [s.name for s in done if s.origin is Origin.IN_TREE]
    _write_loaded_record(path, plan.kernel_release, boot, set(previous.get("in_tree", [])) | set(in_tree))


def _write_loaded_record(path: str, kernel_release: str, boot: Optional[str], in_tree: AbstractSet[str]) -> None:
    record = {"schema": 1, "kernel": kernel_release, "boot": boot, "in_tree": sorted(in_tree)}
    # Not synced: it tells what is loaded in the running kernel, which a power loss takes with it
    # (a torn or missing record reads as none). The boot path saves two fsyncs, about 10 ms.
    write_json(path, record, volatile=True)


def read_loaded_record(path: str, boot: Optional[str]) -> dict[str, list[str]]:
    """The loaded record of this boot (``boot``: the kernel's boot id); one a host left behind
    when it went down without an unload is another boot's, and names nothing loaded now by kvc
    (an in-tree module it lists may have been loaded by someone else since)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or (boot is not None and data.get("boot") != boot):
        return {}
    in_tree = data.get("in_tree", [])
    return {"in_tree": [str(name) for name in in_tree if isinstance(name, str)]}


def plan_unload(
    instance: str,
    kernel_release: str,
    module_names: Sequence[str],
    kernel: Kernel,
    *,
    force: bool = False,
    record_path: Optional[str] = None,
) -> UnloadPlan:
    """Unload in reverse dependency order; refuse modules held by modules outside the instance.
    ``record_path`` is the instance's loaded record: its in-tree modules go too once unused."""
    loaded = {entry.name: entry for entry in kernel.loaded_modules()}
    ours = [normalize_name(name) for name in module_names]
    present = [name for name in ours if name in loaded]
    absent = tuple(name for name in ours if name not in loaded)
    order: list[str] = []
    remaining = list(present)
    while remaining:
        # A module can go once no remaining module of ours holds it.
        free = [n for n in remaining if not any(h in remaining for h in loaded[n].users)]
        if not free:
            free = [remaining[-1]]
        pick = free[-1]
        order.append(pick)
        remaining.remove(pick)
    if not force:
        held = []
        for name in order:
            outsiders = [h for h in loaded[name].users if h not in ours]
            if outsiders:
                held.append(f"{name} is in use by: {' '.join(outsiders)}")
        if held:
            raise StateError(
                f"cannot unload {instance}: modules are in use",
                details="\n".join(held),
                hint="unload the users first, or pass --force",
            )
    pulled_in = read_loaded_record(record_path, kernel.boot_id()).get("in_tree", []) if record_path else []
    in_tree = tuple(name for name in reversed(pulled_in) if name in loaded and name not in ours)
    return UnloadPlan(instance, kernel_release, tuple(order), absent, in_tree)


def execute_unload(plan: UnloadPlan, kernel: Kernel, *, force: bool, record_path: Optional[str]) -> None:
    failures = []
    for name in plan.names:
        try:
            kernel.remove(name, kernel.REMOVE_FORCE if force else 0)
        except KernelError as exc:
            if exc.errno == errno.ENOENT:
                # Unloaded after planning by someone else: the goal holds.
                _log().info("%s was unloaded meanwhile by someone else", name)
                continue
            failures.append(f"{name}: {exc}")
    if record_path is not None:
        still_needed = list(plan.in_tree)
        removed_one = True
        # Another pulled-in module may hold one (vxlan holds ip6_udp_tunnel): repeat while that frees more.
        while removed_one:
            removed_one = False
            loaded = {entry.name: entry for entry in kernel.loaded_modules()}
            for name in list(still_needed):
                entry = loaded.get(name)
                if entry is None:
                    still_needed.remove(name)
                elif entry.refcnt == 0:
                    with contextlib.suppress(KernelError):
                        kernel.remove(name, 0)
                        still_needed.remove(name)
                        removed_one = True
        _write_loaded_record(record_path, plan.kernel_release, kernel.boot_id(), set(still_needed))
    if failures:
        raise LoadError(
            f"could not unload every module of {plan.instance}",
            details="\n".join(failures),
            hint="'kvc status' shows what is still loaded",
        )
