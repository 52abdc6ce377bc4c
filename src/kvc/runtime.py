"""Container runtimes behind one interface.

:class:`ContainerRuntime` is what the rest of kvc uses; one adapter per program implements it:

* :class:`PodmanRuntime` (the default),
* :class:`DockerRuntime`,
* :class:`BuildahRuntime`: builds with ``buildah bud``, everything else with podman (both use
  containers-storage, so what buildah builds podman sees).

Every call goes through :func:`kvc.proc.run` with the global ``runtime_args`` (``KVC_RUNTIME_ARGS``)
placed right after the program name. A failing call raises :class:`~kvc.errors.CommandError` with
the command, the last lines of its output and a hint chosen from that output (cannot connect,
no such image, not root, disk full, a host that needs the podman drop-in).

Image names: podman stores a local build of ``NAME-VERSION:KVER`` as
``localhost/NAME-VERSION:KVER``; every method accepts either spelling, and :func:`same_image_name`
compares names that way.

Files are read out of an image without running anything in it when possible: ``podman image
mount`` (rootful podman) gives the image's root directory; otherwise a container is created (not
started), ``cp`` copies out of it, and it is removed. Listing a directory without a mount runs
``find`` in a throw-away container (no network), and falls back to copying the directory out when
the image has no ``find`` (e.g. ``FROM scratch`` images).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import json
import os
import posixpath
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from kvc import proc
from kvc.config import GlobalConfig
from kvc.errors import BuildError, CommandError

PULL_POLICIES = ("always", "missing", "never", "newer")

BuildArgs = Union[Mapping[str, str], Sequence[Tuple[str, str]]]


class Mount(NamedTuple):
    """A host path bind-mounted into a container."""

    source: str
    target: str
    read_only: bool = False


MountSpec = Union[Mount, Tuple[str, str]]


# ---- image references and metadata --------------------------------------------------------------


def normalize_ref(ref: str) -> str:
    """An image reference in a form fit for comparison: ``localhost/`` (podman's prefix for local
    images) and the default domain ``docker.io/[library/]`` dropped, ``:latest`` added when the
    reference has neither tag nor digest. The default domain is part of the reference grammar
    docker applies to short names (podman reports the names it expanded that way), not a mirror."""
    name = ref.strip()
    for prefix in ("localhost/", "docker.io/", "index.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            if prefix != "localhost/" and name.startswith("library/"):
                name = name[len("library/") :]
            break
    if "@" not in name and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def same_image_name(a: str, b: str) -> bool:
    """Whether two references name the same image (``localhost/x:1`` and ``x:1`` do)."""
    return normalize_ref(a) == normalize_ref(b)


_CREATED = re.compile(r"(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:\.(\d+))?)?)?\s*(Z|[+-]\d\d:?\d\d)?")


def parse_created(text: str) -> float:
    """Seconds since the epoch for an image's creation time as podman or docker print it
    (RFC 3339 with up to nanoseconds, or a bare epoch number); 0.0 when it cannot be read."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    match = _CREATED.match(text)
    if not match:
        return 0.0
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    from datetime import datetime, timezone  # here: the boot path reads no creation time

    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0), tzinfo=timezone.utc
        )
    except ValueError:
        return 0.0
    offset = 0
    if zone and zone != "Z":
        digits = zone[1:].replace(":", "")
        offset = (int(digits[:2]) * 60 + int(digits[2:])) * 60 * (1 if zone[0] == "+" else -1)
    return moment.timestamp() - offset + (float("0." + fraction) if fraction else 0.0)


@dataclass(frozen=True)
class ImageInfo:
    """What kvc needs to know about one local image."""

    id: str  # full hex id, without "sha256:"
    names: tuple[str, ...]  # the tags, as the runtime spells them (podman: localhost/NAME:TAG)
    labels: Mapping[str, str] = field(default_factory=dict)
    created: str = ""  # as the runtime printed it; see created_epoch
    architecture: str = ""  # the OCI config's (amd64, arm64), where the runtime's listing shows it

    @property
    def created_epoch(self) -> float:
        return parse_created(self.created)

    @property
    def dangling(self) -> bool:
        return not self.names

    def has_name(self, ref: str) -> bool:
        return any(same_image_name(name, ref) for name in self.names)


