"""Build once, load everywhere, against a real registry: Debian's docker-registry on 127.0.0.1 with
TLS from a test CA and htpasswd basic auth (tests/support/registry.py).

Host A (a KVC_ROOT, podman's default storage) builds simple-kmod for two kernels — the current
Debian 6.1 ABI and bookworm's 6.12 ABI, whose release has a '+' — and pushes; a second push is a
no-op. Host B (its own KVC_ROOT and its own container storage, fake kernels of both releases)
pulls instead of building, because its conf names the repository and forbids building, and loads.
`kvc inspect` reads what the image holds from the manifest and config alone (the registry's log
shows no layer fetched); export and import round-trip with equal digests; a wrongly labelled
image is refused before its layers are pulled; bad credentials, a missing tag and an untrusted
certificate each get one clear line.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from kvc.images import encode_tag, kernel_tag
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support.debian_headers import foreign_headers, newest_foreign_release
from support.debian_kernel import DebianKernel
from support.example import unique_prefix, write_example_conf
from support.registry import LocalRegistry

pytestmark = [pytest.mark.registry, pytest.mark.podman]
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class KvcHost:
    root: Path
    storage: tuple[str, ...]  # podman's global storage options for this host ("" = the default storage)

    def kvc(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KVC_ROOT": str(self.root), "KVC_KERNEL": "fake"}
        return subprocess.run(
            [sys.executable, "-m", "kvc", *args], capture_output=True, text=True, env=env, timeout=timeout
        )

    def ok(self, *args: str) -> str:
        result = self.kvc(*args)
        assert result.returncode == 0, f"kvc {' '.join(args)}: {result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr
        return result.stdout

    def podman(self, *args: str) -> str:
        return subprocess.run(["podman", *self.storage, *args], check=True, capture_output=True, text=True).stdout


def make_host(path: Path, name: str, registry: LocalRegistry, extra: str, storage: tuple[str, ...] = ()) -> KvcHost:
    host = KvcHost(path, storage)
    write_example_conf(path, name, f"\nKVC_REGISTRY={registry.host}/kvc/{name}\n{extra}")
    settings = [
        f"KVC_REGISTRY_AUTH_FILE={registry.auth_file}",
        f"KVC_REGISTRY_CERTS_DIR={registry.certs_dir}",
    ]
    if storage:
        settings.append(f"KVC_RUNTIME_ARGS='{' '.join(storage)}'")
    (path / "etc" / "kvc" / "kmods-via-containers.conf").write_text("\n".join(settings) + "\n")
    return host


def fake_kernel(host: KvcHost, release: str, symvers: Path) -> FakeKernel:
    kernel_root = host.root
    if (kernel_root / "sys").exists():
        shutil.rmtree(kernel_root / "sys")
        shutil.rmtree(kernel_root / "proc", ignore_errors=True)
    return FakeKernel.create(HostPaths(str(kernel_root)), release, symvers=str(symvers))


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Callable[[str], tuple[str, ...]]]:
    """podman storage options for a host of its own: the root in the test's directory, the run root
    short (podman refuses one of more than 50 characters)."""
    made: list[str] = []

    def options(label: str) -> tuple[str, ...]:
        made.append(tempfile.mkdtemp(prefix=f"kvc{label}-", dir="/tmp"))
        return ("--root", str(tmp_path / f"{label}-storage"), "--runroot", made[-1])

    yield options
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def name() -> Iterator[str]:
    """A unique instance name; its images are removed afterwards."""
    with unique_prefix("kvcreg") as prefix:
        yield prefix


def test_build_push_then_pull_and_load_elsewhere_for_two_kernels(
    local_registry: LocalRegistry,
    indexed_kernel_tree: DebianKernel,
    tmp_path: Path,
    name: str,
    storage: Callable[[str], tuple[str, ...]],
) -> None:
    registry = local_registry
    k1, k2 = indexed_kernel_tree.release, f"{newest_foreign_release()}-amd64"
    assert "+" in k2
    a = make_host(tmp_path / "a", name, registry, "")
    pushed = a.ok("build", name, "--kernel", k1, "--kernel", k2, "--push")
    assert pushed.count("pushed ") == 2, pushed
    repo = f"{registry.host}/kvc/{name}"
    fixed2, moving2 = f"1.0.0-{encode_tag(k2)}", encode_tag(k2)
    assert moving2 == k2.replace("+", "__")

    # Pushing the same build again is a no-op: no manifest is written.
    before = registry.requests()
    again = a.ok("push", name, "--kernel", k1, "--kernel", k2)
    assert again.count("is up to date") == 2, again
    during = registry.requests()[len(before) :]
    assert [r for r in during if r[0] in ("GET", "HEAD") and "/manifests/" in r[1]], during
    assert not [r for r in during if r[0] in ("PUT", "POST", "PATCH")], during

    # What the image holds, from the registry's manifest and config only.
    before = registry.requests()
    shown = json.loads(a.ok("inspect", f"{repo}:{moving2}", "--json"))
    assert shown["kernel"] == k2 and shown["name"] == name and shown["version"] == "1.0.0"
    assert {m["name"] for m in shown["modules"]} == {"simple_kmod", "simple_procfs_kmod"}
    assert all(m["vermagic"].split()[0] == k2 and m["srcversion"] for m in shown["modules"])
    assert shown["build_digest"] and shown["kvc_version"]
    fetched = [path for method, path in registry.requests()[len(before) :] if "/blobs/" in path]
    assert len(fetched) == 1, fetched  # the config
    layers = [f"/blobs/{digest}" for digest in shown_layers(registry, repo, moving2)]
    assert not [path for path in fetched if any(path.endswith(layer) for layer in layers)], fetched
    text = a.ok("inspect", f"{repo}:{fixed2}")
    assert f"for kernel {k2}" in text and "vermagic" in text

    # Host B: its own storage; its conf forbids building, so the images must come from the registry.
    # k1's image is pinned by its digest in B's conf: pulled by that digest.
    remote = json.loads(a.ok("inspect", f"{repo}:{encode_tag(k1)}", "--json"))
    pin = f"KVC_REGISTRY_FALLBACK=fail\nKVC_REGISTRY_DIGESTS={k1}={remote['digest']}\n"
    b = make_host(tmp_path / "b", name, registry, pin, storage("b"))
    fake_kernel(b, k1, indexed_kernel_tree.symvers)
    assert f"pull {repo}@{remote['digest']} (the registry has it as {repo}@{remote['digest']})" in b.ok(
        "build", name, "--dry-run"
    )
    got = b.ok("build", name)
    assert f"pulled {name}-1.0.0:{kernel_tag(k1)}" in got, got
    assert b.ok("load", name).strip().endswith("loaded simple_kmod, simple_procfs_kmod")
    local_id = b.podman("image", "inspect", "--format", "{{.Id}}", f"{name}-1.0.0:{kernel_tag(k1)}").strip()
    assert local_id == remote["image_id"]
    (status,) = json.loads(b.ok("status", name, "--remote", "--json"))["instances"]
    (entry,) = status["kernels"]
    assert entry["registry"]["same_as_local"] and entry["registry"]["usable"], entry
    assert entry["registry"]["digest"] == remote["digest"]
    b.ok("unload", name)
    fake_kernel(b, k2, foreign_headers() / "Module.symvers")
    assert f"pulled {name}-1.0.0:{kernel_tag(k2)}" in b.ok("build", name)
    assert "loaded simple_kmod, simple_procfs_kmod" in b.ok("load", name)
    assert "is up to date" in b.ok("build", name)

    # Air gap: A's two images into one archive, into a third host's empty storage.
    archive = tmp_path / "simple.oci.tar"
    exported = a.ok("export", name, "--kernel", k1, "--kernel", k2, "-o", str(archive))
    c = make_host(tmp_path / "c", name, registry, "", storage("c"))
    imported = c.ok("import", str(archive))
    summaries = [line for line in exported.splitlines() if line.startswith(f"{name}-1.0.0:")]
    assert len(summaries) == 2 and all("manifest sha256:" in line for line in summaries), exported
    for line in summaries:
        assert line in imported, (exported, imported)
    for kernel in (k1, k2):
        labels = json.loads(
            c.podman("image", "inspect", "--format", "{{json .Labels}}", f"{name}-1.0.0:{kernel_tag(kernel)}")
        )
        assert labels["kvc.kernel"] == kernel and json.loads(labels["kvc.modules.info"])[0]["vermagic"].startswith(
            kernel
        )
    assert not [n for n in c.podman("images", "--format", "{{.Repository}}").split() if "kvc-import" in n]


def test_an_image_labelled_for_another_kernel_is_refused_before_its_layers_are_pulled(
    local_registry: LocalRegistry, tmp_path: Path, name: str, storage: Callable[[str], tuple[str, ...]]
) -> None:
    registry = local_registry
    release = "6.1.0-99-amd64"
    host = make_host(tmp_path / "b", name, registry, "KVC_REGISTRY_FALLBACK=fail\n", storage("b"))
    wrong = f"{registry.host}/kvc/{name}:1.0.0-{release}"
    subprocess.run(
        [
            "podman",
            "push",
            "--authfile",
            registry.auth_file,
            "--cert-dir",
            os.path.join(registry.certs_dir, registry.host),
            "localhost/debian:bookworm",
            f"docker://{wrong}",
        ],
        check=True,
        capture_output=True,
    )
    before = registry.requests()
    refused = host.kvc("pull", name, "--kernel", release)
    assert refused.returncode == 6, refused.stderr
    assert refused.stderr.count("kvc: error:") == 1 and "Traceback" not in refused.stderr
    assert "not a kvc image" in refused.stderr or "not " + repr(release) in refused.stderr
    requested = [path for _method, path in registry.requests()[len(before) :]]
    layers = shown_layers(registry, f"{registry.host}/kvc/{name}", f"1.0.0-{release}")
    assert layers and not [path for path in requested if any(path.endswith(layer) for layer in layers)], requested
    assert host.podman("images", "-q") == ""


def test_registry_failures_get_one_clear_line(local_registry: LocalRegistry, tmp_path: Path, name: str) -> None:
    registry = local_registry
    host = make_host(tmp_path / "h", name, registry, "")
    missing = host.kvc("inspect", f"{registry.host}/kvc/{name}:nothing-here")
    assert missing.returncode == 6 and "the registry has no such image" in missing.stderr
    auth = tmp_path / "wrong-auth.json"
    auth.write_text(json.dumps({"auths": {registry.host: {"auth": base64.b64encode(b"kvc:wrong-password").decode()}}}))
    settings = host.root / "etc" / "kvc" / "kmods-via-containers.conf"
    settings.write_text(settings.read_text().replace(registry.auth_file, str(auth)))
    denied = host.kvc("inspect", f"{registry.host}/kvc/{name}:x")
    assert denied.returncode == 4, denied.stderr
    assert denied.stderr.count("kvc: error:") == 1 and "wrong-password" not in denied.stderr + denied.stdout
    assert "login" in denied.stderr
    settings.write_text(f"KVC_REGISTRY_CERTS_DIR={tmp_path / 'no-certs'}\n")
    untrusted = host.kvc("inspect", f"{registry.host}/kvc/{name}:x")
    assert untrusted.returncode == 4 and "certs.d" in untrusted.stderr, untrusted.stderr
    for result in (missing, denied, untrusted):
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr


def shown_layers(registry: LocalRegistry, repo: str, tag: str) -> list[str]:
    """The layer digests of an image, read through kvc's own client (manifest only)."""
    from kvc.registry import Reference, RegistryClient, RegistryOptions

    client = RegistryClient(RegistryOptions(auth_file=registry.auth_file, certs_dir=registry.certs_dir))
    image = client.inspect(Reference.parse(f"{repo}:{tag}"))
    assert image is not None
    return list(image.layers)
