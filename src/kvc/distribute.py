"""Prebuilt images through OCI registries: what an image holds, on the image; push; pull.

An instance's image for one kernel goes to a repository under two tags (:func:`kvc.images.registry_tags`):
the fixed ``VERSION-KERNEL`` and the moving ``KERNEL``, both derived from strings a host knows
(its conf and ``uname -r``). Before it is pushed the local image is given labels (and the same
manifest annotations) saying what it holds (:func:`publish_labels`): the kernel release, version,
build-input digest, kvc's version, per module its vermagic, srcversion and signer, the signing key
id, and the last verification of this build. The labelled image is made with a fixed timestamp
(the local image's creation time), so labelling the same image twice gives the same image; a push
whose registry image already has the same build-input digest and verification under both tags is a
no-op.

A pull reads the registry's manifest and config only (:class:`kvc.registry.RegistryClient`) and
refuses, before any layer moves, an image whose ``kvc.kernel`` label is not the kernel exactly,
whose ``name`` is another instance's or whose version is not the conf's; then it pulls by digest
(what was inspected is what arrives), checks the image id, and the build's verification (every
module under ``/lib/modules/KVER`` with vermagic KVER) runs before the local tag moves.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

import kvc
from kvc.arch import Arch, default_arch, find_arch
from kvc.build import (
    ACTION_PULL,
    ACTION_UP_TO_DATE,
    BuildPlan,
    FoundModule,
    context_digest,
    context_is_local,
    leftover_candidate,
    plan_build,
    verify_image,
)
from kvc.config import GlobalConfig, InstanceConfig
from kvc.errors import StateError
from kvc.images import (
    LABEL_DIGEST,
    LABEL_KERNEL,
    LABEL_NAME,
    LABEL_VERSION,
    built_image,
    image_arch,
    image_labels,
    image_tag,
    labelled_arch,
    registry_tags,
)
from kvc.kmmimage import DIR_NAME as KMM_DIR_NAME
from kvc.kmmimage import LABEL_FIRMWARE_PATH, add_kmm_layout
from kvc.layout import Layout
from kvc.registry import Reference, RegistryClient, RegistryError, RegistryOptions, RemoteImage, transport_args
from kvc.runtime import ContainerRuntime, ImageInfo
from kvc.verifyrecord import LABEL_VERIFICATION, published_verification, read_verify_record

LABEL_MODULE_INFO = "kvc.modules.info"
LABEL_TOOL_VERSION = "kvc.tool-version"
LABEL_SIGNER_KEY = "kvc.signer-key-id"
LABEL_OCI_TITLE = "org.opencontainers.image.title"
LABEL_OCI_VERSION = "org.opencontainers.image.version"
PUBLISH_SUFFIX = "-kvc-publish"
KMM_SUFFIX = "-kvc-kmm"

ACTION_PUSH = "push"
ACTION_PUSHED = "up-to-date"


def registry_options(config: GlobalConfig) -> RegistryOptions:
    return RegistryOptions(
        auth_file=config.registry_auth_file, certs_dir=config.registry_certs_dir, tls_verify=config.registry_tls_verify
    )


def repository(text: str, source: str) -> Reference:
    """A repository reference (no tag, no digest) from the command line or a conf."""
    ref = Reference.parse(text)
    if ref.tag or ref.digest:
        raise StateError(
            f"{source}: {text} names an image, not a repository",
            hint=f"give the repository only ({ref.name}); kvc chooses the tags from the version and kernel",
        )
    return ref


# ---- what an image holds ----------------------------------------------------------------------------------


def module_info(found: Sequence[FoundModule]) -> list[dict[str, str]]:
    return [
        {
            "name": module.name,
            "vermagic": module.vermagic,
            "srcversion": module.srcversion,
            "signer": module.signer,
            "sig_key": module.sig_key,
        }
        for module in found
    ]


def label_json(value: Any) -> str:
    """A label's JSON value, compact and in one order (equal values give equal labels)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def publish_labels(
    instance: InstanceConfig,
    kernel_release: str,
    info: ImageInfo,
    found: Sequence[FoundModule],
    verification: Optional[Mapping[str, Any]],
) -> dict[str, str]:
    """The labels a pushed or exported image carries: the build's own (name, kernel, version,
    modules, digest) and what only the built modules and their verification tell."""
    labels = dict(info.labels)
    labels.update(image_labels(instance, kernel_release, info.labels.get(LABEL_DIGEST, ""), image_arch(info)))
    labels[LABEL_MODULE_INFO] = label_json(module_info(found))
    labels[LABEL_TOOL_VERSION] = kvc.__version__
    keys = sorted({module.sig_key for module in found if module.sig_key})
    if keys:
        labels[LABEL_SIGNER_KEY] = ",".join(keys)
    else:
        labels.pop(LABEL_SIGNER_KEY, None)
    if verification is not None:
        labels[LABEL_VERIFICATION] = label_json(verification)
    else:
        labels.pop(LABEL_VERIFICATION, None)
    labels[LABEL_OCI_TITLE] = instance.name
    labels[LABEL_OCI_VERSION] = instance.software_version
    return labels


