"""The framework's errors and exit codes. Each error carries a one-line brief, optional details
(e.g. a log tail) and a hint saying what to do; its class fixes the process exit status, from the
one :class:`ExitCode` table (documented in README.md and in ``kvc --help``'s module docstring)."""

from __future__ import annotations

import enum
from typing import Sequence


class ExitCode(enum.IntEnum):
    """What every framework command (and ``kvc verify``'s report) exits with."""

    SUCCESS = 0
    FAILURE = 1  # anything else that went wrong
    USAGE = 2  # unknown command, flag or argument
    CONFIG = 3  # a conf file is missing or malformed, or names something it must not
    EXTERNAL = 4  # container runtime, build, systemctl, qemu: failed or missing
    REFUSED = 5  # modules refused (preflight or kernel), or not unloadable
    STATE = 6  # not built, not installed, in use, another kernel
    KERNEL_MISSING = 7  # the kernel (its files, or the fake kernel) cannot be found
    SMOKE_FAILED = 8
    GUEST_FAILED = 9  # the verification guest crashed, timed out, or kvc's guest side failed
    HOST_FILES = 10  # a host file cannot be written or read: permissions, no space, read-only
    BUSY = 11  # another kvc run held the instance's lock longer than kvc waits (KVC_LOCK_TIMEOUT)
    SKIPPED = 77  # kvc build: every kernel asked for is outside a DKMS source's BUILD_EXCLUSIVE_* (as DKMS exits)
    INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class KvcError(Exception):
    """Base of every error the framework raises on purpose."""

    exit_code = ExitCode.FAILURE

    def __init__(self, brief: str, *, details: str = "", hint: str = "") -> None:
        super().__init__(brief)
        self.brief = brief
        self.details = details
        self.hint = hint


class UsageError(KvcError):
    exit_code = ExitCode.USAGE


class ConfigError(KvcError):
    """An instance or global configuration file is missing or malformed."""

    exit_code = ExitCode.CONFIG


class CommandError(KvcError):
    """An external program (podman, docker, buildah, systemctl, qemu) failed."""

    exit_code = ExitCode.EXTERNAL

    def __init__(self, argv: Sequence[str], returncode: int, output_tail: str, *, hint: str = "") -> None:
        program = argv[0] if argv else "?"
        super().__init__(f"{program} exited with status {returncode}", details=output_tail, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.output_tail = output_tail


class MissingProgramError(KvcError):
    """A program kvc needs is not installed (or not usable)."""

    exit_code = ExitCode.EXTERNAL


class CommandTimeout(CommandError):
    """An external program did not finish in time (it has been killed)."""


class BuildError(KvcError):
    """A module image could not be built, or was built without the modules it must contain."""

    exit_code = ExitCode.EXTERNAL


class BuildSkipped(BuildError):
    """The build declined the kernel: it is outside a DKMS source's BUILD_EXCLUSIVE_* directives."""

    exit_code = ExitCode.SKIPPED

    def __init__(self, kernel_release: str, reason: str, *, hint: str = "") -> None:
        super().__init__(f"skipped {kernel_release}: {reason}", hint=hint)
        self.kernel_release = kernel_release
        self.reason = reason


class LoadError(KvcError):
    """Modules were refused by preflight or by the kernel; nothing this run loaded stays loaded."""

    exit_code = ExitCode.REFUSED


class StateError(KvcError):
    """The instance is not in a state the action needs (not built, not extracted, held)."""

    exit_code = ExitCode.STATE


class BusyError(KvcError):
    """Another kvc run held a lock this command needs for longer than it waits (it stopped there)."""

    exit_code = ExitCode.BUSY


class KernelMissingError(KvcError):
    """The files of the kernel to verify against (vmlinuz and its module tree) cannot be found."""

    exit_code = ExitCode.KERNEL_MISSING


class SmokeTestError(KvcError):
    """The modules loaded, but the instance's smoke test failed."""

    exit_code = ExitCode.SMOKE_FAILED


class GuestError(KvcError):
    """The verification VM crashed or did not finish in time."""

    exit_code = ExitCode.GUEST_FAILED


class HostFileError(KvcError):
    """The host refused a file operation (permissions, no space, read-only file system)."""

    exit_code = ExitCode.HOST_FILES
