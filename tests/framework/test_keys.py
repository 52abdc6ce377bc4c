"""kvc keys generate (checked with openssl), kvc keys status on fake /proc/keys, efivars, lockdown
and sig_enforce states under KVC_ROOT, and the load preflight's signature refusals against the
fake kernel (modules signed with kvc.kmod.sign, which is byte-identical to sign-file)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from kvc.errors import ExitCode, LoadError
from kvc.keys import (
    DER_FILE,
    EFI_GLOBAL,
    FAKE_MEMBERS,
    KEY_FILE,
    PEM_FILE,
    SHIM_LOCK,
    GeneratedKey,
    generate,
    host_trust,
)
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from kvc.kmod.sign import KeyFileSigner, sign_module
from kvc.loader import execute_load, plan_load
from support.modbuild import ModuleSpec, build_module

RELEASE = "6.1.0-99-amd64"


def kvc(*argv: str, root: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if root is not None:
        env["KVC_ROOT"] = str(root)
    return subprocess.run([sys.executable, "-m", "kvc", *argv], capture_output=True, text=True, env=env, check=False)


# -- generate -------------------------------------------------------------------------------------


def test_generate_writes_a_mok_certificate_openssl_reads(tmp_path: Path) -> None:
    result = kvc("keys", "generate", "--out", str(tmp_path), "--cn", "Host One kvc", "--bits", "3072")
    assert result.returncode == 0, result.stderr
    key, pem, der = (tmp_path / name for name in (KEY_FILE, PEM_FILE, DER_FILE))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-in", str(der), "-noout", "-text"], capture_output=True, text=True
    ).stdout
    extensions = text[text.index("X509v3 extensions:") :]
    assert "X509v3 Basic Constraints: critical\n                CA:FALSE" in extensions
    assert "X509v3 Key Usage: \n                Digital Signature\n" in extensions
    # codeSigning only: an EKU OID that is not 8 bytes makes SUSE kernels refuse the certificate.
    assert "X509v3 Extended Key Usage: \n                Code Signing\n" in extensions
    skid = extensions.split("X509v3 Subject Key Identifier: \n")[1].split()[0]
    assert extensions.split("X509v3 Authority Key Identifier: \n")[1].split()[0].endswith(skid)
    assert "Public-Key: (3072 bit)" in text and "Subject: CN = Host One kvc" in text
    key_id = skid.replace(":", "").lower()
    assert f"key id {key_id}" in result.stdout
    assert f"Loaded X.509 cert 'Host One kvc: {key_id}'" in result.stdout
    assert "mokutil --import kvc-signing.der" in result.stdout
    # The PEM is the same certificate; the key matches it.
    pem_der = subprocess.run(
        ["openssl", "x509", "-in", str(pem), "-outform", "DER"], capture_output=True, check=True
    ).stdout
    assert pem_der == der.read_bytes()
    modulus = [
        subprocess.run(["openssl", kind, "-in", str(path), "-noout", "-modulus"], capture_output=True, text=True).stdout
        for kind, path in (("rsa", key), ("x509", pem))
    ]
    assert modulus[0] and modulus[0] == modulus[1]


def test_generate_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / DER_FILE).write_bytes(b"theirs")
    result = kvc("keys", "generate", "--out", str(tmp_path))
    assert result.returncode == ExitCode.CONFIG
    assert result.stderr.startswith(f"kvc: error: {tmp_path / DER_FILE} exists")
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == [DER_FILE]
    assert (tmp_path / DER_FILE).read_bytes() == b"theirs"


@pytest.mark.parametrize("argv", [["--bits", "1024"], ["--days", "0"], ["--cn", " "]])
def test_generate_bad_options(tmp_path: Path, argv: list[str]) -> None:
    result = kvc("keys", "generate", "--out", str(tmp_path), *argv)
    assert result.returncode == ExitCode.CONFIG
    assert result.stderr.startswith("kvc: error: ") and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


# -- status ---------------------------------------------------------------------------------------

BUILTIN, SECONDARY, MACHINE, PLATFORM = 0x1A2B3C01, 0x1A2B3C02, 0x1A2B3C03, 0x1A2B3C04
DEBIAN_KEY = "Debian Secure Boot Signer 2022 - linux: 14011249c2675ea8e5148542202005810584b25f"


def proc_keys_line(serial: int, type_name: str, description: str) -> str:
    # security/keys/proc.c: "%08x %c%c%c%c%c%c%c %5d %4s %08x %5d %5d %-9.9s %s"
    return f"{serial:08x} I------     1 perm 1f010000     0     0 {type_name:<9.9} {description}\n"


def write_host(
    root: Path,
    *,
    machine_key: Optional[str] = None,
    lockdown: Optional[str] = "none",
    sig_enforce: Optional[str] = "N",
    secure_boot: Optional[int] = None,
    setup_mode: int = 0,
    mok_sb_state: Optional[int] = None,
) -> None:
    """A fake host: /proc/keys and the members file, lockdown, sig_enforce and efivars."""
    keys = [(0x2000001, "asymmetric", f"{DEBIAN_KEY} X509.rsa 84b25f []")]
    if machine_key is not None:
        keys.append((0x2000002, "asymmetric", f"{machine_key} X509.rsa 12345678 []"))
    lines = [proc_keys_line(serial, type_name, text) for serial, type_name, text in keys]
    for serial, ring, count in ((BUILTIN, ".builtin_trusted_keys", 1), (SECONDARY, ".secondary_trusted_keys", 1)):
        lines.append(proc_keys_line(serial, "keyring", f"{ring}: {count}"))
    lines.append(proc_keys_line(MACHINE, "keyring", ".machine: 1"))
    lines.append(proc_keys_line(PLATFORM, "keyring", ".platform: empty"))
    lines.append(proc_keys_line(0x3000000, "keyring", "_ses: 1"))
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/keys").write_text("".join(lines))
    members = [f"{BUILTIN:x}: 2000001", f"{SECONDARY:x}: {MACHINE:x}", f"{PLATFORM:x}:"]
    members.append(f"{MACHINE:x}: 2000002" if machine_key is not None else f"{MACHINE:x}:")
    (root / FAKE_MEMBERS.lstrip("/")).write_text("\n".join(members) + "\n")
    if lockdown is not None:
        (root / "sys/kernel/security").mkdir(parents=True, exist_ok=True)
        words = ["none", "integrity", "confidentiality"]
        (root / "sys/kernel/security/lockdown").write_text(
            " ".join(f"[{word}]" if word == lockdown else word for word in words) + "\n"
        )
    if sig_enforce is not None:
        (root / "sys/module/module/parameters").mkdir(parents=True, exist_ok=True)
        (root / "sys/module/module/parameters/sig_enforce").write_text(sig_enforce + "\n")
    efivars = root / "sys/firmware/efi/efivars"
    if secure_boot is not None:
        efivars.mkdir(parents=True, exist_ok=True)
        (efivars / f"SecureBoot-{EFI_GLOBAL}").write_bytes(b"\x06\x00\x00\x00" + bytes([secure_boot]))
        (efivars / f"SetupMode-{EFI_GLOBAL}").write_bytes(b"\x06\x00\x00\x00" + bytes([setup_mode]))
    if mok_sb_state is not None:
        (efivars / f"MokSBStateRT-{SHIM_LOCK}").write_bytes(b"\x06\x00\x00\x00" + bytes([mok_sb_state]))


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"lockdown": "none", "sig_enforce": "N"}, {"lockdown": "none", "sig_enforce": False, "enforcing": False}),
        ({"lockdown": "none", "sig_enforce": "Y"}, {"lockdown": "none", "sig_enforce": True, "enforcing": True}),
        (
            {"lockdown": "integrity", "sig_enforce": "N"},
            {"lockdown": "integrity", "sig_enforce": False, "enforcing": True},
        ),
        (
            {"lockdown": "confidentiality", "sig_enforce": "Y", "secure_boot": 1},
            {"lockdown": "confidentiality", "enforcing": True, "secure_boot": True, "setup_mode": False},
        ),
        ({"secure_boot": 0, "setup_mode": 1}, {"secure_boot": False, "setup_mode": True, "enforcing": False}),
        ({"secure_boot": 1, "mok_sb_state": 1}, {"secure_boot": True, "mok_validation_disabled": True}),
        (
            {"lockdown": None, "sig_enforce": None},
            {"lockdown": None, "sig_enforce": None, "secure_boot": None, "enforcing": False},
        ),
    ],
)
def test_status_states(tmp_path: Path, state: dict[str, object], expected: dict[str, object]) -> None:
    write_host(tmp_path, **state)  # type: ignore[arg-type]
    result = kvc("keys", "status", "--json", root=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key, value in expected.items():
        assert report[key] == value, key


def test_status_lists_the_trusted_keyrings_keys(tmp_path: Path) -> None:
    write_host(tmp_path, machine_key="kvc test: 00aabbcc", secure_boot=1, lockdown="integrity", sig_enforce="Y")
    trust = host_trust(HostPaths(str(tmp_path)))
    assert {ring: [key.description for key in keys] for ring, keys in trust.keyrings.items()} == {
        ".builtin_trusted_keys": [DEBIAN_KEY],
        ".secondary_trusted_keys": [],
        ".machine": ["kvc test: 00aabbcc"],
        ".platform": [],
    }
    assert trust.keyrings_holding("00:AA:BB:CC") == [".machine"]
    text = kvc("keys", "status", root=tmp_path).stdout
    assert "Secure Boot: on (setup mode off)" in text
    assert "lockdown: integrity, sig_enforce: on" in text
    assert ".machine:\n  kvc test: 00aabbcc\n" in text


# -- preflight ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> GeneratedKey:
    return generate(str(tmp_path_factory.mktemp("key")), "kvc preflight test")


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> GeneratedKey:
    return generate(str(tmp_path_factory.mktemp("other")), "someone else")


def demo_module(directory: Path, key: Optional[GeneratedKey]) -> str:
    """demo_mod, signed as sign-file signs by default (the signer by issuer and serial)."""
    data = build_module(
        ModuleSpec(name="demo_mod", vermagic=f"{RELEASE} SMP preempt mod_unload modversions ", imports=[])
    )
    if key is not None:
        signer = KeyFileSigner(key.key_path, key.pem_path)
        data = sign_module(data, signer, "sha256")
    path = directory / "demo_mod.ko"
    path.write_bytes(data)
    return str(path)


def sig_key(key: GeneratedKey) -> str:
    """The sig_key the fake kernel compares: the certificate's serial number."""
    serial = subprocess.run(
        ["openssl", "x509", "-in", key.pem_path, "-noout", "-serial"], capture_output=True, text=True, check=True
    ).stdout
    return serial.strip().partition("=")[2]