def verification_of(
    layout: Layout, instance: InstanceConfig, kernel_release: str, image_id: str
) -> Optional[dict[str, Any]]:
    """The last ``kvc verify`` of exactly this image for the kernel: status, when, kernel."""
    record = read_verify_record(layout, instance.name, kernel_release)
    if record is None or record.get("image_id") != image_id:
        return None
    return {"status": record["status"], "at": record.get("at"), "kernel": kernel_release}


def labelled_image(
    runtime: ContainerRuntime,
    layout: Layout,
    instance: InstanceConfig,
    kernel_release: str,
    arch: Optional[Arch] = None,
) -> str:
    """The temporary tag (the caller removes it) of the local image of the instance for the kernel
    (and ``arch``), verified again, with KMM's layout added (:mod:`kvc.kmmimage`) and labelled with
    what it holds."""
    tag, info = built_image(runtime, instance, kernel_release, arch)
    found = verify_image(runtime, tag, instance, kernel_release, arch)
    labels = publish_labels(
        instance, kernel_release, info, found, verification_of(layout, instance, kernel_release, info.id)
    )
    timestamp = int(info.created_epoch)
    layout_tag = tag + KMM_SUFFIX
    kmm = add_kmm_layout(runtime, instance, kernel_release, info.id, layout_tag, timestamp=timestamp)
    # A pulled image carries the labels of its own publication: the firmware label only if it still holds.
    labels.pop(LABEL_FIRMWARE_PATH, None)
    labels.update(kmm.labels)
    publish_tag = tag + PUBLISH_SUFFIX
    try:
        runtime.relabel(layout_tag, publish_tag, labels, timestamp=timestamp)
    finally:
        runtime.remove(layout_tag, missing_ok=True)
    return publish_tag


# ---- push ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushPlan:
    instance: InstanceConfig
    kernel_release: str
    local_tag: str
    fixed: Reference
    moving: Reference
    action: str
    reason: str
    arch: Optional[Arch] = None

    def describe(self) -> str:
        if self.action == ACTION_PUSHED:
            return f"{self.fixed} and :{self.moving.tag}: up to date ({self.reason})"
        return "\n".join(
            [
                f"{self.local_tag}: push to {self.fixed} and {self.moving} ({self.reason})",
                f"  verify the modules again, add KMM's layout (the modules, their depmod indexes and firmware "
                f"below {KMM_DIR_NAME})",
                f"  label the image with what it holds ({LABEL_MODULE_INFO}, "
                f"{LABEL_VERIFICATION}, ...) under {self.local_tag}{PUBLISH_SUFFIX}",
                f"  push it to both tags, then remove {self.local_tag}{PUBLISH_SUFFIX}",
            ]
        )


