"""``kvc install BUNDLE_DIR`` and ``kvc uninstall NAME``: plan, then execute exactly the plan.

A bundle is untrusted input: everything it names becomes a path below kvc's own places only
(``/etc/kvc``, ``/etc/kvc/bundles/NAME``, ``/etc/kvc/lib/kvc``, ``/usr/local/bin`` for wrapper
commands with plain names), its symlinks must stay inside it, and install never overwrites a file
it did not write itself. What install writes is recorded, with a sha256 of each file, in a manifest
(``/var/lib/kvc/NAME/install.json``, written before the files and again after them); uninstall
removes only what the manifest lists and only while its content is still what kvc wrote, so files
changed or put there by someone else are kept. A failed install restores what was there before.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from kvc import hooks, systemd
from kvc.atomic import fsync_path, write_file
from kvc.config import InstanceConfig, check_name, parse_assignments, read_conf
from kvc.errors import ConfigError, StateError
from kvc.kmod.digest import file_sha256
from kvc.layout import Layout
from kvc.pathkind import Kind, kind_of

MANIFEST_SCHEMA = 1
WRAPPER_MARKER = "# kvc wrapper"
# Where a host looks for commands besides PATH: systemd services and login shells use these.
COMMAND_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_CONTEXT_KEY = "KMOD_CONTAINER_BUILD_CONTEXT"


class Fate(enum.Enum):
    """What uninstall does with one recorded path."""

    REMOVE = "remove"
    KEEP_CHANGED = "keep"  # changed since kvc wrote it: no longer kvc's
    GONE = "gone"  # already removed by someone


def sha256_of(path: str, kind: Kind) -> str:
    """The digest kvc records: a file's content, a symlink's target, "" for a directory."""
    if kind is Kind.SYMLINK:
        return hashlib.sha256(os.readlink(path).encode()).hexdigest()
    if kind is Kind.DIR:
        return ""
    return file_sha256(path).hex()


@dataclass(frozen=True)
class Entry:
    """One path kvc installed. ``digests`` are the contents that count as kvc's: one after an
    install, two (old and new) while an install that replaces a file is under way."""

    path: str
    kind: Kind
    digests: tuple[str, ...]

    def owned(self) -> bool:
        """Whether the path still holds what kvc wrote there."""
        return kind_of(self.path) is self.kind and (
            self.kind is Kind.DIR or sha256_of(self.path, self.kind) in self.digests
        )


@dataclass(frozen=True)
class Manifest:
    name: str
    entries: tuple[Entry, ...]

    def get(self, path: str) -> Optional[Entry]:
        return next((entry for entry in self.entries if entry.path == path), None)

    def to_json(self) -> dict[str, object]:
        return {
            "schema": MANIFEST_SCHEMA,
            "name": self.name,
            "entries": [{"path": e.path, "kind": e.kind.value, "sha256": list(e.digests)} for e in self.entries],
        }


def read_manifest(layout: Layout, name: str) -> Optional[Manifest]:
    """The instance's install manifest; None when there is none. A manifest kvc cannot read is a
    StateError: guessing would risk removing files that are not kvc's."""
    path = layout.install_manifest(name)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if data["schema"] != MANIFEST_SCHEMA or data["name"] != name:
            raise ValueError("another schema or instance")
        entries = tuple(
            Entry(str(item["path"]), Kind(item["kind"]), tuple(str(d) for d in item["sha256"]))
            for item in data["entries"]
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(
            f"{path}: the install manifest is unreadable ({exc})",
            hint="kvc removes only files its manifest lists; remove the instance's files by hand",
        ) from None
    places = (layout.conf_dir, layout.bin_dir)
    strays = [entry.path for entry in entries if not any(_below(os.path.normpath(entry.path), p) for p in places)]
    if strays:
        raise StateError(
            f"{path}: the install manifest lists {strays[0]}, outside kvc's places ({', '.join(places)})",
            hint="kvc install never writes there, so the manifest was altered: remove the instance's files by hand",
        )
    return Manifest(name, entries)


# ---- install ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One path install creates or replaces: a directory, a symlink (``data`` is its target), or a
    file with ``data`` or a copy of ``source`` (which must still have ``digest`` when copied)."""

    path: str
    kind: Kind
    what: str
    digest: str = ""
    data: bytes = b""
    source: str = ""
    mode: int = 0o644
    replaces: str = ""  # the digest of kvc's earlier file there

    def describe(self) -> str:
        verb = "replace" if self.replaces else "write"
        if self.kind is Kind.DIR:
            return f"create directory {self.path}"
        if self.kind is Kind.SYMLINK:
            return f"{verb} symlink {self.path} -> {self.data.decode()}"
        return f"{verb} {self.what} {self.path}"


@dataclass(frozen=True)
class InstallPlan:
    name: str
    bundle: str
    bundle_target: str
    bundle_copy: tuple[Write, ...]  # what goes into bundle_target, parents first
    files: tuple[Write, ...]  # conf, library, wrappers
    obsolete: tuple[Entry, ...]  # kvc's files of the earlier install that this one no longer has
    manifest_path: str
    manifest: Manifest
    previous: Optional[Manifest]
    unit_path: str
    unit_current: bool
    systemctl: tuple[systemd.SystemctlCall, ...]
    systemctl_skip: str
    kernel_hooks: tuple[hooks.HookPlan, ...] = ()  # shared by every instance, like the unit

    def describe(self) -> str:
        lines = [f"install {self.name} from {self.bundle}:"]
        lines.append(f"  write the install manifest {self.manifest_path}")
        replace = " (replacing kvc's earlier copy)" if os.path.lexists(self.bundle_target) else ""
        lines.append(f"  copy the bundle ({len(self.bundle_copy)} entries) to {self.bundle_target}{replace}")
        lines += [f"  {write.describe()}" for write in self.files]
        lines += [f"  remove {entry.path} (no longer in the bundle)" for entry in self.obsolete]
        lines.append(
            f"  {self.unit_path}: up to date" if self.unit_current else f"  write the systemd unit {self.unit_path}"
        )
        lines += [f"  {hook.describe()}" for hook in self.kernel_hooks]
        lines += [_systemctl_line(call, self.systemctl_skip) for call in self.systemctl]
        return "\n".join(lines)


def _systemctl_line(call: systemd.SystemctlCall, skip: str) -> str:
    if skip:
        return f"  skip '{' '.join(['systemctl', *call.args])}' ({skip}; run it on the host)"
    return f"  {call.describe()}"


def _bundle_entries(bundle: str, target: str) -> list[Write]:
    """The bundle's directories, files and symlinks as writes below ``target``. Symlinks must be
    relative and stay inside the bundle (they are copied as symlinks, never followed); other
    special files are refused."""
    real_bundle = os.path.realpath(bundle)
    writes = [Write(target, Kind.DIR, "bundle directory", mode=0o755)]
    for directory, dirnames, filenames in os.walk(bundle):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, bundle)
            destination = os.path.join(target, relative)
            kind = kind_of(path)
            if kind is Kind.SYMLINK:
                link = os.readlink(path)
                resolved = os.path.realpath(path)
                inside = resolved == real_bundle or resolved.startswith(real_bundle + os.sep)
                if os.path.isabs(link) or not inside:
                    raise ConfigError(
                        f"{path}: the bundle's symlink points outside the bundle (-> {link})",
                        hint="a bundle is copied as it is: put the file itself in the bundle, "
                        "or make the link relative and inside it",
                    )
                writes.append(Write(destination, Kind.SYMLINK, "symlink", sha256_of(path, kind), data=link.encode()))
            elif kind is Kind.DIR:
                writes.append(Write(destination, Kind.DIR, "directory", mode=0o755))
            elif kind is Kind.FILE:
                mode = 0o755 if os.stat(path).st_mode & 0o111 else 0o644
                writes.append(Write(destination, Kind.FILE, "file", sha256_of(path, kind), source=path, mode=mode))
            else:
                raise ConfigError(
                    f"{path}: the bundle holds a special file (not a file, directory or symlink)",
                    hint="remove it from the bundle",
                )
        # os.walk lists symlinked directories among dirnames: they are copied as links, not entered.
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(directory, d))]
    return writes


def _installed_conf(
    text: str, conf: str, values: Mapping[str, str], instance: InstanceConfig, bundle: str, target: str
) -> str:
    """The conf as installed: a local build context inside the bundle is pointed at the copy."""
    context = instance.build_context
    if not context or "://" in context:
        return text
    relative = os.path.relpath(os.path.realpath(context), os.path.realpath(bundle))
    if relative == ".." or relative.startswith(".." + os.sep):
        raise ConfigError(
            f"{conf}: {_CONTEXT_KEY} {values.get(_CONTEXT_KEY, '')!r} points outside the bundle",
            hint="a bundle's relative build context must be inside the bundle",
        )
    installed = os.path.normpath(os.path.join(target, relative))
    lines = []
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        assignment = words[1] if words and words[0] == "export" and len(words) > 1 else line.strip()
        lines.append(f"{_CONTEXT_KEY}={shlex.quote(installed)}" if assignment.startswith(_CONTEXT_KEY + "=") else line)
    result = "\n".join(lines) + "\n"
    check = InstanceConfig.from_values(instance.name, conf, parse_assignments(result, conf))
    if check.build_context != installed:
        raise ConfigError(
            f"{conf}: kvc cannot point {_CONTEXT_KEY} at the installed bundle",
            hint=f"write {_CONTEXT_KEY} on one line of its own",
        )
    return result


def _refuse_host_paths(conf: str, values: Mapping[str, str]) -> None:
    """A bundle builds from what it carries: an absolute build context or build file would send
    any host directory (``/etc``, ``/root``) into a build the bundle's Containerfile controls."""
    for key in (_CONTEXT_KEY, "KMOD_CONTAINER_BUILD_FILE"):
        if os.path.isabs(values.get(key, "")):
            raise ConfigError(
                f"{conf}: {key} {values[key]!r} is a host path; a bundle's build inputs are inside the bundle",
                hint=f"make {key} relative to the bundle (or a git/tarball URL for the context); an absolute "
                "path belongs in a conf written on the host itself",
            )


def _shadowed(layout: Layout, tool: str, path_env: str) -> Optional[str]:
    """The host command a wrapper named ``tool`` would shadow (or be shadowed by), if any."""
    bin_dir = os.path.normpath(layout.bin_dir)
    for directory in [*path_env.split(os.pathsep), *COMMAND_DIRS]:
        if not directory.startswith("/"):
            continue
        candidate = os.path.join(layout.host.host(directory), tool)
        if os.path.normpath(os.path.dirname(candidate)) == bin_dir:
            continue
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _replacing(path: str, previous: Optional[Manifest], what: str) -> str:
    """The digest of kvc's earlier file at ``path`` ("" when there is none); a file kvc did not
    write there, or one changed since, is refused."""
    if not os.path.lexists(path):
        return ""
    entry = previous.get(path) if previous else None
    if entry is None or entry.kind is not Kind.FILE or not entry.owned():
        raise StateError(
            f"{path} exists and was not written by kvc install (or was changed since); not replacing the {what}",
            hint="kvc never overwrites files it did not write: move it away (or 'kvc uninstall' the instance "
            "that has it), then install again",
        )
    return sha256_of(path, Kind.FILE)


def plan_install(
    layout: Layout, bundle_dir: str, *, shadow: bool = False, environ: Optional[Mapping[str, str]] = None
) -> InstallPlan:
    env = os.environ if environ is None else environ
    bundle = os.path.abspath(bundle_dir)
    if not os.path.isdir(bundle):
        raise ConfigError(f"{bundle}: not a bundle directory", hint="give the directory that holds NAME.conf")
    confs = [e for e in sorted(os.listdir(bundle)) if e.endswith(".conf")]
    if len(confs) != 1:
        raise ConfigError(
            f"{bundle}: a bundle directory holds exactly one NAME.conf (found {len(confs)})",
            hint="put the instance's NAME.conf, and no other .conf file, in the bundle",
        )
    name = check_name(confs[0][:-5], os.path.join(bundle, confs[0]))
    systemd.instance_unit(name)
    conf = os.path.join(bundle, confs[0])
    if kind_of(conf) is not Kind.FILE:
        raise ConfigError(f"{conf}: not a regular file", hint="the bundle's conf must be a file, not a link")
    values = read_conf(conf)
    instance = InstanceConfig.from_values(name, conf, values)
    _refuse_host_paths(conf, values)
    previous = read_manifest(layout, name)
    target = layout.bundle_dir(name)
    copy = _bundle_entries(bundle, target)
    if os.path.lexists(target):
        _check_owned_tree(target, previous)
    with open(conf, encoding="utf-8") as handle:
        conf_text = _installed_conf(handle.read(), conf, values, instance, bundle, target)

    files: list[Write] = []

    def add(path: str, data: bytes, what: str, mode: int) -> None:
        digest = hashlib.sha256(data).hexdigest()
        files.append(
            Write(path, Kind.FILE, what, digest, data=data, mode=mode, replaces=_replacing(path, previous, what))
        )

    add(layout.instance_conf(name), conf_text.encode(), "conf", 0o644)
    library = os.path.join(bundle, f"{name}-lib.sh")
    if os.path.lexists(library):
        if kind_of(library) is not Kind.FILE:
            raise ConfigError(f"{library}: not a regular file", hint="the bundle's library must be a file")
        with open(library, "rb") as library_file:
            add(layout.etc_library(name), library_file.read(), "library", 0o644)
    for tool in instance.wrapper_tools:
        path = layout.wrapper(tool)
        shadowed = _shadowed(layout, tool, env.get("PATH", ""))
        if shadowed and not shadow:
            raise StateError(
                f"wrapper {tool} of {name} would shadow the host command {shadowed}",
                hint="rename the tool in KVC_WRAPPER_TOOLS, or pass --shadow to install it anyway",
            )
        add(path, wrapper_text(name, tool).encode(), f"wrapper {tool}", 0o755)
    written = {write.path for write in files} | {write.path for write in copy}
    obsolete = tuple(
        entry
        for entry in (previous.entries if previous else ())
        if entry.path not in written and not _below(entry.path, target) and entry.owned()
    )
    entries = tuple(Entry(w.path, w.kind, (w.digest,) if w.kind is not Kind.DIR else ()) for w in (*copy, *files))
    skip = systemd.Systemctl(layout).skip_reason()
    return InstallPlan(
        name=name,
        bundle=bundle,
        bundle_target=target,
        bundle_copy=tuple(copy),
        files=tuple(files),
        obsolete=obsolete,
        manifest_path=layout.install_manifest(name),
        manifest=Manifest(name, entries),
        previous=previous,
        unit_path=systemd.unit_path(layout),
        unit_current=systemd.unit_is_current(layout),
        systemctl=systemd.enable_calls(name),
        systemctl_skip=skip,
        kernel_hooks=hooks.plan_hooks(layout),
    )


def wrapper_text(name: str, tool: str) -> str:
    return (
        f"#!/bin/sh\n{WRAPPER_MARKER} for {name}: runs {tool} from its image ('kvc uninstall {name}' removes it)\n"
        f'exec kvc wrapper {name} -- {tool} "$@"\n'
    )


def _below(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + os.sep)


def _check_owned_tree(target: str, previous: Optional[Manifest]) -> None:
    """Every entry below ``target`` must be one kvc installed, unchanged, before it is replaced."""
    strangers = []
    for directory, dirnames, filenames in os.walk(target):
        for name in [*dirnames, *filenames]:
            path = os.path.join(directory, name)
            entry = previous.get(path) if previous else None
            if entry is None or not entry.owned():
                strangers.append(path)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(directory, d))]
    if strangers or previous is None or previous.get(target) is None:
        listed = "\n".join(strangers[:10]) or f"{target} (no install manifest lists it)"
        raise StateError(
            f"{target} holds files kvc did not install (or changed since)",
            details=listed,
            hint="kvc never deletes files it did not write: move them away, then install again",
        )


