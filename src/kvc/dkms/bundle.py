"""``kvc dkms import``: plan (locate the source, evaluate its dkms.conf in a container for each
target kernel, check what it says), then write the instance bundle that ``kvc install`` takes:

- ``NAME.conf``: the build context (the bundle), ``KMOD_SOFTWARE_VERSION`` = PACKAGE_VERSION exactly,
  ``KMOD_NAMES`` = the modules as DKMS installs them (DEST_MODULE_NAME), ``KVC_DKMS`` = PACKAGE/VERSION;
- ``Containerfile``: generated; its build stage runs kvc's dkms.conf driver for the kernel;
- ``src/``: the DKMS source tree, unchanged;
- ``kvc-dkms-build``: the driver.

The bundle is written in a scratch directory beside the output and renamed into place, so a failed
import leaves nothing behind, and an existing output directory is never written into."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

from kvc.atomic import write_file
from kvc.config import check_name
from kvc.dkms.conf import NOT_RUN, DkmsConf, parse_records
from kvc.dkms.source import DkmsSource
from kvc.errors import CommandError, ConfigError, HostFileError, StateError
from kvc.runtime import ContainerRuntime, Mount

DRIVER = "kvc-dkms-build"
CONTAINERFILE_TEMPLATE = "dkms.Containerfile"
DEFAULT_BASE_IMAGE = "localhost/debian:bookworm"
_IN_CONTAINER = "/kvc-dkms"
EVAL_TIMEOUT = 120.0


def driver_text() -> str:
    return resources.files("kvc").joinpath("data").joinpath(DRIVER).read_text(encoding="utf-8")


def _guess_module(tree: str) -> tuple[str, str]:
    """(module, version) from a /usr/src/NAME-VERSION directory name, as DKMS names its trees; the
    conf's own PACKAGE_NAME/PACKAGE_VERSION replace them for the build."""
    base = os.path.basename(os.path.normpath(tree))
    name, sep, version = base.rpartition("-")
    return (name, version) if sep and name and version[:1].isdigit() else ("", "")


def evaluate(runtime: ContainerRuntime, image: str, source: DkmsSource, kernel_release: str) -> DkmsConf:
    """The dkms.conf of ``source`` as bash sees it for ``kernel_release``: sourced inside a
    container of ``image`` (no network, the tree read-only), never on this host."""
    if ":" in source.tree:
        raise ConfigError(f"{source.tree}: a source path with ':' cannot be mounted", hint="copy the source elsewhere")
    module, version = _guess_module(source.tree)
    with tempfile.TemporaryDirectory(prefix="kvc-dkms-") as scratch:
        driver = os.path.join(scratch, DRIVER)
        write_file(driver, driver_text().encode(), mode=0o755)
        mounts = [Mount(source.tree, f"{_IN_CONTAINER}/src", True), Mount(driver, f"{_IN_CONTAINER}/{DRIVER}", True)]
        argv = ["bash", f"{_IN_CONTAINER}/{DRIVER}", "eval", f"{_IN_CONTAINER}/src", kernel_release]
        argv += [os.uname().machine, module, version]
        try:
            result = runtime.run_isolated(image, argv, mounts=mounts, timeout=EVAL_TIMEOUT)
        except CommandError as exc:
            raise StateError(
                f"{source.given}: evaluating dkms.conf in a container of {image} failed: {exc.brief}",
                details=exc.output_tail,
                hint="the dkms.conf must finish within two minutes without network access",
            ) from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        missing = any("image not known" in line or "No such image" in line for line in lines)
        raise StateError(
            f"{source.given}: evaluating dkms.conf in a container of {image} failed (status {result.returncode})",
            details="\n".join(lines[-10:]),
            hint=f"build or pull {image} first, or give another with --base-image"
            if missing
            else "the dkms.conf must be a bash file that DKMS can source",
        )
    return DkmsConf(kernel_release, parse_records(result.stdout.encode("utf-8", "surrogateescape"), source.given))


@dataclass(frozen=True)
class ImportPlan:
    source: DkmsSource
    name: str
    output: str
    package: str
    version: str
    modules: tuple[str, ...]  # DEST_MODULE_NAMEs, in the conf's order
    base_image: str
    kernels: tuple[str, ...]  # the kernels the conf was evaluated for
    warnings: tuple[str, ...]

    def describe(self) -> list[str]:
        return [
            f"import the DKMS source {self.package}/{self.version} ({self.source.kind.value} {self.source.given}) "
            f"as instance {self.name}",
            f"  modules: {' '.join(self.modules)} (dkms.conf evaluated for {', '.join(self.kernels)})",
            f"  write {self.output}/: {self.name}.conf, Containerfile (base {self.base_image}), src/, {DRIVER}",
            f"  then: kvc install {self.output}; kvc build {self.name} -k KVER; kvc verify {self.name} -k KVER",
        ]


