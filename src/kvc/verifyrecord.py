"""The record of an instance's last ``kvc verify`` on each kernel (``kvc.verify.run`` writes it) and the
verification an image's label carries: what ``kvc status``, the reboot gate and ``kvc push`` read,
without importing the verification machinery (qemu, the initramfs, the guest)."""

from __future__ import annotations

import enum
import json
from typing import Any, Mapping, Optional

from kvc.errors import ExitCode
from kvc.layout import Layout

REPORT_SCHEMA = 1
LABEL_VERIFICATION = "kvc.verification"


class VerifyStatus(enum.Enum):
    """A verification's outcome; the value is what the JSON report and the record say."""

    VERIFIED = "verified"
    LOAD_REFUSED = "load-refused"
    UNLOAD_FAILED = "unload-failed"
    SMOKE_FAILED = "smoke-failed"
    CRASHED = "crashed"
    TIMED_OUT = "timed-out"
    GUEST_FAILED = "guest-failed"

    @property
    def exit_code(self) -> ExitCode:
        return _STATUS_EXIT[self]

    @property
    def summary(self) -> str:
        """The report's last line, for people."""
        return _STATUS_SUMMARY[self]


_STATUS_EXIT = {
    VerifyStatus.VERIFIED: ExitCode.SUCCESS,
    VerifyStatus.LOAD_REFUSED: ExitCode.REFUSED,
    VerifyStatus.UNLOAD_FAILED: ExitCode.REFUSED,
    VerifyStatus.SMOKE_FAILED: ExitCode.SMOKE_FAILED,
    VerifyStatus.CRASHED: ExitCode.GUEST_FAILED,
    VerifyStatus.TIMED_OUT: ExitCode.GUEST_FAILED,
    VerifyStatus.GUEST_FAILED: ExitCode.GUEST_FAILED,
}
_STATUS_VALUES = frozenset(status.value for status in VerifyStatus)
_STATUS_SUMMARY = {
    VerifyStatus.VERIFIED: "VERIFIED",
    VerifyStatus.LOAD_REFUSED: "FAILED: the kernel refused a module",
    VerifyStatus.UNLOAD_FAILED: "FAILED: a module did not unload",
    VerifyStatus.SMOKE_FAILED: "FAILED: the smoke test failed",
    VerifyStatus.CRASHED: "FAILED: the guest kernel crashed",
    VerifyStatus.TIMED_OUT: "FAILED: the guest timed out",
    VerifyStatus.GUEST_FAILED: "FAILED: kvc's guest setup or agent failed (see its lines above)",
}


def read_verify_record(layout: Layout, name: str, kernel_release: str) -> Optional[dict[str, Any]]:
    """The last verification's outcome, or None when there was none (or it is unreadable)."""
    try:
        with open(layout.verify_record(name, kernel_release), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA or data.get("status") not in _STATUS_VALUES:
        return None
    return data


def verification_of(layout: Layout, name: str, kernel: str, image_id: Optional[str]) -> Optional[dict[str, Any]]:
    """The last ``kvc verify`` of the instance on the kernel, and whether it was of ``image_id``."""
    record = read_verify_record(layout, name, kernel)
    if record is None:
        return None
    return {
        "status": record["status"],
        "at": record.get("at"),
        "image_id": record.get("image_id"),
        "current": image_id is not None and record.get("image_id") == image_id,
    }


def published_verification(labels: Mapping[str, str]) -> Optional[dict[str, Any]]:
    """The verification a pushed or exported image carries (its ``kvc.verification`` label), if any."""
    try:
        value = json.loads(labels[LABEL_VERIFICATION]) if labels.get(LABEL_VERIFICATION) else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
