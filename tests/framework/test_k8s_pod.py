"""kvc's DaemonSet pod, executed: ``podman kube play`` runs the pod template ``kvc k8s daemonset``
writes (the same YAML a kubelet would run) with the images kvc pushed to a local registry and the
kvc image, on a stand-in for a node: a KVC_ROOT with the Debian kernel's module tree and a fake
kernel of its release.

podman 4.3 plays Pods, not DaemonSets, and a node is not this machine, so the template is converted,
and only that: the DaemonSet's pod template becomes a Pod; ``spec.nodeName`` (which the kubelet would
fill) becomes the node's name; ``restartPolicy: Always`` becomes ``OnFailure`` (podman 4.3 restarts
init containers for ever under ``Always``); and every hostPath ``/X`` is the stand-in's ``ROOT/X``, mounted at
``/node/X`` with ``KVC_ROOT=/node`` and ``KVC_KERNEL=fake`` (the fake kernel's ``/proc`` and
``/sys`` live there too). The init container copies the modules from KMM's layout in the pushed
image; kvc loads both modules in order with their parameters; a pod restart leaves them loaded; a
new version unloads the old and loads the new; the removal Job leaves the fake kernel empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel
from support.example import unique_prefix, write_example_conf
from support.kvcimage import build_kvc_image
from support.registry import LocalRegistry

pytestmark = [pytest.mark.registry, pytest.mark.podman]
ROOT = Path(__file__).resolve().parents[2]
NODE = "node-1"


@dataclass
class BuildHost:
    root: Path

    def kvc(self, *args: str) -> str:
        env = {**os.environ, "KVC_ROOT": str(self.root), "KVC_KERNEL": "fake"}
        done = subprocess.run(
            [sys.executable, "-m", "kvc", *args], capture_output=True, text=True, env=env, timeout=1200
        )
        assert done.returncode == 0 and "Traceback" not in done.stderr, f"kvc {args}: {done.stdout}{done.stderr}"
        return done.stdout


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 or not check, f"podman {args}: {done.stdout}{done.stderr}"
    return done


def on_node(template: dict[str, Any], node_root: Path, extra_paths: list[Path]) -> dict[str, Any]:
    """The pod spec as it would run on the stand-in node (see the module's docstring)."""
    spec: dict[str, Any] = json.loads(json.dumps(template["spec"]))
    spec.pop("nodeSelector", None)
    spec.pop("nodeName", None)
    moved = {}
    for volume in spec["volumes"]:
        host = volume.get("hostPath")
        if host is not None:
            moved[volume["name"]] = host["path"]
            host["path"] = str(node_root) + host["path"]
            Path(host["path"]).mkdir(parents=True, exist_ok=True)
            host["type"] = "Directory"
    # The fake kernel: its /proc and its state (what the node's kernel would be).
    fake = {"fake-proc": "proc", "fake-kernel": ".kvc-fake-kernel"}
    for volume, below in fake.items():
        spec["volumes"].append({"name": volume, "hostPath": {"path": str(node_root / below), "type": "Directory"}})
    for index, outside in enumerate(extra_paths):
        spec["volumes"].append({"name": f"outside-{index}", "hostPath": {"path": str(outside)}})
    for container in spec["containers"]:
        for mount in container["volumeMounts"]:
            if mount["name"] in moved or mount["name"] == "conf":
                mount["mountPath"] = "/node" + mount["mountPath"]
        container["volumeMounts"] += [{"name": v, "mountPath": f"/node/{p}"} for v, p in fake.items()]
        for index, outside in enumerate(extra_paths):
            container["volumeMounts"].append({"name": f"outside-{index}", "mountPath": str(outside), "readOnly": True})
        for variable in container["env"]:
            if variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
                variable.pop("valueFrom")
                variable["value"] = NODE
        container["env"] += [{"name": "KVC_ROOT", "value": "/node"}, {"name": "KVC_KERNEL", "value": "fake"}]
    return spec


def playable(objects: list[dict[str, Any]], kind: str, pod_name: str, node_root: Path, extra: list[Path]) -> str:
    """The ConfigMap and the first ``kind``'s pod template as a Pod, as YAML for podman kube play."""
    conf = next(obj for obj in objects if obj["kind"] == "ConfigMap")
    owner = next(obj for obj in objects if obj["kind"] == kind)
    spec = on_node(owner["spec"]["template"], node_root, extra)
    # podman 4.3 restarts the init container for ever under the DaemonSet's restartPolicy Always;
    # OnFailure runs it once and still restarts a failed agent, as a kubelet would.
    spec["restartPolicy"] = "Never" if kind == "Job" else "OnFailure"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name}, "spec": spec}
    return yaml.safe_dump_all([conf, pod])