def fake_host(root: Path, enforce: bool, trusted: Optional[GeneratedKey]) -> FakeKernel:
    kernel = FakeKernel.create(
        HostPaths(str(root)),
        RELEASE,
        sig_enforce=enforce,
        trusted_keys=[sig_key(trusted)] if trusted is not None else [],
    )
    write_host(
        root,
        machine_key=trusted.description if trusted is not None else None,
        lockdown="integrity" if enforce else "none",
        sig_enforce="Y" if enforce else "N",
        secure_boot=1 if enforce else 0,
    )
    return kernel


def plan(root: Path, kernel: FakeKernel, path: str):  # type: ignore[no-untyped-def]
    return plan_load("demo", RELEASE, [path], {}, kernel, None, trust=host_trust(HostPaths(str(root))))


def test_unsigned_on_enforcing_kernel_refused(tmp_path: Path, keypair: GeneratedKey) -> None:
    kernel = fake_host(tmp_path / "root", True, keypair)
    with pytest.raises(LoadError) as caught:
        plan(tmp_path / "root", kernel, demo_module(tmp_path, None))
    assert "demo_mod: unsigned, and the kernel enforces signatures (sig_enforce=Y, lockdown=integrity)" in str(
        caught.value.details
    )
    assert "mokutil --import kvc-signing.der" in str(caught.value.hint)
    assert "MokManager" in str(caught.value.hint)
    # Without the preflight the fake kernel refuses it as the real one does.
    unchecked = plan_load("demo", RELEASE, [demo_module(tmp_path, None)], {}, kernel, None)
    with pytest.raises(LoadError) as refused:
        execute_load(unchecked, kernel, None)
    assert "Loading of unsigned module is rejected" in str(refused.value.details)