def _image_info(data: Mapping[str, object]) -> ImageInfo:
    config = data.get("Config")
    labels = data.get("Labels") or (config.get("Labels") if isinstance(config, dict) else None) or {}
    names = data.get("RepoTags") or data.get("Names") or []
    image_id = str(data.get("Id", ""))
    return ImageInfo(
        id=image_id[len("sha256:") :] if image_id.startswith("sha256:") else image_id,
        names=tuple(str(name) for name in names if str(name) != "<none>:<none>") if isinstance(names, list) else (),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        created=str(data.get("Created", "")),
        architecture=str(data.get("Architecture", "")),
    )


# ---- errors and hints ------------------------------------------------------------------------------

_NOT_FOUND = ("image not known", "no such image", "no such object", "image unknown", "not found in local storage")


LISTING_ATTEMPTS = 5


def _is_not_found(output: str) -> bool:
    low = output.lower()
    return any(marker in low for marker in _NOT_FOUND)


# containers/storage, when an image lost a part (its writer was killed half-way): every listing fails.
_DAMAGED_IMAGE = re.compile(r'for image with ID "([0-9a-f]{64})" \(consider removing the image')


def hint_for(program: str, output: str) -> str:
    """A hint for a failed runtime command, from its output ("" when nothing specific applies)."""
    damaged = _DAMAGED_IMAGE.search(output)
    if damaged:
        return (
            f"{program}'s storage holds a damaged image {damaged.group(1)[:12]} (a write of it was killed "
            f"half-way): remove it with '{program} rmi -f {damaged.group(1)}', then run the command again"
        )
    low = output.lower()
    if (
        "cannot connect" in low
        or "is the docker daemon running" in low
        or ("connection refused" in low and ".sock" in low)
    ):
        return (
            f"{program} cannot reach its service: start it (e.g. 'systemctl start {program}' or its socket), "
            "or check KVC_RUNTIME_ARGS in /etc/kvc/kmods-via-containers.conf"
        )
    if _is_not_found(output):
        return "no such image: build it first ('kvc build NAME --kernel KVER') or check the image reference"
    if "cgroups in hybrid mode not supported" in low or "rlimit" in low:
        return (
            f"{program} cannot start containers on this host with its defaults: use runc and pinned ulimits "
            "(a containers.conf drop-in; see scripts/setup-podman.sh)"
        )
    if "permission denied" in low or "operation not permitted" in low or "rootless" in low:
        return "kvc uses rootful containers: run it as root"
    if "no space left on device" in low:
        return "free disk space where the runtime keeps its images (/var/lib/containers or /var/lib/docker)"
    if "requested access to the resource is denied" in low or "unauthorized" in low or "authentication required" in low:
        return f"log in to the registry first ('{program} login REGISTRY') or check the image reference"
    if "manifest unknown" in low or "name unknown" in low:
        return "the registry has no such image or tag: check the reference (KVC_IMAGE) and the kernel release"
    if (
        "pinging container registry" in low
        or "dial tcp" in low
        or "no such host" in low
        or "i/o timeout" in low
        or "temporary failure in name resolution" in low
    ):
        return "the registry could not be reached: check the network, proxy and DNS settings"
    return ""


class BuildCommandError(CommandError):
    """A failed image build; ``output`` holds everything it printed. Its tail is the error's
    details unless the output was ``shown`` as it ran (it is on the screen already)."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str, *, shown: bool, hint: str = "") -> None:
        super().__init__(argv, returncode, "" if shown else proc.tail(output, 40), hint=hint)
        self.output = output


def _failure(result: proc.Completed, hint: str) -> CommandError:
    """The error for a failed call made with ``check=False`` (logged once, like proc.run does)."""
    output = result.stdout + result.stderr
    proc.log_failure(result.argv, result.returncode)
    return CommandError(
        result.argv, result.returncode, proc.tail(output), hint=hint_for(result.argv[0], output) or hint
    )


# ---- file access inside images ---------------------------------------------------------------------

_MAX_SYMLINKS = 40


def resolve_in_root(root: str, path: str) -> str:
    """The host path of image path ``path`` in an image mounted at ``root``, following symlinks as
    the image would see them: absolute targets restart at ``root`` and ``..`` stops there, so no
    link in the image can point outside it. The last component need not exist."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if not stat.S_ISLNK(info.st_mode):
            resolved.append(part)
            continue
        hops += 1
        if hops > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    return os.path.join(root, *resolved)


