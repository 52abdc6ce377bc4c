"""Errors raised by kvc.kmod: each carries a one-line brief, optional details and a hint."""

from __future__ import annotations


class KmodError(Exception):
    """Base of every error kvc.kmod raises on purpose."""

    def __init__(self, brief: str, *, details: str = "", hint: str = "") -> None:
        super().__init__(brief)
        self.brief = brief
        self.details = details
        self.hint = hint


class ModuleFormatError(KmodError):
    """A module file (ELF, compression, signature) is malformed.

    ``errno`` is the errno kmod reports for the same problem (ENOEXEC for "not an ELF file",
    EINVAL for a corrupt one), so the tools can print kmod's message.
    """

    def __init__(self, path: str, problem: str, *, errno: int = 22) -> None:
        super().__init__(
            f"{path}: {problem}",
            hint="the file is not a valid kernel module; rebuild or re-download it",
        )
        self.path = path
        self.problem = problem
        self.errno = errno


class IndexFormatError(KmodError):
    """A modules.*.bin index or text index file is malformed."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}", hint="regenerate the indexes with depmod")
        self.path = path
        self.problem = problem
