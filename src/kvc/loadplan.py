"""``kvc load --dry-run``: the whole plan of a load, without touching the host.

The modules are read from the current extraction, else from the image (or ``--modules-dir``)
into a scratch directory, as ``kvc check`` reads them; nothing is extracted. The files that ship
with them are planned as the delivery would place them. In-tree dependencies come from the
host's tree for the kernel; where the host has none (a container without ``/lib/modules``, a
test root), from ``--kernel-dir DIR`` or from the kernel ``kvc verify`` cached
(``/var/cache/kvc/kernels/KVER``); the plan says which. A tree delivery's load is planned on a
preview of the tree (links to the host's tree plus the instance's modules, indexed by kvc's
depmod in a scratch directory) when the delivery is not current, as modprobe would load from the
real tree after it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import AbstractSet, Callable, Iterator, Optional

from kvc.config import Delivery, InstanceConfig
from kvc.errors import StateError
from kvc.extract import DIRECTORY_HINT, directory_files, is_current, read_manifest
from kvc.images import image_tag
from kvc.kmod.config import load_config
from kvc.kmod.kernel.protocol import Kernel
from kvc.kmod.moddir import ModuleDirectory
from kvc.layout import Layout
from kvc.loader import LoadPlan, plan_load
from kvc.runtime import ContainerRuntime
from kvc.tree import Payload, plan_deliver_payload, preview_load_plan, read_image_payload, tree_load_plan

INDEX = "modules.dep.bin"


@dataclass(frozen=True)
class PlanningTree:
    """Where a dry run finds in-tree modules, and how to say so."""

    moddir: Optional[ModuleDirectory]
    description: str


def _indexed_tree(root: str, kernel_release: str) -> Optional[str]:
    for sub in ("lib/modules", "usr/lib/modules", "modules"):
        path = os.path.join(root, sub, kernel_release)
        if os.path.isfile(os.path.join(path, INDEX)):
            return path
    return None


def planning_tree(layout: Layout, kernel_release: str, kernel_dir: str) -> PlanningTree:
    """The host's tree for the kernel; else ``kernel_dir``'s; else the verify cache's; else none."""
    host = layout.host.module_dir(kernel_release)
    if os.path.isdir(host):
        ignored = f" (--kernel-dir {kernel_dir} is not needed)" if kernel_dir else ""
        return PlanningTree(ModuleDirectory(host), f"the host's tree {host}{ignored}")
    if kernel_dir:
        found = _indexed_tree(kernel_dir, kernel_release)
        if found is None:
            raise StateError(
                f"--kernel-dir {kernel_dir} has no indexed lib/modules/{kernel_release} (no {INDEX})",
                hint=f"give a root holding lib/modules/{kernel_release} with depmod's indexes "
                f"(e.g. the kernel package unpacked, then 'kvc kmod depmod -b DIR {kernel_release}')",
            )
        return PlanningTree(ModuleDirectory(found), f"--kernel-dir: {found} (the host has no {host})")
    cached = _indexed_tree(os.path.join(layout.cache_dir, "kernels", kernel_release, "tree"), kernel_release)
    if cached is not None:
        return PlanningTree(ModuleDirectory(cached), f"the verify cache: {cached} (the host has no {host})")
    return PlanningTree(
        None,
        f"none: the host has no {host} (give --kernel-dir DIR, or run 'kvc verify NAME --kernel {kernel_release}' "
        "once, which caches the kernel)",
    )


@contextlib.contextmanager
def planning_payload(
    layout: Layout,
    runtime: Callable[[], ContainerRuntime],
    instance: InstanceConfig,
    kernel_release: str,
    modules_dir: str,
) -> Iterator[tuple[Payload, str]]:
    """The modules (and shipped files) a load would extract, and where they were read from."""
    target = layout.kernel_state(instance.name, kernel_release)
    if modules_dir:
        files = directory_files(modules_dir, kernel_release)
        with tempfile.TemporaryDirectory(prefix="kvc-plan-") as scratch:
            payload = read_image_payload(
                files, instance, kernel_release, modules_dir, scratch, "", missing_hint=DIRECTORY_HINT
            )
            yield payload, f"{modules_dir} (read into a scratch directory; a load extracts them into {target})"
        return
    tag = image_tag(instance, kernel_release)
    info = runtime().inspect(tag)
    if info is None:
        raise StateError(
            f"image {tag} does not exist", hint=f"run 'kvc build {instance.name} --kernel {kernel_release}' first"
        )
    manifest = read_manifest(layout, instance.name, kernel_release)
    if manifest is not None and is_current(manifest, instance, info.id):
        yield Payload.of(manifest), f"the extraction in {manifest.directory} (current for image {tag})"
        return
    with tempfile.TemporaryDirectory(prefix="kvc-plan-") as scratch:
        with runtime().open_image(tag) as image_files:
            payload = read_image_payload(image_files, instance, kernel_release, f"image {tag}", scratch, info.id)
        yield payload, f"image {tag} (read into a scratch directory; a load extracts them into {target})"


def dry_load(
    layout: Layout,
    runtime: Callable[[], ContainerRuntime],
    kernel: Kernel,
    instance: InstanceConfig,
    kernel_release: str,
    say: Callable[[str], None],
    *,
    delivery: Delivery,
    unloaded_first: AbstractSet[str] = frozenset(),
    modules_dir: str = "",
    kernel_dir: str = "",
) -> None:
    """Print everything a load would do: where the modules come from, the delivery of them and
    of their shipped files, and the load itself (where in-tree modules come from, too)."""
    with planning_payload(layout, runtime, instance, kernel_release, modules_dir) as (payload, source):
        say(f"modules: {source}")
        deliver = plan_deliver_payload(instance, kernel_release, layout, payload, delivery=delivery)
        if not deliver.empty:
            say(deliver.describe())
        if delivery is Delivery.TREE:
            say(f"in-tree modules: the host's tree {deliver.moddir}")
            if deliver.up_to_date:
                plan = tree_load_plan(layout, instance, kernel_release, kernel, unloaded_first=unloaded_first)
            else:
                plan = preview_load_plan(layout, deliver, kernel, unloaded_first=unloaded_first)
        else:
            tree = planning_tree(layout, kernel_release, kernel_dir)
            say(f"in-tree modules: {tree.description}")
            plan = _direct_plan(layout, kernel, instance, kernel_release, payload, tree, unloaded_first)
    say(plan.describe())


def _direct_plan(
    layout: Layout,
    kernel: Kernel,
    instance: InstanceConfig,
    kernel_release: str,
    payload: Payload,
    tree: PlanningTree,
    unloaded_first: AbstractSet[str],
) -> LoadPlan:
    config = load_config(None, module_dir=tree.moddir.path, paths=layout.host) if tree.moddir is not None else None
    plan = plan_load(
        instance.name,
        kernel_release,
        [payload.path(file) for _name, file, _sha in payload.modules],
        instance.module_params,
        kernel,
        tree.moddir,
        modprobe_config=config,
        unloaded_first=unloaded_first,
        intree_modules=instance.intree_modules,
    )
    # The load inserts the extracted files, where the scratch copies were read.
    target = layout.kernel_state(instance.name, kernel_release)
    steps = tuple(
        step._replace(path=os.path.join(target, os.path.relpath(step.path, payload.directory)))
        if step.path.startswith(payload.directory.rstrip("/") + "/")
        else step
        for step in plan.steps
    )
    return plan._replace(steps=steps)
