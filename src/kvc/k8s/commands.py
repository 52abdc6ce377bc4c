"""``kvc k8s``: write the objects that deploy an instance to a cluster (``module``, ``daemonset``,
``unload-job``), and the node side of kvc's DaemonSet (``agent``, ``ready``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from typing import Any, Optional

from kvc.atomic import write_file
from kvc.commands import Context, _load, _unload, say
from kvc.config import InstanceConfig
from kvc.distribute import repository
from kvc.errors import StateError, UsageError
from kvc.extract import copy_instance_modules, directory_files, read_manifest
from kvc.imagerecord import images_locked
from kvc.images import image_tag
from kvc.k8s.nodeapi import InClusterAPI, NodeAPIError
from kvc.k8s.objects import (
    DEFAULT_NAMESPACE,
    KVC_KERNEL_LABEL,
    FleetOptions,
    Rendered,
    check_label,
    daemonsets,
    kernel_label_value,
    kmm_module,
    ready_label,
    unload_jobs,
)
from kvc.k8s.yamltext import dump_all
from kvc.kmod.digest import file_sha256
from kvc.kmod.module import ModuleFile
from kvc.kmod.names import modname_normalize


def warn(text: str) -> None:
    sys.stderr.write(f"kvc: warning: {text}\n")


def _selector(pairs: Optional[list[str]]) -> dict[str, str]:
    selector = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--selector {pair!r} is not KEY=VALUE", hint="e.g. --selector node-role.example/gpu=")
        check_label(key, value, f"--selector {pair}")
        selector[key] = value
    return selector


def _options(ctx: Context, instance: InstanceConfig, args: argparse.Namespace, *, needs_repo: bool) -> FleetOptions:
    given = getattr(args, "repository", None) or instance.registry
    if needs_repo and not given:
        raise UsageError(
            f"{instance.name}: no repository: give --repository REGISTRY/PATH (where 'kvc push' put the images)",
            hint="or set KVC_REGISTRY in the instance's conf",
        )
    selector = _selector(getattr(args, "selector", None))
    kernel_label = getattr(args, "kernel_label", None) or FleetOptions.kernel_label
    return FleetOptions(
        repository=repository(given, "--repository") if given else None,
        namespace=args.namespace,
        pull_secret=getattr(args, "pull_secret", None) or "",
        kvc_image=getattr(args, "kvc_image", None) or "",
        kernel_label=kernel_label,
        **({"selector": selector} if selector else {}),
    )


def _intree_depends(ctx: Context, instance: InstanceConfig, kernels: list[str]) -> list[str]:
    """The modules outside the instance that its modules depend on, read from the local images of
    the kernels that have one (no image, nothing known)."""
    own = {modname_normalize(name) for name in instance.module_names}
    needed: set[str] = set()
    for kernel in kernels:
        tag = image_tag(instance, kernel)
        if not ctx.runtime.image_exists(tag):
            continue
        with tempfile.TemporaryDirectory(prefix="kvc-k8s-") as scratch, ctx.runtime.open_image(tag) as files:
            copies = copy_instance_modules(files, instance, kernel, f"image {tag}", scratch)
            for _image_path, local in copies.values():
                needed.update(modname_normalize(dep) for dep in ModuleFile.open(local).depends)
    return sorted(needed - own)


def _emit(rendered: Rendered, output: Optional[str]) -> int:
    for text in rendered.warnings:
        warn(text)
    text = dump_all(list(rendered.objects))
    if output:
        write_file(output, text)
        say(f"wrote {len(rendered.objects)} object(s) to {output}")
    else:
        sys.stdout.write(text)
    return 0


def _module(ctx: Context, args: argparse.Namespace) -> int:
    instance = ctx.instance(args.name)
    kernels = [ctx.kernel_release(k) for k in args.kernel or []]
    options = _options(ctx, instance, args, needs_repo=True)
    rendered = kmm_module(
        instance, kernels, options, regexp=args.regexp, intree_depends=_intree_depends(ctx, instance, kernels)
    )
    return _emit(rendered, args.output)


def _daemonset(ctx: Context, args: argparse.Namespace) -> int:
    instance = ctx.instance(args.name)
    kernels = [ctx.kernel_release(k) for k in args.kernel or []]
    return _emit(daemonsets(instance, kernels, _options(ctx, instance, args, needs_repo=True)), args.output)


def _unload_job(ctx: Context, args: argparse.Namespace) -> int:
    instance = ctx.instance(args.name)
    return _emit(unload_jobs(instance, args.node or [], _options(ctx, instance, args, needs_repo=False)), args.output)


# ---- the node side ------------------------------------------------------------------------------------------


def _replaced_modules(ctx: Context, instance: InstanceConfig, kernel: str, modules_dir: str) -> list[str]:
    """The instance's modules that are loaded but are not the files in ``modules_dir``: another
    build (srcversion or version) than the new copy, or another file than the extraction they were
    loaded from. Each entry says what changed."""
    files = directory_files(modules_dir, kernel)
    previous = read_manifest(ctx.layout, instance.name, kernel)
    changed = []
    with tempfile.TemporaryDirectory(prefix="kvc-k8s-") as scratch:
        copies = copy_instance_modules(files, instance, kernel, modules_dir, scratch)
        for name, (_image_path, local) in copies.items():
            state = ctx.kernel.module_state(name)
            if state is None or state.initstate is None:
                continue
            new = ModuleFile.open(local)
            version, srcversion = new.info_value("version"), new.info_value("srcversion")
            old_file = {m.name: m.sha256 for m in previous.modules} if previous is not None else {}
            if state.srcversion != srcversion or state.version != version:
                changed.append(
                    f"{name} (loaded: version {state.version or '-'}, srcversion {state.srcversion or '-'}; "
                    f"new: version {version or '-'}, srcversion {srcversion or '-'})"
                )
            elif name in old_file and old_file[name] != file_sha256(local).hex():
                changed.append(f"{name} (a rebuilt file of the same source)")
    return changed


def _set_ready(namespace: str, name: str, ready: bool) -> None:
    api = InClusterAPI.from_environment(os.environ)
    node = os.environ.get("NODE_NAME", "")
    label = ready_label(namespace, name)
    if api is None or not node:
        say(f"not in a cluster (no service account or NODE_NAME): node label {label} not set")
        return
    try:
        api.label_node(node, {label: "true" if ready else None})
    except NodeAPIError as exc:
        warn(f"{exc.brief}{': ' + exc.details.strip() if exc.details else ''}")
        return
    say(f"node {node}: {label}={'true' if ready else '(removed)'}")


def _check_copy_kernel(modules_dir: str, kernel: str) -> None:
    """A copy for another kernel means the node booted a kernel its label does not say yet."""
    try:
        kernels = sorted(os.listdir(os.path.join(modules_dir, "lib", "modules")))
    except OSError:
        kernels = []
    if kernels and kernel not in kernels:
        raise StateError(
            f"this pod's module image is for kernel {', '.join(kernels)}, but the node runs {kernel}",
            hint=f"the node's kernel label is stale or wrong; once it says {kernel}, the DaemonSet for {kernel} "
            f"runs here (no such DaemonSet: 'kvc build NAME --kernel {kernel} --push', then 'kvc k8s daemonset' "
            "with that kernel too)",
        )


def _agent(ctx: Context, args: argparse.Namespace) -> int:
    """Load the instance from the init container's copy, replacing an older build that is loaded;
    label the node; then wait, and leave the modules loaded when the pod stops."""
    instance = ctx.instance(args.name)
    kernel = ctx.running_kernel(instance, None, "load")
    modules_dir = os.path.abspath(args.modules_dir)
    namespace = os.environ.get("KVC_K8S_NAMESPACE", DEFAULT_NAMESPACE)
    _check_copy_kernel(modules_dir, kernel)
    stop = _stop_signal()
    with images_locked(ctx.layout, instance.name):
        replaced = _replaced_modules(ctx, instance, kernel, modules_dir)
        if replaced:
            say(f"{instance.name} {instance.software_version}: replacing what is loaded: {'; '.join(replaced)}")
            say(f"unloading the old version of {instance.name} first")
            _unload(ctx, instance, kernel, dry_run=False, force=False)
        _load(ctx, instance, kernel, dry_run=False, force=False, modules_dir=modules_dir)
    _set_ready(namespace, instance.name, True)
    say(f"{instance.name} {instance.software_version} is loaded on {kernel}; waiting (stopping leaves it loaded)")
    _wait(stop)
    say(f"stopping: {instance.name} stays loaded ('kvc k8s unload-job {instance.name}' removes it)")
    return 0


def _stop_signal() -> threading.Event:
    """Set by SIGTERM or SIGINT (how the kubelet stops a container); installed before any work, so
    that a stop during it is not lost."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    return stop


