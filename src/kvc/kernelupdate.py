"""Kernel updates: the reboot gate (``kvc check --next-boot``) and ``kvc kernel-added KVER``.

The gate answers, for the kernel the host boots next (:mod:`kvc.nextboot`) and every enabled
instance, whether the instance is ready: its image for that kernel exists and is current (what
``kvc build`` would keep, :func:`kvc.build.image_is_current`), and, when the instance sets
``KVC_VERIFY_REQUIRED=yes``, the last ``kvc verify`` on that kernel passed for exactly that image.
Each problem comes with the command that fixes it. It reads only: one ``image inspect`` per
instance and the verification records.

``kvc kernel-added KVER`` (run by kvc's kernel-install plugin and Debian postinst.d hook, or by
hand) prepares every enabled instance for KVER: it keeps, pulls or builds the image as ``kvc
build NAME --kernel KVER`` does, verifies it in a VM when the instance asks for that (unless this
very image already passed on KVER), and delivers it into KVER's module tree in tree mode. One
instance's failure does not stop the others; each is reported, and then the gate's verdict.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol

from kvc.build import ACTION_UP_TO_DATE, BuildPlan, execute_build, image_is_current
from kvc.config import Delivery, InstanceConfig
from kvc.errors import BuildSkipped, KvcError, StateError
from kvc.imagerecord import images_locked
from kvc.images import image_tag
from kvc.layout import Layout
from kvc.nextboot import EnabledInstance, NextKernel, enabled_instances
from kvc.runtime import ContainerRuntime
from kvc.skiprecord import record_skip, recorded_skip
from kvc.verifyrecord import VerifyStatus, verification_of

GATE_SCHEMA = 1


class Host(Protocol):
    """What the gate and kernel-added use of the command context (:class:`kvc.commands.Context`)."""

    @property
    def layout(self) -> Layout: ...

    @property
    def runtime(self) -> ContainerRuntime: ...

    def instance(self, name: str) -> InstanceConfig: ...

    def image_plan(self, instance: InstanceConfig, kernel: str, *, force: bool = False) -> BuildPlan: ...


def _when(verification: Mapping[str, Any]) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(float(verification["at"] or 0)))


@dataclass(frozen=True)
class Problem:
    what: str
    hint: str


@dataclass(frozen=True)
class Readiness:
    """One enabled instance against the next kernel."""

    name: str
    units: tuple[str, ...]
    image: Optional[Mapping[str, Any]]  # tag, exists, id, up_to_date; None when the conf cannot be used
    verify_required: bool
    verification: Optional[Mapping[str, Any]]  # the last kvc verify on the kernel: status, at, image_id, current
    problems: tuple[Problem, ...]
    skipped: str = ""  # why its build declined the kernel (DKMS BUILD_EXCLUSIVE_*): nothing to load there

    @property
    def ready(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "units": list(self.units),
            "ready": self.ready,
            "image": dict(self.image) if self.image is not None else None,
            "verify_required": self.verify_required,
            "verification": dict(self.verification) if self.verification is not None else None,
            "problems": [{"what": p.what, "hint": p.hint} for p in self.problems],
            "skipped": self.skipped or None,
        }

    def lines(self) -> list[str]:
        if not self.ready:
            lines = [f"  {self.name}: NOT READY"]
            for problem in self.problems:
                lines += [f"    {problem.what}", f"      hint: {problem.hint}"]
            return lines
        if self.skipped:
            return [f"  {self.name}: ready, nothing to load (its build skipped this kernel: {self.skipped})"]
        assert self.image is not None
        verified = ""
        if self.verification is not None and self.verification["current"]:
            verified = (
                f", verified {_when(self.verification)}"
                if self.verification["status"] == VerifyStatus.VERIFIED.value
                else ""
            )
        return [f"  {self.name}: ready (image {self.image['tag']} {str(self.image['id'])[:12]} up to date{verified})"]


@dataclass(frozen=True)
class GateReport:
    kernel: NextKernel
    instances: tuple[Readiness, ...]

    @property
    def ready(self) -> bool:
        return all(item.ready for item in self.instances)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": GATE_SCHEMA,
            "next_kernel": self.kernel.to_json(),
            "ready": self.ready,
            "instances": [item.to_json() for item in self.instances],
        }

    def lines(self) -> list[str]:
        lines = [f"next boot: {self.kernel.describe()}"]
        for item in self.instances:
            lines += item.lines()
        if not self.instances:
            lines.append("  no enabled instances: nothing to prepare")
        return lines

    def error(self) -> Optional[StateError]:
        """The gate's refusal (exit 6), or None when the host may reboot."""
        if self.ready:
            return None
        failing = [item.name for item in self.instances if not item.ready]
        return StateError(
            f"not ready for kernel {self.kernel.release}: {len(failing)} of {len(self.instances)} enabled "
            f"instance(s) ({', '.join(failing)})",
            hint="run the hints above, then 'kvc check --next-boot' again",
        )


