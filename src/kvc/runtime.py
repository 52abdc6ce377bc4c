"""Container runtimes behind one interface: podman (default), docker, and buildah (builds with
buildah, everything else with podman, which share containers-storage). Every call goes through
:func:`kvc.proc.run`."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from kvc import proc
from kvc.config import GlobalConfig
from kvc.errors import CommandError


@dataclass(frozen=True)
class ImageInfo:
    id: str
    names: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    created: str = ""


def _image_info(data: Mapping[str, object]) -> ImageInfo:
    config = data.get("Config")
    labels = data.get("Labels") or (config.get("Labels") if isinstance(config, dict) else None) or {}
    names = data.get("RepoTags") or data.get("Names") or []
    return ImageInfo(
        id=str(data.get("Id", "")).removeprefix("sha256:"),
        names=tuple(str(name) for name in names) if isinstance(names, list) else (),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        created=str(data.get("Created", "")),
    )


def same_image_name(a: str, b: str) -> bool:
    """podman stores local builds as ``localhost/NAME:TAG``; both spellings name one image."""
    return a.removeprefix("localhost/") == b.removeprefix("localhost/")


class ContainerRuntime:
    """The podman/docker command line; subclasses adjust what differs."""

    name = "podman"

    def __init__(self, program: str = "podman", global_args: Sequence[str] = ()) -> None:
        self.program = program
        self.global_args = tuple(global_args)

    def argv(self, *args: str) -> list[str]:
        return [self.program, *self.global_args, *args]

    def build(self, context: str, build_file: str, tag: str, build_args: Mapping[str, str],
              labels: Mapping[str, str], *, no_cache: bool = False) -> None:
        args = ["build", "-t", tag, "--file", build_file]
        args += [f"--label={key}={value}" for key, value in labels.items()]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        if no_cache:
            args.append("--no-cache")
        proc.run(self.argv(*args, context), hint="the last lines of the build output are shown above")

    def inspect(self, ref: str) -> Optional[ImageInfo]:
        result = proc.run(self.argv("image", "inspect", ref), check=False)
        if result.returncode != 0:
            return None
        return self._parse_inspect(result.stdout)[0]

    def inspect_many(self, refs: Sequence[str]) -> list[ImageInfo]:
        if not refs:
            return []
        return self._parse_inspect(proc.run(self.argv("image", "inspect", *refs)).stdout)

    @staticmethod
    def _parse_inspect(text: str) -> list[ImageInfo]:
        try:
            data = json.loads(text)
        except ValueError:
            raise CommandError(["image", "inspect"], 0, text[-500:], hint="unexpected output") from None
        return [_image_info(item) for item in data if isinstance(item, dict)]

    def image_exists(self, ref: str) -> bool:
        return self.inspect(ref) is not None

    def list_images(self, label: str) -> list[ImageInfo]:
        """Images carrying ``label`` (``key=value``)."""
        ids = proc.run(self.argv("images", "-q", "--no-trunc", "--filter", f"label={label}")).stdout.split()
        return self.inspect_many(sorted(set(ids)))

    def remove(self, ref: str, *, force: bool = False) -> None:
        proc.run(self.argv("rmi", *(["-f"] if force else []), ref))

    def tag(self, source: str, target: str) -> None:
        proc.run(self.argv("tag", source, target))

    def pull(self, ref: str) -> None:
        proc.run(self.argv("pull", ref), hint="check the image reference and that the registry is reachable")

    def run(self, image: str, command: Sequence[str], *, privileged: bool = False, host_network: bool = False,
            interactive: bool = True, mounts: Sequence[tuple[str, str]] = ()) -> int:
        """Run ``command`` in a throwaway container sharing our stdio; returns its exit status.
        ``-t`` only when stdin is a terminal, so pipes and systemd units work."""
        args = ["run", "--rm"]
        if interactive:
            args.append("-i")
        if sys.stdin is not None and sys.stdin.isatty():
            args.append("-t")
        if privileged:
            args.append("--privileged")
        if host_network:
            args.append("--network=host")
        for source, target in mounts:
            args += ["-v", f"{source}:{target}"]
        return proc.run(self.argv(*args, image, *command), check=False, capture=False).returncode

    def list_files(self, image: str, directory: str) -> list[str]:
        """Files below ``directory`` in the image (paths inside the image)."""
        result = proc.run(self.argv("run", "--rm", "--network=none", "--entrypoint", "find", image, directory,
                                    "-type", "f"), check=False)
        if result.returncode != 0:
            return []
        return [line for line in result.stdout.splitlines() if line.startswith(directory)]

    def copy_out(self, image: str, paths: Sequence[str], destination: str) -> None:
        """Copy files out of an image (without running it) into ``destination``, by basename."""
        container = proc.run(self.argv("create", image, "true")).stdout.strip()
        try:
            for path in paths:
                proc.run(self.argv("cp", f"{container}:{path}", os.path.join(destination, os.path.basename(path))))
        finally:
            proc.run(self.argv("rm", "-f", container), check=False)


class PodmanRuntime(ContainerRuntime):
    name = "podman"

    def copy_out(self, image: str, paths: Sequence[str], destination: str) -> None:
        """``podman image mount`` needs no container (rootful); else create + cp."""
        mounted = proc.run(self.argv("image", "mount", image), check=False)
        mountpoint = mounted.stdout.strip()
        if mounted.returncode != 0 or not os.path.isdir(mountpoint):
            super().copy_out(image, paths, destination)
            return
        try:
            for path in paths:
                shutil.copyfile(os.path.join(mountpoint, path.lstrip("/")),
                                os.path.join(destination, os.path.basename(path)))
        finally:
            proc.run(self.argv("image", "unmount", image), check=False)


class DockerRuntime(ContainerRuntime):
    name = "docker"

    def __init__(self, program: str = "docker", global_args: Sequence[str] = ()) -> None:
        super().__init__(program, global_args)


class BuildahRuntime(PodmanRuntime):
    """Builds with ``buildah bud``; runs, inspects and copies with podman (shared storage)."""

    name = "buildah"

    def __init__(self, program: str = "podman", global_args: Sequence[str] = (), builder: str = "buildah") -> None:
        super().__init__(program, global_args)
        self.builder = builder

    def build(self, context: str, build_file: str, tag: str, build_args: Mapping[str, str],
              labels: Mapping[str, str], *, no_cache: bool = False) -> None:
        args = [self.builder, "bud", "-t", tag, "-f", build_file]
        args += [f"--label={key}={value}" for key, value in labels.items()]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        if no_cache:
            args.append("--no-cache")
        proc.run([*args, context], hint="the last lines of the build output are shown above")


def runtime_for(config: GlobalConfig) -> ContainerRuntime:
    if config.runtime == "docker":
        return DockerRuntime(global_args=config.runtime_args)
    if config.runtime == "buildah":
        return BuildahRuntime(global_args=config.runtime_args)
    return PodmanRuntime(global_args=config.runtime_args)
