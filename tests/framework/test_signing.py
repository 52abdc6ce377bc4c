"""kvc.signing: the instance's signers (a key file whose mode is checked, an external signer
command speaking kvc's stdin/stdout protocol) and the KVC_SIGN_* conf keys. The command signer
must give the very signature the key file gives (RSA PKCS#1 v1.5 is deterministic)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvc.config import InstanceConfig, SigningConfig
from kvc.errors import CommandError, ConfigError, ExitCode
from kvc.kmod.sign import KeyFileSigner, sign_module
from kvc.signing import CommandSigner, check_key_file, signer_for

SIGNER_SCRIPT = Path(__file__).resolve().parent.parent / "support" / "ext_signer.py"
MODULE_BYTES = b"\x7fELF" + bytes(range(256)) * 16


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("key")
    key, cert = directory / "signing.key", directory / "signing.pem"
    subprocess.run(
        ["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "1",
         "-subj", "/O=kvc test/CN=kvc signing test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)
    return key, cert


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_command_signer_signs_as_the_key_file_does(key_pair: tuple[Path, Path], hash_name: str) -> None:
    key, cert = key_pair
    by_file = signer_for(SigningConfig(certificate_path=str(cert), key_path=str(key), hash_name=hash_name))
    by_command = signer_for(
        SigningConfig(certificate_path=str(cert), command=(sys.executable, str(SIGNER_SCRIPT), str(key)))
    )
    assert isinstance(by_file, KeyFileSigner) and isinstance(by_command, CommandSigner)
    signed = sign_module(MODULE_BYTES, by_command, hash_name)
    assert signed == sign_module(MODULE_BYTES, by_file, hash_name)
    assert signed.startswith(MODULE_BYTES) and signed.endswith(b"~Module signature appended~\n")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o700])
def test_key_file_readable_by_others_is_refused(key_pair: tuple[Path, Path], tmp_path: Path, mode: int) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(key_pair[0].read_bytes())
    loose.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        check_key_file(str(loose))
    assert str(loose) in caught.value.brief and f"chmod 600 {loose}" == caught.value.hint
    loose.chmod(0o400)
    assert check_key_file(str(loose)) == str(loose)


def test_key_file_not_regular_or_missing(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "absent.key"):
        with pytest.raises(ConfigError) as caught:
            check_key_file(str(path))
        assert str(path) in caught.value.brief


@pytest.mark.parametrize(
    ("script", "needle"),
    [("import sys; sys.stderr.write('token locked'); sys.exit(3)", "token locked"), ("pass", "no signature")],
)
def test_failing_or_silent_signer_command(key_pair: tuple[Path, Path], script: str, needle: str) -> None:
    signer = signer_for(SigningConfig(certificate_path=str(key_pair[1]), command=(sys.executable, "-c", script)))
    with pytest.raises(CommandError) as caught:
        signer.sign(MODULE_BYTES, "sha256")
    assert caught.value.exit_code == ExitCode.EXTERNAL
    assert needle in caught.value.output_tail


BASE = {"KMOD_CONTAINER_BUILD_CONTEXT": "/srv/ctx", "KMOD_SOFTWARE_VERSION": "1.0", "KMOD_NAMES": "demo"}


def test_conf_keys_parse() -> None:
    values = {**BASE, "KVC_SIGN_KEY": "/etc/kvc/k.key", "KVC_SIGN_CERT": "/etc/kvc/k.der", "KVC_SIGN_HASH": "sha512"}
    config = InstanceConfig.from_values("demo", "/etc/kvc/demo.conf", values)
    assert config.signing == SigningConfig(
        certificate_path="/etc/kvc/k.der", key_path="/etc/kvc/k.key", hash_name="sha512"
    )
    command = {**BASE, "KVC_SIGN_COMMAND": "/usr/bin/remote-sign --slot 2", "KVC_SIGN_CERT": "/etc/kvc/k.pem"}
    signing = InstanceConfig.from_values("demo", "/etc/kvc/demo.conf", command).signing
    assert signing is not None and signing.command == ("/usr/bin/remote-sign", "--slot", "2")
    assert InstanceConfig.from_values("demo", "/etc/kvc/demo.conf", BASE).signing is None


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"KVC_SIGN_KEY": "/k.key"}, "KVC_SIGN_CERT is not set"),
        ({"KVC_SIGN_CERT": "/k.pem"}, "without a signer"),
        ({"KVC_SIGN_KEY": "/k.key", "KVC_SIGN_COMMAND": "/s", "KVC_SIGN_CERT": "/k.pem"}, "both set"),
        ({"KVC_SIGN_KEY": "/k.key", "KVC_SIGN_CERT": "/k.pem", "KVC_SIGN_HASH": "md5"}, "KVC_SIGN_HASH"),
        ({"KVC_SIGN_KEY": "k.key", "KVC_SIGN_CERT": "/k.pem"}, "not an absolute path"),
        ({"KVC_SIGN_KEY": "pkcs11:token=x", "KVC_SIGN_CERT": "/k.pem"}, "PKCS#11"),
        ({"KVC_SIGN_COMMAND": "/s -$(id)", "KVC_SIGN_CERT": "/k.pem"}, "KVC_SIGN_COMMAND"),
    ],
)
def test_bad_conf_keys(extra: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        InstanceConfig.from_values("demo", "/etc/kvc/demo.conf", {**BASE, **extra})
    assert needle in caught.value.brief
    assert os.path.basename("/etc/kvc/demo.conf") in caught.value.brief
