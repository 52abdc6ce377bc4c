"""The objects ``kvc k8s`` writes, accepted by a real Kubernetes 1.20.2 control plane (built from
Debian's ``kubernetes`` source, tests/support/controlplane.py) and acted on by its controllers and
scheduler: each per-kernel DaemonSet gets exactly one pod, bound to the fake node reporting its
kernel; the unload Jobs' pods are bound to the nodes they name; the KMM Module is accepted by the
CustomResourceDefinition made from KMM's API, with its defaults; wrong types are refused. There is
no kubelet, so nothing runs: tests/framework/test_k8s_pod.py runs the pod with podman."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import yaml

from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support.controlplane import KERNEL_LABEL, APIError, ControlPlane, control_plane_binaries, wait_until
from support.example import write_example_conf
from support.kvccli import kvc
from support.modbuild import ModuleSpec, Param, build_module

pytestmark = pytest.mark.k8s

K1 = "6.1.0-91-amd64"
K2 = "6.1.0-92-amd64"
OTHER = "6.1.0-93-amd64"
NODES = {"node-k1": K1, "node-k2": K2, "node-other": OTHER}
# A release with a '+' is no label value: kvc's own labeller writes it tag-encoded.
PLUS = "6.1.0-94+bpo-amd64"
PLUS_VALUE = "6.1.0-94__bpo-amd64"
KVC_KERNEL_LABEL = "kvc/kernel-release"
PARAM_OPS_CRC = 0x1D2F3A4B  # the fake kernel's export the crafted modules' int parameter imports
REPO = "127.0.0.1:5000/kvc/simple-kmod"
KVC_IMAGE = "127.0.0.1:5000/kvc:1"
NAMESPACE = "kube-system"
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    with ControlPlane(control_plane_binaries()) as plane:
        for node, kernel in NODES.items():
            plane.add_node(node, {KERNEL_LABEL: kernel}, kernel)
        yield plane


@pytest.fixture(scope="module")
def kvc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("k8s-root")
    write_example_conf(root)
    return root


def node_label(cluster: ControlPlane, node: str, key: str) -> Optional[str]:
    labels = (cluster.get("v1", "Node", node) or {}).get("metadata", {}).get("labels", {})
    return None if key not in labels else str(labels[key])


def rendered(root: Path, *args: str) -> list[Obj]:
    done = kvc(["k8s", *args], {"KVC_ROOT": str(root), "KVC_KERNEL": "fake"})
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def pods(cluster: ControlPlane, selector: dict[str, str]) -> list[Obj]:
    return cluster.list("v1", "Pod", NAMESPACE, ",".join(f"{key}={value}" for key, value in selector.items()))


def bound(cluster: ControlPlane, selector: dict[str, str], count: int) -> list[Obj]:
    """The pods ``selector`` matches, once there are ``count`` and all are bound to a node."""

    def all_bound() -> list[Obj]:
        found = pods(cluster, selector)
        return found if len(found) == count and all(p["spec"].get("nodeName") for p in found) else []

    return wait_until(all_bound, f"{count} bound pod(s) with {selector}", timeout=90)


def scheduled_status(cluster: ControlPlane, name: str, count: int) -> Obj:
    """The DaemonSet's status once its controller counts ``count`` pods scheduled."""

    def counted() -> Obj:
        daemonset = cluster.get("apps/v1", "DaemonSet", name, NAMESPACE) or {}
        status: Obj = daemonset.get("status", {})
        return status if status.get("currentNumberScheduled") == count else {}

    return wait_until(counted, f"{count} scheduled pod(s) in the status of DaemonSet {name}")


