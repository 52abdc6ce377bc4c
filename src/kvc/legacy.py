"""``kmods-via-containers ACTION NAME KVER [ARG...]``: the original framework's command line.

An instance with a bash library -- ``NAME-lib.sh`` in ``/usr/local/lib/kvc``, ``/usr/lib/kvc`` or
``/etc/kvc/lib/kvc`` -- runs exactly as under the original framework: kvc's bash driver
(``data/kvc-legacy.sh``) gives the library the original's variables, helpers and stubs, sources
``/etc/kvc/kmods-via-containers.conf`` and every library found in that order, and dispatches the
action with the original's messages and exit statuses. The driver shares our stdin, stdout and
stderr, so wrappers stay interactive.

An instance with a conf (``/etc/kvc/NAME.conf``) but no library is kvc's own: after the same
``KVC:`` line and unknown-action answer, :func:`native_action` serves it, with the wrapper's
arguments as given (no word splitting: that quirk belongs to bash libraries). Everything else
(too few arguments, no library and no conf) also goes to the driver, which fails the way the
original did.

``KVC_ROOT`` moves the paths the framework itself reads (the framework conf, the library
directories). Paths a library hard-codes -- the original libraries ``source
"/etc/kvc/${KVC_SOFTWARE_NAME}.conf"`` -- are left alone, since libraries run unchanged: to run one
against a test tree, bind the tree over the real directories in a private mount namespace
(``unshare -m``), as the tests do.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from importlib import resources
from typing import Iterator, Optional, Sequence

from kvc import proc
from kvc.config import check_name
from kvc.errors import BuildSkipped, ConfigError
from kvc.layout import Layout

PROG = "kmods-via-containers"
ACTIONS = ("build", "load", "unload", "reload", "wrapper")
DRIVER = "kvc-legacy.sh"
FRAMEWORK_CONF = "kmods-via-containers.conf"
# The original's answer to an unknown action (after "Unknown command. Exiting."), on stdout.
USAGE = """Usage:

build       Build kernel module(s) via container
load        Load kernel module(s)
unload      Unload kernel module(s)
reload      Build and reload kernel module(s)
wrapper     Run userspace tools from within the container
"""


def library_candidates(layout: Layout, name: str) -> list[str]:
    """Where ``NAME-lib.sh`` may be, in sourcing order: later libraries override earlier ones."""
    return [os.path.join(directory, f"{name}-lib.sh") for directory in layout.library_dirs]


def find_libraries(layout: Layout, name: str) -> list[str]:
    """The instance libraries the driver will source, in order."""
    return [path for path in library_candidates(layout, name) if os.path.isfile(path)]


def driver_env(layout: Layout) -> dict[str, str]:
    """The driver's search paths, from the layout (so under ``KVC_ROOT`` when it is set)."""
    return {
        "KVC_LEGACY_CONF": os.path.join(layout.conf_dir, FRAMEWORK_CONF),
        "KVC_LEGACY_LIBRARY_DIRS": "\n".join(layout.library_dirs),
    }


@contextmanager
def _child_owns_terminal_signals() -> Iterator[None]:
    """While the driver runs, Ctrl-C and Ctrl-\\ are its business (they reach it directly, from the
    terminal's process group); we wait for it and return its status instead of dying first and
    leaving it orphaned. A Python-level handler, unlike SIG_IGN, is not inherited across exec."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signum: signal.signal(signum, lambda _signum, _frame: None) for signum in (signal.SIGINT, signal.SIGQUIT)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_driver(argv: Sequence[str], layout: Optional[Layout] = None) -> int:
    """Run ``bash kvc-legacy.sh ARGV...`` sharing our stdio; its exit status (``128 + N`` when
    killed by signal N, as a shell reports it)."""
    layout = layout or Layout.from_env()
    driver = resources.files("kvc").joinpath("data").joinpath(DRIVER)
    sys.stdout.flush()
    sys.stderr.flush()
    with resources.as_file(driver) as script, _child_owns_terminal_signals():
        completed = proc.run(["bash", str(script), *argv], check=False, capture=False, env=driver_env(layout))
    return completed.returncode if completed.returncode >= 0 else 128 - completed.returncode


def native_action(action: str, name: str, kver: str, args: Sequence[str]) -> int:
    """Serve ACTION for an instance that has a conf but no library (kvc's own instances)."""
    import argparse

    import kvc.commands as commands

    namespace = argparse.Namespace(
        command=action,
        name=name,
        kernel=[kver] if action == "build" else kver,
        force=False,
        dry_run=False,
        push=None,
        modules_dir=None,
        argv=list(args),
    )
    try:
        return commands.dispatch(namespace)
    except BuildSkipped as exc:
        if action != "build":
            raise
        # As DKMS's autoinstall: a kernel its dkms.conf excludes is not a failure of the unit.
        sys.stdout.write(f"KVC: {name}: {exc.brief}; nothing to build or load\n")
        return 0


def is_native(layout: Layout, name: str) -> bool:
    """A valid instance name with a conf and no library: kvc's own instance."""
    try:
        check_name(name)
    except ConfigError:
        return False
    return os.path.isfile(layout.instance_conf(name)) and not find_libraries(layout, name)


def main(argv: Sequence[str]) -> int:
    """``kmods-via-containers ACTION NAME KVER [ARG...]`` (``argv`` without the program name)."""
    layout = Layout.from_env()
    if len(argv) < 3 or not is_native(layout, argv[1]):
        return run_driver(argv, layout)
    action, name, kver, args = argv[0], argv[1], argv[2], list(argv[3:])
    sys.stdout.write(f"KVC: {action} {name} for {kver}\n")
    if action not in ACTIONS:
        sys.stdout.write("Unknown command. Exiting.\n" + USAGE)
        return 1
    sys.stdout.flush()
    return native_action(action, name, kver, args)
