"""The framework's commands: each plans first, prints the plan with --dry-run, else executes."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, AbstractSet, Any, Callable, Mapping, Optional, Protocol, Sequence, TypeVar

from kvc import systemd
from kvc.arch import Arch, default_arch, target_arch
from kvc.config import Delivery, GlobalConfig, InstanceConfig, check_kernel_release, check_name
from kvc.errors import BuildSkipped, KvcError, StateError, UsageError
from kvc.extract import (
    DIRECTORY_HINT,
    Manifest,
    copy_instance_modules,
    directory_files,
    extract_from_directory,
    extract_image,
    read_manifest,
    recorded_extraction,
)
from kvc.imagerecord import images_locked, recorded_images, remember_image, remember_images
from kvc.images import LABEL_KERNEL, LABEL_NAME, image_arch, image_tag
from kvc.keys import ENROLL_STEPS, HostTrust, generate, host_trust, module_verdicts
from kvc.kmod.config import load_config
from kvc.kmod.kernel.environment import kernel_from_env
from kvc.kmod.kernel.protocol import Kernel
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.module import ModuleFile
from kvc.layout import Layout
from kvc.loader import (
    LOADED_RECORD,
    LoadPlan,
    check_architecture,
    execute_load,
    execute_unload,
    plan_load,
    plan_unload,
)
from kvc.lock import images_in_use, instance_lock
from kvc.runtime import ContainerRuntime, ImageFiles, ImageInfo, runtime_for
from kvc.skiprecord import record_skip, recorded_skip
from kvc.tree import (
    delivery_status,
    execute_deliver,
    execute_remove,
    plan_deliver,
    plan_deliver_extracted,
    plan_remove,
    plan_remove_all,
    read_records,
    tree_load_plan,
)
from kvc.verifyrecord import VerifyStatus, published_verification, verification_of

if TYPE_CHECKING:
    # Imported where used: 'kvc load' and 'kvc status' (the boot path) never import the registry
    # client, the archive or the kernel-update code, and 'kvc load' not the build.
    from kvc.build import BuildPlan
    from kvc.nextboot import NextKernel
    from kvc.registry import Reference, RegistryClient, RegistryOptions

STATUS_SCHEMA = 1


@dataclass
class Context:
    layout: Layout
    refresh_images: bool = False  # ask the runtime even where kvc's record of the images is complete
    _images: dict[str, Mapping[str, Optional[ImageInfo]]] = field(default_factory=dict)

    @cached_property
    def global_config(self) -> GlobalConfig:
        return GlobalConfig.load(self.layout.conf_dir)

    @cached_property
    def runtime(self) -> ContainerRuntime:
        return runtime_for(self.global_config)

    @cached_property
    def kernel(self) -> Kernel:
        return kernel_from_env(self.layout.host)

    @cached_property
    def registry_options(self) -> RegistryOptions:
        from kvc.distribute import registry_options

        return registry_options(self.global_config)

    @cached_property
    def registry(self) -> RegistryClient:
        from kvc.registry import RegistryClient

        return RegistryClient(self.registry_options)

    def image_plan(
        self, instance: InstanceConfig, kernel: str, *, force: bool = False, arch: Optional[Arch] = None
    ) -> BuildPlan:
        """How the instance's image for the kernel is made: from its registry (KVC_REGISTRY) when it
        has one, else built (or pulled from KVC_IMAGE); ``arch``: the target's architecture (None:
        what the release names, else the host's)."""
        from kvc.build import plan_build

        if instance.registry:
            from kvc.distribute import plan_obtain

            return plan_obtain(instance, kernel, self.runtime, self.registry, self.registry_options, force=force)
        return plan_build(instance, kernel, self.runtime, force=force, arch=arch)

    def instance(self, name: str) -> InstanceConfig:
        return InstanceConfig.load(self.layout.conf_dir, name)

    def images(self, instance: InstanceConfig) -> Mapping[str, Optional[ImageInfo]]:
        """What the instance's tags name, by kernel: every kernel it has images for and the running
        one (None: no image under the tag). From kvc's record when it is complete, else from the
        runtime, then recorded (:mod:`kvc.imagerecord`)."""
        if instance.name not in self._images:
            recorded = None if self.refresh_images else recorded_images(self.layout, instance.name)
            if recorded is not None and self.kernel.release() not in recorded:
                recorded = None  # recorded under another running kernel: ask about this one too
            self._images[instance.name] = recorded or remember_images(
                self.layout, instance.name, functools.partial(self._ask_images, instance)
            )
        return self._images[instance.name]

    def known_images(self, instance: InstanceConfig) -> Optional[Mapping[str, Optional[ImageInfo]]]:
        """What :meth:`images` would say without asking the runtime, if it can (else None)."""
        if instance.name in self._images:
            return self._images[instance.name]
        return None if self.refresh_images else recorded_images(self.layout, instance.name)

    def _ask_images(self, instance: InstanceConfig) -> dict[str, Optional[ImageInfo]]:
        listed = self.runtime.list_images(f"{LABEL_NAME}={instance.name}")
        kernels = {self.kernel.release(), *(info.labels.get(LABEL_KERNEL, "") for info in listed)} - {""}
        return {kernel: self.runtime.inspect(image_tag(instance, kernel)) for kernel in sorted(kernels)}

    def kernel_release(self, requested: Optional[str]) -> str:
        return check_kernel_release(requested) if requested else self.kernel.release()

    def running_kernel(self, instance: InstanceConfig, requested: Optional[str], action: str) -> str:
        """The running kernel's release; ``--kernel`` may only name it (modules of another kernel
        must not go into this one)."""
        running = self.kernel.release()
        if requested and check_kernel_release(requested) != running:
            raise StateError(
                f"cannot {action} {instance.name} for kernel {requested}: the running kernel is {running}",
                hint=f"'kvc verify {instance.name} --kernel {requested}' tries the modules on {requested} in a VM; "
                f"'kvc build {instance.name} --kernel {requested}' prepares its image for the next boot",
            )
        return running

    def moddir(self, kernel_release: str) -> Optional[ModuleDirectory]:
        path = self.layout.host.module_dir(kernel_release)
        return ModuleDirectory(path) if os.path.isdir(path) else None

    def instance_names(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.layout.conf_dir))
        except FileNotFoundError:
            return []
        return [entry[:-5] for entry in entries if entry.endswith(".conf") and entry != "kmods-via-containers.conf"]


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _registry_repository(instance: InstanceConfig, given: Optional[str], action: str) -> Reference:
    """The repository ``kvc push``/``pull`` (``action``) uses: the one given, else KVC_REGISTRY."""
    from kvc.distribute import repository

    text = given or instance.registry
    if not text:
        direction = "to" if action == "push" else "from"
        raise UsageError(
            f"no repository to {action} {instance.name} {direction}",
            hint=f"name one (kvc {action} {instance.name} REGISTRY/PATH) or set KVC_REGISTRY in {instance.source}",
        )
    return repository(text, "the repository" if given else f"{instance.source}: KVC_REGISTRY")


