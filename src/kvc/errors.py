"""The framework's errors. Each carries a one-line brief, optional details (e.g. a log tail) and a
hint saying what to do; its class fixes the process exit status (documented in README.md)."""

from __future__ import annotations

from typing import Sequence


class KvcError(Exception):
    """Base of every error the framework raises on purpose."""

    exit_code = 1

    def __init__(self, brief: str, *, details: str = "", hint: str = "") -> None:
        super().__init__(brief)
        self.brief = brief
        self.details = details
        self.hint = hint


class UsageError(KvcError):
    exit_code = 2


class ConfigError(KvcError):
    """An instance or global configuration file is missing or malformed."""

    exit_code = 3


class CommandError(KvcError):
    """An external program (podman, docker, buildah, systemctl, qemu) failed."""

    exit_code = 4

    def __init__(self, argv: Sequence[str], returncode: int, output_tail: str, *, hint: str = "") -> None:
        program = argv[0] if argv else "?"
        super().__init__(f"{program} exited with status {returncode}", details=output_tail, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.output_tail = output_tail


class MissingProgramError(KvcError):
    """A program kvc needs is not installed (or not usable)."""

    exit_code = 4


class CommandTimeout(CommandError):
    """An external program did not finish in time (it has been killed)."""


class BuildError(KvcError):
    """A module image could not be built, or was built without the modules it must contain."""

    exit_code = 4


class LoadError(KvcError):
    """Modules were refused by preflight or by the kernel; nothing this run loaded stays loaded."""

    exit_code = 5


class StateError(KvcError):
    """The instance is not in a state the action needs (not built, not extracted, locked, held)."""

    exit_code = 6


class KernelMissingError(KvcError):
    """The files of the kernel to verify against (vmlinuz and its module tree) cannot be found."""

    exit_code = 7


class SmokeTestError(KvcError):
    """The modules loaded, but the instance's smoke test failed."""

    exit_code = 8


class GuestError(KvcError):
    """The verification VM crashed or did not finish in time."""

    exit_code = 9
