"""Module signing (kvc.kmod.sign, kvc kmod sign-file) against the kernel's scripts/sign-file.

sign-file from Debian's linux-kbuild-6.1 (installed with linux-headers-amd64) is the oracle: for
the same key, certificate, module and hash our signed module, and sign-file -p/-d's detached
PKCS#7, must be the same bytes. Keys are generated here with cryptography. Debian's kmod modinfo
must print our signatures as kvc kmod modinfo does, also for .ko.xz and .ko.zst.
"""

from __future__ import annotations

import datetime
import lzma
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest
import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from kvc.kmod.errors import KmodError
from kvc.kmod.sign import KeyFileSigner, sign_module, sign_module_file, signature_block
from kvc.kmod.signature import read_signature
from support.debian_kernel import DebianKernel
from support.modbuild import ModuleSpec, build_module
from support.oracle import run_kmod, run_kvc

SIGN_FILE = "/usr/lib/linux-kbuild-6.1/scripts/sign-file"
BITS = (2048, 3072, 4096)
HASHES = ("sha256", "sha384", "sha512")

needs_sign_file = pytest.mark.skipif(
    not Path(SIGN_FILE).exists(), reason="sign-file missing (apt-get install linux-kbuild-6.1)"
)


def write_key(directory: Path, private_key: object, name: str) -> Tuple[Path, Path]:
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvc"), x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    public = private_key.public_key()  # type: ignore[attr-defined]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(private_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_path = directory / f"{name}.key"
    key_path.write_bytes(
        private_key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    cert_path = directory / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Dict[int, Tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("keys")
    return {
        bits: write_key(directory, rsa.generate_private_key(public_exponent=65537, key_size=bits), f"rsa{bits}")
        for bits in BITS
    }


def simple_module(tmp_path: Path) -> Path:
    path = tmp_path / "simple.ko"
    path.write_bytes(
        build_module(
            ModuleSpec(
                name="simple", vermagic="6.1.0-57-amd64 SMP mod_unload modversions ", modinfo=[("license", "GPL")]
            )
        )
    )
    return path


def sign_file(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SIGN_FILE, *args], capture_output=True)


@needs_sign_file
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("hash_name", HASHES)
def test_simple_module_signature_is_sign_files(
    keys: Dict[int, Tuple[Path, Path]], tmp_path: Path, bits: int, hash_name: str
) -> None:
    key, cert = keys[bits]
    module = simple_module(tmp_path)
    signer = KeyFileSigner(key, cert)
    for skid in (False, True):
        expected = tmp_path / "expected.ko"
        assert (
            sign_file(
                [*(["-k"] if skid else []), hash_name, str(key), str(cert), str(module), str(expected)]
            ).returncode
            == 0
        )
        assert sign_module(module.read_bytes(), signer, hash_name, key_id_from_skid=skid) == expected.read_bytes()


@needs_sign_file
def test_sign_file_tool_writes_sign_files_files(keys: Dict[int, Tuple[Path, Path]], tmp_path: Path) -> None:
    key, cert = keys[2048]
    der_cert = tmp_path / "cert.der"
    der_cert.write_bytes(x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER))
    for options in ([], ["-p"], ["-d"], ["-k"], ["-p", "-k"]):
        outputs = {}
        for who in ("theirs", "ours"):
            workdir = tmp_path / f"{who}{''.join(options)}"
            workdir.mkdir()
            module = simple_module(workdir)
            args = [*options, "sha256", str(key), str(der_cert), str(module)]
            result = sign_file(args) if who == "theirs" else run_kvc("sign-file", args)
            assert result.returncode == 0, result.stderr
            outputs[who] = {path.name: path.read_bytes() for path in workdir.iterdir()}
        assert outputs["ours"] == outputs["theirs"], options
    # -s appends a PKCS#7 made elsewhere (here the -d file); sign-file reads neither hash nor certificate.
    detached = tmp_path / "theirs-d" / "simple.ko.p7s"
    for who in ("theirs", "ours"):
        module = simple_module(tmp_path / f"{who}-d")
        args = ["-s", str(detached), "unread", str(tmp_path / "unread.pem"), str(module), str(tmp_path / f"{who}-s.ko")]
        assert (sign_file(args) if who == "theirs" else run_kvc("sign-file", args)).returncode == 0
    assert (tmp_path / "ours-s.ko").read_bytes() == (tmp_path / "theirs-s.ko").read_bytes()
    assert (tmp_path / "ours-s.ko").read_bytes() == (
        tmp_path / "theirs-d" / "simple.ko"
    ).read_bytes() + signature_block(module.read_bytes(), KeyFileSigner(key, cert), "sha256")
    # With DEST the module stays as it was and DEST gets the signed module.
    module = simple_module(tmp_path)
    assert run_kvc("sign-file", ["sha384", str(key), str(cert), str(module), str(tmp_path / "ours.ko")]).returncode == 0
    assert sign_file(["sha384", str(key), str(cert), str(module), str(tmp_path / "theirs.ko")]).returncode == 0
    assert (tmp_path / "ours.ko").read_bytes() == (tmp_path / "theirs.ko").read_bytes()
    assert module.read_bytes() == simple_module(tmp_path).read_bytes()