def test_untrusted_key_refused(tmp_path: Path, keypair: GeneratedKey, other_key: GeneratedKey) -> None:
    kernel = fake_host(tmp_path / "root", True, keypair)
    with pytest.raises(LoadError) as caught:
        plan(tmp_path / "root", kernel, demo_module(tmp_path, other_key))
    assert "demo_mod: signed by someone else" in str(caught.value.details)
    assert "which none of the kernel's trusted keyrings holds" in str(caught.value.details)


def test_trusted_key_accepted(tmp_path: Path, keypair: GeneratedKey) -> None:
    kernel = fake_host(tmp_path / "root", True, keypair)
    steps = plan(tmp_path / "root", kernel, demo_module(tmp_path, keypair))
    assert [step.name for step in steps.steps] == ["demo_mod"]
    execute_load(steps, kernel, None)
    assert "demo_mod" in {entry.name for entry in kernel.loaded_modules()}


def test_unsigned_on_non_enforcing_kernel_warns(
    tmp_path: Path, keypair: GeneratedKey, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = fake_host(tmp_path / "root", False, None)
    steps = plan(tmp_path / "root", kernel, demo_module(tmp_path, None))
    assert [step.name for step in steps.steps] == ["demo_mod"]
    assert "demo_mod: unsigned; the kernel will load it and taint itself 'E' (unsigned module)" in caplog.text


# -- the command line: kvc load refuses, kvc keys status NAME judges --------------------------------


def cli_host(tmp_path: Path, key: Optional[GeneratedKey], trusted: GeneratedKey) -> tuple[Path, Path, dict[str, str]]:
    """A fake enforcing host trusting ``trusted``, demo.conf, and demo_mod (signed by ``key``) in
    a modules directory for --modules-dir."""
    root = tmp_path / "root"
    fake_host(root, True, trusted)
    (root / "etc/kvc").mkdir(parents=True)
    (root / "etc/kvc/demo.conf").write_text(
        'KMOD_CONTAINER_BUILD_CONTEXT=/nonexistent\nKMOD_SOFTWARE_VERSION=1\nKMOD_NAMES="demo_mod"\n'
    )
    modules = tmp_path / "modules"
    target = modules / "lib/modules" / RELEASE / "extra"
    target.mkdir(parents=True)
    demo_module(target, key)
    env = {**os.environ, "KVC_ROOT": str(root), "KVC_KERNEL": "fake"}
    return root, modules, env


def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvc", *argv], capture_output=True, text=True, env=env, check=False)


def test_kvc_load_refuses_an_untrusted_signature(
    tmp_path: Path, keypair: GeneratedKey, other_key: GeneratedKey
) -> None:
    root, modules, env = cli_host(tmp_path, other_key, keypair)
    result = run(env, "load", "demo", "--modules-dir", str(modules))
    assert result.returncode == ExitCode.REFUSED, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "kvc: error: the kernel will refuse these modules' signatures"
    assert lines[1].startswith("  demo_mod: signed by someone else (key ")
    assert lines[-1].startswith("kvc: hint: ") and "mokutil --import kvc-signing.der" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (root / "sys/module/demo_mod").exists()
    status = json.loads(run(env, "keys", "status", "demo", "--json").stdout)
    assert status["modules"][0]["accepted"] is False
    assert status["modules"][0]["signer"] == "someone else"


def test_kvc_load_takes_a_trusted_signature(tmp_path: Path, keypair: GeneratedKey) -> None:
    root, modules, env = cli_host(tmp_path, keypair, keypair)
    result = run(env, "load", "demo", "--modules-dir", str(modules))
    assert result.returncode == 0, result.stderr
    assert (root / "sys/module/demo_mod").is_dir()
    text = run(env, "keys", "status", "demo").stdout
    assert "demo_mod: signed by kvc preflight test (key " in text
    assert "trusted by .machine" in text


def test_keys_status_name_without_extraction(tmp_path: Path, keypair: GeneratedKey) -> None:
    _root, _modules, env = cli_host(tmp_path, keypair, keypair)
    result = run(env, "keys", "status", "demo")
    assert result.returncode == ExitCode.STATE
    assert result.stderr.startswith(f"kvc: error: demo has no extraction for {RELEASE}")
