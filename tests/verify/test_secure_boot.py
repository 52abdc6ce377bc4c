"""``kvc verify --secure-boot``: the real kernel, booted through OVMF with Secure Boot on and a
certificate enrolled as a MOK (MokListRT), judges module signatures.

Fast tests: the MokListRT payload, the certificate's kernel name, the qemu line for the firmware,
the per-module verdicts read from the kernel's answers, and the one-line errors.

The ``vm`` tests build tests/kmods/kvc-hello.c against Debian's headers, sign it here with
``openssl cms`` plus the module-signature trailer (byte-identical to the kernel's sign-file, see
the README's Secure Boot section), put each variant in an image of its own instance and verify it
with Secure Boot on and our certificate enrolled: signed with the enrolled key it loads without
the E taint; unsigned, signed with another key, or with one byte flipped, the kernel refuses it
(EKEYREJECTED) -- one boot per case, since the first refusal stops the load.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvc.verify.qemu import GuestMachine
from kvc.verify.run import signature_verdict
from kvc.verify.secureboot import (
    EFI_CERT_X509_GUID,
    KVC_OWNER_GUID,
    OVMF_SECURE_CODE,
    mok_signature_list,
    read_certificate,
)
from support.debian_kernel import DebianKernel
from support.example import unique_prefix
from support.kvccli import kvc

ROOT = Path(__file__).resolve().parents[2]
KMODS = ROOT / "tests" / "kmods"
SHARED_CACHE = Path(os.environ.get("KVC_TEST_CACHE") or Path.home() / ".cache" / "kvc-test") / "kvc"
MODULE_SIGNATURE_MAGIC = b"~Module signature appended~\n"
PKEY_ID_PKCS7 = 2


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A MOK-style RSA key and certificate (as the reference notes make them)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "30",
            "-subj",
            f"/O=kvc tests/CN={name}",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "keyUsage=digitalSignature",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def sign(module: bytes, key: Path, cert: Path) -> bytes:
    """``module`` with a kernel module signature appended, as scripts/sign-file appends it."""
    signature = subprocess.run(
        [
            "openssl",
            "cms",
            "-sign",
            "-binary",
            "-noattr",
            "-nocerts",
            "-nosmimecap",
            "-md",
            "sha256",
            "-signer",
            str(cert),
            "-inkey",
            str(key),
            "-outform",
            "DER",
        ],
        input=module,
        check=True,
        capture_output=True,
    ).stdout
    trailer = struct.pack(">BBBBB3xI", 0, 0, PKEY_ID_PKCS7, 0, 0, len(signature)) + MODULE_SIGNATURE_MAGIC
    return module + signature + trailer


# ---- without a VM ---------------------------------------------------------------------------------


def test_the_moklistrt_payload_is_one_x509_signature_list(tmp_path: Path) -> None:
    _, cert_path = make_certificate(tmp_path, "kvc list signer")
    cert = read_certificate(str(cert_path))
    payload = mok_signature_list(cert.der)
    assert payload[:16] == EFI_CERT_X509_GUID.bytes_le
    list_size, header_size, signature_size = struct.unpack_from("<III", payload, 16)
    assert (list_size, header_size, signature_size) == (len(payload), 0, 16 + len(cert.der))
    assert uuid.UUID(bytes_le=payload[28:44]) == KVC_OWNER_GUID and payload[44:] == cert.der
    der = subprocess.run(
        ["openssl", "x509", "-in", str(cert_path), "-outform", "DER"], check=True, capture_output=True
    ).stdout
    assert cert.der == der and read_certificate(str(cert_path)) == cert
    (tmp_path / "cert.der").write_bytes(der)
    assert read_certificate(str(tmp_path / "cert.der")).der == der
    skid = subprocess.run(
        ["openssl", "x509", "-in", str(cert_path), "-noout", "-ext", "subjectKeyIdentifier"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()[-1]
    assert cert.key_id == skid.strip().replace(":", "").lower()
    assert cert.name == "kvc tests: kvc list signer"  # the CN does not start with the O: the kernel joins them


def test_the_firmware_boot_adds_smm_and_the_flash_drives(tmp_path: Path) -> None:
    plain = GuestMachine("/k", "/i", "console=ttyS0", str(tmp_path / "log"))
    assert plain.argv()[plain.argv().index("-machine") + 1] == "q35" and "-drive" not in plain.argv()
    secure = GuestMachine(
        "/k",
        "/i",
        "console=ttyS0",
        str(tmp_path / "log"),
        firmware_code=OVMF_SECURE_CODE,
        firmware_vars="/w/vars.fd",
        secure_boot=True,
    ).argv()
    assert secure[secure.index("-machine") + 1] == "q35,smm=on"
    assert secure[secure.index("-global") + 1] == "driver=cfi.pflash01,property=secure,value=on"
    drives = [secure[index + 1] for index, word in enumerate(secure) if word == "-drive"]
    assert drives == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_SECURE_CODE}",
        "if=pflash,format=raw,unit=1,file=/w/vars.fd",
    ]


def test_the_verdicts_come_from_the_kernels_answer_and_lines() -> None:
    refused = {"loaded": False, "errno": "EKEYREJECTED"}
    assert signature_verdict({"loaded": True, "taint": "O"}) == "accepted"
    assert signature_verdict({"loaded": True, "taint": "OE"}) == "loaded-unsigned"
    assert signature_verdict({**refused, "log": ["Loading of unsigned module is rejected"]}) == "unsigned-rejected"
    unavailable = {**refused, "log": ["Loading of module with unavailable key is rejected"]}
    assert signature_verdict(unavailable) == "unavailable-key-rejected"
    assert signature_verdict({**refused, "log": []}) == "signature-rejected"
    lockdown = {"loaded": False, "errno": "EPERM", "log": ["Lockdown: insmod: unsigned module loading is restricted"]}
    assert signature_verdict(lockdown) == "lockdown-refused"
    assert signature_verdict({"loaded": False, "errno": "ENOEXEC", "log": []}) == "not-loaded"


def test_secure_boot_needs_a_certificate_and_sb_cert_needs_secure_boot(tmp_path: Path) -> None:
    env = {"KVC_ROOT": str(tmp_path / "root")}
    conf = tmp_path / "root" / "etc" / "kvc"
    conf.mkdir(parents=True)
    (conf / "sb.conf").write_text('KMOD_CONTAINER_BUILD_CONTEXT="/x"\nKMOD_SOFTWARE_VERSION="1"\nKMOD_NAMES="m"\n')
    alone = kvc(["verify", "sb", "--sb-cert", "/c.pem"], env)
    assert alone.returncode == 2 and "--sb-cert goes with --secure-boot" in alone.stderr
    missing = kvc(["verify", "sb", "--secure-boot"], env)
    assert missing.returncode != 0 and "needs the certificate to enroll for instance sb" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    bad = kvc(["verify", "sb", "--secure-boot", "--sb-cert", str(tmp_path / "garbage.pem"), "--dry-run"], env)
    assert bad.returncode != 0 and "is not an X.509 certificate" in bad.stderr and "Traceback" not in bad.stderr
    # Without --sb-cert, the instance's own certificate (KVC_SIGN_CERT) is the one enrolled.
    with (conf / "sb.conf").open("a") as handle:
        handle.write(f'KVC_SIGN_CERT="{tmp_path / "garbage.pem"}"\nKVC_SIGN_COMMAND="signer"\n')
    configured = kvc(["verify", "sb", "--secure-boot", "--dry-run"], env)
    assert configured.returncode != 0 and "is not an X.509 certificate" in configured.stderr, configured.stderr
    assert str(tmp_path / "garbage.pem") in configured.stderr


# ---- in a real VM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sb_env(tmp_path_factory: pytest.TempPathFactory, indexed_kernel_tree: DebianKernel) -> Iterator[dict[str, Any]]:
    for program in ("qemu-system-x86_64", "podman", "make", "openssl"):
        assert shutil.which(program), f"{program} is missing: run scripts/setup.sh --containers"
    assert os.path.isfile(OVMF_SECURE_CODE), "OVMF is missing: run scripts/setup.sh"
    tmp = tmp_path_factory.mktemp("secureboot")
    release = indexed_kernel_tree.release
    headers = Path("/usr/src") / f"linux-headers-{release}"
    assert headers.is_dir(), "headers and kernel ABI differ"
    shutil.copytree(KMODS, tmp / "src")
    built = subprocess.run(
        ["make", f"KDIR={headers}", "MODULES=kvc-hello", "modules"],
        cwd=tmp / "src",
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    module = (tmp / "src" / "kvc-hello.ko").read_bytes()
    assert MODULE_SIGNATURE_MAGIC not in module[-64:]
    enrolled_key, enrolled_cert = make_certificate(tmp, "kvc enrolled signer")
    other_key, other_cert = make_certificate(tmp, "kvc other signer")
    signed = sign(module, enrolled_key, enrolled_cert)
    middle = len(module) // 2
    variants = {
        "signed": signed,
        "unsigned": module,
        "otherkey": sign(module, other_key, other_cert),
        "flipped": signed[:middle] + bytes([signed[middle] ^ 0xFF]) + signed[middle + 1 :],
    }
    env = {"KVC_ROOT": str(tmp / "root"), "KVC_CACHE_DIR": str(SHARED_CACHE)}
    conf_dir = tmp / "root" / "etc" / "kvc"
    conf_dir.mkdir(parents=True)
    with unique_prefix("kvcsb") as prefix:
        names = {}
        for variant, data in variants.items():
            name = names[variant] = f"{prefix}-{variant}"
            context = tmp / variant
            context.mkdir()
            (context / "kvc-hello.ko").write_bytes(data)
            (context / "Containerfile").write_text("FROM scratch\nARG KVER\nCOPY *.ko /lib/modules/${KVER}/extra/\n")
            values = {"KMOD_CONTAINER_BUILD_CONTEXT": str(context), "KMOD_SOFTWARE_VERSION": "1.0"}
            values["KMOD_NAMES"] = "kvc-hello"
            (conf_dir / f"{name}.conf").write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in values.items()))
            # Tagged directly, as a prebuilt (and separately signed) image would be.
            tag = ["--label", f"name={name}", "-t", f"{name}-1.0:{release}"]
            subprocess.run(
                ["podman", "build", "-q", "--build-arg", f"KVER={release}", *tag, str(context)],
                check=True,
                capture_output=True,
            )
        yield {
            "env": env,
            "release": release,
            "kernel_dir": str(indexed_kernel_tree.root),
            "names": names,
            "cert": enrolled_cert,
        }


def verify_secure(sb_env: dict[str, Any], variant: str, *extra: str) -> tuple[int, dict[str, Any]]:
    args = ["verify", sb_env["names"][variant], "--kernel", sb_env["release"], "--kernel-dir", sb_env["kernel_dir"]]
    args += ["--accel", "tcg", "--secure-boot", "--sb-cert", str(sb_env["cert"]), "--json", *extra]
    result = kvc(args, sb_env["env"], timeout=400)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def assert_enforcing(report: dict[str, Any]) -> None:
    secure = report["secure_boot"]
    assert secure["efi"] and secure["secure_boot"] is True, json.dumps(secure, indent=2)
    assert secure["lockdown"] == "integrity" and secure["sig_enforce"] is True
    assert ".machine" in secure["keyrings"], json.dumps(secure, indent=2)
    lines = secure["kernel_lines"]
    mok = lines.index("integrity: Loading X.509 certificate: UEFI:MokListRT")
    assert lines[mok + 1] == f"integrity: Loaded X.509 cert '{secure['key']}'"
    assert report["vm"]["boot"] == "bzimage" and report["vm"]["firmware"] == OVMF_SECURE_CODE


@pytest.mark.vm
@pytest.mark.podman
def test_signed_with_the_enrolled_key_loads_without_the_unsigned_taint(sb_env: dict[str, Any]) -> None:
    code, report = verify_secure(sb_env, "signed")
    assert code == 0, json.dumps(report, indent=2)
    assert_enforcing(report)
    (module,) = report["modules"]
    assert module["loaded"] and module["signature"] == "accepted"
    assert "E" not in module["taint"] and not report["tainted"] & (1 << 13)  # TAINT_UNSIGNED_MODULE
    args = ["verify", sb_env["names"]["signed"], "--kernel", sb_env["release"], "--kernel-dir", sb_env["kernel_dir"]]
    human = kvc([*args, "--accel", "tcg", "--secure-boot", "--sb-cert", str(sb_env["cert"])], sb_env["env"], 400)
    assert human.returncode == 0, human.stdout + human.stderr
    assert "Secure Boot on, lockdown integrity, sig_enforce on" in human.stdout
    assert "in .machine" in human.stdout and "signature: accepted" in human.stdout
    assert "bzImage boot through OVMF" in human.stdout.splitlines()[0]
    print(f"signed: boot {report['timings']['boot_seconds']} s, VM {report['timings']['vm_seconds']} s")


@pytest.mark.vm
@pytest.mark.podman
@pytest.mark.parametrize(
    ("variant", "verdict", "line"),
    [
        ("unsigned", "unsigned-rejected", "Loading of unsigned module is rejected"),
        ("otherkey", "unavailable-key-rejected", "Loading of module with unavailable key is rejected"),
        ("flipped", "signature-rejected", None),
    ],
)
def test_the_kernel_refuses_what_the_enrolled_key_did_not_sign(
    sb_env: dict[str, Any], variant: str, verdict: str, line: str | None
) -> None:
    code, report = verify_secure(sb_env, variant)
    assert code == 5 and report["status"] == "load-refused", json.dumps(report, indent=2)
    assert_enforcing(report)
    (module,) = report["modules"]
    assert not module["loaded"] and module["errno"] == "EKEYREJECTED" and module["signature"] == verdict
    if line is not None:
        assert any(line in text for text in module["log"]), module["log"]
    print(f"{variant}: boot {report['timings']['boot_seconds']} s, VM {report['timings']['vm_seconds']} s")