def plan_push(
    instance: InstanceConfig,
    kernel_release: str,
    repo: Reference,
    runtime: ContainerRuntime,
    client: RegistryClient,
    layout: Layout,
    arch: Optional[Arch] = None,
) -> PushPlan:
    """Push unless both tags already name one registry image with the local image's build-input
    digest and verification (reads two manifests and one config; pulls nothing). ``arch``: the
    target's architecture (None: the release's, else the host's)."""
    tag, info = built_image(runtime, instance, kernel_release, arch)
    fixed_tag, moving_tag = registry_tags(instance, kernel_release, arch)
    fixed, moving = repo.with_tag(fixed_tag), repo.with_tag(moving_tag)

    def plan(action: str, reason: str) -> PushPlan:
        return PushPlan(instance, kernel_release, tag, fixed, moving, action, reason, arch)

    remote = client.inspect(fixed)
    if remote is None:
        return plan(ACTION_PUSH, f"the registry has no {fixed_tag}")
    if remote.labels.get(LABEL_DIGEST, "") != info.labels.get(LABEL_DIGEST, ""):
        return plan(ACTION_PUSH, "the registry's image was built from other inputs")
    verification = verification_of(layout, instance, kernel_release, info.id)
    if remote.labels.get(LABEL_VERIFICATION, "") != (label_json(verification) if verification else ""):
        return plan(ACTION_PUSH, "the verification changed")
    if client.exists(moving) != remote.digest:
        return plan(ACTION_PUSH, f"{moving_tag} names another image")
    return plan(ACTION_PUSHED, f"the registry has this build ({remote.digest[:19]})")


def execute_push(plan: PushPlan, runtime: ContainerRuntime, layout: Layout, options: RegistryOptions) -> str:
    if plan.action == ACTION_PUSHED:
        return f"{plan.fixed} is up to date"
    publish_tag = labelled_image(runtime, layout, plan.instance, plan.kernel_release, plan.arch)
    args = transport_args(options, plan.fixed.registry)
    try:
        with tempfile.TemporaryDirectory(prefix="kvc-push-") as scratch:
            digest_file = os.path.join(scratch, "digest")
            runtime.push(publish_tag, f"docker://{plan.fixed}", options=args, digest_file=digest_file)
            with open(digest_file, encoding="utf-8") as handle:
                digest = handle.read().strip()
            # The same image again: every blob is there already, only the tag is written.
            runtime.push(publish_tag, f"docker://{plan.moving}", options=args)
    finally:
        runtime.remove(publish_tag, missing_ok=True)
    return f"pushed {plan.local_tag} to {plan.fixed} and :{plan.moving.tag} ({digest})"


# ---- pull ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteChoice:
    """What the registry offers for one instance and kernel: the image to pull, or why none fits."""

    ref: Reference
    image: Optional[RemoteImage]
    problem: str = ""


def remote_problems(instance: InstanceConfig, kernel_release: str, image: RemoteImage) -> list[str]:
    """Why a registry image must not be loaded for the instance and kernel (empty: it may)."""
    labels = image.labels
    problems = []
    if labels.get(LABEL_NAME) != instance.name:
        problems.append(f"it is {labels.get(LABEL_NAME) or 'not a kvc image'!r}'s image, not {instance.name}'s")
    if labels.get(LABEL_KERNEL) != kernel_release:
        problems.append(f"its {LABEL_KERNEL} label is {labels.get(LABEL_KERNEL, '')!r}, not {kernel_release!r}")
    if labels.get(LABEL_VERSION) != instance.software_version:
        problems.append(
            f"its {LABEL_VERSION} label is {labels.get(LABEL_VERSION, '')!r}, not {instance.software_version!r}"
        )
    if context_is_local(instance) and labels.get(LABEL_DIGEST) != context_digest(
        instance, kernel_release, labelled_arch(labels)
    ):
        problems.append("it was built from other inputs than this host's build context (kvc.digest differs)")
    built_for, wanted = labelled_arch(labels) or find_arch(image.architecture), default_arch(kernel_release)
    if built_for is not None and wanted is not None and built_for is not wanted:
        problems.append(f"it is an {built_for.value} image, and kernel {kernel_release} here is {wanted.value}")
    return problems


