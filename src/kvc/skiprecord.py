"""The record of a kernel the build declined (a DKMS source's ``BUILD_EXCLUSIVE_*``, exit 77),
per instance and kernel: the reboot gate, the unit and status then know the instance has
nothing for that kernel, as DKMS would. Its own module: the boot path's load reads it (it is
almost always absent) without importing the build."""

from __future__ import annotations

import json
import time

from kvc.atomic import write_json
from kvc.config import InstanceConfig
from kvc.layout import Layout


def record_skip(layout: Layout, instance: InstanceConfig, kernel_release: str, reason: str) -> None:
    """Remember that the build declined the kernel, for these build inputs."""
    from kvc.build import context_digest

    data = {"reason": reason, "digest": context_digest(instance, kernel_release), "at": int(time.time())}
    write_json(layout.skip_record(instance.name, kernel_release), data)


def recorded_skip(layout: Layout, instance: InstanceConfig, kernel_release: str) -> str:
    """Why the build declined the kernel, when it did with the current build inputs ("" otherwise)."""
    try:
        with open(layout.skip_record(instance.name, kernel_release), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return ""
    if not isinstance(data, dict):
        return ""
    from kvc.build import context_digest  # only when there is a record

    return str(data.get("reason", "")) if data.get("digest") == context_digest(instance, kernel_release) else ""