def _verification_problem(
    name: str, kernel: str, current: bool, verification: Optional[Mapping[str, Any]]
) -> Optional[Problem]:
    """What keeps an instance with KVC_VERIFY_REQUIRED=yes from being ready, if anything: a
    passed verification on the kernel of exactly its current image is needed."""
    verify = f"kvc verify {name} --kernel {kernel}"
    required = "(KVC_VERIFY_REQUIRED=yes)"
    if not current:
        return Problem(f"not verified on {kernel} {required}", f"{verify}, after the build")
    if verification is None:
        return Problem(f"not verified on {kernel} {required}", verify)
    if not verification["current"]:
        return Problem(
            f"the last verification on {kernel} ({verification['status']}) was of another image "
            f"({str(verification['image_id'])[:12]}) {required}",
            verify,
        )
    if verification["status"] != VerifyStatus.VERIFIED.value:
        return Problem(
            f"the last verification on {kernel} ended {verification['status']} {required}",
            f"see the report 'kvc status {name} --kernel {kernel}' names; after a fix, {verify}",
        )
    return None


def assess(host: Host, enabled: EnabledInstance, kernel: str) -> Readiness:
    name = enabled.name
    try:
        instance = host.instance(name)
    except KvcError as exc:
        what = f"its configuration cannot be used: {exc.brief}"
        return Readiness(name, enabled.units, None, False, None, (Problem(what, exc.hint or "fix the conf"),))
    tag = image_tag(instance, kernel)
    info = host.runtime.inspect(tag)
    current = info is not None and image_is_current(instance, kernel, info)
    image = {"tag": tag, "exists": info is not None, "id": info.id if info else None, "up_to_date": current}
    build = f"kvc build {name} --kernel {kernel}"
    problems = []
    skipped = recorded_skip(host.layout, instance, kernel) if info is None else ""
    if skipped:
        return Readiness(name, enabled.units, image, False, None, (), skipped)
    if info is None:
        problems.append(Problem(f"image {tag} does not exist: {name} is not built for {kernel}", build))
    elif not current:
        problems.append(Problem(f"image {tag} is outdated: its build inputs changed", build))
    verification = verification_of(host.layout, name, kernel, info.id if info else None)
    if instance.verify_required:
        missing = _verification_problem(name, kernel, current, verification)
        problems += [missing] if missing is not None else []
    return Readiness(name, enabled.units, image, instance.verify_required, verification, tuple(problems))


def gate(host: Host, kernel: NextKernel) -> GateReport:
    """Every enabled instance against ``kernel``."""
    return GateReport(kernel, tuple(assess(host, item, kernel.release) for item in enabled_instances(host.layout)))


# ---- kvc kernel-added ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preparation:
    """What kernel-added does for one enabled instance: its image plan, whether it verifies and
    delivers, or why it cannot be planned."""

    name: str
    instance: Optional[InstanceConfig] = None
    build: Optional[BuildPlan] = None
    verify: bool = False
    verified_before: str = ""  # when verify is off because this image already passed: when
    deliver: bool = False
    deliver_at_boot: bool = False  # tree mode, but the host has no module tree for the kernel yet
    error: Optional[KvcError] = None

    def describe(self, kernel: str) -> str:
        if self.error is not None or self.build is None:
            brief = self.error.brief if self.error is not None else "nothing planned"
            return f"{self.name}: cannot prepare it for {kernel}: {brief}"
        lines = [f"{self.name}:", *("  " + line for line in self.build.describe().splitlines())]
        if self.verify:
            lines.append(
                f"  then verify it on {kernel} in a VM (as 'kvc verify {self.name} --kernel {kernel}'), unless "
                "the image the build leaves passed there before"
            )
        elif self.verified_before:
            lines.append(f"  its verification on {kernel} passed {self.verified_before} for this image: not repeated")
        if self.deliver:
            lines.append(
                f"  then deliver it into /lib/modules/{kernel}/updates/kvc/{self.name} "
                f"(as 'kvc deliver {self.name} --kernel {kernel}')"
            )
        elif self.deliver_at_boot:
            lines.append(f"  {self.deliver_note(kernel)}")
        return "\n".join(lines)

    def deliver_note(self, kernel: str) -> str:
        return (
            f"no /lib/modules/{kernel} on this host yet (a staged ostree deployment's tree shows at its boot): "
            "the unit's 'kvc load' delivers into the module tree at boot"
        )


@dataclass(frozen=True)
class KernelAddedPlan:
    kernel: NextKernel
    steps: tuple[Preparation, ...]

    def describe(self) -> str:
        lines = [f"prepare the enabled instances for {self.kernel.describe()}:"]
        lines += ["  " + line for step in self.steps for line in step.describe(self.kernel.release).splitlines()]
        if not self.steps:
            lines.append("  no enabled instances: nothing to prepare")
        release = self.kernel.release
        lines.append(f"then check the reboot gate for {release} (as 'kvc check --next-boot --kernel {release}')")
        return "\n".join(lines)


def _passed_before(host: Host, instance: InstanceConfig, kernel: str, image_id: str = "") -> str:
    """When the instance's image for the kernel (``image_id``, else the local one now) passed
    ``kvc verify`` on it, or "" when it has not."""
    if not image_id:
        info = host.runtime.inspect(image_tag(instance, kernel))
        image_id = info.id if info is not None else ""
    done = verification_of(host.layout, instance.name, kernel, image_id or None)
    return _when(done) if done is not None and done["current"] and done["status"] == VerifyStatus.VERIFIED.value else ""


