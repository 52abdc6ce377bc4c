"""The host-side module signers an instance names (KVC_SIGN_*): a private key file, whose mode
is checked before it is read, or an external signer command. Keys are never copied: the key file
is read in this process only, and an external signer keeps its key to itself.

External signer protocol: kvc runs KVC_SIGN_COMMAND's words (no shell) with the hash name
(sha256, sha384, sha512) appended as the last argument, writes the bytes to sign on its stdin and
reads the raw RSA PKCS#1 v1.5 signature from its stdout. A non-zero exit or an empty output is an
error (exit 4). The certificate comes from KVC_SIGN_CERT."""

from __future__ import annotations

import os
import stat

from kvc import proc
from kvc.config import SigningConfig
from kvc.errors import CommandError, ConfigError
from kvc.kmod.sign import KeyFileSigner, Signer, SigningError, certificate_from_pem_or_der

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