def wait_for_log(container: str, text: str, count: int = 1, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    logs = ""
    while time.monotonic() < deadline:
        logs = podman("logs", container, check=False).stdout
        if logs.count(text) >= count:
            return logs
        time.sleep(1)
    pod = container.rsplit("-", 1)[0]
    states = podman("ps", "-a", "--filter", f"pod={pod}", "--format", "{{.Names}} {{.Status}}", check=False).stdout
    init = podman("logs", f"{pod}-modules", check=False)
    raise AssertionError(
        f"{container} never said {text!r} ({count}x):\n{logs}\n{states}\ninit: {init.stdout}{init.stderr}"
    )


def loaded(node_root: Path) -> dict[str, tuple[str, dict[str, str]]]:
    kernel = FakeKernel(HostPaths(str(node_root)))
    states = [kernel.module_state(m.name) for m in kernel.loaded_modules()]
    return {s.name: (s.version or "", dict(s.parameters)) for s in states if s is not None}


@pytest.fixture
def name() -> Iterator[str]:
    with unique_prefix("kvcpod") as prefix:
        yield prefix


def test_the_daemonset_pod_loads_survives_restarts_upgrades_and_is_removed_by_its_job(
    local_registry: LocalRegistry, indexed_kernel_tree: DebianKernel, tmp_path: Path, name: str
) -> None:
    registry, kernel = local_registry, indexed_kernel_tree.release
    kvc_image = build_kvc_image()
    repo = f"{registry.host}/kvc/{name}"
    build = BuildHost(tmp_path / "build")
    (build.root / "etc" / "kvc").mkdir(parents=True)
    (build.root / "etc" / "kvc" / "kmods-via-containers.conf").write_text(
        f"KVC_REGISTRY_AUTH_FILE={registry.auth_file}\nKVC_REGISTRY_CERTS_DIR={registry.certs_dir}\n"
    )
    pulled = []
    documents = {}
    for version in ("1.0.0", "1.1.0"):
        write_example_conf(build.root, name, f"\nKVC_REGISTRY={repo}\nKMOD_SOFTWARE_VERSION={version}\n")
        build.kvc("build", name, "--kernel", kernel, "--push")
        # The kubelet pulls the module image; here podman does, before the pod is played.
        pulled.append(f"{repo}:{version}-{kernel}")
        podman(
            "pull", "--authfile", registry.auth_file, "--cert-dir", f"{registry.certs_dir}/{registry.host}", pulled[-1]
        )
        rendered = build.kvc("k8s", "daemonset", name, "--kvc-image", kvc_image, "--kernel", kernel)
        documents[version] = list(yaml.safe_load_all(rendered))
    removal = list(yaml.safe_load_all(build.kvc("k8s", "unload-job", name, "--kvc-image", kvc_image, "--node", NODE)))

    node_root = tmp_path / "node"
    (node_root / "lib" / "modules").mkdir(parents=True)
    (node_root / "lib" / "modules" / kernel).symlink_to(indexed_kernel_tree.moddir)
    FakeKernel.create(HostPaths(str(node_root)), kernel, symvers=str(indexed_kernel_tree.symvers))
    # The tree's link target and the exports the fake kernel reads, at their paths on this machine.
    outside = [Path(indexed_kernel_tree.moddir), Path(indexed_kernel_tree.symvers)]
    pod, container = f"{name}-{NODE}", f"{name}-{NODE}-kvc"
    plays = tmp_path / "plays"
    plays.mkdir()
    try:
        first = plays / "v1.yaml"
        first.write_text(playable(documents["1.0.0"], "DaemonSet", pod, node_root, outside))
        podman("kube", "play", str(first))
        logs = wait_for_log(container, "waiting (stopping leaves it loaded)")
        assert "loaded simple_kmod, simple_procfs_kmod" in logs, logs
        assert loaded(node_root) == {
            "simple_kmod": ("1.0.0", {}),
            "simple_procfs_kmod": ("1.0.0", {"number": "0"}),
        }
        ready = podman("exec", container, "kvc", "k8s", "ready", name, check=False)
        assert ready.returncode == 0, ready.stderr

        # A restart (node reboot aside, what a DaemonSet update or eviction does): nothing unloaded.
        podman("pod", "stop", "-t", "30", pod)
        assert "stays loaded" in podman("logs", container).stdout
        assert set(loaded(node_root)) == {"simple_kmod", "simple_procfs_kmod"}
        podman("pod", "start", pod)
        logs = wait_for_log(container, "waiting (stopping leaves it loaded)", count=2)
        assert "loaded nothing new" in logs and "replacing" not in logs, logs
        assert set(loaded(node_root)) == {"simple_kmod", "simple_procfs_kmod"}

        # The DaemonSet of the next version replaces the pod: it unloads 1.0.0 and loads 1.1.0.
        second = plays / "v2.yaml"
        second.write_text(playable(documents["1.1.0"], "DaemonSet", pod, node_root, outside))
        podman("kube", "play", "--replace", str(second))
        logs = wait_for_log(container, "waiting (stopping leaves it loaded)")
        assert f"{name} 1.1.0: replacing what is loaded: simple_kmod (loaded: version 1.0.0" in logs, logs
        assert logs.index("unloading the old version") < logs.index("loaded simple_kmod, simple_procfs_kmod")
        assert loaded(node_root) == {
            "simple_kmod": ("1.1.0", {}),
            "simple_procfs_kmod": ("1.1.0", {"number": "0"}),
        }

        # Removal: the DaemonSet's pod goes (modules stay), then the Job unloads.
        podman("kube", "down", str(second))
        assert set(loaded(node_root)) == {"simple_kmod", "simple_procfs_kmod"}
        job = plays / "unload.yaml"
        job.write_text(playable(removal, "Job", f"{name}-unload", node_root, outside))
        podman("kube", "play", str(job))
        deadline = time.monotonic() + 120
        while loaded(node_root) and time.monotonic() < deadline:
            time.sleep(1)
        assert loaded(node_root) == {}, podman("logs", f"{name}-unload-kvc", check=False).stdout
        state = podman("inspect", "--format", "{{.State.ExitCode}}", f"{name}-unload-kvc").stdout.strip()
        assert state == "0"
    finally:
        for play in sorted(plays.glob("*.yaml")):
            podman("kube", "down", str(play), check=False)
        for image in pulled:
            podman("rmi", "-f", image, check=False)