def choose_remote(
    instance: InstanceConfig, kernel_release: str, repo: Reference, client: RegistryClient
) -> RemoteChoice:
    """The registry image for the instance and kernel: the digest the conf pins for the kernel,
    else the fixed tag. Reads the manifest and config only."""
    pinned = instance.registry_digests.get(kernel_release, "")
    ref = repo.with_digest(pinned) if pinned else repo.with_tag(registry_tags(instance, kernel_release)[0])
    image = client.inspect(ref)
    if image is None:
        return RemoteChoice(ref, None, f"the registry has no {ref}")
    problems = remote_problems(instance, kernel_release, image)
    return RemoteChoice(ref, image, "; ".join(problems))


def pull_plan(
    instance: InstanceConfig,
    kernel_release: str,
    choice: RemoteChoice,
    options: RegistryOptions,
    reason: str,
    existing_id: str = "",
) -> BuildPlan:
    assert choice.image is not None
    digest_ref = choice.ref.with_digest(choice.image.digest)
    return BuildPlan(
        instance,
        kernel_release,
        image_tag(instance, kernel_release),
        image_labels(
            instance,
            kernel_release,
            choice.image.labels.get(LABEL_DIGEST, ""),
            labelled_arch(choice.image.labels),
        ),
        ACTION_PULL,
        reason,
        source=str(digest_ref),
        digest=choice.image.labels.get(LABEL_DIGEST, ""),
        existing_id=existing_id,
        pull_options=tuple(transport_args(options, choice.ref.registry)),
        expected_id=choice.image.config_digest.split(":", 1)[-1],
        expected_labels={LABEL_KERNEL: kernel_release, LABEL_NAME: instance.name},
    )


# ---- build once, load everywhere ----------------------------------------------------------------------------


def _registry_plan(
    instance: InstanceConfig,
    kernel_release: str,
    choice: RemoteChoice,
    existing: Optional[ImageInfo],
    options: RegistryOptions,
    force: bool,
) -> Optional[BuildPlan]:
    """Keep or pull the registry's image (None: the registry has none that fits)."""
    if choice.image is None or choice.problem:
        return None
    tag = image_tag(instance, kernel_release)
    remote_id = choice.image.config_digest.split(":", 1)[-1]
    if existing is not None and existing.id == remote_id and not force:
        reason = f"the same image as {choice.ref}; --force pulls again"
        return BuildPlan(
            instance,
            kernel_release,
            tag,
            dict(existing.labels),
            ACTION_UP_TO_DATE,
            reason,
            existing_id=existing.id,
            stale_candidate=leftover_candidate(instance, kernel_release, existing),
        )
    reason = f"the registry has it as {choice.ref}" + (" (--force)" if force else "")
    return pull_plan(instance, kernel_release, choice, options, reason, existing.id if existing else "")


def plan_pull(
    instance: InstanceConfig,
    kernel_release: str,
    repo: Reference,
    runtime: ContainerRuntime,
    client: RegistryClient,
    options: RegistryOptions,
    *,
    force: bool = False,
) -> BuildPlan:
    """``kvc pull``: the registry's image for the kernel, or StateError saying why there is none."""
    choice = choose_remote(instance, kernel_release, repo, client)
    plan = _registry_plan(
        instance, kernel_release, choice, runtime.inspect(image_tag(instance, kernel_release)), options, force
    )
    if plan is None:
        raise StateError(
            f"{choice.ref}: no image of {instance.name} {instance.software_version} for kernel {kernel_release}: "
            f"{choice.problem}",
            hint=f"push one from a build host: 'kvc build {instance.name} --kernel {kernel_release} --push'",
        )
    return plan