def _pending(plan: InstallPlan) -> Manifest:
    """The manifest while the install runs: the new entries, accepting kvc's earlier content of
    replaced files too, and the earlier install's entries (so a crash leaves nothing unlisted)."""
    old = {entry.path: entry for entry in (plan.previous.entries if plan.previous else ())}
    entries = [
        Entry(e.path, e.kind, e.digests + (old[e.path].digests if e.path in old else ())) for e in plan.manifest.entries
    ]
    paths = {entry.path for entry in entries}
    entries += [entry for path, entry in old.items() if path not in paths]
    return Manifest(plan.name, tuple(entries))


class _Undo:
    """Steps to take back if the install fails, newest first."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], None]] = []
        self.cleanups: list[Callable[[], None]] = []

    def rollback(self) -> None:
        for step in reversed(self.steps):
            with contextlib.suppress(OSError):  # best effort: the original error is what the user sees
                step()

    def commit(self) -> None:
        for step in self.cleanups:
            with contextlib.suppress(OSError):  # a leftover backup is harmless
                step()


def _aside(path: str) -> str:
    """A fresh name next to ``path`` for its earlier version (removed once the install commits)."""
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.kvc-old-{os.getpid()}-{os.urandom(4).hex()}")


def _replace_file(path: str, data: bytes, mode: int, undo: _Undo) -> None:
    """Write ``path`` atomically; keep the earlier file (a hard link) until the install commits."""
    if os.path.lexists(path):
        backup = _aside(path)
        os.link(path, backup, follow_symlinks=False)
        undo.steps.append(lambda: os.replace(backup, path))
        undo.cleanups.append(lambda: os.unlink(backup))
    else:
        undo.steps.append(lambda: os.unlink(path) if os.path.lexists(path) else None)
    write_file(path, data, mode)


def _make_dirs(path: str, undo: _Undo) -> None:
    """Create ``path`` and its missing parents; undo removes those it created (if empty)."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)
        undo.steps.append(functools.partial(os.rmdir, directory))