def test_every_daemonset_object_is_accepted_and_each_kernel_gets_one_pod_on_its_node(
    cluster: ControlPlane, kvc_root: Path
) -> None:
    objects = rendered(
        kvc_root,
        "daemonset",
        "simple-kmod",
        "--repository",
        REPO,
        "--kvc-image",
        KVC_IMAGE,
        "--kernel",
        K1,
        "--kernel",
        K2,
    )
    for obj in objects:
        answer = cluster.apply(obj)
        assert answer["metadata"]["uid"] and answer["kind"] == obj["kind"]
    daemonsets = [obj for obj in objects if obj["kind"] == "DaemonSet"]
    assert len(daemonsets) == 2
    for daemonset, (node, kernel) in zip(daemonsets, [("node-k1", K1), ("node-k2", K2)]):
        selector = daemonset["spec"]["selector"]["matchLabels"]
        (pod,) = bound(cluster, selector, 1)
        assert pod["spec"]["nodeName"] == node, f"{daemonset['metadata']['name']} for {kernel}"
        # What the apiserver kept is what kvc wrote: the privileged agent, the init copy, no preStop.
        (agent,) = pod["spec"]["containers"]
        assert agent["securityContext"]["privileged"] is True and "lifecycle" not in agent
        assert pod["spec"]["initContainers"][0]["image"].startswith(f"{REPO}:1.0.0-")
        assert pod["spec"]["priorityClassName"] == "system-node-critical" and pod["spec"]["priority"] > 10**9
        status = scheduled_status(cluster, daemonset["metadata"]["name"], 1)
        assert status["desiredNumberScheduled"] == 1 and status["numberMisscheduled"] == 0
    # Nothing for the node whose kernel has no DaemonSet.
    placed = cluster.list("v1", "Pod", NAMESPACE, "app.kubernetes.io/instance=simple-kmod,kvc/kernel")
    assert "node-other" not in [p["spec"]["nodeName"] for p in placed] and len(placed) >= 2


def test_a_wrong_type_a_misspelled_field_and_a_missing_image_are_refused(cluster: ControlPlane, kvc_root: Path) -> None:
    """What makes "accepted" above mean something: the same DaemonSet, spoiled once each way."""
    (daemonset,) = [
        obj
        for obj in rendered(
            kvc_root, "daemonset", "simple-kmod", "--repository", REPO, "--kvc-image", KVC_IMAGE, "-k", K1
        )
        if obj["kind"] == "DaemonSet"
    ]

    def spoiled(name: str, spoil: Callable[[Obj], None]) -> Obj:
        obj = copy.deepcopy(daemonset)
        obj["metadata"]["name"] = name
        spoil(obj["spec"]["template"]["spec"])
        return obj

    wrong_type = spoiled("kvc-wrong-type", lambda pod: pod.update(terminationGracePeriodSeconds="thirty"))
    with pytest.raises(APIError) as refused:
        cluster.create(wrong_type)
    assert refused.value.code == 400 and "TerminationGracePeriodSeconds" in refused.value.message
    with pytest.raises(APIError) as refused:
        cluster.apply(wrong_type)
    assert "terminationGracePeriodSeconds: expected numeric" in refused.value.message
    # A plain create drops unknown fields in 1.20; a server-side apply (what the tests use) refuses them.
    misspelled = spoiled("kvc-misspelled", lambda pod: pod.update(priorityClass=pod.pop("priorityClassName")))
    with pytest.raises(APIError) as refused:
        cluster.apply(misspelled)
    assert ".spec.template.spec.priorityClass: field not declared in schema" in refused.value.message
    no_image = spoiled("kvc-no-image", lambda pod: pod["containers"][0].pop("image"))
    with pytest.raises(APIError) as refused:
        cluster.apply(no_image, dry_run=True)
    assert refused.value.code == 422 and "containers[0].image: Required value" in refused.value.message
    for name in ("kvc-wrong-type", "kvc-misspelled", "kvc-no-image"):
        assert cluster.get("apps/v1", "DaemonSet", name, NAMESPACE) is None


