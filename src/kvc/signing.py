"""The host-side module signers an instance names (KVC_SIGN_*): a private key file, whose mode
is checked before it is read, or an external signer command. Keys are never copied: the key file
is read in this process only, and an external signer keeps its key to itself.

External signer protocol: kvc runs KVC_SIGN_COMMAND's words (no shell) with the hash name
(sha256, sha384, sha512) appended as the last argument, writes the bytes to sign on its stdin and
reads the raw RSA PKCS#1 v1.5 signature from its stdout. A non-zero exit or an empty output is an
error (exit 4). The certificate comes from KVC_SIGN_CERT."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass

from kvc import proc
from kvc.config import InstanceConfig, SigningConfig
from kvc.distribute import LABEL_SIGNER_KEY
from kvc.errors import CommandError, ConfigError, StateError, UsageError
from kvc.extract import copy_instance_modules
from kvc.images import built_image
from kvc.kmod.sign import (
    KeyFileSigner,
    Signer,
    SigningError,
    certificate_from_pem_or_der,
    read_certificate,
    sign_module_file,
)
from kvc.runtime import ContainerRuntime

SIGNER_TIMEOUT = 300.0


def check_key_file(path: str) -> str:
    """``path`` if it is a regular file owned by root (or by us) that only its owner can read."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the signing key: {exc.strerror}", hint="check KVC_SIGN_KEY") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: the signing key is not a regular file", hint="point KVC_SIGN_KEY at the key file")
    if info.st_uid not in (0, os.getuid()):
        raise ConfigError(
            f"{path}: the signing key is owned by uid {info.st_uid}, not by root",
            hint=f"chown root: {path}",
        )
    if stat.S_IMODE(info.st_mode) not in (0o600, 0o400):
        raise ConfigError(
            f"{path}: the signing key has mode {stat.S_IMODE(info.st_mode):04o}: others can read it",
            hint=f"chmod 600 {path}",
        )
    return path


def read_certificate_file(path: str) -> bytes:
    """The DER bytes of the certificate at ``path`` (PEM or DER)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the certificate: {exc.strerror}", hint="check KVC_SIGN_CERT") from None
    try:
        return certificate_from_pem_or_der(data)
    except SigningError as exc:
        raise ConfigError(f"{path}: not an X.509 certificate ({exc})", hint="give a PEM or DER certificate") from None


class CommandSigner:
    """Signs through an external command (see the module's docstring for the protocol)."""

    def __init__(self, command: tuple[str, ...], certificate_der: bytes) -> None:
        self.command = command
        self.certificate_der = certificate_der

    def sign(self, data: bytes, hash_name: str) -> bytes:
        argv = [*self.command, hash_name]
        hint = "check KVC_SIGN_COMMAND: it reads the bytes on stdin and writes the raw signature on stdout"
        signature = proc.run_bytes(argv, data, timeout=SIGNER_TIMEOUT, hint=hint)
        if not signature:
            raise CommandError(argv, 0, "the signer wrote no signature", hint=hint)
        return signature


def signer_for(config: SigningConfig) -> Signer:
    """The signer ``config`` names, its key file and certificate checked."""
    certificate = read_certificate_file(config.certificate_path)
    if config.command:
        return CommandSigner(config.command, certificate)
    return KeyFileSigner(check_key_file(config.key_path), config.certificate_path)


# ---- signing a built image ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignPlan:
    """Sign the instance's modules in its image for one kernel, into a new image under the same
    tag, or nothing when the image carries this signer's key id already."""

    instance: InstanceConfig
    kernel_release: str
    tag: str
    image_id: str
    signed_by: str  # the image's kvc.signer-key-id label ("" when kvc has not signed it)
    certificate: str  # KVC_SIGN_CERT

    @property
    def up_to_date(self) -> bool:
        return bool(self.signed_by) and self.signed_by == certificate_key_id(self.certificate)

    def describe(self) -> str:
        if self.up_to_date:
            return f"{self.tag} is signed by {self.signed_by} already"
        config = self.instance.signing
        signer = f"the command {' '.join(config.command)}" if config and config.command else "the key file"
        return "\n".join(
            [
                f"sign {self.instance.name} modules in {self.tag} ({self.image_id[:12]}) for {self.kernel_release}:",
                f"  copy {' '.join(self.instance.module_names)} out of the image into a private directory",
                f"  sign each with {signer} ({config.hash_name if config else ''}, certificate {self.certificate})",
                f"  build {self.tag} from {self.image_id[:12]} with the signed modules, labelled "
                f"{LABEL_SIGNER_KEY}; the private directory is removed",
            ]
        )


def certificate_key_id(path: str) -> str:
    """The key id modinfo prints as sig_key for sign-file's default signatures: the certificate's
    serial number, XX:XX:... hex."""
    serial = read_certificate(read_certificate_file(path)).serial
    content = serial[2:] if serial[1] < 0x80 else serial[2 + (serial[1] & 0x7F) :]
    # As a number (OpenSSL's BN_bn2bin): no leading zero bytes.
    return ":".join(f"{byte:02X}" for byte in content.lstrip(b"\0") or b"\0")


def plan_sign(instance: InstanceConfig, kernel_release: str, runtime: ContainerRuntime) -> SignPlan:
    if instance.signing is None:
        raise UsageError(
            f"{instance.name} has no signer",
            hint=f"set KVC_SIGN_CERT and KVC_SIGN_KEY (or KVC_SIGN_COMMAND) in {instance.source}",
        )
    tag, info = built_image(runtime, instance, kernel_release)
    signed_by = info.labels.get(LABEL_SIGNER_KEY, "")
    plan = SignPlan(instance, kernel_release, tag, info.id, signed_by, instance.signing.certificate_path)
    if signed_by and not plan.up_to_date:
        raise StateError(
            f"{tag} is signed by another key ({signed_by})",
            hint=f"rebuild it ('kvc build {instance.name} --kernel {kernel_release} --force'), then sign it",
        )
    return plan


def execute_sign(plan: SignPlan, runtime: ContainerRuntime) -> str:
    """Sign into a new image; what was done, for people. Only the signed modules enter the build
    context: the key stays in this process (or with the external signer)."""
    if plan.up_to_date:
        return plan.describe()
    config = plan.instance.signing
    assert config is not None  # plan_sign checked
    signer = signer_for(config)
    key_id = certificate_key_id(plan.certificate)
    with tempfile.TemporaryDirectory(prefix="kvc-sign-") as context:
        with runtime.open_image(plan.tag) as files:
            copies = copy_instance_modules(files, plan.instance, plan.kernel_release, f"image {plan.tag}", context)
        lines = [f"FROM {plan.image_id}"]
        for image_path, local in copies.values():
            sign_module_file(local, signer, config.hash_name)
            lines.append(f"COPY {json.dumps([os.path.basename(local), image_path])}")
        build_file = os.path.join(context, "Containerfile")
        with open(build_file, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        runtime.build(context, build_file, plan.tag, (), {LABEL_SIGNER_KEY: key_id}, pull="never")
    return f"signed {plan.tag}: {', '.join(copies)} signed by {key_id}"