def _copy_bundle(plan: InstallPlan, staging: str) -> None:
    for write in plan.bundle_copy[1:]:
        path = os.path.join(staging, os.path.relpath(write.path, plan.bundle_target))
        if write.kind is Kind.DIR:
            os.mkdir(path, write.mode)
        elif write.kind is Kind.SYMLINK:
            os.symlink(write.data.decode(), path)
        else:
            with open(write.source, "rb") as source, open(path, "xb") as copy:
                shutil.copyfileobj(source, copy)
                copy.flush()
                os.fchmod(copy.fileno(), write.mode)
                os.fsync(copy.fileno())
            if sha256_of(path, Kind.FILE) != write.digest:
                raise StateError(
                    f"{write.source} changed while kvc installed it", hint="install again once the bundle is complete"
                )


def execute_install(plan: InstallPlan, layout: Layout, say: Callable[[str], None]) -> None:
    """Execute ``plan`` (the caller holds the instance lock). On any failure everything goes back
    to how it was, and the error propagates."""
    undo = _Undo()
    try:
        _make_dirs(os.path.dirname(plan.manifest_path), undo)
        _replace_file(plan.manifest_path, _manifest_bytes(_pending(plan)), 0o644, undo)
        parent = os.path.dirname(plan.bundle_target)
        _make_dirs(parent, undo)
        staging = tempfile.mkdtemp(prefix=f".{plan.name}.new-", dir=parent)
        undo.steps.append(lambda: shutil.rmtree(staging, ignore_errors=True))
        _copy_bundle(plan, staging)
        os.chmod(staging, 0o755)
        if os.path.lexists(plan.bundle_target):
            _check_owned_tree(plan.bundle_target, plan.previous)
            old = _aside(plan.bundle_target)
            os.rename(plan.bundle_target, old)
            undo.steps.append(lambda: os.rename(old, plan.bundle_target))
            undo.cleanups.append(lambda: shutil.rmtree(old))
        os.rename(staging, plan.bundle_target)
        undo.steps.append(lambda: os.rename(plan.bundle_target, staging))
        fsync_path(parent)
        for write in plan.files:
            _make_dirs(os.path.dirname(write.path), undo)
            if write.replaces and _replacing(write.path, plan.previous, write.what) != write.replaces:
                raise StateError(f"{write.path} changed while kvc installed {plan.name}", hint="install again")
            _replace_file(write.path, write.data, write.mode, undo)
        for entry in plan.obsolete:
            if entry.owned():
                backup = _aside(entry.path)
                os.rename(entry.path, backup)
                undo.steps.append(functools.partial(os.rename, backup, entry.path))
                undo.cleanups.append(functools.partial(os.unlink, backup))
        if not plan.unit_current:
            _replace_file(plan.unit_path, systemd.unit_text().encode(), systemd.UNIT_MODE, undo)
        for hook in hooks.plan_hooks(layout):
            if hook.state is not hooks.HookState.CURRENT:
                _make_dirs(os.path.dirname(hook.path), undo)
                _replace_file(hook.path, hook.hook.text.encode(), hooks.HOOK_MODE, undo)
        write_file(plan.manifest_path, _manifest_bytes(plan.manifest))
    except BaseException:
        undo.rollback()
        raise
    undo.commit()
    say(f"installed {plan.name}: {len(plan.manifest.entries)} paths, listed in {plan.manifest_path}")


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n").encode()