def plan_obtain(
    instance: InstanceConfig,
    kernel_release: str,
    runtime: ContainerRuntime,
    client: RegistryClient,
    options: RegistryOptions,
    *,
    force: bool = False,
) -> BuildPlan:
    """How an instance with ``KVC_REGISTRY`` gets its image for a kernel (what ``kvc build`` and the
    unit at boot do): kept when the local image is current (its build-input digest; for an
    instance without a build context, the registry's image id); else pulled from the registry;
    else, when the registry has no fitting image or cannot be reached, built
    (``KVC_REGISTRY_FALLBACK=build``) or refused (``fail``). The plan's reason says which and why.
    ``force`` builds again (pulls again without a build context)."""
    repo = repository(instance.registry, f"{instance.source}: KVC_REGISTRY")
    local = plan_build(instance, kernel_release, runtime, force=force) if context_is_local(instance) else None
    if local is not None and (local.action == ACTION_UP_TO_DATE or force):
        return local
    existing = runtime.inspect(image_tag(instance, kernel_release))
    try:
        choice = choose_remote(instance, kernel_release, repo, client)
    except RegistryError as exc:
        choice = RemoteChoice(repo, None, exc.brief)
    plan = _registry_plan(instance, kernel_release, choice, existing, options, force)
    if plan is not None:
        return plan
    if existing is not None and local is None and not force:
        return BuildPlan(
            instance,
            kernel_release,
            image_tag(instance, kernel_release),
            dict(existing.labels),
            ACTION_UP_TO_DATE,
            f"kept the local image: {choice.problem}",
            existing_id=existing.id,
            stale_candidate=leftover_candidate(instance, kernel_release, existing),
        )
    if instance.registry_fallback == "build" and local is not None:
        return replace(local, reason=f"{choice.problem}; building ({local.reason})")
    raise StateError(
        f"no image of {instance.name} {instance.software_version} for kernel {kernel_release}: {choice.problem}",
        hint=f"push one from a build host ('kvc build {instance.name} --kernel {kernel_release} --push'), or set "
        "KVC_REGISTRY_FALLBACK=build with a build context",
    )


# ---- reading what an image holds ----------------------------------------------------------------------------


def _json_label(labels: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(labels[key]) if labels.get(key) else None
    except ValueError:
        return None


def describe_remote(image: RemoteImage) -> dict[str, Any]:
    """What a registry image says it holds (``kvc inspect --json``, schema 1)."""
    labels = image.labels
    return {
        "schema": 1,
        "reference": str(image.reference),
        "digest": image.digest,
        "image_id": image.config_digest.split(":", 1)[-1],
        "media_type": image.media_type,
        "created": image.created,
        "size": image.size,
        "kvc_image": bool(labels.get(LABEL_KERNEL)),
        "name": labels.get(LABEL_NAME),
        "version": labels.get(LABEL_VERSION),
        "kernel": labels.get(LABEL_KERNEL),
        "build_digest": labels.get(LABEL_DIGEST),
        "kvc_version": labels.get(LABEL_TOOL_VERSION),
        "signer_key_id": labels.get(LABEL_SIGNER_KEY),
        "modules": _json_label(labels, LABEL_MODULE_INFO),
        "verification": published_verification(labels),
        "labels": dict(labels),
    }


def format_remote(report: Mapping[str, Any]) -> str:
    lines = [
        f"{report['reference']}",
        f"  digest {report['digest']}, image {str(report['image_id'])[:12]}, {report['size'] / 1e6:.1f} MB of layers",
    ]
    if not report["kvc_image"]:
        lines.append("  not a kvc image (no kvc.kernel label)")
        return "\n".join(lines)
    lines.append(
        f"  {report['name']} {report['version']} for kernel {report['kernel']}, built by kvc "
        f"{report['kvc_version'] or '(unknown)'}, inputs {str(report['build_digest'])[:16]}"
    )
    for module in report["modules"] or []:
        signed = f"signed by {module['signer']} ({module['sig_key']})" if module.get("signer") else "unsigned"
        lines.append(f"  {module['name']}: vermagic {module['vermagic']}, srcversion {module['srcversion']}, {signed}")
    verification = report["verification"]
    if verification:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(verification.get("at") or 0)))
        lines.append(f"  verification: {verification['status']} on {verification['kernel']} at {when} UTC")
    else:
        lines.append("  verification: none recorded for this build")
    return "\n".join(lines)
