"""``kmods-via-containers ACTION NAME KVER [ARG...]``: the original framework's command line.

An instance with a bash library (``NAME-lib.sh`` in /usr/local/lib/kvc, /usr/lib/kvc or
/etc/kvc/lib/kvc) runs under bash exactly as the original framework ran it. An instance with only
a conf (``/etc/kvc/NAME.conf``) is served by kvc's own build/load/unload/wrapper.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from typing import Sequence

from kvc import proc
from kvc.layout import Layout

ACTIONS = ("build", "load", "unload", "reload", "wrapper")


def libraries(layout: Layout, name: str) -> list[str]:
    """The instance libraries to source, in the original's order (later ones win)."""
    return [path for path in (os.path.join(directory, f"{name}-lib.sh") for directory in layout.library_dirs)
            if os.path.isfile(path)]


def run_library(layout: Layout, argv: Sequence[str], found: Sequence[str]) -> int:
    driver = resources.files("kvc").joinpath("data", "kvc-legacy.sh")
    with resources.as_file(driver) as script:
        env = {"KVC_LEGACY_GLOBAL_CONF": os.path.join(layout.conf_dir, "kmods-via-containers.conf"),
               "KVC_LEGACY_LIBRARIES": "\n".join(found)}
        return proc.run(["bash", str(script), *argv], check=False, capture=False, env=env).returncode


def run_native(action: str, name: str, kver: str, args: Sequence[str]) -> int:
    import kvc.commands as commands

    namespace = argparse.Namespace(command=action, name=name, kernel=kver, force=False, dry_run=False,
                                   argv=list(args))
    if action == "build":
        namespace.kernel = [kver]
    return commands.dispatch(namespace)


def main(argv: Sequence[str]) -> int:
    layout = Layout.from_env()
    if len(argv) < 3:
        missing = ("ACTION", "NAME", "KVER")[len(argv)]
        sys.stderr.write(f"kmods-via-containers: missing {missing}\n"
                         "Usage: kmods-via-containers <build|load|unload|reload|wrapper> <name> <kver> [args]\n")
        return 1
    action, name, kver = argv[0], argv[1], argv[2]
    found = libraries(layout, name)
    if found:
        return run_library(layout, argv, found)
    sys.stdout.write(f"KVC: {action} {name} for {kver}\n")
    if not os.path.exists(layout.instance_conf(name)):
        sys.stdout.write("KVC requires an instance library to define significant functionality\n"
                         f"No instance library found in one of required locations: "
                         f"{' '.join(layout.library_dirs)}\n")
        return 1
    if action not in ACTIONS:
        sys.stdout.write("Unknown command. Exiting.\n"
                         "Usage: kmods-via-containers <command> <name> <kver> [args]\n"
                         f"  commands: {', '.join(ACTIONS)}\n")
        return 1
    sys.stdout.flush()
    return run_native(action, name, kver, argv[3:])