@needs_sign_file
def test_sign_file_tool_exit_codes(keys: Dict[int, Tuple[Path, Path]], tmp_path: Path) -> None:
    key, cert = keys[2048]
    module = simple_module(tmp_path)
    original = module.read_bytes()
    for args, status in (
        ([], 2),
        (["sha256", str(key), str(cert)], 2),
        (["-x", "sha256", str(key), str(cert), str(module)], 2),
        (["sha256", str(key), str(cert), str(tmp_path / "missing.ko")], 1),
        (["sha256", str(tmp_path / "missing.key"), str(cert), str(module)], 1),
        (["nohash", str(key), str(cert), str(module)], 1),
    ):
        assert sign_file(args).returncode == status, args
        ours = run_kvc("sign-file", args)
        assert ours.returncode == status, args
        assert b"Traceback" not in ours.stderr
        assert ours.stderr.count(b"\n") <= 3, ours.stderr
    assert module.read_bytes() == original


def test_ecdsa_key_is_refused_saying_why(tmp_path: Path) -> None:
    key, cert = write_key(tmp_path, ec.generate_private_key(ec.SECP384R1()), "ec")
    with pytest.raises(KmodError) as info:
        KeyFileSigner(key, cert)
    assert "ECDSA" in info.value.brief and "CONFIG_CRYPTO_ECDSA is not set" in info.value.details
    ours = run_kvc("sign-file", ["sha256", str(key), str(cert), str(simple_module(tmp_path))])
    assert ours.returncode == 1 and b"ECDSA" in ours.stderr


@pytest.mark.oracle
def test_the_ecdsa_refusal_is_what_debians_config_says(kernel_tree: DebianKernel) -> None:
    config = (kernel_tree.root / "boot" / f"config-{kernel_tree.release}").read_text().splitlines()
    assert "# CONFIG_CRYPTO_ECDSA is not set" in config
    assert "CONFIG_MODULE_SIG_KEY_TYPE_RSA=y" in config


def test_unknown_hash_is_refused(keys: Dict[int, Tuple[Path, Path]], tmp_path: Path) -> None:
    with pytest.raises(KmodError, match="unsupported signature hash 'md5'"):
        signature_block(b"module", KeyFileSigner(*keys[2048]), "md5")


def test_missing_cryptography_is_one_clear_error(
    keys: Dict[int, Tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes the import fail as it does where the package is not installed.
    for name in [name for name in sys.modules if name.startswith("cryptography")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(KmodError) as info:
        KeyFileSigner(*keys[2048])
    assert "'cryptography'" in info.value.brief and "kvc[sign]" in info.value.hint


def compressed(path: Path, kind: str) -> Path:
    data = path.read_bytes()
    if kind == "xz":
        out = path.with_name(path.name + ".xz")
        out.write_bytes(lzma.compress(data, check=lzma.CHECK_CRC32))
    else:
        out = path.with_name(path.name + ".zst")
        out.write_bytes(zstandard.ZstdCompressor().compress(data))
    return out


@needs_sign_file
@pytest.mark.oracle
def test_real_modules_every_combination(
    kernel_tree: DebianKernel, keys: Dict[int, Tuple[Path, Path]], tmp_path: Path
) -> None:
    modules = [p for p in kernel_tree.modules() if p.name in ("cachefiles.ko", "ext4.ko", "dummy.ko")]
    assert len(modules) == 3
    compared = 0
    for module in modules:
        data = module.read_bytes()
        for bits in BITS:
            key, cert = keys[bits]
            signer = KeyFileSigner(key, cert)
            for hash_name in HASHES:
                expected = tmp_path / "expected.ko"
                assert sign_file([hash_name, str(key), str(cert), str(module), str(expected)]).returncode == 0
                assert sign_module(data, signer, hash_name) == expected.read_bytes(), (module, bits, hash_name)
                compared += 1
    assert compared == 27


@needs_sign_file
@pytest.mark.oracle
def test_every_module_of_the_tree(
    kernel_tree: DebianKernel, keys: Dict[int, Tuple[Path, Path]], tmp_path: Path
) -> None:
    """Every module of Debian's tree, signed as sign-file signs it (about 35 s, most of it sign-file's)."""
    key, cert = keys[2048]
    signer = KeyFileSigner(key, cert)
    expected = tmp_path / "expected.ko"
    modules = kernel_tree.modules()
    assert len(modules) > 3500
    for module in modules:
        assert sign_file(["sha256", str(key), str(cert), str(module), str(expected)]).returncode == 0
        assert sign_module(module.read_bytes(), signer, "sha256") == expected.read_bytes(), module


@needs_sign_file
@pytest.mark.oracle
def test_compressed_modules_signed_before_compression(
    kernel_tree: DebianKernel, keys: Dict[int, Tuple[Path, Path]], tmp_path: Path
) -> None:
    (source,) = [p for p in kernel_tree.modules() if p.name == "dummy.ko"]
    key, cert = keys[3072]
    signer = KeyFileSigner(key, cert)
    plain = tmp_path / "dummy.ko"
    shutil.copyfile(source, plain)
    expected = tmp_path / "expected.ko"
    assert sign_file(["sha512", str(key), str(cert), str(plain), str(expected)]).returncode == 0
    signed = [sign_module_file(plain, signer, "sha512", dest=tmp_path / "signed.ko")]
    for kind in ("xz", "zst"):
        packed = compressed(plain, kind)
        sign_module_file(packed, signer, "sha512")
        signed.append(packed)
    for path in signed:
        data = path.read_bytes()
        if path.suffix == ".xz":
            data = lzma.decompress(data)
        elif path.suffix == ".zst":
            data = zstandard.ZstdDecompressor().stream_reader(data).read()
        assert data == expected.read_bytes(), path
        ours = run_kvc("modinfo", [str(path)])
        theirs = run_kmod("modinfo", [str(path)])
        assert ours == theirs
        assert b"\nsigner:         rsa3072\n" in ours.stdout
        assert read_signature(data, str(path)) is not None
