"""KVC configuration files, parsed safely: ``KEY=value`` assignments in the shell syntax KVC's
files use (quotes, backslashes, comments, ``export``, ``$VAR``/``${VAR}`` from earlier keys), and
nothing else — a file is never executed, and command substitution is refused."""

from __future__ import annotations

import enum
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from kvc.errors import ConfigError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SAFE_WORD = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_.+:@%=,/~#-]*")
_IMAGE_REF = re.compile(r"[a-z0-9][A-Za-z0-9._/:@+{}-]*")
_KERNEL_RELEASE = re.compile(r"[0-9][A-Za-z0-9._+~-]*")
# A kernel module name: what Linux accepts in MODULE_NAME_LEN (56 bytes with the NUL) and kbuild
# makes of file names; never a path.
_MODULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,54}")
# A wrapper command becomes a file in /usr/local/bin: a plain command name, never a path.
_COMMAND_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")
# A qemu -device value: a driver name and properties; no paths (a device must not read host files).
_QEMU_DEVICE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*(,[A-Za-z][A-Za-z0-9_.-]*=[A-Za-z0-9_.:-]+)*")
_UNSET_HINT = "set it on an earlier line, or write a literal '$' as '\\$' or inside single quotes"

CONF_DIR = "/etc/kvc"
GLOBAL_CONF = "kmods-via-containers.conf"
RUNTIMES = ("podman", "docker", "buildah")


