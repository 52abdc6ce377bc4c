"""The kernel hooks ``kvc install`` writes: a kernel-install plugin and a Debian postinst.d hook.

Both run ``kvc kernel-added KVER`` when a kernel is installed (``data/90-kvc.install``,
``data/kvc``). Like the unit template they serve every instance, so they are written when
missing or when they are an older kvc's (they carry :data:`HOOK_MARKER`), never over a file that
is not kvc's, and ``kvc uninstall`` leaves them: without an enabled instance they prepare nothing.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from kvc.errors import StateError
from kvc.layout import Layout

HOOK_MARKER = "# kvc kernel hook"
HOOK_MODE = 0o755


@dataclass(frozen=True)
class Hook:
    resource: str  # the file in kvc's package data
    host_path: str  # where it is installed, below KVC_ROOT

    @property
    def text(self) -> str:
        from importlib import resources  # only for the hook's text: not on the boot path

        return resources.files("kvc").joinpath("data").joinpath(self.resource).read_text(encoding="utf-8")

    def path(self, layout: Layout) -> str:
        return layout.host.host(self.host_path)


# /etc/kernel/install.d, not /usr/lib/kernel/install.d: /usr is the packages' (and read-only on
# OSTree and bootc hosts). run-parts runs only names without dots; zz- names are the boot
# loaders' (Debian kernel handbook 8.2), so the hook is plain "kvc", as DKMS's is "dkms".
HOOKS = (
    Hook("90-kvc.install", "/etc/kernel/install.d/90-kvc.install"),
    Hook("kvc", "/etc/kernel/postinst.d/kvc"),
)


class HookState(enum.Enum):
    CURRENT = "current"  # kvc's, this version, with its mode
    MISSING = "missing"
    OLDER = "older"  # an earlier kvc's (it has the marker): replaced
    FOREIGN = "foreign"  # someone else's file: never replaced


def hook_state(layout: Layout, hook: Hook) -> HookState:
    path = hook.path(layout)
    if not os.path.lexists(path):
        return HookState.MISSING
    try:
        if os.path.islink(path):
            return HookState.FOREIGN
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
            mode = os.fstat(handle.fileno()).st_mode & 0o7777
    except (OSError, UnicodeDecodeError):
        return HookState.FOREIGN
    if text == hook.text and mode == HOOK_MODE:
        return HookState.CURRENT
    lines = text.splitlines()
    return HookState.OLDER if len(lines) > 1 and lines[1].startswith(HOOK_MARKER) else HookState.FOREIGN


@dataclass(frozen=True)
class HookPlan:
    """What ``kvc install`` does with one hook."""

    hook: Hook
    path: str
    state: HookState

    def describe(self) -> str:
        if self.state is HookState.CURRENT:
            return f"{self.path}: up to date"
        verb = "replace kvc's earlier" if self.state is HookState.OLDER else "write the"
        return f"{verb} kernel hook {self.path}"


def plan_hooks(layout: Layout) -> tuple[HookPlan, ...]:
    """Each hook's plan; StateError when a file that is not kvc's is in the way."""
    plans = tuple(HookPlan(hook, hook.path(layout), hook_state(layout, hook)) for hook in HOOKS)
    for plan in plans:
        if plan.state is HookState.FOREIGN:
            raise StateError(
                f"{plan.path} exists and was not written by kvc; not replacing it with kvc's kernel hook",
                hint="kvc never overwrites files it did not write: move it away, then install again",
            )
    return plans
