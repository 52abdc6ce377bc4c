"""kvc.signing: the instance's signers (a key file whose mode is checked, an external signer
command speaking kvc's stdin/stdout protocol) and the KVC_SIGN_* conf keys. The command signer
must give the very signature the key file gives (RSA PKCS#1 v1.5 is deterministic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvc.config import InstanceConfig, SigningConfig
from kvc.errors import CommandError, ConfigError, ExitCode
from kvc.kmod.sign import KeyFileSigner, sign_module
from kvc.signing import CommandSigner, check_key_file, signer_for
from support.debian_kernel import DebianKernel
from support.example import unique_prefix, write_example_conf
from support.oracle import kmod_tool

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


# ---- signing a built image, and where the key must never be -------------------------------------------------


def _secret_forms(key: Path) -> dict[str, bytes]:
    """The private key as it could leak: its PEM body lines, its DER, and its private exponent."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = key.read_bytes()
    private = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    exponent = private.private_numbers().d
    body = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    return {
        "pem line": body[len(body) // 2],
        "der": der[64:128],
        "private exponent": exponent.to_bytes((exponent.bit_length() + 7) // 8, "big")[:48],
    }


@pytest.mark.podman
@pytest.mark.parametrize("signer_kind", ["key-file", "command"])
def test_a_signed_image_holds_signed_modules_and_never_the_key(
    key_pair: tuple[Path, Path], tmp_path: Path, indexed_kernel_tree: DebianKernel, signer_kind: str
) -> None:
    key, cert = key_pair
    release = indexed_kernel_tree.release
    root, scratch = tmp_path / "root", tmp_path / "tmpdir"
    scratch.mkdir()
    signer = (
        f'KVC_SIGN_KEY="{key}"\n'
        if signer_kind == "key-file"
        else f'KVC_SIGN_COMMAND="{sys.executable} {SIGNER_SCRIPT} {key}"\n'
    )
    env = {**os.environ, "KVC_ROOT": str(root), "TMPDIR": str(scratch)}
    with unique_prefix("kvcsign") as name:
        write_example_conf(root, name, f'KVC_SIGN_CERT="{cert}"\n{signer}')
        run = subprocess.run(
            [sys.executable, "-m", "kvc", "-v", "build", name, "--kernel", release], capture_output=True, env=env
        )
        assert run.returncode == 0, run.stderr.decode()
        tag = f"{name}-1.0.0:{release}"
        assert f"signed {tag}: simple_kmod, simple_procfs_kmod signed by ".encode() in run.stdout
        again = subprocess.run(
            [sys.executable, "-m", "kvc", "sign", name, "--kernel", release], capture_output=True, env=env
        )
        assert again.returncode == 0 and b"is signed by" in again.stdout and b"already" in again.stdout, again

        saved = tmp_path / "image.tar"
        subprocess.run(["podman", "save", "--format", "docker-archive", "-o", str(saved), tag], check=True)
        inspected = subprocess.run(["podman", "image", "inspect", tag], capture_output=True, check=True).stdout
        labels = json.loads(inspected)[0]["Labels"]
        haystacks = {
            "image layers": saved.read_bytes(),
            "image config": inspected,
            "kvc -v output": run.stdout + run.stderr,
        }
        for what, needle in _secret_forms(key).items():
            for where, haystack in haystacks.items():
                assert needle not in haystack, f"the key's {what} is in the {where}"
        assert list(scratch.iterdir()) == []  # no temporary file left behind

        container = subprocess.run(["podman", "create", tag, "true"], capture_output=True, text=True, check=True)
        try:
            module = tmp_path / "simple-kmod.ko"
            inside = f"/lib/modules/{release}/extra/simple-kmod.ko"
            subprocess.run(["podman", "cp", f"{container.stdout.strip()}:{inside}", str(module)], check=True)
        finally:
            subprocess.run(["podman", "rm", container.stdout.strip()], capture_output=True)
        ours = subprocess.run([sys.executable, "-m", "kvc", "kmod", "modinfo", str(module)], capture_output=True)
        theirs = subprocess.run([kmod_tool("modinfo"), str(module)], capture_output=True)
        assert ours.stdout == theirs.stdout and b"signer:         kvc signing test" in ours.stdout
        sig_key = next(line for line in ours.stdout.decode().splitlines() if line.startswith("sig_key:"))
        assert labels["kvc.signer-key-id"] == sig_key.split()[1]