def test_the_unload_jobs_are_accepted_and_their_pods_bound_to_the_named_nodes(
    cluster: ControlPlane, kvc_root: Path
) -> None:
    objects = rendered(
        kvc_root, "unload-job", "simple-kmod", "--kvc-image", KVC_IMAGE, "--node", "node-k1", "--node", "node-other"
    )
    for obj in objects:
        cluster.apply(obj)
    jobs = [obj for obj in objects if obj["kind"] == "Job"]
    assert len(jobs) == 2
    for job, node in zip(jobs, ["node-k1", "node-other"]):
        (pod,) = bound(cluster, {"job-name": job["metadata"]["name"]}, 1)
        assert pod["spec"]["nodeName"] == node


def test_with_kvcs_own_kernel_label_a_plus_release_finds_its_node_and_the_labeller_runs_everywhere(
    cluster: ControlPlane, kvc_root: Path, tmp_path: Path
) -> None:
    cluster.add_node("node-plus", {KVC_KERNEL_LABEL: PLUS_VALUE}, PLUS)
    objects = rendered(
        kvc_root, "daemonset", "simple-kmod", "--repository", REPO, "--kvc-image", KVC_IMAGE, "-k", PLUS,
        "--kernel-label", KVC_KERNEL_LABEL,
    )  # fmt: skip
    for obj in objects:
        cluster.apply(obj)
    (daemonset,) = [obj for obj in objects if obj["kind"] == "DaemonSet" and "kvc/kernel" in obj["metadata"]["labels"]]
    assert daemonset["spec"]["template"]["spec"]["nodeSelector"] == {KVC_KERNEL_LABEL: PLUS_VALUE}
    selector = daemonset["spec"]["selector"]["matchLabels"]
    (pod,) = bound(cluster, selector, 1)
    assert pod["spec"]["nodeName"] == "node-plus"
    (labeller,) = [obj for obj in objects if obj["kind"] == "DaemonSet" and obj is not daemonset]
    nodes = sorted(node["metadata"]["name"] for node in cluster.list("v1", "Node"))
    placed = bound(cluster, labeller["spec"]["selector"]["matchLabels"], len(nodes))
    assert sorted(p["spec"]["nodeName"] for p in placed) == nodes

    # A new node with that kernel and no label yet: kvc k8s label-node, as the labeller's pod runs it
    # (its service account's token, the node's name), labels it, and the kernel's DaemonSet follows.
    cluster.add_node("node-plus-unlabelled", {}, PLUS)
    root = tmp_path / "node-root"
    FakeKernel.create(HostPaths(str(root)), PLUS)
    labeller_account = cluster.service_account_dir(
        NAMESPACE, labeller["spec"]["template"]["spec"]["serviceAccountName"], tmp_path / "labeller"
    )
    label = subprocess.Popen(
        [sys.executable, "-m", "kvc", "k8s", "label-node"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "KVC_ROOT": str(root), "KVC_KERNEL": "fake",
             **cluster.in_cluster_environment(labeller_account, "node-plus-unlabelled")},
    )  # fmt: skip
    try:
        wait_until(
            lambda: (
                node_label(cluster, "node-plus-unlabelled", KVC_KERNEL_LABEL) == PLUS_VALUE or label.poll() is not None
            ),
            "the labeller's label",
        )
    finally:
        label.send_signal(signal.SIGTERM)
        out, err = label.communicate(timeout=30)
    assert label.returncode == 0, err
    assert f"node node-plus-unlabelled: {KVC_KERNEL_LABEL}={PLUS_VALUE}" in out
    assert sorted(p["spec"]["nodeName"] for p in bound(cluster, selector, 2)) == ["node-plus", "node-plus-unlabelled"]

    # Without the ClusterRole kvc wrote, the same call is refused: RBAC is what lets the pod label.
    default_account = cluster.service_account_dir(NAMESPACE, "default", tmp_path / "default")
    refused = kvc(
        ["k8s", "label-node"],
        {"KVC_ROOT": str(root), "KVC_KERNEL": "fake", **cluster.in_cluster_environment(default_account, "node-other")},
        timeout=60,
    )
    assert refused.returncode != 0 and "refused to label node node-other: HTTP 403" in refused.stderr, refused.stderr
    assert node_label(cluster, "node-other", KVC_KERNEL_LABEL) is None