def _warnings(conf: DkmsConf) -> list[str]:
    found = []
    for key in NOT_RUN:
        if conf.first(key):
            found.append(f"{key}={conf.first(key)!r} is not run: kvc installs nothing on the host while building")
    depends = conf.array("BUILD_DEPENDS")
    if depends:
        found.append(
            f"BUILD_DEPENDS={' '.join(depends)}: kvc builds each source alone, without other DKMS modules; "
            "import and load those as their own instances first"
        )
    for key in ("BUILD_EXCLUSIVE_KERNEL", "BUILD_EXCLUSIVE_KERNEL_MIN", "BUILD_EXCLUSIVE_KERNEL_MAX"):
        if len(conf.values.get(key, {})) > 1:
            found.append(f"{key}[N] per module is a DKMS 3.1 directive: kvc applies only {key}[0], to the whole source")
    return found


def plan_import(
    runtime: ContainerRuntime,
    source: DkmsSource,
    kernels: Sequence[str],
    *,
    name: str = "",
    output: str = "",
    base_image: str = DEFAULT_BASE_IMAGE,
) -> ImportPlan:
    confs = [evaluate(runtime, base_image, source, kernel) for kernel in kernels]
    package, version = confs[0].package(source.given)
    modules = tuple(record.dest_name for record in confs[0].modules(source.given))
    for conf in confs[1:]:
        if conf.package(source.given) != (package, version):
            raise ConfigError(
                f"{source.given}: dkms.conf names {conf.package_name}/{conf.package_version} for kernel "
                f"{conf.kernel_release} but {package}/{version} for {confs[0].kernel_release}",
                hint="kvc keeps one name and version per instance",
            )
        other = tuple(record.dest_name for record in conf.modules(source.given))
        if other != modules:
            raise ConfigError(
                f"{source.given}: dkms.conf lists modules {' '.join(other)} for kernel {conf.kernel_release} "
                f"but {' '.join(modules)} for {confs[0].kernel_release}",
                hint="import it once per kernel group, with --name and -k",
            )
    instance = name or package
    try:
        check_name(instance, "the instance name (PACKAGE_NAME)" if not name else "--name")
    except ConfigError as exc:
        raise ConfigError(exc.brief, hint="give --name NAME") from None
    target = os.path.abspath(output or instance)
    if os.path.lexists(target) and not (os.path.isdir(target) and not os.listdir(target)):
        raise StateError(f"{target} exists", hint="give another --output, or remove it first")
    warnings = tuple(dict.fromkeys(item for conf in confs for item in _warnings(conf)))
    return ImportPlan(source, instance, target, package, version, modules, base_image, tuple(kernels), warnings)


def conf_text(plan: ImportPlan) -> str:
    return (
        f"# kvc instance {plan.name}: the DKMS source {plan.package} {plan.version}, imported by\n"
        f"# 'kvc dkms import' from {os.path.basename(plan.source.given.rstrip('/'))} ({plan.source.kind.value}).\n"
        "# kvc reads this file as plain KEY=value assignments. The build follows src/dkms.conf,\n"
        "# evaluated for each kernel inside the build container (Containerfile, kvc-dkms-build).\n"
        "KMOD_CONTAINER_BUILD_CONTEXT=.\n"
        "KMOD_CONTAINER_BUILD_FILE=Containerfile\n"
        f"KMOD_SOFTWARE_VERSION={shlex.quote(plan.version)}\n"
        f"KMOD_NAMES={shlex.quote(' '.join(plan.modules))}\n"
        f"KVC_DKMS={shlex.quote(f'{plan.package}/{plan.version}')}\n"
        "# Into the module tree, as DKMS installs: modprobe, udev and the kernel's request_module() find\n"
        "# the modules (kvc load and verify still load every module of KMOD_NAMES).\n"
        "KVC_DELIVERY=tree\n"
        "# kvc verify runs KVC_SMOKE_TEST in the image once the modules are loaded, e.g.\n"
        f"# KVC_SMOKE_TEST='test -d /sys/module/{plan.modules[0].replace('-', '_')}'\n"
    )


def containerfile_text(plan: ImportPlan) -> str:
    template = resources.files("kvc").joinpath("data").joinpath(CONTAINERFILE_TEMPLATE).read_text(encoding="utf-8")
    for key, value in (("@PACKAGE@", plan.package), ("@VERSION@", plan.version), ("@BASE_IMAGE@", plan.base_image)):
        template = template.replace(key, value)
    return template


def execute_import(plan: ImportPlan) -> str:
    parent = os.path.dirname(plan.output)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(plan.output)}.kvc-import-", dir=parent)
    except OSError as exc:
        raise HostFileError(f"{parent}: cannot write the bundle: {exc.strerror}", hint="choose --output") from None
    try:
        os.chmod(staging, 0o755)
        shutil.copytree(plan.source.tree, os.path.join(staging, "src"), symlinks=True)
        write_file(os.path.join(staging, f"{plan.name}.conf"), conf_text(plan).encode(), mode=0o644)
        write_file(os.path.join(staging, "Containerfile"), containerfile_text(plan).encode(), mode=0o644)
        write_file(os.path.join(staging, DRIVER), driver_text().encode(), mode=0o755)
        os.rename(staging, plan.output)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise HostFileError(
            f"{plan.output}: cannot write the bundle: {exc}", hint="check the space and permissions"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return (
        f"wrote {plan.output} (instance {plan.name}: {plan.package}/{plan.version}, modules {' '.join(plan.modules)})"
    )