class ImageFiles(abc.ABC):
    """Read access to one image's files, open for a ``with`` block (see ContainerRuntime.open_image)."""

    via = ""  # "mount" or "container"
    root: Optional[str] = None  # the image's root directory on the host, while open, when mounted

    @abc.abstractmethod
    def list(self, directory: str) -> list[str]:
        """Regular files below ``directory`` (image paths, sorted); [] when it does not exist."""

    @abc.abstractmethod
    def copy(self, paths: Sequence[str], destination: str) -> dict[str, str]:
        """Copy the image files ``paths`` into the existing directory ``destination``, each under its
        basename; returns {image path: local path}. Symlinks are followed inside the image; what is
        not a regular file is refused."""


def _local_names(paths: Sequence[str], destination: str) -> dict[str, str]:
    targets: dict[str, str] = {}
    seen: dict[str, str] = {}
    for path in paths:
        base = posixpath.basename(path)
        if not base or base in (".", ".."):
            raise ValueError(f"not a file path: {path!r}")
        if base in seen and seen[base] != path:
            raise ValueError(f"two files named {base} to copy: {seen[base]} and {path}")
        seen[base] = path
        targets[path] = os.path.join(destination, base)
    return targets


def _not_a_file(image: str, path: str, what: str) -> BuildError:
    return BuildError(
        f"{path} in image {image} {what}",
        hint="module files in the image must be regular files (symlinks are followed inside the image)",
    )


class DirectoryFiles(ImageFiles):
    """An image's files in a directory on the host: an image mounted (``podman image mount``, or
    by someone else) or copied there. Symlinks are followed as the image would see them."""

    via = "mount"

    def __init__(self, root: str, image: str = "") -> None:
        self.top = root
        self.root = root
        self.image = image or root

    def host_path(self, path: str) -> str:
        """Where the image path ``path`` lies on the host (links resolved inside the image)."""
        return resolve_in_root(self.top, path)

    def list(self, directory: str) -> list[str]:
        top = resolve_in_root(self.top, directory)
        if not os.path.isdir(top):
            return []
        base = posixpath.normpath("/" + directory.strip("/"))
        found = []
        for current, dirs, files in os.walk(top):
            dirs.sort()
            relative = os.path.relpath(current, top)
            for name in files:
                if stat.S_ISREG(os.lstat(os.path.join(current, name)).st_mode):
                    found.append(posixpath.normpath(posixpath.join(base, relative, name)))
        return sorted(found)

    def copy(self, paths: Sequence[str], destination: str) -> dict[str, str]:
        targets = _local_names(paths, destination)
        for path, target in targets.items():
            source = resolve_in_root(self.top, path)
            try:
                info = os.lstat(source)
            except FileNotFoundError:
                raise _not_a_file(self.image, path, "does not exist") from None
            if not stat.S_ISREG(info.st_mode):
                raise _not_a_file(self.image, path, "is not a regular file")
            shutil.copyfile(source, target, follow_symlinks=False)
        return targets