def cmd_build(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.build import ACTION_BUILD, execute_build

    instance = ctx.instance(args.name)
    kernels = [ctx.kernel_release(k) for k in (args.kernel or [None])]
    push_to = _registry_repository(instance, args.push or None, "push") if args.push is not None else None
    arch = getattr(args, "arch", None)
    plans = [ctx.image_plan(instance, kernel, force=args.force, arch=target_arch(kernel, arch)) for kernel in kernels]
    if args.dry_run:
        for plan in plans:
            say(plan.describe())
            if instance.signing is not None:
                say("  then sign its modules on this host (kvc sign), unless this signer signed the image already")
            if push_to is not None:
                say(f"  then push it to {push_to} (unless the registry has this build)")
            if instance.dkms and plan.action == ACTION_BUILD:
                say(f"  (DKMS source {instance.dkms}: its dkms.conf may skip this kernel, exit 77)")
        return 0
    skipped: list[BuildSkipped] = []
    with images_locked(ctx.layout, instance.name):
        for plan in plans:
            try:
                say(execute_build(plan, ctx.runtime))
            except BuildSkipped as exc:
                record_skip(ctx.layout, instance, plan.kernel_release, exc.reason)
                skipped.append(exc)
                if len(plans) > 1:
                    say(f"{plan.tag}: {exc.brief}")
                continue
            if instance.signing is not None:
                from kvc.signing import execute_sign, plan_sign

                say(execute_sign(plan_sign(instance, plan.kernel_release, ctx.runtime), ctx.runtime))
            if push_to is not None:
                _push(ctx, instance, plan.kernel_release, push_to, plan.arch)
    if len(skipped) == len(plans) == 1:
        raise skipped[0]
    if skipped and len(skipped) == len(plans):
        raise BuildSkipped(
            ", ".join(exc.kernel_release for exc in skipped),
            f"every kernel is outside {instance.name}'s BUILD_EXCLUSIVE_* directives",
            hint="build for a kernel its dkms.conf allows",
        )
    return 0


class _Plan(Protocol):
    def describe(self) -> str: ...


_P = TypeVar("_P", bound=_Plan)


def _run_plans(
    ctx: Context,
    name: str,
    plans: Sequence[_P],
    dry_run: bool,
    execute: Callable[[_P], object],
    *,
    images_change: bool = False,
) -> int:
    """Print every plan; unless a dry run, execute them in turn under the instance's locks (and
    with kvc's record of its images dropped when ``images_change``)."""
    for plan in plans:
        say(plan.describe())
    if dry_run:
        return 0
    held = images_locked(ctx.layout, name) if images_change else instance_lock(ctx.layout.lock_dir, name)
    with held:
        for plan in plans:
            execute(plan)
    return 0


def cmd_sign(ctx: Context, args: argparse.Namespace) -> int:
    """Sign the instance's built images on this host, into new images (the key never enters one)."""
    from kvc.signing import execute_sign, plan_sign

    instance = ctx.instance(args.name)
    kernels = [ctx.kernel_release(k) for k in (args.kernel or [None])]
    plans = [plan_sign(instance, kernel, ctx.runtime) for kernel in kernels]
    return _run_plans(
        ctx,
        instance.name,
        plans,
        args.dry_run,
        lambda plan: None if plan.up_to_date else say(execute_sign(plan, ctx.runtime)),
        images_change=True,
    )


def _push(ctx: Context, instance: InstanceConfig, kernel: str, repo: Reference, arch: Optional[Arch] = None) -> None:
    from kvc.distribute import execute_push, plan_push

    plan = plan_push(instance, kernel, repo, ctx.runtime, ctx.registry, ctx.layout, arch)
    say(execute_push(plan, ctx.runtime, ctx.layout, ctx.registry_options))


def cmd_push(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.distribute import plan_push

    instance = ctx.instance(args.name)
    repo = _registry_repository(instance, args.repository, "push")
    kernels = [ctx.kernel_release(k) for k in (args.kernel or [None])]
    if args.dry_run:
        for kernel in kernels:
            arch = target_arch(kernel, args.arch)
            say(plan_push(instance, kernel, repo, ctx.runtime, ctx.registry, ctx.layout, arch).describe())
        return 0
    with images_locked(ctx.layout, instance.name):
        for kernel in kernels:
            _push(ctx, instance, kernel, repo, target_arch(kernel, args.arch))
    return 0


def cmd_pull(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.build import execute_build
    from kvc.distribute import plan_pull

    instance = ctx.instance(args.name)
    repo = _registry_repository(instance, args.repository, "pull")
    kernels = [ctx.kernel_release(k) for k in (args.kernel or [None])]
    plans = [
        plan_pull(instance, kernel, repo, ctx.runtime, ctx.registry, ctx.registry_options, force=args.force)
        for kernel in kernels
    ]
    if args.dry_run:
        for plan in plans:
            say(plan.describe())
        return 0
    with images_locked(ctx.layout, instance.name):
        for plan in plans:
            say(execute_build(plan, ctx.runtime))
    return 0


def cmd_inspect(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.distribute import describe_remote, format_remote
    from kvc.registry import Reference

    ref = Reference.parse(args.reference)
    if not ref.tag and not ref.digest:
        raise UsageError(
            f"{args.reference} names a repository, not an image",
            hint="add the tag: VERSION-KERNEL, or KERNEL (e.g. :$(uname -r), '+' written '__')",
        )
    image = ctx.registry.inspect(ref)
    if image is None:
        raise StateError(f"{ref}: the registry has no such image", hint="check the tag ('kvc push' makes them)")
    report = describe_remote(image)
    say(json.dumps(report, indent=2) if args.json else format_remote(report))
    return 0


def cmd_export(ctx: Context, args: argparse.Namespace) -> int:
    instance = ctx.instance(args.name)
    kernels = [ctx.kernel_release(k) for k in args.kernel]
    output = os.path.abspath(args.output)
    if os.path.isdir(output) or not os.path.isdir(os.path.dirname(output)):
        raise UsageError(f"-o {args.output}: not a file in an existing directory", hint="name the archive to write")
    if args.dry_run:
        for kernel in kernels:
            say(f"export {image_tag(instance, kernel)} (verified again, labelled) into {output}")
        return 0
    from kvc.archive import export_images

    with instance_lock(ctx.layout.lock_dir, instance.name):
        images = export_images(ctx.runtime, ctx.layout, [(instance, k) for k in kernels], output, say)
    for image in images:
        say(image.summary)
    say(f"wrote {output}")
    return 0


def cmd_import(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.archive import import_archive

    import_archive(ctx.runtime, ctx.layout, os.path.abspath(args.archive), ctx.instance, say)
    return 0


def _plan_load(
    ctx: Context, instance: InstanceConfig, kernel: str, manifest: Manifest, unloaded_first: AbstractSet[str]
) -> LoadPlan:
    manifest.verify()
    return _plan_paths(ctx, instance, kernel, [manifest.path_of(m.name) for m in manifest.modules], unloaded_first)


def _plan_paths(
    ctx: Context, instance: InstanceConfig, kernel: str, paths: list[str], unloaded_first: AbstractSet[str]
) -> LoadPlan:
    moddir = ctx.moddir(kernel)
    config = load_config(None, module_dir=moddir.path, paths=ctx.layout.host) if moddir is not None else None
    return plan_load(
        instance.name,
        kernel,
        paths,
        instance.module_params,
        ctx.kernel,
        moddir,
        reload_loaded=False,
        modprobe_config=config,
        unloaded_first=unloaded_first,
        intree_modules=instance.intree_modules,
        trust=host_trust(ctx.layout.host) if kernel == ctx.layout.host.kernel_release() else None,
    )


def _dry_load(
    ctx: Context,
    instance: InstanceConfig,
    kernel: str,
    *,
    new_image: bool,
    unloaded_first: AbstractSet[str],
    delivery: Optional[Delivery] = None,
    modules_dir: str = "",
    kernel_dir: str = "",
) -> None:
    """Print what a load would do: the whole plan from the modules as they are now (an image a
    build is about to replace can only be named)."""
    if new_image:
        say(
            f"extract {instance.name} modules from {image_tag(instance, kernel)} (the image the build makes) into "
            f"{ctx.layout.kernel_state(instance.name, kernel)}, then load them in dependency order"
        )
        return
    from kvc.loadplan import dry_load

    dry_load(
        ctx.layout,
        lambda: ctx.runtime,
        ctx.kernel,
        instance,
        kernel,
        say,
        delivery=delivery or instance.delivery,
        unloaded_first=unloaded_first,
        modules_dir=modules_dir,
        kernel_dir=kernel_dir,
    )


def _load(
    ctx: Context,
    instance: InstanceConfig,
    kernel: str,
    *,
    dry_run: bool,
    force: bool,
    modules_dir: str = "",
    delivery: Optional[Delivery] = None,
    kernel_dir: str = "",
) -> int:
    mode = delivery or instance.delivery
    if dry_run:
        _dry_load(
            ctx,
            instance,
            kernel,
            new_image=False,
            unloaded_first=frozenset(),
            delivery=mode,
            modules_dir=modules_dir,
            kernel_dir=kernel_dir,
        )
        return 0
    tag = image_tag(instance, kernel)
    inspected: Optional[ImageInfo] = None
    skipped = "" if modules_dir else recorded_skip(ctx.layout, instance, kernel)
    if skipped and not ctx.runtime.image_exists(tag):
        say(f"{instance.name}: nothing to load on {kernel}: its build skipped this kernel ({skipped})")
        return 0
    recorded = None if force or modules_dir else recorded_extraction(ctx.layout, instance, kernel, tag)
    if modules_dir:
        manifest = extract_from_directory(ctx.layout, instance, kernel, modules_dir, force=force)
    elif recorded is not None:
        manifest = recorded
    else:
        manifest, inspected = extract_image(ctx.layout, instance, kernel, ctx.runtime, tag, force=force)
    # Before the delivery too: another architecture's modules go neither into the tree nor the kernel.
    modules = {module.name: ModuleFile.open(manifest.path_of(module.name)) for module in manifest.modules}
    check_architecture(instance.name, kernel, modules, ctx.kernel)
    delivered = plan_deliver_extracted(instance, kernel, ctx.layout, manifest, delivery=mode)
    if not delivered.empty:
        say(delivered.describe())
        execute_deliver(delivered, ctx.layout, ctx.runtime, say)
    if mode is Delivery.TREE:
        plan = tree_load_plan(ctx.layout, instance, kernel, ctx.kernel)
    else:
        plan = _plan_load(ctx, instance, kernel, manifest, frozenset())
    say(plan.describe())
    loaded = execute_load(plan, ctx.kernel, os.path.join(manifest.directory, LOADED_RECORD))
    say(f"loaded {', '.join(loaded) or 'nothing new'}")
    if inspected is not None:
        # Only after a load that worked: a failed one leaves kvc's state as it was. A record that
        # cannot be written costs the next load a question to the runtime.
        with contextlib.suppress(OSError):
            remember_image(ctx.layout, instance.name, kernel, inspected)
    return 0


def _loaded_record(ctx: Context, instance: InstanceConfig, kernel: str) -> str:
    return os.path.join(ctx.layout.kernel_state(instance.name, kernel), LOADED_RECORD)


def _unload(ctx: Context, instance: InstanceConfig, kernel: str, *, dry_run: bool, force: bool) -> int:
    record = _loaded_record(ctx, instance, kernel)
    plan = plan_unload(instance.name, kernel, instance.module_names, ctx.kernel, force=force, record_path=record)
    say(plan.describe())
    if dry_run:
        return 0
    execute_unload(plan, ctx.kernel, force=force, record_path=record)
    return 0


def _locked_action(ctx: Context, args: argparse.Namespace, action: Callable[..., int]) -> int:
    """Load or unload: a dry run plans without the lock; a real run holds it."""
    instance = ctx.instance(args.name)
    kernel = ctx.running_kernel(instance, args.kernel, args.command)
    if args.dry_run:
        return action(ctx, instance, kernel, dry_run=True, force=args.force)
    # Neither changes an image: a verification of the same instance (sharing the image lock) may run.
    with instance_lock(ctx.layout.lock_dir, instance.name, images=False):
        return action(ctx, instance, kernel, dry_run=False, force=args.force)


def cmd_load(ctx: Context, args: argparse.Namespace) -> int:
    modules_dir = getattr(args, "modules_dir", None) or ""
    if modules_dir and not os.path.isdir(modules_dir):
        raise UsageError(
            f"--modules-dir {modules_dir} is not a directory",
            hint="give the root of a file system holding lib/modules/KVER/ (an image's root)",
        )
    kernel_dir = getattr(args, "kernel_dir", None) or ""
    if kernel_dir and not args.dry_run:
        raise UsageError(
            "--kernel-dir goes with --dry-run (a load takes in-tree modules from the host's tree)",
            hint="add --dry-run to plan with DIR's module tree",
        )
    delivery = getattr(args, "delivery", None)
    return _locked_action(
        ctx,
        args,
        functools.partial(
            _load,
            modules_dir=os.path.abspath(modules_dir) if modules_dir else "",
            delivery=Delivery(delivery) if delivery else None,
            kernel_dir=os.path.abspath(kernel_dir) if kernel_dir else "",
        ),
    )


def cmd_deliver(ctx: Context, args: argparse.Namespace) -> int:
    """Deliver the instance into the module tree of each kernel (or remove the delivery)."""
    kernels = [ctx.kernel_release(k) for k in (args.kernel or [None])]
    if args.remove:
        name = check_name(args.name)
        removals = [plan_remove(ctx.layout, name, kernel) for kernel in kernels]
        return _run_plans(ctx, name, removals, args.dry_run, lambda removal: execute_remove(removal, ctx.layout, say))
    instance = ctx.instance(args.name)
    plans = [plan_deliver(instance, kernel, ctx.layout, ctx.runtime) for kernel in kernels]
    return _run_plans(
        ctx, instance.name, plans, args.dry_run, lambda plan: execute_deliver(plan, ctx.layout, ctx.runtime, say)
    )


def _next_kernel(ctx: Context, requested: Optional[str]) -> NextKernel:
    """The kernel named (``--kernel``, or by the hook that runs kvc), else the one the host boots next."""
    from kvc.nextboot import find_next_kernel, named_kernel

    return named_kernel(requested) if requested else find_next_kernel(ctx.layout)


def _check_next_boot(ctx: Context, args: argparse.Namespace) -> int:
    """The reboot gate: every enabled instance ready for the next kernel, else exit 6."""
    from kvc.kernelupdate import gate

    if args.name or args.modules_dir:
        raise UsageError(
            "--next-boot checks every enabled instance: it takes no NAME and no --modules-dir",
            hint="run 'kvc check --next-boot' (or 'kvc check NAME' for one instance on the running kernel)",
        )
    report = gate(ctx, _next_kernel(ctx, args.kernel))
    say(json.dumps(report.to_json(), indent=2) if args.json else "\n".join(report.lines()))
    refusal = report.error()
    if refusal is not None:
        raise refusal
    return 0


def cmd_kernel_added(ctx: Context, args: argparse.Namespace) -> int:
    """Prepare every enabled instance for a new kernel (the hooks' command), then the gate's verdict."""
    from kvc.kernelupdate import execute_kernel_added, gate, kernel_added_error, plan_kernel_added

    plan = plan_kernel_added(ctx, _next_kernel(ctx, args.kernel_release))
    say(plan.describe())
    if args.dry_run:
        return 0
    failures = execute_kernel_added(ctx, plan, say)
    report = gate(ctx, plan.kernel)
    say("\n".join(report.lines()))
    error = kernel_added_error(plan.kernel.release, failures, report)
    if error is not None:
        raise error
    return 0


def cmd_check(ctx: Context, args: argparse.Namespace) -> int:
    """Whether the instance's modules would load on the running kernel now: the preflight of
    ``kvc load`` on copies of the modules; changes nothing (no extraction, no load). With
    ``--next-boot``, the reboot gate."""
    if args.next_boot:
        return _check_next_boot(ctx, args)
    if not args.name:
        raise UsageError("check needs NAME or --next-boot", hint="see 'kvc check --help'")
    if args.json:
        raise UsageError("--json goes with --next-boot", hint="run 'kvc check --next-boot --json'")
    instance = ctx.instance(args.name)
    kernel = ctx.running_kernel(instance, args.kernel, "check")
    modules_dir = args.modules_dir or ""
    source = os.path.abspath(modules_dir) if modules_dir else image_tag(instance, kernel)
    if modules_dir and not os.path.isdir(modules_dir):
        raise UsageError(f"--modules-dir {modules_dir} is not a directory", hint="give an image's root directory")
    if not modules_dir and not ctx.runtime.image_exists(source):
        raise StateError(
            f"image {source} does not exist: {instance.name} is not built for {kernel}",
            hint=f"run 'kvc build {instance.name}' (or 'kvc pull {instance.name}') first",
        )
    opened: contextlib.AbstractContextManager[ImageFiles] = (
        contextlib.nullcontext(directory_files(source, kernel)) if modules_dir else ctx.runtime.open_image(source)
    )
    with tempfile.TemporaryDirectory(prefix="kvc-check-") as scratch:
        with opened as files:
            what, hint = (source, DIRECTORY_HINT) if modules_dir else (f"image {source}", "")
            copies = copy_instance_modules(files, instance, kernel, what, scratch, missing_hint=hint)
        plan = _plan_paths(ctx, instance, kernel, [local for _path, local in copies.values()], frozenset())
    say(plan.describe())
    say(f"{instance.name}: the modules from {source} pass the preflight for {kernel}")
    return 0


def cmd_unload(ctx: Context, args: argparse.Namespace) -> int:
    return _locked_action(ctx, args, _unload)


def cmd_reload(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.build import ACTION_UP_TO_DATE, execute_build

    instance = ctx.instance(args.name)
    kernel = ctx.running_kernel(instance, args.kernel, "reload")
    if args.dry_run:
        build = ctx.image_plan(instance, kernel)
        say(build.describe())
        record = _loaded_record(ctx, instance, kernel)
        unload = plan_unload(instance.name, kernel, instance.module_names, ctx.kernel, record_path=record)
        say(unload.describe())
        new_image = build.action != ACTION_UP_TO_DATE
        _dry_load(ctx, instance, kernel, new_image=new_image, unloaded_first={*unload.names, *unload.in_tree})
        return 0
    with images_locked(ctx.layout, instance.name):
        say(execute_build(ctx.image_plan(instance, kernel), ctx.runtime))
        _unload(ctx, instance, kernel, dry_run=False, force=False)
        return _load(ctx, instance, kernel, dry_run=False, force=False)


def cmd_wrapper(ctx: Context, args: argparse.Namespace) -> int:
    instance = ctx.instance(args.name)
    kernel = ctx.kernel_release(args.kernel)
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("wrapper needs a command: kvc wrapper NAME -- CMD [ARG...]")
    tag = image_tag(instance, kernel)
    if not ctx.runtime.image_exists(tag):
        raise StateError(f"image {tag} does not exist", hint=f"run 'kvc build {instance.name}' first")
    return ctx.runtime.run(tag, command, privileged=True, host_network=True)


def _registry_status(ctx: Context, instance: InstanceConfig, kernel: str, local_id: Optional[str]) -> dict[str, Any]:
    """The instance's registry image for the kernel, from the manifest and config only."""
    from kvc.distribute import choose_remote, describe_remote, repository

    repo = repository(instance.registry, f"{instance.source}: KVC_REGISTRY")
    try:
        choice = choose_remote(instance, kernel, repo, ctx.registry)
    except KvcError as exc:
        return {"reference": str(repo), "error": exc.brief}
    if choice.image is None:
        return {"reference": str(choice.ref), "exists": False}
    report = describe_remote(choice.image)
    return {
        "reference": str(choice.ref),
        "exists": True,
        "digest": report["digest"],
        "image_id": report["image_id"],
        "same_as_local": report["image_id"] == local_id,
        "usable": not choice.problem,
        "problem": choice.problem or None,
        "verification": report["verification"],
    }


def status_kernels(ctx: Context, instance: InstanceConfig, requested: Optional[list[str]]) -> list[str]:
    """The kernels asked for; else the running one, those the instance has images for, and those
    it delivered into."""
    if requested:
        return [ctx.kernel_release(k) for k in requested]
    running = ctx.kernel.release()
    kernels = [running]
    kernels += sorted(k for k in ctx.images(instance) if k != running)
    kernels += sorted({r.kernel_release for r in read_records(ctx.layout, instance.name)} - set(kernels))
    return kernels


def _status_arch(kernel: str, info: Optional[ImageInfo]) -> Optional[str]:
    """The architecture of the kernel's image: its own (label or OCI platform), else the one kvc
    would build it for; None when neither is known."""
    arch = (image_arch(info) if info is not None else None) or default_arch(kernel)
    return arch.value if arch is not None else None


def instance_status(
    ctx: Context, instance: InstanceConfig, kernels: list[str], *, remote: bool = False
) -> dict[str, Any]:
    from kvc.build import image_is_current

    loaded = {m.name: m for m in ctx.kernel.loaded_modules()}
    entries = []
    for kernel in kernels:
        tag = image_tag(instance, kernel)
        known = ctx.known_images(instance)  # asked once for every kernel only when no --kernel named them
        info = known[kernel] if known is not None and kernel in known else ctx.runtime.inspect(tag)
        manifest = read_manifest(ctx.layout, instance.name, kernel)
        modules = []
        for name in (n.replace("-", "_") for n in instance.module_names):
            live = loaded.get(name) if kernel == ctx.kernel.release() else None
            state = ctx.kernel.module_state(name) if live is not None else None
            modules.append(
                {
                    "name": name,
                    "loaded": live is not None,
                    "refcnt": live.refcnt if live else None,
                    "taint": (state.taint if state else live.taints) if live else None,
                }
            )
        entries.append(
            {
                "kernel": kernel,
                "arch": _status_arch(kernel, info),
                "image": {
                    "tag": tag,
                    "exists": info is not None,
                    "id": info.id if info else None,
                    "up_to_date": info is not None and image_is_current(instance, kernel, info),
                },
                "extracted": manifest is not None and manifest.image_id == (info.id if info else manifest.image_id),
                "verification": verification_of(ctx.layout, instance.name, kernel, info.id if info else None),
                "published_verification": published_verification(info.labels if info else {}),
                "delivery": delivery_status(ctx.layout, instance.name, kernel),
                "modules": modules,
            }
        )
        if remote and instance.registry:
            entries[-1]["registry"] = _registry_status(ctx, instance, kernel, info.id if info else None)
    return {"name": instance.name, "version": instance.software_version, "kernels": entries}


def _verification_text(verification: Optional[dict[str, Any]]) -> str:
    if verification is None:
        return "not verified"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(verification["at"] or 0)))
    verified = verification["status"] == VerifyStatus.VERIFIED.value
    what = "verified" if verified else f"verification {verification['status']}"
    return f"{what} {when}" + ("" if verification["current"] else " (an older image)")


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    names = [args.name] if args.name else ctx.instance_names()
    running = ctx.kernel.release()
    report = []
    for name in names:
        instance = ctx.instance(name)
        report.append(instance_status(ctx, instance, status_kernels(ctx, instance, args.kernel), remote=args.remote))
    if args.json:
        say(json.dumps({"schema": STATUS_SCHEMA, "running_kernel": running, "instances": report}, indent=2))
        return 0
    for item in report:
        say(f"{item['name']} {item['version']}")
        for entry in item["kernels"]:
            image = entry["image"]
            image_text = ("up to date" if image["up_to_date"] else "outdated") if image["exists"] else "not built"
            arch = f" ({entry['arch']})" if entry["arch"] else ""
            say(
                f"  kernel {entry['kernel']}{arch}: image {image['tag']} {image_text}, "
                f"{'extracted' if entry['extracted'] else 'not extracted'}, "
                f"{_verification_text(entry['verification'])}"
            )
            published = entry["published_verification"]
            if published and entry["verification"] is None:
                say(f"    {published['status']} on {published['kernel']} where it was built (the image's label)")
            if entry["delivery"]:
                say(f"    delivery: {_delivery_text(entry['delivery'])}")
            if "registry" in entry:
                say(f"    registry: {_registry_text(entry['registry'])}")
            for module in entry["modules"]:
                if module["loaded"]:
                    say(f"    {module['name']}: loaded, refcnt {module['refcnt']}, taint {module['taint'] or '-'}")
                else:
                    say(f"    {module['name']}: not loaded")
    if not report:
        say("no instances installed")
    return 0


def _delivery_text(entry: Mapping[str, Any]) -> str:
    if "error" in entry:
        return str(entry["error"])
    where = f"into {entry['path']}" if entry["path"] else "firmware and udev rules only"
    overlay = entry["overlay"]
    if overlay:
        state = "mounted" if overlay["mounted"] else "not mounted"
        where += f" through kvc's overlay ({overlay['upper']}, {state}, by {overlay['by']})"
    firmware = f", firmware_class.path={entry['firmware_path']}" if entry["firmware_path"] else ""
    return f"{entry['mode']}, {entry['files']} files {where}{firmware}"


def _registry_text(entry: Mapping[str, Any]) -> str:
    if "error" in entry:
        return f"{entry['reference']}: {entry['error']}"
    if not entry["exists"]:
        return f"{entry['reference']}: no such image"
    state = "the local image" if entry["same_as_local"] else "differs from the local image"
    usable = "" if entry["usable"] else f", not usable here: {entry['problem']}"
    return f"{entry['reference']} ({entry['digest'][:19]}): {state}{usable}"


def cmd_install(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.install import execute_install, plan_install

    plan = plan_install(ctx.layout, args.bundle, shadow=args.shadow)
    say(plan.describe())
    if args.dry_run:
        return 0
    with instance_lock(ctx.layout.lock_dir, plan.name):
        execute_install(plan, ctx.layout, say)
    systemd.Systemctl(ctx.layout).run(plan.systemctl)
    return 0


def cmd_uninstall(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.install import execute_uninstall, plan_uninstall

    plan = plan_uninstall(ctx.layout, args.name)
    deliveries = plan_remove_all(ctx.layout, plan.name)
    say(plan.describe([textwrap.indent(delivery.describe(), "  ") for delivery in deliveries]))
    if args.dry_run:
        return 0
    # Before the lock: stopping the unit runs its ExecStop, an unload that takes the lock itself.
    systemd.Systemctl(ctx.layout).run(plan.systemctl)
    with instance_lock(ctx.layout.lock_dir, plan.name):
        for delivery in deliveries:
            execute_remove(delivery, ctx.layout, say)
        execute_uninstall(plan, say)
    return 0


def cmd_verify(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.verify.kernelfiles import default_sources, find_kernel
    from kvc.verify.run import VerifyOptions, execute_verify, format_report, plan_verify
    from kvc.verify.secureboot import certificate_path

    if args.memory < 256 or args.timeout <= 0:
        raise UsageError("verify needs --memory of at least 256 MiB and a positive --timeout")
    if not os.path.isdir(args.guest_root):
        raise UsageError(
            f"--guest-root {args.guest_root} is not a directory",
            hint="give the directory of a root file system for the guest, e.g. a debootstrap minbase root",
        )
    if args.sb_cert and not args.secure_boot:
        raise UsageError(
            "--sb-cert goes with --secure-boot", hint=f"kvc verify {args.name} --secure-boot --sb-cert CERT"
        )
    instance = ctx.instance(args.name)
    options = VerifyOptions(
        args.accel,
        args.memory,
        args.timeout,
        args.keep_artifacts,
        os.path.abspath(args.guest_root),
        certificate_path(args.sb_cert, instance.signing.certificate_path if instance.signing else None, instance.name)
        if args.secure_boot
        else "",
    )
    # Held from the plan (which resolves the tag to an image id) to the report: a build would retag
    # or prune the image the guest has mounted. Shared, and not the instance lock: a boot-time load
    # or unload goes on meanwhile.
    with contextlib.nullcontext() if args.dry_run else images_in_use(ctx.layout.lock_dir, instance.name):
        plan = plan_verify(
            instance,
            ctx.kernel_release(args.kernel),
            ctx.runtime,
            options,
            lambda release: find_kernel(
                release,
                default_sources(
                    kernel_dir=args.kernel_dir, host_root=ctx.layout.host.root, cache_dir=ctx.layout.cache_dir
                ),
            ),
            args.arch,
        )
        if args.dry_run:
            say(plan.describe())
            return 0
        report = execute_verify(plan, ctx.runtime, ctx.layout)
    say(json.dumps(report.data, indent=2) if args.json else format_report(report))
    return report.exit_code


def cmd_keys(ctx: Context, args: argparse.Namespace) -> int:
    if args.keys_command == "generate":
        made = generate(os.path.abspath(args.out), args.cn, args.bits, args.days)
        say(f"wrote {made.key_path} (0600), {made.pem_path}, {made.der_path}")
        say(f"key id {made.key_id} (the kernel will print: Loaded X.509 cert '{made.description}')")
        say(f"enroll it: {ENROLL_STEPS}")
        return 0
    trust = host_trust(ctx.layout.host)
    verdicts = _signer_verdicts(ctx, args.name, trust) if args.name else None
    if args.json:
        say(json.dumps({**trust.to_json(), **({"modules": verdicts} if verdicts is not None else {})}, indent=2))
        return 0
    say(f"Secure Boot: {_state(trust.secure_boot)} (setup mode {_state(trust.setup_mode)})")
    if trust.mok_validation_disabled:
        say("shim validation disabled (MokSBStateRT)")
    say(f"lockdown: {trust.lockdown or 'unknown'}, sig_enforce: {_state(trust.sig_enforce)}")
    say(f"modules must be signed by a trusted key: {'yes' if trust.enforcing else 'no'}")
    for ring, keys in trust.keyrings.items():
        say(f"{ring}:")
        for key in keys:
            say(f"  {key.description}")
    for verdict in verdicts or []:
        if verdict["problem"]:
            say(f"refused: {verdict['problem']}")
        elif verdict["signer"] is None:
            say(f"{verdict['module']}: unsigned (accepted: the kernel does not enforce signatures)")
        else:
            where = ", ".join(verdict["keyrings"]) or "no trusted keyring (the kernel does not enforce)"
            say(f"{verdict['module']}: signed by {verdict['signer']} (key {verdict['sig_key']}), trusted by {where}")
    return 0


def _signer_verdicts(ctx: Context, name: str, trust: HostTrust) -> list[dict[str, Any]]:
    """The running kernel's verdict on each module of the instance's current extraction."""
    instance = ctx.instance(name)
    kernel = ctx.kernel.release()
    manifest = read_manifest(ctx.layout, instance.name, kernel)
    if manifest is None:
        raise StateError(
            f"{instance.name} has no extraction for {kernel}", hint=f"load it first: 'kvc load {instance.name}'"
        )
    signatures = {m.name: ModuleFile.open(manifest.path_of(m.name)).signature for m in manifest.modules}
    return module_verdicts(signatures, trust)


def _state(value: Optional[bool]) -> str:
    return "unknown" if value is None else ("on" if value else "off")


COMMANDS = {
    "build": cmd_build,
    "load": cmd_load,
    "keys": cmd_keys,
    "unload": cmd_unload,
    "check": cmd_check,
    "reload": cmd_reload,
    "wrapper": cmd_wrapper,
    "status": cmd_status,
    "verify": cmd_verify,
    "push": cmd_push,
    "sign": cmd_sign,
    "pull": cmd_pull,
    "inspect": cmd_inspect,
    "export": cmd_export,
    "import": cmd_import,
    "kernel-added": cmd_kernel_added,
    "deliver": cmd_deliver,
    "install": cmd_install,
    "uninstall": cmd_uninstall,
}


def cmd_k8s(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.k8s.commands import cmd_k8s as k8s

    return k8s(ctx, args)


COMMANDS["k8s"] = cmd_k8s


def cmd_dkms(ctx: Context, args: argparse.Namespace) -> int:
    from kvc.dkms.commands import cmd_dkms as dkms

    return dkms(ctx, args)


COMMANDS["dkms"] = cmd_dkms


def dispatch(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](Context(Layout.from_env(), getattr(args, "refresh", False)), args)