def _prepare(host: Host, enabled: EnabledInstance, kernel: str) -> Preparation:
    try:
        instance = host.instance(enabled.name)
        build = host.image_plan(instance, kernel)
    except KvcError as exc:
        return Preparation(enabled.name, error=exc)
    verified_before = ""
    if instance.verify_required and build.action == ACTION_UP_TO_DATE and build.existing_id:
        verified_before = _passed_before(host, instance, kernel, build.existing_id)
    verify = instance.verify_required and not verified_before
    tree = instance.delivery is Delivery.TREE
    has_tree = os.path.isdir(host.layout.host.module_dir(kernel))
    return Preparation(
        enabled.name,
        instance,
        build,
        verify,
        verified_before,
        deliver=tree and has_tree,
        deliver_at_boot=tree and not has_tree,
    )


def plan_kernel_added(host: Host, kernel: NextKernel) -> KernelAddedPlan:
    """Plans per enabled instance (image plans read the local images, and the registry's manifest
    for KVC_REGISTRY instances); a failed plan is recorded, not raised."""
    return KernelAddedPlan(
        kernel, tuple(_prepare(host, item, kernel.release) for item in enabled_instances(host.layout))
    )


def _failure_lines(name: str, error: KvcError) -> list[str]:
    lines = [f"{name}: FAILED: {error.brief}"]
    lines += ["  " + line for line in error.details.rstrip("\n").splitlines()]
    return lines + ([f"  hint: {error.hint}"] if error.hint else [])


def _verify(host: Host, instance: InstanceConfig, kernel: str, say: Callable[[str], None]) -> None:
    """``kvc verify NAME --kernel KVER`` with its defaults; a verification that does not pass
    raises an error with the report's exit code (the report is printed either way)."""
    from kvc.verify.kernelfiles import default_sources, find_kernel
    from kvc.verify.run import VerifyOptions, execute_verify, format_report, plan_verify

    layout = host.layout
    sources = default_sources(kernel_dir=None, host_root=layout.host.root, cache_dir=layout.cache_dir)
    plan = plan_verify(instance, kernel, host.runtime, VerifyOptions(), lambda release: find_kernel(release, sources))
    report = execute_verify(plan, host.runtime, layout)
    say(format_report(report))
    if report.status is not VerifyStatus.VERIFIED:
        failed = KvcError(
            f"the verification on {kernel} ended {report.status.value}",
            hint=f"see the report above; after a fix, 'kvc kernel-added {kernel}' again",
        )
        failed.exit_code = report.exit_code
        raise failed


def _deliver(host: Host, instance: InstanceConfig, kernel: str, say: Callable[[str], None]) -> None:
    """``kvc deliver NAME --kernel KVER``: planned once the image is there (the build may have
    just made it)."""
    from kvc.tree import execute_deliver, plan_deliver

    plan = plan_deliver(instance, kernel, host.layout, host.runtime)
    say(plan.describe())
    execute_deliver(plan, host.layout, host.runtime, say)


def execute_kernel_added(host: Host, plan: KernelAddedPlan, say: Callable[[str], None]) -> list[tuple[str, KvcError]]:
    """Carry out every instance's preparation, each under its lock; the failures, in order."""
    failures: list[tuple[str, KvcError]] = []
    kernel = plan.kernel.release
    for step in plan.steps:
        try:
            if step.error is not None or step.instance is None or step.build is None:
                raise step.error or KvcError(f"{step.name} could not be planned")
            with images_locked(host.layout, step.name):
                say(f"{step.name}: {execute_build(step.build, host.runtime)}")
                verified_before = step.verified_before or (
                    _passed_before(host, step.instance, kernel) if step.verify else ""
                )
                if verified_before:
                    say(f"{step.name}: verified on {kernel} {verified_before} (this image); not repeated")
                elif step.verify:
                    _verify(host, step.instance, kernel, say)
                if step.deliver:
                    _deliver(host, step.instance, kernel, say)
                elif step.deliver_at_boot:
                    say(f"{step.name}: {step.deliver_note(kernel)}")
        except BuildSkipped as exc:
            if step.instance is not None:
                record_skip(host.layout, step.instance, kernel, exc.reason)
            say(f"{step.name}: {exc.brief}")
        except KvcError as exc:
            failures.append((step.name, exc))
            for line in _failure_lines(step.name, exc):
                say(line)
    return failures


def kernel_added_error(kernel: str, failures: list[tuple[str, KvcError]], report: GateReport) -> Optional[KvcError]:
    """What kernel-added exits with: the first failed instance's code, else the gate's refusal."""
    if failures:
        names = ", ".join(name for name, _ in failures)
        error = KvcError(
            f"{len(failures)} enabled instance(s) could not be prepared for kernel {kernel}: {names}",
            hint="see the lines above; 'kvc check --next-boot' tells what is still missing before a reboot",
        )
        error.exit_code = failures[0][1].exit_code
        return error
    return report.error()
