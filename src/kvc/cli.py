"""kvc's command line: a thin layer over kvc.kmod and the framework, and its one error boundary.

Every expected failure ends here as one ``kvc: error: ...`` line (with details indented below it
and a ``kvc: hint: ...`` line), never a traceback. Exit codes (:class:`kvc.errors.ExitCode`):
0 success; 1 failure; 2 usage; 3 configuration; 4 container runtime, build or another external
program (systemctl, qemu); 5 modules refused (preflight or kernel); 6 state (not built, not
installed, in use, not the running kernel, a file kvc did not write, an enabled instance
not ready for the next kernel); 7 kernel files, the fake kernel or the next boot's kernel not
found; 8 smoke test failed; 9 verification guest crashed or timed out; 10 a host file cannot be
written or read (permissions, no space, read-only file system); 11 busy (another kvc run held the
instance's lock for ``KVC_LOCK_TIMEOUT`` seconds, 600 by default); 77 ``kvc build``: every kernel asked
for is outside a DKMS source's BUILD_EXCLUSIVE_* directives (skipped, as DKMS exits); 130 interrupted. ``kvc kmod``
tools exit as kmod's do.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from typing import TYPE_CHECKING, Callable, NoReturn, Optional, Sequence

from kvc.errors import ConfigError, ExitCode, HostFileError, KernelMissingError, KvcError, LoadError, UsageError

PROG = "kvc"


class _Parser(argparse.ArgumentParser):
    """argparse, with its complaints reported through the error boundary (one line and a hint)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"see '{self.prog} --help'")


if TYPE_CHECKING:
    _Commands = argparse._SubParsersAction[_Parser]


def _add_kernel(parser: argparse.ArgumentParser, *, many: bool = False) -> None:
    if many:
        parser.add_argument(
            "--kernel",
            "-k",
            action="append",
            metavar="KVER",
            help="kernel release (repeatable; default: the running kernel)",
        )
    else:
        parser.add_argument("--kernel", "-k", metavar="KVER", help="kernel release (default: running)")


def _add_arch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        metavar="ARCH",
        help="the target's architecture, amd64 or arm64 (default: what the kernel release names, else this host's)",
    )