def agent_modules(base: Path, kernel: str, symvers: Path) -> Path:
    """The init container's copy for ``kernel``: the example's two modules (crafted, loadable into
    the fake kernel) under base/lib/modules/KERNEL/extra, and the kernel's exports in ``symvers``."""
    symvers.write_text(f"0x{PARAM_OPS_CRC:08x}\tparam_ops_int\tvmlinux\tEXPORT_SYMBOL\t\n")
    extra = base / "lib" / "modules" / kernel / "extra"
    extra.mkdir(parents=True)
    for name, params in (("simple-kmod", []), ("simple-procfs-kmod", [Param("number")])):
        spec = ModuleSpec(
            name=name.replace("-", "_"),
            vermagic=f"{kernel} SMP preempt mod_unload modversions ",
            params=params,
            crcs={"param_ops_int": PARAM_OPS_CRC},
            modinfo=[("license", "GPL"), ("version", "1.0.0"), ("srcversion", "SRC100")],
        )
        (extra / f"{name}.ko").write_bytes(build_module(spec))
    return base


def test_the_agent_with_its_pods_service_account_labels_its_node_ready(
    cluster: ControlPlane, kvc_root: Path, tmp_path: Path
) -> None:
    """kvc k8s agent as the DaemonSet's pod runs it on node-k1: the conf from the ConfigMap the
    apiserver stored, the pod's service account, a fake kernel K1; it loads and labels the node."""
    objects = rendered(
        kvc_root, "daemonset", "simple-kmod", "--repository", REPO, "--kvc-image", KVC_IMAGE, "--kernel", K1
    )
    for obj in objects:
        cluster.apply(obj)
    (configmap,) = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    stored = cluster.get("v1", "ConfigMap", configmap["metadata"]["name"], NAMESPACE)
    assert stored is not None
    root = tmp_path / "node-k1"
    (root / "etc" / "kvc").mkdir(parents=True)
    (root / "etc" / "kvc" / "simple-kmod.conf").write_text(stored["data"]["simple-kmod.conf"])
    symvers = tmp_path / "Module.symvers"
    modules = agent_modules(tmp_path / "kvc-modules", K1, symvers)
    FakeKernel.create(HostPaths(str(root)), K1, symvers=str(symvers))
    (daemonset,) = [obj for obj in objects if obj["kind"] == "DaemonSet"]
    account = cluster.service_account_dir(
        NAMESPACE, daemonset["spec"]["template"]["spec"]["serviceAccountName"], tmp_path / "account"
    )
    ready_label = "kvc/kube-system.simple-kmod.ready"
    agent = subprocess.Popen(
        [sys.executable, "-m", "kvc", "k8s", "agent", "simple-kmod", "--modules-dir", str(modules)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "KVC_ROOT": str(root), "KVC_KERNEL": "fake", "KVC_K8S_NAMESPACE": NAMESPACE,
             **cluster.in_cluster_environment(account, "node-k1")},
    )  # fmt: skip
    try:
        wait_until(
            lambda: node_label(cluster, "node-k1", ready_label) == "true" or agent.poll() is not None,
            "the agent's ready label",
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    assert f"node node-k1: {ready_label}=true" in out and "stays loaded" in out, out
    assert node_label(cluster, "node-k1", ready_label) == "true"
    assert node_label(cluster, "node-k2", ready_label) is None
    kernel = FakeKernel(HostPaths(str(root)))
    assert sorted(m.name for m in kernel.loaded_modules()) == ["simple_kmod", "simple_procfs_kmod"]
