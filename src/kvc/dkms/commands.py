"""``kvc dkms import`` (a DKMS source becomes an instance bundle) and ``kvc dkms status`` (the
instances as ``dkms status`` shows modules: ``NAME/VERSION, KVER, ARCH: STATE``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from kvc.commands import Context, instance_status, say, status_kernels
from kvc.config import InstanceConfig
from kvc.dkms.bundle import execute_import, plan_import
from kvc.dkms.source import locate
from kvc.skiprecord import recorded_skip


def _import(ctx: Context, args: argparse.Namespace) -> int:
    kernels = list(dict.fromkeys(ctx.kernel_release(k) for k in (args.kernel or [None])))
    with tempfile.TemporaryDirectory(prefix="kvc-dkms-source-") as scratch:
        source = locate(args.source, scratch)
        plan = plan_import(
            ctx.runtime, source, kernels, name=args.name or "", output=args.output or "", base_image=args.base_image
        )
        for line in plan.describe():
            say(line)
        for warning in plan.warnings:
            sys.stderr.write(f"kvc: warning: {plan.package}/{plan.version}: {warning}\n")
        if not args.dry_run:
            say(execute_import(plan))
    return 0


def dkms_state(entry: dict[str, Any]) -> str:
    """The furthest an instance got on one kernel, in DKMS's spirit: built < verified < loaded."""
    modules = entry["modules"]
    if modules and all(module["loaded"] for module in modules):
        return "loaded"
    verification = entry["verification"]
    if verification and verification["status"] == "verified" and verification["current"]:
        return "verified"
    return "built"


def status_lines(ctx: Context, instance: InstanceConfig, kernels: list[str]) -> list[str]:
    package = instance.dkms or f"{instance.name}/{instance.software_version}"
    suffix = "" if package.split("/", 1)[0] == instance.name else f" (instance {instance.name})"
    lines = []
    for entry in instance_status(ctx, instance, kernels)["kernels"]:
        if not entry["image"]["exists"]:
            skipped = recorded_skip(ctx.layout, instance, entry["kernel"])
            if skipped:
                lines.append(f"{package}, {entry['kernel']}, {os.uname().machine}: skipped ({skipped}){suffix}")
            continue
        outdated = "" if entry["image"]["up_to_date"] else " (image outdated: rebuild)"
        lines.append(f"{package}, {entry['kernel']}, {os.uname().machine}: {dkms_state(entry)}{outdated}{suffix}")
    return lines or [f"{package}: added{suffix}"]


def _status(ctx: Context, args: argparse.Namespace) -> int:
    names = args.names or [name for name in ctx.instance_names() if ctx.instance(name).dkms]
    for name in names:
        instance = ctx.instance(name)
        for line in status_lines(ctx, instance, status_kernels(ctx, instance, args.kernel)):
            say(line)
    return 0


def cmd_dkms(ctx: Context, args: argparse.Namespace) -> int:
    if args.dkms_command == "import":
        return _import(ctx, args)
    return _status(ctx, args)