def parse_assignments(text: str, source: str, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The variables a KVC conf file assigns, in order, with shell quoting and expansion of
    variables assigned earlier in the file (or given in ``environ``)."""
    values: dict[str, str] = {}
    known = dict(environ or {})
    lineno = 0
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        lineno = index + 1
        index += 1
        while line.endswith("\\") and index < len(lines):
            line = line[:-1] + lines[index]
            index += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        match = _NAME.match(stripped)
        if not match or stripped[match.end() : match.end() + 1] != "=":
            raise ConfigError(
                f"{source}:{lineno}: not a KEY=value assignment: {stripped[:60]!r}",
                hint="kvc reads conf files as plain assignments and never runs them",
            )
        name = match.group(0)
        value, rest = _parse_value(stripped[match.end() + 1 :], known, f"{source}:{lineno}")
        rest = rest.strip()
        if rest and not rest.startswith("#"):
            raise ConfigError(
                f"{source}:{lineno}: unexpected text after the value of {name}: {rest[:40]!r}",
                hint="quote values that contain spaces",
            )
        values[name] = value
        known[name] = value
    return values


def _parse_value(text: str, known: Mapping[str, str], where: str) -> tuple[str, str]:
    """(value, remaining text) for one shell word."""
    out: list[str] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char in " \t":
            break
        if char == "'":
            end = text.find("'", pos + 1)
            if end < 0:
                raise ConfigError(f"{where}: unterminated single quote", hint="close the quote")
            out.append(text[pos + 1 : end])
            pos = end + 1
        elif char == '"':
            pos += 1
            while True:
                if pos >= len(text):
                    raise ConfigError(f"{where}: unterminated double quote", hint="close the quote")
                char = text[pos]
                if char == '"':
                    pos += 1
                    break
                if char == "\\" and pos + 1 < len(text) and text[pos + 1] in '"\\$`':
                    out.append(text[pos + 1])
                    pos += 2
                elif char == "$":
                    expanded, pos = _expand(text, pos, known, where)
                    out.append(expanded)
                elif char == "`":
                    raise ConfigError(f"{where}: command substitution is not allowed", hint="write the literal value")
                else:
                    out.append(char)
                    pos += 1
        elif char == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
        elif char == "$":
            expanded, pos = _expand(text, pos, known, where)
            out.append(expanded)
        elif char in "`;&|<>()":
            raise ConfigError(
                f"{where}: shell syntax {char!r} is not allowed in a value",
                hint="kvc reads conf files as plain assignments; quote the value",
            )
        else:
            out.append(char)
            pos += 1
    return "".join(out), text[pos:]


def _expand(text: str, pos: int, known: Mapping[str, str], where: str) -> tuple[str, int]:
    """The value of ``$NAME`` or ``${NAME}`` at ``pos``. A key not set earlier is an error: the
    shell would expand it to nothing, silently breaking the value (``/sys/module/$m/x``)."""
    if text.startswith("$(", pos):
        raise ConfigError(f"{where}: command substitution is not allowed", hint="write the literal value")
    if text.startswith("${", pos):
        end = text.find("}", pos)
        name = text[pos + 2 : end] if end > 0 else ""
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: only plain ${{NAME}} expansions are supported", hint="write the literal value")
        after = end + 1
    else:
        match = _NAME.match(text, pos + 1)
        if not match:
            following = text[pos + 1 : pos + 2]
            if following and (following.isdigit() or following in "?#@*!$-"):
                raise ConfigError(
                    f"{where}: ${following} is not a key of the file", hint="expand only keys set on earlier lines"
                )
            return "$", pos + 1
        name, after = match.group(0), match.end()
    if name not in known:
        raise ConfigError(f"{where}: ${name} is not set (the shell would make it empty)", hint=_UNSET_HINT)
    return known[name], after


def read_conf(path: str, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", hint="install the instance with 'kvc install'") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_assignments(text, path, environ)


def check_word(value: str, what: str, source: str, pattern: re.Pattern[str] = _SAFE_WORD) -> str:
    """``value`` if it is safe to place on a command line (no option injection, no shell)."""
    if not pattern.fullmatch(value):
        raise ConfigError(
            f"{source}: {what} {value!r} is not allowed",
            hint="use letters, digits and . _ - + : @ % = , / ~ # (and no leading '-')",
        )
    return value


def check_module_name(name: str, source: str) -> str:
    """``name`` if it is a kernel module name (letters, digits, ``_`` and ``-``): it becomes file
    names, image labels and ``/sys/module`` paths."""
    if not _MODULE_NAME.fullmatch(name):
        raise ConfigError(
            f"{source}: module name {name!r} in KMOD_NAMES is not a kernel module name",
            hint="list module names as modinfo shows them: letters, digits, '_' and '-', at most 55 characters",
        )
    return name


def check_command_name(name: str, source: str) -> str:
    """``name`` if it is a plain command name (no path): wrappers are installed under it."""
    if not _COMMAND_NAME.fullmatch(name):
        raise ConfigError(
            f"{source}: wrapper tool {name!r} in KVC_WRAPPER_TOOLS is not a plain command name",
            hint="name the tool as it is called on PATH: letters, digits and . _ + - (no '/', no leading '.' or '-')",
        )
    return name


def check_name(name: str, source: str = "instance name") -> str:
    # Also a systemd instance name (kmods-via-containers@NAME.service): no '+'.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(
            f"{source}: instance name {name!r} is not allowed",
            hint="use letters, digits and . _ - and start with a letter or digit",
        )
    if name in RESERVED_NAMES:
        raise ConfigError(
            f"{source}: instance name {name!r} is reserved (kvc keeps its own /var/lib/kvc/{name})",
            hint="choose another name",
        )
    return name


def check_kernel_release(release: str) -> str:
    return check_word(release, "kernel release", "--kernel", _KERNEL_RELEASE)


def _flag(values: Mapping[str, str], key: str, default: bool, path: str) -> bool:
    value = values.get(key, "").strip().lower()
    if not value:
        return default
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"{path}: {key}={value!r} is not a yes/no value", hint="write yes or no")


def _firmware_paths(value: str, path: str) -> tuple[str, ...]:
    """KVC_FIRMWARE: paths relative to the image's /lib/firmware, installed at the same place
    below the host's firmware directory; never absolute, never leaving it."""
    found = []
    for item in value.split():
        check_word(item, "KVC_FIRMWARE item", path)
        normal = posixpath.normpath(item)
        if item.startswith("/") or normal == "." or normal.split("/")[0] == "..":
            raise ConfigError(
                f"{path}: KVC_FIRMWARE item {item!r} is not a path inside the image's /lib/firmware",
                hint="name firmware files or directories relative to /lib/firmware, e.g. vendor/device.bin",
            )
        found.append(normal)
    return tuple(found)


def _image_files(values: Mapping[str, str], key: str, suffix: str, path: str) -> tuple[str, ...]:
    """Absolute image paths of files installed under their names (which end in ``suffix``, the
    only files their readers take) into one host directory: no two with the same name."""
    found: dict[str, str] = {}
    for item in values.get(key, "").split():
        check_word(item, f"{key} item", path)
        normal = posixpath.normpath(item)
        name = posixpath.basename(normal)
        if not item.startswith("/") or not name.endswith(suffix) or len(name) <= len(suffix) or name.startswith("."):
            raise ConfigError(
                f"{path}: {key} item {item!r} is not an absolute image path of a *{suffix} file",
                hint=f"name files in the image by their full path, e.g. /etc/example/NAME{suffix}",
            )
        if name in found:
            raise ConfigError(
                f"{path}: {key} names two files called {name} ({found[name]} and {item})",
                hint="they would be installed at the same place: rename one in the image",
            )
        found[name] = normal
    return tuple(found.values())


@dataclass(frozen=True)
class GlobalConfig:
    runtime: str = "podman"
    runtime_args: tuple[str, ...] = ()
    # Registries: credentials come from an auth file (never from a conf or a command line).
    registry_auth_file: str = ""  # KVC_REGISTRY_AUTH_FILE; "" = $REGISTRY_AUTH_FILE, then containers' lookup
    registry_certs_dir: str = ""  # KVC_REGISTRY_CERTS_DIR: a certs.d root; "" = /etc/containers/certs.d
    registry_tls_verify: bool = True  # KVC_REGISTRY_TLS_VERIFY

    @classmethod
    def load(cls, conf_dir: str) -> GlobalConfig:
        path = os.path.join(conf_dir, GLOBAL_CONF)
        if not os.path.exists(path):
            return cls()
        values = read_conf(path)
        runtime = values.get("KVC_CONTAINER_RUNTIME", "podman") or "podman"
        if runtime not in RUNTIMES:
            raise ConfigError(
                f"{path}: KVC_CONTAINER_RUNTIME={runtime!r} is not supported", hint=f"use one of: {', '.join(RUNTIMES)}"
            )
        args = tuple(values.get("KVC_RUNTIME_ARGS", "").split())
        for arg in args:
            check_word(arg.lstrip("-") or "-", "runtime argument", path)
        paths = {}
        for key in ("KVC_REGISTRY_AUTH_FILE", "KVC_REGISTRY_CERTS_DIR"):
            value = values.get(key, "")
            if value and not os.path.isabs(check_word(value, key, path)):
                raise ConfigError(f"{path}: {key} must be an absolute path", hint=f"write {key}=/full/path")
            paths[key] = value
        return cls(
            runtime,
            args,
            paths["KVC_REGISTRY_AUTH_FILE"],
            paths["KVC_REGISTRY_CERTS_DIR"],
            _flag(values, "KVC_REGISTRY_TLS_VERIFY", True, path),
        )


REGISTRY_FALLBACKS = ("build", "fail")


class Delivery(str, enum.Enum):
    """KVC_DELIVERY: how the instance's modules reach the kernel."""

    DIRECT = "direct"  # kvc inserts them from /var/lib/kvc/NAME/KVER (the default)
    TREE = "tree"  # installed into /lib/modules/KVER/updates/kvc/NAME and indexed: modprobe and udev find them


# Instance names kvc uses for directories of its own below /var/lib/kvc.
RESERVED_NAMES = ("modules", "firmware")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SIGN_HASHES = ("sha256", "sha384", "sha512")
# The signer's own options may start with '-': kvc runs the command itself (no other program's argv).
_SIGNER_ARGUMENT = re.compile(r"[A-Za-z0-9_./=+:@%,~#-]+")


@dataclass(frozen=True)
class SigningConfig:
    """KVC_SIGN_*: who signs the instance's modules on the host. Exactly one of ``key_path`` (a
    private key file) and ``command`` (an external signer's argv) is set."""

    certificate_path: str  # KVC_SIGN_CERT: PEM or DER
    key_path: str = ""  # KVC_SIGN_KEY
    command: tuple[str, ...] = ()  # KVC_SIGN_COMMAND
    hash_name: str = "sha256"  # KVC_SIGN_HASH


def _signing(values: Mapping[str, str], path: str) -> Optional[SigningConfig]:
    key = values.get("KVC_SIGN_KEY", "")
    command = tuple(values.get("KVC_SIGN_COMMAND", "").split())
    cert = values.get("KVC_SIGN_CERT", "")
    hash_name = values.get("KVC_SIGN_HASH", "") or "sha256"
    if not key and not command:
        if cert:
            raise ConfigError(
                f"{path}: KVC_SIGN_CERT is set without a signer", hint="set KVC_SIGN_KEY or KVC_SIGN_COMMAND"
            )
        return None
    if key and command:
        raise ConfigError(f"{path}: KVC_SIGN_KEY and KVC_SIGN_COMMAND are both set", hint="keep one signer")
    if key.startswith("pkcs11:"):
        raise ConfigError(
            f"{path}: KVC_SIGN_KEY={key!r}: PKCS#11 keys are not supported",
            hint="give a key file, or a KVC_SIGN_COMMAND that signs with the token",
        )
    if not cert:
        raise ConfigError(f"{path}: KVC_SIGN_CERT is not set", hint="name the signer's certificate (PEM or DER)")
    if hash_name not in SIGN_HASHES:
        raise ConfigError(f"{path}: KVC_SIGN_HASH={hash_name!r} is not one of {', '.join(SIGN_HASHES)}")
    for what, value in (("KVC_SIGN_KEY", key), ("KVC_SIGN_CERT", cert)):
        if value:
            check_word(value, what, path)
            if not os.path.isabs(value):
                raise ConfigError(f"{path}: {what}={value!r} is not an absolute path", hint="give the full path")
    if command:
        check_word(command[0], "KVC_SIGN_COMMAND program", path)
    for word in command[1:]:
        check_word(word, "KVC_SIGN_COMMAND argument", path, _SIGNER_ARGUMENT)
    return SigningConfig(certificate_path=cert, key_path=key, command=command, hash_name=hash_name)


@dataclass(frozen=True)
class InstanceConfig:
    """One instance: ``/etc/kvc/NAME.conf``."""

    name: str
    source: str
    build_context: str
    build_file: str
    software_version: str
    module_names: tuple[str, ...]
    module_params: Mapping[str, str] = field(default_factory=dict)
    wrapper_tools: tuple[str, ...] = ()
    build_args: tuple[tuple[str, str], ...] = ()
    image: str = ""
    smoke_test: str = ""
    keep_kernels: int = 3
    registry: str = ""  # KVC_REGISTRY: the repository prebuilt images are pulled from (and pushed to)
    registry_fallback: str = "build"  # KVC_REGISTRY_FALLBACK: no image in the registry -> build or fail
    registry_digests: Mapping[str, str] = field(default_factory=dict)  # KVC_REGISTRY_DIGESTS: KVER -> digest
    delivery: Delivery = Delivery.DIRECT  # KVC_DELIVERY
    firmware: tuple[str, ...] = ()  # KVC_FIRMWARE: files or directories below the image's /lib/firmware
    modprobe_conf: tuple[str, ...] = ()  # KVC_MODPROBE_CONF: image files for /etc/modprobe.d
    modules_load: bool = False  # KVC_MODULES_LOAD: /etc/modules-load.d/kvc-NAME.conf (tree delivery)
    udev_rules: tuple[str, ...] = ()  # KVC_UDEV_RULES: image files for /etc/udev/rules.d
    intree_modules: tuple[str, ...] = ()  # KVC_INTREE_MODULES: in-tree modules loaded first, as modprobe would
    verify_devices: tuple[str, ...] = ()  # KVC_VERIFY_DEVICES: extra qemu -device values for kvc verify
    verify_required: bool = False  # KVC_VERIFY_REQUIRED: the reboot gate also wants a passed verification
    signing: Optional[SigningConfig] = None  # KVC_SIGN_*: the host-side module signer (None = unsigned)
    dkms: str = ""  # KVC_DKMS: PACKAGE/VERSION of the DKMS source it was imported from ("" = not one)

    @classmethod
    def load(cls, conf_dir: str, name: str) -> InstanceConfig:
        check_name(name)
        path = os.path.join(conf_dir, f"{name}.conf")
        values = read_conf(path)
        return cls.from_values(name, path, values)

    @classmethod
    def from_values(cls, name: str, path: str, values: Mapping[str, str]) -> InstanceConfig:
        def required(key: str) -> str:
            value = values.get(key, "")
            if not value:
                raise ConfigError(f"{path}: {key} is not set", hint=f"add {key}=... to {path}")
            return value

        image = values.get("KVC_IMAGE", "")
        if image:
            check_word(image, "KVC_IMAGE", path, _IMAGE_REF)
        registry = values.get("KVC_REGISTRY", "")
        if registry:
            check_word(registry, "KVC_REGISTRY", path, _IMAGE_REF)
        if image and registry:
            raise ConfigError(
                f"{path}: KVC_IMAGE and KVC_REGISTRY are both set",
                hint="KVC_REGISTRY replaces KVC_IMAGE (kvc finds the kernel's image there): keep one",
            )
        context = values.get("KMOD_CONTAINER_BUILD_CONTEXT", "")
        if not image and not registry:
            context = required("KMOD_CONTAINER_BUILD_CONTEXT")
        if context:
            check_word(context, "KMOD_CONTAINER_BUILD_CONTEXT", path)
            if "://" not in context and not context.startswith("/"):
                # A relative local context is relative to the directory holding the conf.
                context = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), context))
        build_file = values.get("KMOD_CONTAINER_BUILD_FILE", "") or "Containerfile"
        check_word(build_file, "KMOD_CONTAINER_BUILD_FILE", path)
        if not os.path.isabs(build_file) and os.path.normpath(build_file).split(os.sep)[0] == "..":
            raise ConfigError(
                f"{path}: KMOD_CONTAINER_BUILD_FILE {build_file!r} points outside the build context",
                hint="name a file in the build context (relative to it), or give an absolute path",
            )
        version = check_word(required("KMOD_SOFTWARE_VERSION"), "KMOD_SOFTWARE_VERSION", path)
        modules = tuple(required("KMOD_NAMES").split())
        for module in modules:
            check_module_name(module, path)
        params = {}
        prefix = "KVC_MODULE_PARAMS_"
        for key, value in values.items():
            if key.startswith(prefix):
                module = key[len(prefix) :]
                if module not in {m.replace("-", "_") for m in modules}:
                    raise ConfigError(
                        f"{path}: {key} names no module of KMOD_NAMES",
                        hint="use the module name with '-' written as '_'",
                    )
                params[module] = value
        tools = tuple(values.get("KVC_WRAPPER_TOOLS", "").split())
        for tool in tools:
            check_command_name(tool, path)
        build_args = []
        for item in values.get("KVC_BUILD_ARGS", "").split():
            key, sep, value = item.partition("=")
            if not sep or not _NAME.fullmatch(key):
                raise ConfigError(f"{path}: KVC_BUILD_ARGS item {item!r} is not NAME=value")
            build_args.append((key, value))
        fallback = values.get("KVC_REGISTRY_FALLBACK", "") or ("build" if context else "fail")
        if fallback not in REGISTRY_FALLBACKS:
            raise ConfigError(
                f"{path}: KVC_REGISTRY_FALLBACK={fallback!r} is not one of {', '.join(REGISTRY_FALLBACKS)}",
                hint="build: build when the registry has no image for the kernel; fail: stop with an error",
            )
        if fallback == "build" and not context:
            raise ConfigError(
                f"{path}: KVC_REGISTRY_FALLBACK=build needs KMOD_CONTAINER_BUILD_CONTEXT",
                hint="set the build context, or KVC_REGISTRY_FALLBACK=fail",
            )
        digests = {}
        for item in values.get("KVC_REGISTRY_DIGESTS", "").split():
            release, sep, digest = item.partition("=")
            if not sep or not _KERNEL_RELEASE.fullmatch(release) or not _DIGEST.fullmatch(digest):
                raise ConfigError(
                    f"{path}: KVC_REGISTRY_DIGESTS item {item!r} is not KVER=sha256:<64 hex digits>",
                    hint="pin a kernel's image as KVER=DIGEST, e.g. 6.1.0-57-amd64=sha256:...",
                )
            digests[release] = digest
        if digests and not registry:
            raise ConfigError(f"{path}: KVC_REGISTRY_DIGESTS is set without KVC_REGISTRY", hint="set KVC_REGISTRY")
        intree = tuple(values.get("KVC_INTREE_MODULES", "").split())
        for module in intree:
            if not _MODULE_NAME.fullmatch(module):
                raise ConfigError(
                    f"{path}: KVC_INTREE_MODULES item {module!r} is not a kernel module name",
                    hint="list in-tree module names as modinfo shows them: letters, digits, '_' and '-'",
                )
        devices = tuple(values.get("KVC_VERIFY_DEVICES", "").split())
        for device in devices:
            if not _QEMU_DEVICE.fullmatch(device):
                raise ConfigError(
                    f"{path}: KVC_VERIFY_DEVICES item {device!r} is not a qemu device",
                    hint="write qemu -device values as DRIVER[,PROPERTY=VALUE...] "
                    "(letters, digits and _ . - :, no paths), e.g. edu",
                )
        delivery = values.get("KVC_DELIVERY", "") or Delivery.DIRECT.value
        if delivery not in {d.value for d in Delivery}:
            raise ConfigError(
                f"{path}: KVC_DELIVERY={delivery!r} is not one of {', '.join(d.value for d in Delivery)}",
                hint="direct: kvc inserts the modules itself; tree: into /lib/modules/KVER, found by modprobe and udev",
            )
        firmware = _firmware_paths(values.get("KVC_FIRMWARE", ""), path)
        modprobe_conf = _image_files(values, "KVC_MODPROBE_CONF", ".conf", path)
        if f"kvc-{name}.conf" in {posixpath.basename(p) for p in modprobe_conf}:
            raise ConfigError(
                f"{path}: KVC_MODPROBE_CONF names kvc-{name}.conf, the file kvc writes itself",
                hint="rename the file in the image",
            )
        udev_rules = _image_files(values, "KVC_UDEV_RULES", ".rules", path)
        keep = values.get("KVC_KEEP_KERNELS", "3")
        # isdigit() alone also accepts digits such as '²' that int() refuses.
        if not (keep.isascii() and keep.isdigit()) or int(keep) < 1:
            raise ConfigError(f"{path}: KVC_KEEP_KERNELS={keep!r} must be a whole number >= 1")
        return cls(
            name=name,
            source=path,
            build_context=context,
            build_file=build_file,
            software_version=version,
            module_names=modules,
            module_params=params,
            wrapper_tools=tools,
            build_args=tuple(build_args),
            image=image,
            smoke_test=values.get("KVC_SMOKE_TEST", ""),
            keep_kernels=int(keep),
            registry=registry,
            registry_fallback=fallback,
            registry_digests=digests,
            delivery=Delivery(delivery),
            firmware=firmware,
            modprobe_conf=modprobe_conf,
            modules_load=_flag(values, "KVC_MODULES_LOAD", False, path),
            udev_rules=udev_rules,
            intree_modules=intree,
            verify_devices=devices,
            verify_required=_flag(values, "KVC_VERIFY_REQUIRED", False, path),
            signing=_signing(values, path),
            dkms=check_word(values["KVC_DKMS"], "KVC_DKMS", path) if values.get("KVC_DKMS") else "",
        )
