"""A recording fake podman/docker/buildah on PATH (``FakeRuntime`` and its ``fake`` fixture), and
small module and image-metadata builders; shared by the runtime, build and extract tests."""

from __future__ import annotations

import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import pytest

from support import fakeprog
from support.elfbuild import ElfSpec, SymbolSpec, build, modinfo_section, this_module_section

KVER = "6.1.0-56-amd64"


# Answers `cp CONTAINER:PATH DEST` from a directory standing for the image (what fakeprog's rules
# cannot do: they only print); `create` prints a container id; everything else succeeds silently.
CP_HELPER = """#!{python} -IS
import os, shutil, sys
ROOT = {root!r}
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
if args and args[0] == "create":
    print("c0ffee")
elif args and args[0] == "cp":
    path = args[1].split(":", 1)[1]
    source = os.path.join(ROOT, path.lstrip("/").rstrip("."))
    if os.path.isdir(source):
        shutil.copytree(source, args[2], symlinks=True)
    elif os.path.isfile(source):
        shutil.copyfile(source, args[2])
    else:
        sys.stderr.write("Error: " + path + ": no such file or directory\\n")
        sys.exit(125)
"""


def module_bytes(name: str, vermagic: str, depends: str = "") -> bytes:
    """A small ELF object shaped like a kernel module (modinfo with vermagic, this_module)."""
    spec = ElfSpec(symbols=[SymbolSpec("_printk")])
    entries = [("vermagic", vermagic), ("license", "GPL"), ("depends", depends)]
    spec.add(".modinfo", modinfo_section(entries))
    spec.add(".gnu.linkonce.this_module", this_module_section(name.replace("-", "_")))
    return build(spec)


def inspect_entry(
    image_id: str, names: Sequence[str], labels: Mapping[str, str], created: str = "2026-11-24T10:00:00.123456789Z"
) -> dict[str, object]:
    """One element of podman's `image inspect` JSON."""
    return {"Id": image_id, "RepoTags": list(names), "Names": list(names), "Labels": dict(labels), "Created": created}


@dataclass
class FakeRuntime:
    """A fake podman (and docker/buildah) on PATH that logs its calls; ``root`` is a directory
    standing for the image's file system, served through `image mount` (or `cp`, see CP_HELPER)."""

    tmp: Path
    bin: Path
    log: Path
    root: Path
    rules: list[fakeprog.RuleSpec] = field(default_factory=list)

    def files(self, files: Mapping[str, bytes]) -> None:
        for path, data in files.items():
            target = self.root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def install(
        self,
        rules: Sequence[fakeprog.RuleSpec] = (),
        *,
        mount: bool = True,
        program: str = "podman",
        default_code: int = 0,
    ) -> None:
        """The fake answers ``rules`` first; then `image mount` (the image root, or a rootless
        refusal with ``mount=False``); `cp`/`create` go to CP_HELPER."""
        helper = self.tmp / "cp-helper"
        helper.write_text(CP_HELPER.format(python=sys.executable, root=str(self.root)))
        helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
        standard: list[fakeprog.RuleSpec] = [
            (["image", "mount"], f"{self.root}\n", 0)
            if mount
            else fakeprog.Rule(
                ["image", "mount"], "", 125, 'Error: cannot run command "podman image mount" in rootless mode\n'
            ),
            (["image", "unmount"], "", 0),
        ]
        fakeprog.install(
            self.bin,
            program,
            self.log,
            rules=[*rules, *standard],
            real=str(helper) if default_code == 0 else None,
            default_code=default_code,
        )

    def calls(self, program: Optional[str] = None) -> list[list[str]]:
        return fakeprog.calls(self.log, program)

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRuntime]:
    runtime = FakeRuntime(tmp_path, tmp_path / "bin", tmp_path / "calls.jsonl", tmp_path / "image")
    runtime.root.mkdir()
    monkeypatch.setenv("PATH", fakeprog.path_with(runtime.bin))
    yield runtime
