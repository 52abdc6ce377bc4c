"""The verification guest's module tree for an instance delivered into the tree (``KVC_DELIVERY=tree``).

The guest sees ``/lib/modules/KVER`` as an overlay: the kernel's own tree (read-only over 9p)
below, a *layer* above it that holds the instance's modules at ``updates/kvc/NAME/`` and the
indexes of the combined tree, and a tmpfs on top. The indexes are written here, on the host, by
kvc's own depmod (:mod:`kvc.kmod.depmod`), as a host's tree delivery writes them: in the guest
the same depmod would read 4,000 modules over 9p under emulation. It runs on a scratch tree in
the cache whose entries are symbolic links to the kernel's, so depmod's parse cache (in the
cache too, keyed by each file's stat) makes every run after the first take about a second.
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence

from kvc.errors import KernelMissingError
from kvc.kmod import depmod

TREE_SUBDIR = "updates/kvc"


def instance_subdir(name: str) -> str:
    """Where an instance's modules live in a module tree, relative to ``/lib/modules/KVER``."""
    return f"{TREE_SUBDIR}/{name}"


def write_tree_layer(
    release: str, kernel_moddir: str, instance: str, modules: Sequence[str], layer: str, cache_dir: str
) -> list[str]:
    """Write the layer (``layer/updates/kvc/NAME/*.ko`` and ``layer/modules.*``) for the kernel's
    tree ``kernel_moddir`` plus ``modules``; returns the modules' paths relative to the tree."""
    scratch = os.path.join(cache_dir, "verify-tree", instance, release)
    shutil.rmtree(scratch, ignore_errors=True)
    moddir = os.path.join(scratch, "lib", "modules", release)
    os.makedirs(moddir)
    for entry in sorted(os.listdir(kernel_moddir)):
        if entry not in depmod.OUTPUTS:
            os.symlink(os.path.join(kernel_moddir, entry), os.path.join(moddir, entry))
    subdir = instance_subdir(instance)
    relative = []
    for target in (moddir, layer):
        os.makedirs(os.path.join(target, subdir), exist_ok=True)
    for path in modules:
        name = os.path.basename(path)
        for target in (moddir, layer):
            shutil.copyfile(path, os.path.join(target, subdir, name))
        relative.append(f"{subdir}/{name}")
    messages: list[str] = []
    log = depmod.Log(lambda level, text: messages.append(text.strip()))
    options = depmod.DepmodOptions(
        release, basedir=scratch, config_paths=(), cache_dir=os.path.join(cache_dir, "depmod")
    )
    try:
        result = depmod.run(options, log)
        written = depmod.write_outputs(layer, result.files, log)
    except depmod.DepmodError:
        written = False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not written:
        raise KernelMissingError(
            f"kvc's depmod could not index {kernel_moddir} with {instance}'s modules",
            details="\n".join(messages[-5:]),
        )
    return relative
