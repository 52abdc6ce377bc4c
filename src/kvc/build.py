"""Build (or pull) an instance's image for one kernel: plan, then execute.

:func:`plan_build` decides, without starting a container, whether the image ``NAME-VERSION:KVER``
is up to date: it is when it exists and its ``kvc.digest`` label equals :func:`context_digest` of
the current configuration. That check is one ``image inspect`` (well under a second).

:func:`execute_build` builds under a candidate tag, verifies the image (every ``KMOD_NAMES`` module
is under ``/lib/modules/KVER/``, in any subdirectory, plain or compressed, and its vermagic names
exactly KVER, read with :mod:`kvc.kmod` from copies of the files), and only then moves the real tag
onto it. An image that fails verification is removed and never tagged. After a successful build
the instance's images are pruned to the newest ``KVC_KEEP_KERNELS`` kernels.

Image names, labels and pruning are :mod:`kvc.images`. A pulled prebuilt image (``KVC_IMAGE``) gets
the same verification and then the local tag ``NAME-VERSION:KVER``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shlex
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from kvc.arch import Arch, arch_of_elf_machine, default_arch, known_host_arch
from kvc.config import InstanceConfig
from kvc.errors import BuildError, BuildSkipped, CommandError
from kvc.images import (
    LABEL_DIGEST,
    LABEL_KERNEL,
    LABEL_NAME,
    LABEL_VERSION,
    candidate_tag,
    image_arch,
    image_labels,
    image_tag,
    match_modules,
    prebuilt_ref,
    prune_images,
    remove_if_untagged,
)
from kvc.kmod.errors import KmodError
from kvc.kmod.module import ModuleFile, is_module_filename
from kvc.kmod.names import modname_from_path as name_from_path
from kvc.kmod.names import modname_normalize as normalize_name
from kvc.runtime import BuildCommandError, ContainerRuntime, ImageFiles, ImageInfo

_log = logging.getLogger("kvc")

DIGEST_SCHEME = "kvc-context-digest-1"
EXCLUDED_DIRS = (".git",)

ACTION_UP_TO_DATE = "up-to-date"
ACTION_BUILD = "build"
ACTION_PULL = "pull"
# A build that declines a kernel prints this line and fails (kvc's dkms.conf driver, exit 77).
SKIP_MARKER = "kvc-dkms: skip: "
DRIVER_ERROR = "kvc-dkms: error: "
# Lines a build leaves in its image for kvc build to print as warnings (e.g. DKMS modules the
# build made but dkms.conf does not list).
BUILD_WARNINGS = "/usr/lib/kvc/build-warnings"


# ---- build inputs ------------------------------------------------------------------------------------


def context_is_local(instance: InstanceConfig) -> bool:
    context = instance.build_context
    return bool(context) and "://" not in context and os.path.isdir(context)


def build_file_path(instance: InstanceConfig) -> str:
    """The build file argument: inside a local context unless absolute; as written for URL contexts
    (the runtime finds it in the fetched context, as KVC's --file did)."""
    if context_is_local(instance) and not os.path.isabs(instance.build_file):
        return os.path.join(instance.build_context, instance.build_file)
    return instance.build_file


# The build arguments kvc sets; an instance's KVC_BUILD_ARGS cannot replace them.
TARGET_ARGS = ("KVER", "KMODVER", "KVC_ARCH", "KVC_KERNEL_ARCH", "TARGETARCH", "TARGETPLATFORM")
HOST_ARGS = ("KVC_CROSS_COMPILE", "BUILDARCH", "BUILDPLATFORM")


def build_args(instance: InstanceConfig, kernel_release: str, arch: Optional[Arch] = None) -> list[tuple[str, str]]:
    """What the image is built for, then the instance's own arguments: KVC's KVER and KMODVER; the
    target's architecture (``arch``; None: the release's, else the host's) as KVC_ARCH (Debian's
    name), KVC_KERNEL_ARCH (kbuild's ARCH), and TARGETARCH and TARGETPLATFORM, which podman sets
    itself inside stages but (podman 4.3, Debian 12's) not for FROM lines."""
    ours = [("KVER", kernel_release), ("KMODVER", instance.software_version)]
    target = arch or default_arch(kernel_release)
    if target is not None:
        ours += [
            ("KVC_ARCH", target.value),
            ("KVC_KERNEL_ARCH", target.kernel_arch),
            ("TARGETARCH", target.value),
            ("TARGETPLATFORM", target.platform),
        ]
    reserved = TARGET_ARGS + HOST_ARGS
    return ours + [(k, v) for k, v in instance.build_args if k not in reserved]


def host_build_args(kernel_release: str, arch: Optional[Arch] = None) -> list[tuple[str, str]]:
    """What this build host adds for the target: KVC_CROSS_COMPILE (empty for a native build, else
    the cross toolchain's prefix, ``aarch64-linux-gnu-``), BUILDARCH and BUILDPLATFORM (for ``FROM
    --platform=$BUILDPLATFORM``: build stages that run here). Not part of the build digest: an image
    cross-built on amd64 is the one an arm64 host would have built."""
    target = arch or default_arch(kernel_release)
    build = known_host_arch()
    if target is None or build is None:
        return []
    return [
        ("KVC_CROSS_COMPILE", target.cross_compile(build)),
        ("BUILDARCH", build.value),
        ("BUILDPLATFORM", build.platform),
    ]


def build_platform(kernel_release: str, arch: Optional[Arch] = None) -> str:
    """``--platform`` for the build: the target's platform when it is not this host's ("" for a
    native build, whose image has the host's platform anyway)."""
    target = arch or default_arch(kernel_release)
    return "" if target is None or target is known_host_arch() else target.platform


# ---- the context digest ----------------------------------------------------------------------------------


def _hash_tree(update: Callable[[bytes], None], top: str) -> None:
    """Every entry below ``top`` in sorted order: relative path, type and mode, and the content of
    files (link targets for symlinks). ``.git`` directories are left out."""

    def walk(directory: str, relative: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise BuildError(
                f"cannot read the build context: {exc}", hint="the build context must be readable by kvc"
            ) from None
        for name in names:
            path = os.path.join(directory, name)
            rel = f"{relative}/{name}" if relative else name
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode) and name in EXCLUDED_DIRS:
                continue
            kind = stat.S_IFMT(info.st_mode)
            update(f"{rel}\0{kind:o}\0{stat.S_IMODE(info.st_mode):o}\0".encode())
            if stat.S_ISLNK(info.st_mode):
                update(os.readlink(path).encode() + b"\0")
            elif stat.S_ISDIR(info.st_mode):
                walk(path, rel)
            elif stat.S_ISREG(info.st_mode):
                update(f"{info.st_size}\0".encode())
                try:
                    with open(path, "rb") as handle:
                        for chunk in iter(lambda: handle.read(1 << 20), b""):
                            update(chunk)
                except OSError as exc:
                    raise BuildError(
                        f"cannot read the build context: {exc}", hint="the build context must be readable by kvc"
                    ) from None

    walk(top, "")


def context_digest(instance: InstanceConfig, kernel_release: str, arch: Optional[Arch] = None) -> str:
    """sha256 over what the image is built from: the files of a local build context (sorted
    relative paths, type, mode and content; ``.git`` left out), the build file's name (and content
    when it lies outside the context), the software version, the build arguments, the module names
    and the kernel release. A git or tarball URL context counts by its URL string only: kvc cannot
    see what the URL serves, so a change behind it needs ``--force``."""
    digest = hashlib.sha256()
    parts = [
        DIGEST_SCHEME,
        instance.build_file,
        instance.software_version,
        kernel_release,
        repr(build_args(instance, kernel_release, arch)),
        repr(list(instance.module_names)),
    ]
    for part in parts:
        digest.update(part.encode() + b"\0")
    if not context_is_local(instance):
        digest.update(b"url\0" + instance.build_context.encode() + b"\0")
        return digest.hexdigest()
    digest.update(b"dir\0")
    _hash_tree(digest.update, instance.build_context)
    build_file = build_file_path(instance)
    inside = os.path.realpath(build_file).startswith(os.path.realpath(instance.build_context) + os.sep)
    if not inside and os.path.isfile(build_file):
        digest.update(b"build-file\0")
        with open(build_file, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def image_is_current(instance: InstanceConfig, kernel_release: str, info: ImageInfo) -> bool:
    """Whether a local image is one ``kvc build`` keeps (``kvc status``' up to date, and the
    reboot gate's): a prebuilt image (``KVC_IMAGE``) as it is; one built here, or pulled for an
    instance with a build context, when its build digest is this configuration's; one pulled for
    an instance without a build context (``KVC_REGISTRY`` only) when its labels name this
    instance, version and kernel (the pull checked them; its digest is the build host's)."""
    labels = info.labels
    if instance.image:
        return True
    if not instance.build_context:
        named = (labels.get(LABEL_NAME), labels.get(LABEL_VERSION), labels.get(LABEL_KERNEL))
        return named == (instance.name, instance.software_version, kernel_release)
    return labels.get(LABEL_DIGEST) == context_digest(instance, kernel_release, image_arch(info))


# ---- planning ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildPlan:
    """What :func:`execute_build` will do for one instance and kernel, and why."""

    instance: InstanceConfig
    kernel_release: str
    tag: str  # NAME-VERSION:KVER
    labels: Mapping[str, str]
    action: str  # "up-to-date", "build" or "pull"
    reason: str
    source: str = ""  # the reference pulled, for "pull" (and prebuilt "up-to-date")
    digest: str = ""
    existing_id: str = ""  # the image the tag names now, if any
    command: tuple[str, ...] = field(default=())  # the build command line, for "build"
    pull_options: tuple[str, ...] = ()  # registry transport options, for "pull"
    expected_id: str = ""  # for "pull": the image id the registry's manifest names
    expected_labels: Mapping[str, str] = field(default_factory=dict)  # for "pull": labels it must carry
    # The candidate name a build killed between its last two steps left on the tag's image ("" if none).
    stale_candidate: str = ""
    arch: Optional[Arch] = None  # the target's architecture (None: the release's, else the host's)

    def describe(self) -> str:
        """The plan for --dry-run: a summary line, then the steps."""
        if self.action == ACTION_UP_TO_DATE:
            stale = f"\n  untag {self.stale_candidate} (left by an interrupted build)" if self.stale_candidate else ""
            return f"{self.tag}: up to date ({self.reason}){stale}"
        names = ", ".join(normalize_name(name) for name in self.instance.module_names)
        verify = (
            f"verify {names} under /lib/modules/{self.kernel_release} (vermagic {self.kernel_release}), "
            f"then tag {self.tag}"
        )
        if self.action == ACTION_PULL:
            return "\n".join(
                [
                    f"{self.tag}: pull {self.source} ({self.reason})",
                    f"  tag {self.source} as {candidate_tag(self.instance, self.kernel_release)}",
                    f"  {verify}",
                ]
            )
        lines = [f"{self.tag}: build ({self.reason})"]
        if not context_is_local(self.instance):
            lines.append(
                f"  context {self.instance.build_context} is a URL: its digest covers the URL string "
                "only, so changes behind it need --force"
            )
        if self.command:
            lines.append(f"  {shlex.join(self.command)}")
        lines.append(f"  {verify}")
        lines.append(
            f"  remove the image {self.tag} named before if nothing else names it; prune kvc's tags of "
            f"{self.instance.name} to the newest {self.instance.keep_kernels} kernel(s) (an image with "
            "other names is only untagged)"
        )
        return "\n".join(lines)


def leftover_candidate(
    instance: InstanceConfig, kernel_release: str, existing: Optional[ImageInfo], arch: Optional[Arch] = None
) -> str:
    """The candidate name an interrupted build or pull left on the tag's image ("" when none): an
    up-to-date plan takes it off."""
    candidate = candidate_tag(instance, kernel_release, arch)
    return candidate if existing is not None and existing.has_name(candidate) else ""


def plan_build(
    instance: InstanceConfig,
    kernel_release: str,
    runtime: ContainerRuntime,
    *,
    force: bool = False,
    pull: Optional[str] = None,
    no_cache: bool = False,
    arch: Optional[Arch] = None,
) -> BuildPlan:
    """Decide what to do. Starts no container: one or two ``image inspect`` calls. ``arch``: the
    target's architecture (None: the release's, else the host's)."""
    arch = arch or default_arch(kernel_release)
    tag = image_tag(instance, kernel_release, arch)
    digest = context_digest(instance, kernel_release, arch)
    labels = image_labels(instance, kernel_release, digest, arch)
    existing = runtime.inspect(tag)
    existing_id = existing.id if existing else ""
    candidate = candidate_tag(instance, kernel_release, arch)
    stale = leftover_candidate(instance, kernel_release, existing, arch)
    if instance.image:
        source = prebuilt_ref(instance.image, kernel_release)
        if force:
            return BuildPlan(
                instance, kernel_release, tag, labels, ACTION_PULL, "--force", source, digest, existing_id, arch=arch
            )
        if existing is None:
            return BuildPlan(
                instance, kernel_release, tag, labels, ACTION_PULL, "no image yet", source, digest, arch=arch
            )
        local = runtime.inspect(source)
        if local is not None and local.id != existing.id:
            return BuildPlan(
                instance,
                kernel_release,
                tag,
                labels,
                ACTION_PULL,
                f"{source} is a different image now",
                source,
                digest,
                existing_id,
                arch=arch,
            )
        return BuildPlan(
            instance,
            kernel_release,
            tag,
            labels,
            ACTION_UP_TO_DATE,
            f"pulled from {source}; --force pulls again",
            source,
            digest,
            existing_id,
            stale_candidate=stale,
            arch=arch,
        )
    command = tuple(
        runtime.build_argv(
            instance.build_context,
            build_file_path(instance),
            candidate,
            build_args(instance, kernel_release, arch) + host_build_args(kernel_release, arch),
            labels,
            pull=pull,
            no_cache=no_cache,
            platform=build_platform(kernel_release, arch),
        )
    )
    url_note = "" if context_is_local(instance) else " (URL context: only the URL string is compared)"

    def plan(action: str, reason: str) -> BuildPlan:
        return BuildPlan(
            instance,
            kernel_release,
            tag,
            labels,
            action,
            reason,
            "",
            digest,
            existing_id,
            command if action == ACTION_BUILD else (),
            stale_candidate=stale if action == ACTION_UP_TO_DATE else "",
            arch=arch,
        )

    if force:
        return plan(ACTION_BUILD, "--force")
    if existing is None:
        return plan(ACTION_BUILD, "no image yet")
    recorded = existing.labels.get(LABEL_DIGEST)
    if recorded is None:
        return plan(ACTION_BUILD, f"the image has no {LABEL_DIGEST} label (built outside kvc)")
    if recorded != digest:
        return plan(ACTION_BUILD, "build context, version or args changed" + url_note)
    return plan(ACTION_UP_TO_DATE, "image matches the build context" + url_note)


# ---- failures ------------------------------------------------------------------------------------------------

_NETWORK = (
    "Temporary failure resolving",
    "Temporary failure in name resolution",
    "Could not resolve",
    "Failed to fetch",
    "Network is unreachable",
    "Connection refused",
    "Connection timed out",
    "Could not connect to",
    "Name or service not known",
    "No route to host",
    "TLS handshake timeout",
    "pinging container registry",
    "no such host",
    "i/o timeout",
    "dial tcp",
    "Could not resolve host",
)
_COMPILER_ERROR = re.compile(r"^.*\.(?:c|h|S):\d+(?::\d+)?: (?:fatal )?error: .*$", re.MULTILINE)
_MODPOST_ERROR = re.compile(r"^.*ERROR: modpost: .*$", re.MULTILINE)
_MISSING_PACKAGE = (
    "Unable to locate package",
    "has no installation candidate",
    "No match for argument",
    "No package",
    "Couldn't find any package",
    "not found",
)


def classify_failure(output: str, kernel_release: str) -> tuple[str, str]:
    """(one-line cause, hint) for a failed build, recognized from its output: no network (which
    also explains packages that cannot be found), kernel headers missing for the release, the
    compiler or modpost failing, a full disk."""
    lines = output.splitlines()
    driver = next((line for line in lines if line.startswith(DRIVER_ERROR)), "")[len(DRIVER_ERROR) :]
    if driver and not driver.startswith("the build failed"):
        return (f"the DKMS build stopped: {driver[:200]}", "see the build output above (src/dkms.conf in the bundle)")
    network = next((line.strip() for line in lines if any(marker in line for marker in _NETWORK)), "")
    header_names = (
        f"linux-headers-{kernel_release}",
        f"kernel-devel-{kernel_release}",
        f"kernel-headers-{kernel_release}",
    )
    headers = next(
        (
            line.strip()
            for line in lines
            if any(name in line for name in header_names) and any(m in line for m in _MISSING_PACKAGE)
        ),
        "",
    )
    if not headers and f"/lib/modules/{kernel_release}/build" in output and "No such file or directory" in output:
        headers = f"/lib/modules/{kernel_release}/build is missing"
    network_hint = "check the host's network, proxy and DNS settings (builds fetch packages and sources)"
    if headers and network:
        return (
            f"the build could not reach the network, so the package lists are incomplete ({network[:160]})",
            network_hint,
        )
    if headers:
        return (
            f"no kernel headers for {kernel_release} in the build image's package sources ({headers[:160]})",
            "check the kernel release; its headers package may be in another suite (e.g. "
            "bookworm-security or backports), or point the Containerfile at a repository that has it",
        )
    match = _COMPILER_ERROR.search(output)
    if match:
        return (
            f"the module source failed to compile: {match.group(0).strip()[:160]}",
            "fix the source for this kernel's API (see the compiler errors in the log)",
        )
    match = _MODPOST_ERROR.search(output)
    if match:
        return (
            f"the module failed to link (modpost): {match.group(0).strip()[:160]}",
            "a symbol the module uses is not exported by this kernel",
        )
    if network:
        return (f"the build could not reach the network ({network[:160]})", network_hint)
    if "no space left on device" in output.lower():
        return ("the build ran out of disk space", "free space where images are stored (/var/lib/containers)")
    if "error:" in output and (".c:" in output or ".h:" in output):
        return ("the module source failed to compile", "see the compiler errors in the log")
    return ("the image build failed", "see the build output above")


# ---- verification -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoundModule:
    name: str  # kmod's name (with '_')
    path: str  # in the image
    vermagic: str
    srcversion: str = ""
    signer: str = ""  # "" when unsigned
    sig_key: str = ""  # the signing key id as modinfo prints it (XX:XX:...)


def find_modules(runtime: ContainerRuntime, image: str, kernel_release: str, names: Sequence[str]) -> dict[str, str]:
    """{module name: path in the image} for the wanted modules under /lib/modules/KVER."""
    with runtime.open_image(image) as files:
        return match_modules(files.list(f"/lib/modules/{kernel_release}"), kernel_release, names)


def _elsewhere(files: ImageFiles, names: Sequence[str]) -> list[str]:
    wanted = {normalize_name(name) for name in names}
    return [path for path in files.list("/lib/modules") if is_module_filename(path) and name_from_path(path) in wanted]


def verify_image(
    runtime: ContainerRuntime, image: str, instance: InstanceConfig, kernel_release: str, arch: Optional[Arch] = None
) -> list[FoundModule]:
    """Every KMOD_NAMES module is in the image under /lib/modules/KVER, has a vermagic whose first
    word is KVER and is an ELF file of the target's architecture (``arch``; None: the release's,
    else the host's); else BuildError naming each module and what was found."""
    with runtime.open_image(image) as files:
        return _check_modules(files, image, instance, kernel_release, arch)


def _check_modules(
    files: ImageFiles, image: str, instance: InstanceConfig, kernel_release: str, arch: Optional[Arch] = None
) -> list[FoundModule]:
    target = arch or default_arch(kernel_release)
    directory = f"/lib/modules/{kernel_release}"
    listed = files.list(directory)
    found = match_modules(listed, kernel_release, instance.module_names)
    missing = [name for name in instance.module_names if normalize_name(name) not in found]
    if missing:
        others = [p for p in _elsewhere(files, missing) if not p.startswith(directory + "/")]
        present = sorted(p[len(directory) + 1 :] for p in listed if is_module_filename(p))
        details = [
            f"missing: {name} (no {normalize_name(name)}.ko[.xz|.zst|.gz] below {directory})" for name in missing
        ]
        details.append(
            f"module files below {directory}: "
            + (", ".join(present[:20]) or "none")
            + (f" (and {len(present) - 20} more)" if len(present) > 20 else "")
        )
        if others:
            details.append("found for another kernel: " + ", ".join(others[:10]))
        raise BuildError(
            f"image {image} lacks module(s) {', '.join(missing)} for kernel {kernel_release}",
            details="\n".join(details),
            hint="install the modules into /lib/modules/$KVER/ (any subdirectory) in the "
            "Containerfile, built for the KVER build argument",
        )
    with tempfile.TemporaryDirectory(prefix="kvc-verify-") as scratch:
        copies = files.copy(list(found.values()), scratch)
        results: list[FoundModule] = []
        problems: list[str] = []
        for name in (normalize_name(n) for n in instance.module_names):
            path = found[name]
            try:
                module = ModuleFile.open(copies[path])
                vermagic = (module.vermagic or "").strip()
                srcversion = module.info_value("srcversion") or ""
                signature = module.signature
                machine = module.elf.machine
            except KmodError as exc:
                problems.append(f"{name} ({path}): not a readable module: {exc}")
                continue
            if target is not None and machine != target.elf_machine:
                built = arch_of_elf_machine(machine)
                problems.append(
                    f"{name} ({path}): built for {built.value if built else f'ELF machine {machine}'}, "
                    f"not {target.value} (ELF machine {machine}, not {target.elf_machine})"
                )
            release = vermagic.split()[0] if vermagic.split() else ""
            if release != kernel_release:
                problems.append(
                    f"{name} ({path}): vermagic {vermagic or '(none)'!r} names kernel "
                    f"{release or '(none)'}, not {kernel_release}"
                )
            results.append(
                FoundModule(
                    name,
                    path,
                    vermagic,
                    srcversion,
                    signature.signer if signature else "",
                    ":".join(f"{byte:02X}" for byte in signature.key_id) if signature else "",
                )
            )
    if problems:
        raise BuildError(
            f"image {image} has modules that are not built for kernel {kernel_release}",
            details="\n".join(problems),
            hint="build against the headers of exactly this kernel release (build arg KVER), with the "
            "toolchain of its architecture (build args KVC_ARCH and KVC_CROSS_COMPILE)",
        )
    return results


def _build_warnings(files: ImageFiles) -> list[str]:
    """The lines of the image's BUILD_WARNINGS file (none when it has none)."""
    if BUILD_WARNINGS not in files.list(os.path.dirname(BUILD_WARNINGS)):
        return []
    with tempfile.TemporaryDirectory(prefix="kvc-warnings-") as scratch:
        copy = files.copy([BUILD_WARNINGS], scratch)[BUILD_WARNINGS]
        with open(copy, encoding="utf-8", errors="replace") as handle:
            return [line.strip() for line in handle if line.strip()]


def verify_build(
    runtime: ContainerRuntime, image: str, instance: InstanceConfig, kernel_release: str, arch: Optional[Arch] = None
) -> tuple[list[FoundModule], list[str]]:
    """:func:`verify_image`, and the warnings the build left in the image."""
    with runtime.open_image(image) as files:
        return _check_modules(files, image, instance, kernel_release, arch), _build_warnings(files)


def skip_reason(output: str) -> str:
    """Why the build declined its kernel, when it did ("" otherwise)."""
    for line in output.splitlines():
        if line.startswith(SKIP_MARKER):
            return line[len(SKIP_MARKER) :].strip()
    return ""


# ---- skipped kernels -------------------------------------------------------------------------------------------


# ---- execution ----------------------------------------------------------------------------------------------


def _remove_quietly(runtime: ContainerRuntime, ref: str) -> None:
    with contextlib.suppress(CommandError):
        runtime.remove(ref, missing_ok=True)


def _check_pulled(runtime: ContainerRuntime, plan: BuildPlan, image_id: str) -> None:
    """The pulled image is the one the plan chose (its id) and carries the labels it must (the
    exact kernel release, the instance's name); BuildError otherwise."""
    problems = []
    if plan.expected_id and image_id != plan.expected_id:
        problems.append(f"its id is {image_id[:12]}, the registry's manifest named {plan.expected_id[:12]}")
    info = runtime.inspect(image_id)
    labels = info.labels if info is not None else {}
    for key, value in plan.expected_labels.items():
        if labels.get(key) != value:
            problems.append(f"its {key} label is {labels.get(key, '')!r}, not {value!r}")
    if problems:
        raise BuildError(
            f"{plan.tag}: refused the image pulled from {plan.source}",
            details="\n".join(problems),
            hint="push the image built for exactly this kernel ('kvc push'), or pin its digest",
        )


def execute_build(
    plan: BuildPlan,
    runtime: ContainerRuntime,
    *,
    stream: Optional[bool] = None,
    pull: Optional[str] = None,
    no_cache: bool = False,
) -> str:
    """Carry out a plan and return a one-line summary. The tag moves only onto a verified image;
    a build or verification failure raises BuildError and leaves no candidate behind. The image
    the tag named before goes when nothing else names it (a rebuild with every step cached gives
    the same image, which stays). ``stream``: the build output on stderr as it runs (None: when
    kvc runs with -v)."""
    if plan.action == ACTION_UP_TO_DATE:
        if plan.stale_candidate:
            with contextlib.suppress(CommandError):  # best effort: the next build prunes it anyway
                runtime.untag(plan.existing_id, plan.stale_candidate)
        return f"{plan.tag} is up to date"
    instance = plan.instance
    candidate = candidate_tag(instance, plan.kernel_release, plan.arch)
    if plan.action == ACTION_PULL:
        try:
            pulled = runtime.pull(plan.source, options=plan.pull_options)
        except CommandError as exc:
            raise BuildError(
                f"{plan.tag}: pulling {plan.source} failed",
                details=exc.output_tail,
                hint=exc.hint or "check the reference (KVC_IMAGE) and that the registry is reachable",
            ) from None
        _check_pulled(runtime, plan, pulled)
        runtime.tag(pulled, candidate)
    else:
        try:
            runtime.build(
                instance.build_context,
                build_file_path(instance),
                candidate,
                build_args(instance, plan.kernel_release, plan.arch) + host_build_args(plan.kernel_release, plan.arch),
                plan.labels,
                pull=pull,
                no_cache=no_cache,
                stream=stream,
                platform=build_platform(plan.kernel_release, plan.arch),
            )
        except BuildCommandError as exc:
            _remove_quietly(runtime, candidate)
            reason = skip_reason(exc.output)
            if reason:
                raise BuildSkipped(
                    plan.kernel_release,
                    reason,
                    hint="the source's dkms.conf excludes this kernel, as DKMS would; build for another kernel",
                ) from None
            cause, hint = classify_failure(exc.output, plan.kernel_release)
            raise BuildError(f"{plan.tag}: {cause}", details=exc.output_tail, hint=hint) from None
    try:
        found, warnings = verify_build(runtime, candidate, instance, plan.kernel_release, plan.arch)
    except BaseException:
        _remove_quietly(runtime, candidate)
        raise
    previous = runtime.inspect(plan.tag)
    runtime.tag(candidate, plan.tag)
    runtime.remove(candidate)
    replaced = previous is not None and remove_if_untagged(runtime, previous.id)
    pruned = prune_images(runtime, instance, keep_tag=plan.tag)
    verb = "pulled" if plan.action == ACTION_PULL else "built"
    modules = ", ".join(module.name for module in found)
    removed = len(pruned) + (1 if replaced else 0)
    suffix = f"; removed {removed} old image(s)" if removed else ""
    for line in warnings:
        _log.warning("warning: %s: %s", plan.tag, line)
    return f"{verb} {plan.tag} ({modules} verified for {plan.kernel_release}){suffix}"