def _wait(stop: threading.Event) -> None:
    while not stop.wait(3600):
        pass


def _label_node(ctx: Context, args: argparse.Namespace) -> int:
    """Label this node with the kernel it runs (kvc's stand-in for NFD's label), then wait."""
    stop = _stop_signal()
    release = ctx.kernel.release()
    value = kernel_label_value(KVC_KERNEL_LABEL, release)
    api = InClusterAPI.from_environment(os.environ)
    node = os.environ.get("NODE_NAME", "")
    if api is None or not node:
        raise StateError(
            "not in a cluster: no service account or no NODE_NAME",
            hint="run it in the kvc-kernel-label DaemonSet from 'kvc k8s daemonset --kernel-label kvc/kernel-release'",
        )
    api.label_node(node, {KVC_KERNEL_LABEL: value})
    say(f"node {node}: {KVC_KERNEL_LABEL}={value} (kernel {release})")
    _wait(stop)
    return 0


def _ready(ctx: Context, args: argparse.Namespace) -> int:
    """Exit 0 when every module of the instance is loaded, and is the extracted build."""
    instance = ctx.instance(args.name)
    kernel = ctx.kernel.release()
    manifest = read_manifest(ctx.layout, instance.name, kernel)
    if manifest is None:
        raise StateError(f"{instance.name}: nothing extracted for {kernel}", hint="the agent has not loaded it yet")
    problems = []
    for module in manifest.modules:
        state = ctx.kernel.module_state(module.name)
        if state is None or state.initstate != "live":
            problems.append(f"{module.name} is not loaded")
            continue
        srcversion = ModuleFile.open(manifest.path_of(module.name)).info_value("srcversion")
        if srcversion and state.srcversion != srcversion:
            problems.append(f"{module.name} is another build (srcversion {state.srcversion}, extracted {srcversion})")
    if problems:
        raise StateError(f"{instance.name} is not ready: {'; '.join(problems)}", hint="see the agent's log")
    say(f"{instance.name}: ready ({', '.join(m.name for m in manifest.modules)} loaded)")
    return 0


ACTIONS: dict[str, Any] = {
    "module": _module,
    "daemonset": _daemonset,
    "unload-job": _unload_job,
    "agent": _agent,
    "ready": _ready,
    "label-node": _label_node,
}


def cmd_k8s(ctx: Context, args: argparse.Namespace) -> int:
    return int(ACTIONS[args.k8s_command](ctx, args))
