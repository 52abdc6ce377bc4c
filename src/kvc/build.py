"""Build an instance's image for a kernel: plan (is it up to date?), then execute (build under a
candidate tag, verify the modules in it, tag it, prune old kernels' images)."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from kvc.config import InstanceConfig
from kvc.errors import BuildError, CommandError
from kvc.kmod.errors import KmodError
from kvc.kmod.module import ModuleFile, is_module_filename, name_from_path, normalize_name
from kvc.runtime import ContainerRuntime, ImageInfo

LABEL_NAME = "name"  # KVC's label: name=NAME
LABEL_KERNEL = "kvc.kernel"
LABEL_VERSION = "kvc.version"
LABEL_MODULES = "kvc.modules"
LABEL_DIGEST = "kvc.digest"
CANDIDATE_SUFFIX = "-kvc-candidate"


@dataclass(frozen=True)
class BuildPlan:
    instance: InstanceConfig
    kernel_release: str
    tag: str
    labels: Mapping[str, str]
    action: str  # "up-to-date", "build" or "pull"
    reason: str
    source: str = ""  # the image pulled, for "pull"

    def describe(self) -> str:
        what = {"up-to-date": "nothing to do", "build": "build", "pull": f"pull {self.source}"}[self.action]
        return f"{self.tag}: {what} ({self.reason})"


def image_tag(instance: InstanceConfig, kernel_release: str) -> str:
    return f"{instance.image_repository}:{kernel_release}"


def context_digest(instance: InstanceConfig, kernel_release: str) -> str:
    """What the image is built from: every file of a local context (path, mode, content), the
    build file name, version, build args and kernel. A git or tarball URL context counts by its
    URL only — kvc cannot see what the URL serves."""
    digest = hashlib.sha256()
    for part in (instance.build_file, instance.software_version, kernel_release,
                 repr(sorted(instance.build_args)), repr(list(instance.module_names))):
        digest.update(part.encode() + b"\0")
    context = instance.build_context
    if "://" in context or not os.path.isdir(context):
        digest.update(b"url\0" + context.encode())
        return digest.hexdigest()
    for root, dirs, files in os.walk(context):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            path = os.path.join(root, name)
            info = os.lstat(path)
            digest.update(os.path.relpath(path, context).encode() + b"\0")
            digest.update(f"{stat.S_IMODE(info.st_mode):o}\0".encode())
            if stat.S_ISLNK(info.st_mode):
                digest.update(os.readlink(path).encode())
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


def plan_build(instance: InstanceConfig, kernel_release: str, runtime: ContainerRuntime, *,
               force: bool = False) -> BuildPlan:
    tag = image_tag(instance, kernel_release)
    digest = context_digest(instance, kernel_release)
    labels = {LABEL_NAME: instance.name, LABEL_KERNEL: kernel_release, LABEL_VERSION: instance.software_version,
              LABEL_MODULES: " ".join(instance.module_names), LABEL_DIGEST: digest}
    existing = runtime.inspect(tag)
    if instance.image:
        source = instance.image.replace("{kver}", kernel_release) if "{kver}" in instance.image \
            else f"{instance.image}:{kernel_release}"
        if existing is not None and not force:
            return BuildPlan(instance, kernel_release, tag, labels, "up-to-date", f"pulled from {source}", source)
        return BuildPlan(instance, kernel_release, tag, labels, "pull", "prebuilt image configured", source)
    if force:
        return BuildPlan(instance, kernel_release, tag, labels, "build", "--force")
    if existing is None:
        return BuildPlan(instance, kernel_release, tag, labels, "build", "no image yet")
    if existing.labels.get(LABEL_DIGEST) != digest:
        return BuildPlan(instance, kernel_release, tag, labels, "build", "build context, version or args changed")
    return BuildPlan(instance, kernel_release, tag, labels, "up-to-date", "image matches the build context")


def classify_failure(output: str, kernel_release: str) -> tuple[str, str]:
    """(one-line cause, hint) for a failed build, from its output."""
    if f"linux-headers-{kernel_release}" in output and ("Unable to locate" in output or "no package" in output.lower()):
        return (f"no kernel headers for {kernel_release} in the build image's package sources",
                "check the kernel release, or point the Containerfile at a repository that has its headers")
    if any(marker in output for marker in ("Temporary failure resolving", "Could not resolve", "Failed to fetch",
                                           "Network is unreachable", "connection refused")):
        return ("the build could not reach the network", "check the host's network, proxy and DNS settings")
    if "error:" in output and (".c:" in output or ".h:" in output):
        return ("the module source failed to compile", "see the compiler errors above")
    return ("the image build failed", "see the build output above")


def find_modules(runtime: ContainerRuntime, image: str, kernel_release: str,
                 names: Sequence[str]) -> dict[str, str]:
    """{module name: path in the image} for the wanted modules under /lib/modules/KVER."""
    wanted = {normalize_name(name) for name in names}
    found: dict[str, str] = {}
    for path in sorted(runtime.list_files(image, f"/lib/modules/{kernel_release}")):
        name = name_from_path(path)
        if is_module_filename(path) and name in wanted and name not in found:
            found[name] = path
    return found


def verify_modules(runtime: ContainerRuntime, image: str, instance: InstanceConfig, kernel_release: str) -> None:
    """Every KMOD_NAMES module is in the image and built for ``kernel_release``."""
    found = find_modules(runtime, image, kernel_release, instance.module_names)
    missing = [name for name in instance.module_names if normalize_name(name) not in found]
    if missing:
        raise BuildError(f"the image lacks module(s) {', '.join(missing)} under /lib/modules/{kernel_release}",
                         details="found: " + (", ".join(sorted(found)) or "no module files"),
                         hint="install the modules into /lib/modules/$KVER/ in the Containerfile")
    with tempfile.TemporaryDirectory(prefix="kvc-verify-") as scratch:
        runtime.copy_out(image, list(found.values()), scratch)
        problems = []
        for name, path in found.items():
            try:
                vermagic = ModuleFile.open(os.path.join(scratch, os.path.basename(path))).vermagic or ""
            except KmodError as exc:
                problems.append(f"{name}: {exc.brief}")
                continue
            if vermagic.split()[:1] != [kernel_release]:
                problems.append(f"{name} ({path}) has vermagic {vermagic.strip()!r}")
    if problems:
        raise BuildError(f"the image's modules are not built for kernel {kernel_release}",
                         details="\n".join(problems),
                         hint="build against the headers of exactly this kernel release (build arg KVER)")


def execute_build(plan: BuildPlan, runtime: ContainerRuntime) -> str:
    """Carry out a plan; returns a one-line summary. A failed verification leaves no tag."""
    if plan.action == "up-to-date":
        return f"{plan.tag} is up to date"
    candidate = plan.tag + CANDIDATE_SUFFIX
    instance = plan.instance
    try:
        if plan.action == "pull":
            runtime.pull(plan.source)
            runtime.tag(plan.source, candidate)
        else:
            build_args = {"KVER": plan.kernel_release, "KMODVER": instance.software_version,
                          **dict(instance.build_args)}
            build_file = instance.build_file
            if "://" not in instance.build_context and not os.path.isabs(build_file):
                build_file = os.path.join(instance.build_context, build_file)
            runtime.build(instance.build_context, build_file, candidate, build_args, plan.labels)
    except CommandError as exc:
        cause, hint = classify_failure(exc.output_tail, plan.kernel_release)
        raise BuildError(f"{plan.tag}: {cause}", details=exc.output_tail, hint=hint) from None
    try:
        verify_modules(runtime, candidate, instance, plan.kernel_release)
        runtime.tag(candidate, plan.tag)
    finally:
        runtime.remove(candidate)
    pruned = prune_images(runtime, instance, keep_tag=plan.tag)
    suffix = f"; removed {len(pruned)} old image(s)" if pruned else ""
    return f"built {plan.tag}{suffix}"


def _kernel_of(info: ImageInfo) -> str:
    if LABEL_KERNEL in info.labels:
        return info.labels[LABEL_KERNEL]
    return info.names[0].rsplit(":", 1)[-1] if info.names else ""


def prune_images(runtime: ContainerRuntime, instance: InstanceConfig, *, keep_tag: Optional[str] = None) -> list[str]:
    """Keep this instance's images (label name=NAME) for the newest ``keep_kernels`` kernels;
    remove older ones and untagged leftovers. The image just built always stays."""
    images = runtime.list_images(f"{LABEL_NAME}={instance.name}")
    newest_first = sorted(images, key=lambda info: info.created, reverse=True)
    kept_kernels: list[str] = []
    removed = []
    for info in newest_first:
        is_current = keep_tag is not None and any(name.endswith(keep_tag) for name in info.names)
        kernel = _kernel_of(info)
        if is_current or (info.names and (kernel in kept_kernels or len(kept_kernels) < instance.keep_kernels)):
            if kernel not in kept_kernels:
                kept_kernels.append(kernel)
            continue
        try:
            runtime.remove(info.id, force=True)
            removed.append(info.names[0] if info.names else info.id)
        except CommandError:
            continue
    return removed