class _ContainerImage(ImageFiles):
    """Files through a created (never started) container: ``cp`` out of it; listing runs ``find``."""

    via = "container"

    def __init__(self, runtime: CliRuntime, image: str) -> None:
        self.runtime = runtime
        self.image = image
        self.container = ""

    def _ensure_container(self) -> str:
        if not self.container:
            # The command is never run; images FROM scratch have none, and create insists on one.
            created = self.runtime.call("create", "--pull=never", self.image, "/kvc-copy-out")
            self.container = created.stdout.strip().splitlines()[-1].strip()
        return self.container

    def close(self) -> None:
        if self.container:
            self.runtime.call("rm", "-f", self.container, check=False)
            self.container = ""

    def list(self, directory: str) -> list[str]:
        base = posixpath.normpath("/" + directory.strip("/"))
        # The trailing "/" makes find follow a symlinked start directory.
        result = self.runtime.call(
            "run",
            "--rm",
            "--pull=never",
            "--network=none",
            "--entrypoint",
            "find",
            self.image,
            base.rstrip("/") + "/",
            "-type",
            "f",
            check=False,
        )
        if result.returncode == 0:
            return sorted({posixpath.normpath(line) for line in result.stdout.splitlines() if line.startswith(base)})
        if (
            result.returncode == 1
            and "No such file or directory" in result.stderr
            and result.stderr.lstrip().startswith("find:")
        ):
            return []
        output = result.stdout + result.stderr
        if result.returncode not in (126, 127) and "executable file not found" not in output:
            raise _failure(result, "listing files in the image failed")
        # No find in the image (e.g. FROM scratch): copy the directory out and walk it.
        with tempfile.TemporaryDirectory(prefix="kvc-list-") as scratch:
            local = os.path.join(scratch, "d")
            copied = self.runtime.call("cp", f"{self._ensure_container()}:{base}", local, check=False)
            if copied.returncode != 0:
                if "no such file" in (copied.stdout + copied.stderr).lower():
                    return []
                raise _failure(copied, "copying files out of the image failed")
            if not os.path.isdir(local):
                return []
            return [
                posixpath.normpath(posixpath.join(base, path.lstrip("/"))) for path in DirectoryFiles(local).list("/")
            ]

    def copy(self, paths: Sequence[str], destination: str) -> dict[str, str]:
        targets = _local_names(paths, destination)
        container = self._ensure_container()
        for path, target in targets.items():
            self.runtime.call("cp", f"{container}:{path}", target)
            if not stat.S_ISREG(os.lstat(target).st_mode):
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                else:
                    os.unlink(target)
                raise _not_a_file(self.image, path, "is not a regular file")
        return targets


# ---- the interface -----------------------------------------------------------------------------------


class ContainerRuntime(abc.ABC):
    """What kvc does with a container runtime. Every method raises CommandError on failure."""

    name = ""

    @abc.abstractmethod
    def build(
        self,
        context: str,
        build_file: str,
        tag: str,
        build_args: BuildArgs,
        labels: Mapping[str, str],
        *,
        pull: Optional[str] = None,
        no_cache: bool = False,
        stream: Optional[bool] = None,
        timestamp: Optional[int] = None,
        platform: str = "",
    ) -> None:
        """Build ``context`` (a directory, or a git/tarball URL) with ``build_file`` into ``tag``.
        ``pull`` is a base-image policy (always, missing, never, newer; None: the runtime's default).
        ``platform`` (``linux/arm64``) is the image's OCI platform when it is not the host's.
        ``timestamp`` (seconds since the epoch) fixes the creation time of the image and of the files
        its layers add, where the runtime can, so the same build gives the same image.
        Output is captured, and a failure raises a BuildCommandError carrying all of it; with
        ``stream`` it is also shown on stderr as it arrives (None: when kvc runs with -v)."""

    @abc.abstractmethod
    def build_argv(
        self,
        context: str,
        build_file: str,
        tag: str,
        build_args: BuildArgs,
        labels: Mapping[str, str],
        *,
        pull: Optional[str] = None,
        no_cache: bool = False,
        timestamp: Optional[int] = None,
        platform: str = "",
    ) -> list[str]:
        """The command line :meth:`build` runs (for --dry-run)."""

    @abc.abstractmethod
    def inspect(self, ref: str) -> Optional[ImageInfo]:
        """The image ``ref`` names (tag, either spelling, or id), or None when there is none."""

    def image_exists(self, ref: str) -> bool:
        return self.inspect(ref) is not None

    @abc.abstractmethod
    def list_images(self, label: str) -> list[ImageInfo]:
        """Local images (tagged and dangling, not intermediate layers) carrying ``label``
        (``key`` or ``key=value``)."""

    @abc.abstractmethod
    def remove(self, ref: str, *, force: bool = False, missing_ok: bool = False) -> None:
        """Remove a tag (the image goes with its last tag) or an image by id."""

    @abc.abstractmethod
    def untag(self, image: str, name: str) -> None:
        """Take the name ``name`` off ``image`` (an id or a name); the image itself stays."""

    @abc.abstractmethod
    def tag(self, source: str, target: str) -> None: ...

    @abc.abstractmethod
    def pull(self, ref: str, *, options: Sequence[str] = ()) -> str:
        """Pull ``ref`` (a registry reference, or another transport such as ``oci:DIR:REF``) and
        return the pulled image's id. ``options``: transport options (``--authfile``, ``--cert-dir``,
        ``--tls-verify=false``; see kvc.registry.transport_args)."""

    @abc.abstractmethod
    def relabel(self, image: str, tag: str, labels: Mapping[str, str], *, timestamp: int) -> None:
        """Make ``tag`` an image with ``image``'s layers and these labels (also manifest annotations
        where the runtime writes them), created at ``timestamp`` (seconds since the epoch) where the
        runtime can fix it, so that relabelling the same image the same way gives the same image."""

    @abc.abstractmethod
    def push(self, image: str, destination: str, *, options: Sequence[str] = (), digest_file: str = "") -> None:
        """Push the local ``image`` to ``destination`` (a registry reference, or ``oci:DIR:REF``);
        the pushed manifest's digest goes into ``digest_file`` when given."""

    @abc.abstractmethod
    def run(
        self,
        image: str,
        argv: Sequence[str],
        *,
        privileged: bool = False,
        host_network: bool = False,
        interactive: bool = True,
        tty: Optional[bool] = None,
        mounts: Sequence[MountSpec] = (),
        remove: bool = True,
        entrypoint: Optional[str] = None,
    ) -> int:
        """Run ``argv`` in a container of the local ``image`` sharing our stdin/stdout/stderr, and
        return its exit status. ``tty`` None means: a terminal only when stdin and stdout are
        terminals (so pipes, files and systemd units get clean output)."""

    @abc.abstractmethod
    def run_isolated(
        self, image: str, argv: Sequence[str], *, mounts: Sequence[Mount] = (), timeout: float = 120.0
    ) -> proc.Completed:
        """Run ``argv`` in a throwaway container of the local ``image`` cut off from the host: no
        network, no capabilities, no new privileges, nothing of our environment, only ``mounts``
        (read-only); its stdout and stderr are returned, whatever its exit status."""

    @abc.abstractmethod
    def open_image(self, image: str) -> contextlib.AbstractContextManager[ImageFiles]:
        """Access to the image's files for a ``with`` block (one mount or one container)."""

    def list_files(self, image: str, directory: str) -> list[str]:
        """Regular files below ``directory`` in the image (image paths, sorted)."""
        with self.open_image(image) as files:
            return files.list(directory)

    def copy_out(self, image: str, paths: Sequence[str], destination: str) -> dict[str, str]:
        """Copy image files into ``destination`` by basename; {image path: local path}."""
        with self.open_image(image) as files:
            return files.copy(paths, destination)