# ---- uninstall --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    entry: Entry
    fate: Fate

    def describe(self) -> str:
        if self.fate is Fate.REMOVE:
            return f"remove {self.entry.path}" + (" (if empty)" if self.entry.kind is Kind.DIR else "")
        if self.fate is Fate.KEEP_CHANGED:
            return f"keep {self.entry.path} (changed since kvc installed it)"
        return f"skip {self.entry.path} (already gone)"


@dataclass(frozen=True)
class UninstallPlan:
    name: str
    systemctl: tuple[systemd.SystemctlCall, ...]
    systemctl_skip: str
    removals: tuple[Removal, ...]  # files and symlinks first, then directories deepest first
    state_dir: str

    def describe(self, before_files: Sequence[str] = ()) -> str:
        """The plan in execution order; ``before_files`` are the plans of steps that run between
        the systemctl calls and the file removals (the instance's module-tree deliveries)."""
        lines = [f"uninstall {self.name}:"]
        lines += [_systemctl_line(call, self.systemctl_skip) for call in self.systemctl]
        lines += before_files
        lines += [f"  {removal.describe()}" for removal in self.removals]
        lines.append(f"  remove {self.state_dir} (extracted modules, verification records, the install manifest)")
        return "\n".join(lines)


def plan_uninstall(layout: Layout, name: str) -> UninstallPlan:
    check_name(name)
    manifest = read_manifest(layout, name)
    if manifest is None:
        raise StateError(
            f"{name} was not installed by 'kvc install' (no {layout.install_manifest(name)})",
            hint="kvc removes only what its install recorded; remove a hand-written conf yourself",
        )
    files = [entry for entry in manifest.entries if entry.kind is not Kind.DIR]
    dirs = sorted((entry for entry in manifest.entries if entry.kind is Kind.DIR), key=lambda e: -e.path.count("/"))
    removals = []
    for entry in (*files, *dirs):
        if kind_of(entry.path) is None:
            fate = Fate.GONE
        else:
            fate = Fate.REMOVE if entry.owned() else Fate.KEEP_CHANGED
        removals.append(Removal(entry, fate))
    skip = systemd.Systemctl(layout).skip_reason()
    return UninstallPlan(name, systemd.disable_calls(name), skip, tuple(removals), layout.instance_state(name))


def execute_uninstall(plan: UninstallPlan, say: Callable[[str], None]) -> None:
    """Remove what the plan removes, checking each file again (the caller holds the lock)."""
    for removal in plan.removals:
        entry = removal.entry
        if removal.fate is not Fate.REMOVE:
            if removal.fate is Fate.KEEP_CHANGED:
                say(f"kept {entry.path}: changed since kvc installed it")
            continue
        if entry.kind is Kind.DIR:
            try:
                os.rmdir(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # someone else's files are in it
                    raise
                say(f"kept {entry.path}: holds files kvc did not install")
                continue
        elif entry.owned():
            os.unlink(entry.path)
        else:
            say(f"kept {entry.path}: changed since kvc installed it")
            continue
        say(f"removed {entry.path}")
    if os.path.isdir(plan.state_dir) and not os.path.islink(plan.state_dir):
        shutil.rmtree(plan.state_dir)
        say(f"removed {plan.state_dir}")