def _add_build(sub: _Commands) -> None:
    p = sub.add_parser("build", help="build the instance image for each kernel")
    p.add_argument("name")
    _add_kernel(p, many=True)
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    _add_arch(p)
    p.add_argument(
        "--push",
        nargs="?",
        const="",
        metavar="REPOSITORY",
        help="then push each image (default repository: KVC_REGISTRY); a no-op when the registry has this build",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")


def _add_sign(sub: _Commands) -> None:
    p = sub.add_parser("sign", help="sign the instance's built modules on this host, into a new image")
    p.add_argument("name")
    _add_kernel(p, many=True)
    p.add_argument("--dry-run", action="store_true", help="print the plan, sign nothing")


def _add_push(sub: _Commands) -> None:
    p = sub.add_parser("push", help="push the instance's images to a registry, labelled with what they hold")
    p.add_argument("name")
    p.add_argument("repository", nargs="?", metavar="REPOSITORY", help="REGISTRY/PATH (default: KVC_REGISTRY)")
    _add_kernel(p, many=True)
    _add_arch(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan, push nothing")


def _add_pull(sub: _Commands) -> None:
    p = sub.add_parser("pull", help="pull the instance's images for the kernels from a registry (checked first)")
    p.add_argument("name")
    p.add_argument("repository", nargs="?", metavar="REPOSITORY", help="REGISTRY/PATH (default: KVC_REGISTRY)")
    _add_kernel(p, many=True)
    p.add_argument("--force", action="store_true", help="pull again even when the local image is the same")
    p.add_argument("--dry-run", action="store_true", help="print the plan, pull nothing")


def _add_inspect(sub: _Commands) -> None:
    p = sub.add_parser("inspect", help="what a registry image holds, from its manifest and config (no layers)")
    p.add_argument("reference", metavar="REF", help="REGISTRY/PATH:TAG or REGISTRY/PATH@DIGEST")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")


def _add_export(sub: _Commands) -> None:
    p = sub.add_parser("export", help="write the instance's images for the kernels into one OCI archive")
    p.add_argument("name")
    p.add_argument("--kernel", "-k", action="append", required=True, metavar="KVER", help="kernel release (repeatable)")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="the archive to write")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")


def _add_import(sub: _Commands) -> None:
    p = sub.add_parser("import", help="take the images of an archive from 'kvc export' in, digests checked")
    p.add_argument("archive", metavar="FILE")


def _add_load(sub: _Commands) -> None:
    p = sub.add_parser("load", help="extract, preflight and load the instance's modules")
    p.add_argument("name")
    _add_kernel(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--force", action="store_true", help="re-extract and reload modules already loaded")
    p.add_argument(
        "--modules-dir",
        metavar="DIR",
        help="take the modules from DIR/lib/modules/KVER/ instead of the instance's image (an image "
        "mounted or copied by someone else)",
    )
    p.add_argument(
        "--delivery",
        choices=("direct", "tree"),
        help="direct: kvc inserts the modules; tree: deliver them into /lib/modules/KVER and load them by name "
        "from there, as modprobe does (default: KVC_DELIVERY, else direct)",
    )
    p.add_argument(
        "--kernel-dir",
        metavar="DIR",
        help="with --dry-run, where the host has no module tree for the kernel: in-tree modules from "
        "DIR/lib/modules/KVER (default: the kernel 'kvc verify' cached)",
    )


def _add_deliver(sub: _Commands) -> None:
    p = sub.add_parser(
        "deliver", help="install the instance's modules and shipped files into a kernel's module tree (or remove them)"
    )
    p.add_argument("name")
    _add_kernel(p, many=True)
    p.add_argument("--remove", action="store_true", help="remove the delivery: the tree and its indexes as before")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")


def _add_check(sub: _Commands) -> None:
    p = sub.add_parser(
        "check",
        help="run the load preflight on copies of the modules, load nothing; or, with --next-boot, the reboot gate",
    )
    p.add_argument("name", nargs="?")
    p.add_argument(
        "--kernel",
        "-k",
        metavar="KVER",
        help="kernel release (default: the running one; with --next-boot, the one the host boots next)",
    )
    p.add_argument("--modules-dir", metavar="DIR", help="check the modules in DIR/lib/modules/KVER/ instead")
    p.add_argument(
        "--next-boot",
        action="store_true",
        help="the reboot gate: is every enabled instance built (and verified, if it asks) for the next kernel; "
        "exit 6 if not",
    )
    p.add_argument("--json", action="store_true", help="with --next-boot: machine-readable output (schema 1)")


def _add_kernel_added(sub: _Commands) -> None:
    p = sub.add_parser(
        "kernel-added",
        help="prepare every enabled instance for a new kernel: build or pull, verify if asked, deliver in tree "
        "mode; then the reboot gate (kvc's kernel-install plugin and Debian hook run it)",
    )
    p.add_argument(
        "kernel_release", nargs="?", metavar="KVER", help="the new kernel (default: the one the host boots next)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")


def _add_unload(sub: _Commands) -> None:
    p = sub.add_parser("unload", help="unload the instance's modules in reverse dependency order")
    p.add_argument("name")
    _add_kernel(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--force", action="store_true", help="unload even if other modules hold them")


def _add_reload(sub: _Commands) -> None:
    p = sub.add_parser("reload", help="build if needed, unload, load")
    p.add_argument("name")
    _add_kernel(p)
    p.add_argument("--dry-run", action="store_true", help="print the three plans (build, unload, load), change nothing")


def _add_wrapper(sub: _Commands) -> None:
    p = sub.add_parser("wrapper", help="run a userspace tool from the instance image")
    p.add_argument("name")
    _add_kernel(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")


def _add_verify(sub: _Commands) -> None:
    p = sub.add_parser("verify", help="load, smoke-test and unload the built modules on the target kernel in a VM")
    p.add_argument("name")
    _add_kernel(p)
    _add_arch(p)
    p.add_argument(
        "--kernel-dir",
        metavar="DIR",
        help="the kernel's files: DIR/boot/vmlinuz-KVER and DIR/lib/modules/KVER "
        "(default: this host's, else the distribution's package, cached)",
    )
    p.add_argument(
        "--guest-root",
        metavar="DIR",
        default="/",
        help="the guest's root filesystem, shared read-only (default: this host's /); the single-file kvc "
        "runs from its own directory, so DIR needs no Python and no kvc (the Python kvc needs both at "
        "the same paths in DIR)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report (schema 1)")
    p.add_argument(
        "--keep-artifacts", action="store_true", help="keep the console log, job and initramfs even when verified"
    )
    p.add_argument(
        "--accel",
        choices=("auto", "tcg", "kvm"),
        default="auto",
        help="qemu accelerator (auto: KVM if a probe boot works, else TCG)",
    )
    p.add_argument("--memory", type=int, default=1024, metavar="MIB", help="guest memory (default 1024)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="hard limit for the whole guest run (default 300)",
    )
    p.add_argument(
        "--secure-boot",
        action="store_true",
        help="boot the bzImage through OVMF with Secure Boot on and the signing certificate enrolled as a MOK "
        "(MokListRT): the kernel enforces module signatures; the report gives its verdict per module",
    )
    p.add_argument(
        "--sb-cert",
        metavar="CERT",
        help="with --secure-boot: the certificate (PEM or DER) to enroll (default: the instance's KVC_SIGN_CERT)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, boot nothing")


def _add_keys(sub: _Commands) -> None:
    p = sub.add_parser("keys", help="module-signing keys: generate one, or show the host's trust")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    k = keys.add_parser("generate", help="a MOK-style RSA key and certificate (DER for mokutil --import)")
    k.add_argument("--out", default=".", help="directory for kvc-signing.key/.pem/.der (default: here)")
    k.add_argument("--cn", default="kvc module signing key", help="the certificate's common name")
    k.add_argument("--bits", type=int, default=2048, help="RSA key size: 2048, 3072 or 4096")
    k.add_argument("--days", type=int, default=3650, help="certificate lifetime in days")
    k = keys.add_parser("status", help="Secure Boot, lockdown, sig_enforce and the trusted keyrings' keys")
    k.add_argument("name", nargs="?", help="also judge this instance's extracted modules' signatures")
    k.add_argument("--json", action="store_true", help="machine-readable output")


def _add_status(sub: _Commands) -> None:
    p = sub.add_parser("status", help="images, extraction and load state per instance and kernel")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="ask the container runtime about the images, not kvc's record of them (an image retagged or removed "
        "by hand, outside kvc)",
    )
    p.add_argument(
        "--remote", action="store_true", help="also the KVC_REGISTRY image per kernel (manifest and config only)"
    )
    _add_kernel(p, many=True)


def _add_install(sub: _Commands) -> None:
    p = sub.add_parser("install", help="install an instance bundle and the systemd unit")
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument(
        "--shadow",
        action="store_true",
        help="install wrapper commands even where they shadow a host command of the same name",
    )


def _add_uninstall(sub: _Commands) -> None:
    p = sub.add_parser("uninstall", help="remove an installed instance")
    p.add_argument("name")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")


def _add_dkms(sub: _Commands) -> None:
    p = sub.add_parser("dkms", help="DKMS sources as instances: import one, or show them DKMS-style")
    dkms = p.add_subparsers(dest="dkms_command", metavar="ACTION", required=True)
    k = dkms.add_parser(
        "import", help="write an instance bundle from a DKMS source (directory, tarball or *-dkms .deb)"
    )
    k.add_argument("source", metavar="SOURCE")
    k.add_argument("--name", help="the instance's name (default: the conf's PACKAGE_NAME)")
    k.add_argument("--output", "-o", metavar="DIR", help="the bundle directory to create (default: ./NAME)")
    k.add_argument(
        "--base-image",
        default="localhost/debian:bookworm",
        metavar="IMAGE",
        help="the build's base image; dkms.conf is evaluated in it too (default: %(default)s)",
    )
    _add_kernel(k, many=True)
    k.add_argument("--dry-run", action="store_true", help="evaluate and print the plan, write nothing")
    k = dkms.add_parser("status", help="NAME/VERSION, KVER, ARCH: built|verified|loaded per DKMS instance")
    k.add_argument("names", nargs="*", metavar="NAME", help="instances (default: every one imported from DKMS)")
    _add_kernel(k, many=True)


def _add_k8s(sub: _Commands) -> None:
    p = sub.add_parser("k8s", help="Kubernetes: a KMM Module, or kvc's own DaemonSets, for an instance")
    k8s = p.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)

    def cluster_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--namespace", "-n", default="kube-system", help="the objects' namespace (kube-system)")
        parser.add_argument("--output", "-o", metavar="FILE", help="write the YAML to FILE (default: stdout)")

    k = k8s.add_parser("module", help="a KMM Module (kmm.sigs.x-k8s.io/v1beta1) for the images kvc pushed")
    k.add_argument("name")
    k.add_argument("--repository", metavar="REPO", help="where kvc pushed the images (default: KVC_REGISTRY)")
    _add_kernel(k, many=True)
    k.add_argument("--regexp", action="store_true", help="one mapping for every kernel: VERSION-${KERNEL_FULL_VERSION}")
    k.add_argument("--selector", action="append", metavar="KEY=VALUE", help="node selector (repeatable)")
    k.add_argument("--image-repo-secret", dest="pull_secret", metavar="SECRET", help="the pull secret's name")
    cluster_options(k)

    k = k8s.add_parser("daemonset", help="kvc's own DaemonSets, one per kernel, for clusters without KMM")
    k.add_argument("name")
    k.add_argument("--repository", metavar="REPO", help="where kvc pushed the images (default: KVC_REGISTRY)")
    k.add_argument("--kvc-image", required=True, metavar="IMAGE", help="the kvc image the pods run")
    _add_kernel(k, many=True)
    k.add_argument(
        "--kernel-label",
        metavar="KEY",
        help="the node label holding the kernel release (default: NFD's kernel-version.full; kvc/kernel-release: "
        "kvc's own, set by a labeller DaemonSet it adds)",
    )
    k.add_argument("--image-pull-secret", dest="pull_secret", metavar="SECRET", help="the pull secret's name")
    cluster_options(k)

    k = k8s.add_parser("unload-job", help="Jobs that unload the instance on the named nodes (removal)")
    k.add_argument("name")
    k.add_argument("--kvc-image", required=True, metavar="IMAGE", help="the kvc image the pods run")
    k.add_argument("--node", action="append", metavar="NODE", help="a node to unload on (repeatable)")
    k.add_argument("--image-pull-secret", dest="pull_secret", metavar="SECRET", help="the pull secret's name")
    cluster_options(k)

    k = k8s.add_parser("agent", help="(in kvc's DaemonSet pod) load the instance, label the node, wait")
    k.add_argument("name")
    k.add_argument(
        "--modules-dir", required=True, metavar="DIR", help="the init container's copy: DIR/lib/modules/KVER"
    )

    k = k8s.add_parser("ready", help="(the pod's readiness probe) exit 0 when the instance is loaded")
    k.add_argument("name")

    k8s.add_parser("label-node", help="(in the kvc-kernel-label DaemonSet) label this node with its kernel, wait")


# Each command's sub-parser, in the order --help lists them.
_COMMANDS: dict[str, Callable[[_Commands], None]] = {
    "build": _add_build,
    "sign": _add_sign,
    "push": _add_push,
    "pull": _add_pull,
    "inspect": _add_inspect,
    "export": _add_export,
    "import": _add_import,
    "load": _add_load,
    "deliver": _add_deliver,
    "check": _add_check,
    "kernel-added": _add_kernel_added,
    "unload": _add_unload,
    "reload": _add_reload,
    "wrapper": _add_wrapper,
    "verify": _add_verify,
    "keys": _add_keys,
    "k8s": _add_k8s,
    "dkms": _add_dkms,
    "status": _add_status,
    "install": _add_install,
    "uninstall": _add_uninstall,
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """kvc's parser; with ``only``, one that knows only that command, unless it is no command (the
    full parser's error then lists them all): the boot path's ``kvc load`` builds one sub-parser,
    not 25."""
    parser = _Parser(
        prog=PROG,
        description="Kernel modules via containers.",
        epilog="'kvc kmod TOOL ...' runs the kmod-compatible tools (lsmod, modinfo, insmod, rmmod).",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log external commands")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    if only in _COMMANDS:
        _COMMANDS[only](subparsers)
    else:
        for add in _COMMANDS.values():
            add(subparsers)
    return parser


def report(error: KvcError) -> int:
    lines = [f"{PROG}: error: {error.brief}"]
    if error.details:
        lines.extend("  " + line for line in error.details.rstrip("\n").splitlines())
    if error.hint:
        lines.append(f"{PROG}: hint: {error.hint}")
    sys.stderr.write("\n".join(lines) + "\n")
    return int(error.exit_code)


_ERRNO_HINTS = {
    errno.EACCES: "run kvc as root, or check the permissions of the path",
    errno.EPERM: "run kvc as root, or check the permissions of the path",
    errno.ENOSPC: "free space on that file system, then run the command again",
    errno.EDQUOT: "free space (the disk quota is used up), then run the command again",
    errno.EROFS: "the host's file system is read-only: point KVC_ROOT at a writable directory, or make /var writable",
}


def as_kvc_error(exc: BaseException) -> Optional[KvcError]:
    """The framework's error for an expected failure raised below it: the kernel or kvc.kmod
    refusing, depmod stopping, the host refusing a file operation. None for anything else (a bug,
    which keeps its traceback)."""
    from kvc.kmod.depmod import DepmodError
    from kvc.kmod.errors import KmodError, ModuleFormatError
    from kvc.kmod.kernel.protocol import KernelError

    if isinstance(exc, KernelError):
        if exc.errno == errno.ENOSYS:
            return KernelMissingError(
                f"no kernel to work with: {exc}",
                hint="with KVC_KERNEL=fake, create the fake kernel under KVC_ROOT first "
                "(kvc.kmod.kernel.fake.FakeKernel.create), or unset KVC_KERNEL",
            )
        return LoadError(f"the kernel refused: {exc}", details="\n".join(exc.log_lines), hint="see 'kvc status'")
    if isinstance(exc, ModuleFormatError):
        return LoadError(exc.brief, details=exc.details, hint=exc.hint)
    if isinstance(exc, KmodError):
        return KvcError(exc.brief, details=exc.details, hint=exc.hint)
    if isinstance(exc, DepmodError):
        return KvcError(f"depmod failed: {exc}", hint="see depmod's messages above")
    if isinstance(exc, UnicodeDecodeError):
        return ConfigError(f"a file kvc reads is not UTF-8 text: {exc}", hint="fix or remove the file")
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "a host file"
        target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        reason = exc.strerror or str(exc)
        return HostFileError(
            f"{where}{target}: {reason}",
            hint=_ERRNO_HINTS.get(exc.errno or 0, "check the path, then run the command again"),
        )
    return None


def _guarded(command: Callable[[], int]) -> int:
    """The one error boundary: an expected failure becomes one error line (and a hint) with its
    exit code; anything else is a bug and keeps its traceback."""
    try:
        return command()
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return int(ExitCode.INTERRUPTED)
    except KvcError as error:
        return report(error)
    except Exception as exc:
        mapped = as_kvc_error(exc)
        if mapped is None:
            raise
        return report(mapped)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "kmod":
        from kvc.kmod import tools

        return tools.main(args[1:])

    def command() -> int:
        parser = build_parser(next((arg for arg in args if not arg.startswith("-")), None))
        options = parser.parse_args(args)
        if options.command is None:
            parser.print_help()
            return int(ExitCode.USAGE)
        logging.basicConfig(level=logging.INFO if options.verbose else logging.WARNING, format=f"{PROG}: %(message)s")
        import kvc.commands as commands

        return commands.dispatch(options)

    return _guarded(command)


def legacy_main(argv: Optional[Sequence[str]] = None) -> int:
    import kvc.legacy as legacy

    return _guarded(lambda: legacy.main(list(sys.argv[1:] if argv is None else argv)))