def _pairs(build_args: BuildArgs) -> list[tuple[str, str]]:
    return list(build_args.items()) if isinstance(build_args, Mapping) else [(k, v) for k, v in build_args]


def _wants_tty() -> bool:
    streams = (sys.stdin, sys.stdout)
    try:
        return all(stream is not None and stream.isatty() for stream in streams)
    except (ValueError, OSError):
        return False


class CliRuntime(ContainerRuntime):
    """The podman/docker command line, which agree on everything kvc uses."""

    name = "podman"

    def __init__(self, program: str = "podman", global_args: Sequence[str] = ()) -> None:
        self.program = program
        self.global_args = tuple(global_args)

    def argv(self, *args: str) -> list[str]:
        return [self.program, *self.global_args, *args]

    def call(self, *args: str, check: bool = True, hint: str = "") -> proc.Completed:
        """Run ``program [global args] args`` with output captured; failures get a hint from the output."""
        try:
            return proc.run(self.argv(*args), check=check, hint=hint)
        except CommandError as exc:
            exc.hint = hint_for(self.program, exc.output_tail) or exc.hint
            raise

    # -- build
    def _pull_args(self, pull: Optional[str]) -> list[str]:
        if pull is None:
            return []
        if pull not in PULL_POLICIES:
            raise ValueError(f"pull policy {pull!r} is not one of {', '.join(PULL_POLICIES)}")
        return [f"--pull={pull}"]

    def _build_command(self) -> list[str]:
        return self.argv("build")

    def build_argv(
        self,
        context: str,
        build_file: str,
        tag: str,
        build_args: BuildArgs,
        labels: Mapping[str, str],
        *,
        pull: Optional[str] = None,
        no_cache: bool = False,
        timestamp: Optional[int] = None,
        platform: str = "",
    ) -> list[str]:
        args = [*self._build_command(), "-t", tag, "--file", build_file]
        if platform:
            args += ["--platform", platform]
        args += [f"--label={key}={value}" for key, value in labels.items()]
        for key, value in _pairs(build_args):
            args += ["--build-arg", f"{key}={value}"]
        args += self._pull_args(pull)
        if no_cache:
            args.append("--no-cache")
        if timestamp is not None:
            args += self._timestamp_args(timestamp)
        return [*args, context]

    def _timestamp_args(self, timestamp: int) -> list[str]:
        return ["--timestamp", str(timestamp)]

    def build(
        self,
        context: str,
        build_file: str,
        tag: str,
        build_args: BuildArgs,
        labels: Mapping[str, str],
        *,
        pull: Optional[str] = None,
        no_cache: bool = False,
        stream: Optional[bool] = None,
        timestamp: Optional[int] = None,
        platform: str = "",
    ) -> None:
        argv = self.build_argv(
            context,
            build_file,
            tag,
            build_args,
            labels,
            pull=pull,
            no_cache=no_cache,
            timestamp=timestamp,
            platform=platform,
        )
        shown = proc.verbose() if stream is None else stream
        result = proc.run(argv, check=False, echo=shown)
        if result.returncode != 0:
            output = result.stdout + result.stderr
            proc.log_failure(result.argv, result.returncode)
            raise BuildCommandError(
                argv,
                result.returncode,
                output,
                shown=shown,
                hint=hint_for(argv[0], output) or "see the build output above",
            )

    # -- images
    @staticmethod
    def _parse_inspect(argv: Sequence[str], text: str) -> list[ImageInfo]:
        try:
            data = json.loads(text)
        except ValueError:
            raise CommandError(
                argv, 0, proc.tail(text), hint="the runtime printed something that is not JSON"
            ) from None
        if not isinstance(data, list):
            data = [data]
        return [_image_info(item) for item in data if isinstance(item, dict)]

    def inspect(self, ref: str) -> Optional[ImageInfo]:
        result = self.call("image", "inspect", ref, check=False)
        if result.returncode != 0:
            if _is_not_found(result.stdout + result.stderr):
                return None
            raise _failure(result, "inspecting the image failed")
        found = self._parse_inspect(result.argv, result.stdout)
        return found[0] if found else None

    def list_images(self, label: str) -> list[ImageInfo]:
        for _attempt in range(LISTING_ATTEMPTS):
            # podman's filtered listing fails when an image it is reading is removed meanwhile
            # (another kvc, a prune): list again.
            listing = self.call("images", "-q", "--no-trunc", "--filter", f"label={label}", check=False)
            if listing.returncode == 0 or not _is_not_found(listing.stdout + listing.stderr):
                break
        if listing.returncode != 0:
            raise _failure(listing, "listing the images failed")
        ids = listing.stdout.split()
        unique = sorted(set(ids))
        if not unique:
            return []
        result = self.call("image", "inspect", *unique, check=False)
        if result.returncode == 0:
            return self._parse_inspect(result.argv, result.stdout)
        # One went away since the listing: ask one by one.
        infos = [self.inspect(image_id) for image_id in unique]
        return [info for info in infos if info is not None]

    def remove(self, ref: str, *, force: bool = False, missing_ok: bool = False) -> None:
        result = self.call("rmi", *(["-f"] if force else []), ref, check=False)
        if result.returncode == 0 or (missing_ok and _is_not_found(result.stdout + result.stderr)):
            return
        raise _failure(result, "removing the image failed")

    def untag(self, image: str, name: str) -> None:
        self.call("untag", image, name)

    def tag(self, source: str, target: str) -> None:
        self.call("tag", source, target)

    def pull(self, ref: str, *, options: Sequence[str] = ()) -> str:
        result = self.call("pull", *options, ref, hint="check the image reference and that the registry is reachable")
        # podman prints the image id last; docker prints a digest summary, so ask for the id then.
        last = result.stdout.strip().splitlines()[-1].strip() if result.stdout.strip() else ""
        if re.fullmatch(r"[0-9a-f]{64}", last):
            return last
        info = self.inspect(ref)
        if info is None:
            raise CommandError(result.argv, 0, proc.tail(result.stdout), hint="the pulled image cannot be found")
        return info.id

    def _relabel_args(self, labels: Mapping[str, str], timestamp: int) -> list[str]:
        args = ["--pull=never", "--timestamp", str(timestamp)]
        for key, value in labels.items():
            args += ["--label", f"{key}={value}", "--annotation", f"{key}={value}"]
        return args

    def relabel(self, image: str, tag: str, labels: Mapping[str, str], *, timestamp: int) -> None:
        with tempfile.TemporaryDirectory(prefix="kvc-relabel-") as context:
            build_file = os.path.join(context, "Containerfile")
            with open(build_file, "w", encoding="utf-8") as handle:
                handle.write(f"FROM {image}\n")
            argv = [*self._build_command(), "-t", tag, "--file", build_file, *self._relabel_args(labels, timestamp)]
            try:
                proc.run([*argv, context], hint="labelling the image failed")
            except CommandError as exc:
                exc.hint = hint_for(argv[0], exc.output_tail) or exc.hint
                raise

    def push(self, image: str, destination: str, *, options: Sequence[str] = (), digest_file: str = "") -> None:
        digest = ["--digestfile", digest_file] if digest_file else []
        self.call(
            "push", *options, *digest, image, destination, hint="check the reference and that the registry is reachable"
        )

    # -- containers
    def run_argv(
        self,
        image: str,
        argv: Sequence[str],
        *,
        privileged: bool = False,
        host_network: bool = False,
        interactive: bool = True,
        tty: Optional[bool] = None,
        mounts: Sequence[MountSpec] = (),
        remove: bool = True,
        entrypoint: Optional[str] = None,
    ) -> list[str]:
        """The command line :meth:`run` runs."""
        args = ["run"]
        if remove:
            args.append("--rm")
        if interactive:
            args.append("-i")
        if (_wants_tty() if tty is None else tty) and interactive:
            args.append("-t")
        # Only local images are run; never reach out to a registry for them.
        args.append("--pull=never")
        if privileged:
            args.append("--privileged")
        if host_network:
            args.append("--network=host")
        for spec in mounts:
            mount = spec if isinstance(spec, Mount) else Mount(spec[0], spec[1])
            if ":" in mount.source or ":" in mount.target:
                raise ValueError(f"a mount path may not contain ':': {mount.source} -> {mount.target}")
            args += ["-v", f"{mount.source}:{mount.target}" + (":ro" if mount.read_only else "")]
        if entrypoint is not None:
            args += ["--entrypoint", entrypoint]
        return self.argv(*args, image, *argv)

    def run(
        self,
        image: str,
        argv: Sequence[str],
        *,
        privileged: bool = False,
        host_network: bool = False,
        interactive: bool = True,
        tty: Optional[bool] = None,
        mounts: Sequence[MountSpec] = (),
        remove: bool = True,
        entrypoint: Optional[str] = None,
    ) -> int:
        command = self.run_argv(
            image,
            argv,
            privileged=privileged,
            host_network=host_network,
            interactive=interactive,
            tty=tty,
            mounts=mounts,
            remove=remove,
            entrypoint=entrypoint,
        )
        return proc.run(command, check=False, capture=False).returncode

    def run_isolated(
        self, image: str, argv: Sequence[str], *, mounts: Sequence[Mount] = (), timeout: float = 120.0
    ) -> proc.Completed:
        args = ["run", "--rm", "--pull=never", "--network=none", "--cap-drop=all"]
        args += ["--security-opt", "no-new-privileges"]
        for mount in mounts:
            if ":" in mount.source or ":" in mount.target:
                raise ValueError(f"a mount path may not contain ':': {mount.source} -> {mount.target}")
            args += ["-v", f"{mount.source}:{mount.target}:ro"]
        return proc.run(self.argv(*args, image, *argv), check=False, timeout=timeout)

    # -- files
    @contextlib.contextmanager
    def _container_files(self, image: str) -> Iterator[ImageFiles]:
        files = _ContainerImage(self, image)
        try:
            yield files
        finally:
            files.close()

    def open_image(self, image: str) -> contextlib.AbstractContextManager[ImageFiles]:
        return self._container_files(image)


class PodmanRuntime(CliRuntime):
    """podman; rootful podman reads image files through ``podman image mount``."""

    name = "podman"

    def __init__(self, program: str = "podman", global_args: Sequence[str] = (), *, use_mount: bool = True) -> None:
        super().__init__(program, global_args)
        self.use_mount = use_mount

    @contextlib.contextmanager
    def _mounted_files(self, image: str) -> Iterator[ImageFiles]:
        mounted = self.call("image", "mount", image, check=False) if self.use_mount else None
        mountpoint = mounted.stdout.strip().splitlines()[-1].strip() if mounted and mounted.stdout.strip() else ""
        if mounted is None or mounted.returncode != 0 or not os.path.isdir(mountpoint):
            if mounted is not None and _is_not_found(mounted.stdout + mounted.stderr):
                raise _failure(mounted, "no such image")
            # Rootless podman cannot mount images (and a remote one has no local mount): use a container.
            with self._container_files(image) as files:
                yield files
            return
        try:
            yield DirectoryFiles(mountpoint, image)
        finally:
            self.call("image", "unmount", image, check=False)

    def open_image(self, image: str) -> contextlib.AbstractContextManager[ImageFiles]:
        return self._mounted_files(image)


class DockerRuntime(CliRuntime):
    name = "docker"

    def __init__(self, program: str = "docker", global_args: Sequence[str] = ()) -> None:
        super().__init__(program, global_args)

    def untag(self, image: str, name: str) -> None:
        # docker has no untag; its rmi of one name of several only untags (callers keep another name).
        self.call("rmi", name)

    def _timestamp_args(self, timestamp: int) -> list[str]:
        # docker build cannot fix the creation time.
        return []

    def _relabel_args(self, labels: Mapping[str, str], timestamp: int) -> list[str]:
        # docker build can fix neither the creation time nor manifest annotations.
        return [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]

    def pull(self, ref: str, *, options: Sequence[str] = ()) -> str:
        # docker reads credentials and trust from its daemon's configuration only.
        return super().pull(ref)

    def push(self, image: str, destination: str, *, options: Sequence[str] = (), digest_file: str = "") -> None:
        # docker pushes a tag to the registry it names (no other transports): tag, push, untag.
        if re.match(r"[a-z-]+:(?!\d)", destination):
            raise CommandError(
                [self.program, "push", destination], 1, "", hint="docker pushes to registries only: use podman"
            )
        self.tag(image, destination)
        try:
            self.call("push", destination, hint="check the reference and that the registry is reachable")
            if digest_file:
                info = self.call("image", "inspect", "--format", "{{json .RepoDigests}}", destination).stdout
                digests = [d.split("@", 1)[1] for d in json.loads(info or "[]") if "@" in d]
                with open(digest_file, "w", encoding="utf-8") as handle:
                    handle.write(digests[0] if digests else "")
        finally:
            self.call("rmi", destination, check=False)

    def _pull_args(self, pull: Optional[str]) -> list[str]:
        # docker build knows only "always pull" (--pull); its default is to pull what is missing.
        super()._pull_args(pull)
        return ["--pull"] if pull == "always" else []


class BuildahRuntime(PodmanRuntime):
    """Builds with ``buildah bud`` (with ``--layers``, so steps are cached as podman does);
    everything else with podman, which shares buildah's containers-storage. The global runtime
    arguments are given to both programs (storage options such as --root must agree)."""

    name = "buildah"

    def __init__(
        self,
        program: str = "podman",
        global_args: Sequence[str] = (),
        builder: str = "buildah",
        *,
        use_mount: bool = True,
    ) -> None:
        super().__init__(program, global_args, use_mount=use_mount)
        self.builder = builder

    def _build_command(self) -> list[str]:
        return [self.builder, *self.global_args, "bud", "--layers"]


def runtime_for(config: GlobalConfig) -> ContainerRuntime:
    """The adapter for the configured runtime (KVC_CONTAINER_RUNTIME), with its KVC_RUNTIME_ARGS."""
    if config.runtime == "docker":
        return DockerRuntime(global_args=config.runtime_args)
    if config.runtime == "buildah":
        return BuildahRuntime(global_args=config.runtime_args)
    return PodmanRuntime(global_args=config.runtime_args)
