"""``kvc k8s``: the objects it writes (read back with PyYAML and checked against KMM's API and
Kubernetes' schemas) and the node side of its DaemonSet, run as processes against a fake kernel:
the agent loads, labels nothing outside a cluster, leaves the modules loaded when stopped, and
replaces a loaded older build; ``ready`` answers the readiness probe; the objects warn about what
KMM cannot express. The pod run by ``podman kube play`` is tests/framework/test_k8s_pod.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support.k8svalidate import validate_builtin
from support.kmm_schema import crd, validate_module
from support.kvccli import kvc
from support.modbuild import ModuleSpec, Param, build_module

RELEASE = "6.1.0-99-amd64"
REPO = "registry.example/fleet/demo"
PARAM_OPS_CRC = 0x1D2F3A4B


def write_conf(root: Path, name: str, text: str) -> None:
    conf = root / "etc" / "kvc" / f"{name}.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(text)


DEMO_CONF = (
    "KVC_REGISTRY=registry.example/fleet/demo\nKVC_REGISTRY_FALLBACK=fail\nKMOD_SOFTWARE_VERSION={version}\n"
    'KMOD_NAMES="demo-core demo-net"\nKVC_MODULE_PARAMS_demo_net="speed=3"\n{extra}'
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write_conf(root, "demo", DEMO_CONF.format(version="1.0", extra=""))
    # The kernel exports what the crafted modules import (their parameters' ops).
    symvers = tmp_path / "Module.symvers"
    symvers.write_text(f"0x{PARAM_OPS_CRC:08x}\tparam_ops_int\tvmlinux\tEXPORT_SYMBOL\t\n")
    FakeKernel.create(HostPaths(str(root)), RELEASE, symvers=str(symvers))
    return root


def env(root: Path) -> dict[str, str]:
    return {"KVC_ROOT": str(root), "KVC_KERNEL": "fake", "KUBERNETES_SERVICE_HOST": ""}


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def rendered(root: Path, *args: str) -> tuple[list[dict[str, Any]], str]:
    done = kvc(["k8s", *args], env(root))
    assert done.returncode == 0, done.stderr
    return documents(done.stdout), done.stderr


# ---- the objects ----------------------------------------------------------------------------------------------


def test_the_kmm_module_maps_each_kernel_to_its_pushed_tag_and_loads_in_kmods_order(root: Path) -> None:
    (module,), warnings = rendered(root, "module", "demo", "-k", RELEASE, "-k", "6.12.9+bpo-amd64")
    assert module["apiVersion"] == "kmm.sigs.x-k8s.io/v1beta1" and module["kind"] == "Module"
    container = module["spec"]["moduleLoader"]["container"]
    assert container["kernelMappings"] == [
        {"literal": RELEASE, "containerImage": f"{REPO}:1.0-{RELEASE}"},
        {"literal": "6.12.9+bpo-amd64", "containerImage": f"{REPO}:1.0-6.12.9__bpo-amd64"},
    ]
    # KMOD_NAMES is the load order; KMM wants the topmost module first, and it as moduleName.
    assert container["modprobe"] == {
        "moduleName": "demo_net",
        "dirName": "/opt",
        "parameters": ["speed=3"],
        "modulesLoadingOrder": ["demo_net", "demo_core"],
    }
    assert module["spec"]["selector"] == {"kubernetes.io/os": "linux"} and warnings == ""


def test_the_module_warns_about_what_kmm_cannot_express(root: Path) -> None:
    extra = 'KVC_MODULE_PARAMS_demo_core="debug=1"\nKVC_INTREE_MODULES="videodev"\nKVC_FIRMWARE="demo/fw.bin"\n'
    write_conf(root, "demo", DEMO_CONF.format(version="1.0", extra=extra))
    (module,), warnings = rendered(
        root, "module", "demo", "--regexp", "--selector", "example.com/demo=yes", "--image-repo-secret", "pull"
    )
    lines = warnings.splitlines()
    assert any("parameters of demo_core" in line for line in lines), warnings
    assert any("in-tree modules (videodev)" in line for line in lines), warnings
    assert any("regexp mapping" in line for line in lines), warnings
    assert all(line.startswith("kvc: warning: ") for line in lines)
    spec = module["spec"]
    assert spec["moduleLoader"]["container"]["kernelMappings"] == [
        {"regexp": "^.+$", "containerImage": f"{REPO}:1.0-${{KERNEL_FULL_VERSION}}"}
    ]
    assert spec["moduleLoader"]["container"]["modprobe"]["firmwarePath"] == "/opt/lib/firmware"
    assert spec["selector"] == {"example.com/demo": "yes"} and spec["imageRepoSecret"] == {"name": "pull"}


def test_the_daemonsets_select_nodes_by_kernel_and_never_unload_on_stop(root: Path) -> None:
    objects, _ = rendered(
        root, "daemonset", "demo", "--kvc-image", "registry.example/kvc:1", "-k", RELEASE, "-k", "6.1.0-98-amd64"
    )
    kinds = [obj["kind"] for obj in objects]
    assert kinds == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "DaemonSet"]
    conf = objects[3]["data"]["demo.conf"]
    assert "KMOD_NAMES='demo-core demo-net'" in conf and "KVC_MODULE_PARAMS_demo_net=speed=3" in conf
    for daemonset, kernel in zip(objects[4:], (RELEASE, "6.1.0-98-amd64")):
        pod = daemonset["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"feature.node.kubernetes.io/kernel-version.full": kernel}
        (init,) = pod["initContainers"]
        assert init["image"] == f"{REPO}:1.0-{kernel}" and init["command"][:2] == ["/bin/sh", "-c"]
        (agent,) = pod["containers"]
        assert agent["args"] == ["k8s", "agent", "demo", "--modules-dir", "/kvc-modules"]
        assert agent["securityContext"] == {"privileged": True}
        assert agent["readinessProbe"]["exec"]["command"] == ["kvc", "k8s", "ready", "demo"]
        assert "lifecycle" not in agent  # no preStop: a restart leaves the modules loaded
        assert pod["priorityClassName"] == "system-node-critical"
        host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
        assert host_paths == {"/lib/modules", "/sys", "/var/lib/kvc", "/run/kvc", "/lib/firmware"}
        assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    names = {obj["metadata"]["name"] for obj in objects[4:]}
    assert len(names) == 2


def test_a_kernel_that_is_no_label_value_is_refused_with_a_hint(root: Path) -> None:
    done = kvc(["k8s", "daemonset", "demo", "--kvc-image", "k:1", "-k", "6.12.9+bpo-amd64"], env(root))
    assert done.returncode == 2, done.stderr
    (line, hint) = done.stderr.splitlines()
    assert "is not a valid label value" in line and "--kernel-label" in hint
    missing = kvc(["k8s", "module", "demo"], env(root))
    assert missing.returncode == 2 and "needs --kernel KVER (or --regexp)" in missing.stderr


def test_kvcs_own_kernel_label_comes_with_its_labeller_and_takes_any_release(root: Path) -> None:
    objects, _ = rendered(
        root,
        "daemonset",
        "demo",
        "--kvc-image",
        "k:1",
        "-k",
        "6.12.9+bpo-amd64",
        "--kernel-label",
        "kvc/kernel-release",
    )
    (selected,) = [
        obj for obj in objects if obj["kind"] == "DaemonSet" and "initContainers" in obj["spec"]["template"]["spec"]
    ]
    assert selected["spec"]["template"]["spec"]["nodeSelector"] == {"kvc/kernel-release": "6.12.9__bpo-amd64"}
    (labeller,) = [
        obj for obj in objects if obj["metadata"]["name"] == "kvc-kernel-label" and obj["kind"] == "DaemonSet"
    ]
    pod = labeller["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["k8s", "label-node"] and "volumes" not in pod
    assert "securityContext" not in pod["containers"][0]  # reading the kernel release needs no privilege
    outside = kvc(["k8s", "label-node"], env(root))
    assert outside.returncode == 6 and "not in a cluster" in outside.stderr


def test_unload_jobs_are_pinned_to_their_nodes(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "unload.yaml"
    done = kvc(
        ["k8s", "unload-job", "demo", "--kvc-image", "k:1", "--node", "n1", "--node", "n2", "-o", str(out)], env(root)
    )
    assert done.returncode == 0 and "wrote 6 object(s)" in done.stdout, done.stderr
    jobs = [obj for obj in documents(out.read_text()) if obj["kind"] == "Job"]
    assert [job["spec"]["template"]["spec"]["nodeName"] for job in jobs] == ["n1", "n2"]
    assert all(job["spec"]["template"]["spec"]["containers"][0]["args"] == ["unload", "demo"] for job in jobs)


# ---- against KMM's API and Kubernetes' schemas ------------------------------------------------------------------


def test_every_object_kvc_writes_validates(root: Path) -> None:
    extra = 'KVC_FIRMWARE="demo/fw.bin"\nKVC_INTREE_MODULES="videodev"\n'
    write_conf(root, "demo", DEMO_CONF.format(version="1.0~rc1+git2", extra=extra))
    (module,), _ = rendered(root, "module", "demo", "-k", RELEASE, "--image-repo-secret", "pull")
    assert validate_module(module) == []
    (regexp,), _ = rendered(root, "module", "demo", "--regexp", "--selector", "example.com/gpu=yes")
    assert validate_module(regexp) == []
    objects, _ = rendered(root, "daemonset", "demo", "--kvc-image", "k:1", "-k", RELEASE, "--image-pull-secret", "p")
    own, _ = rendered(
        root, "daemonset", "demo", "--kvc-image", "k:1", "-k", RELEASE, "--kernel-label", "kvc/kernel-release"
    )
    jobs, _ = rendered(root, "unload-job", "demo", "--kvc-image", "k:1", "--node", "n1")
    everything = objects + own + jobs
    assert {obj["kind"] for obj in everything} == {
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Job"
    }  # fmt: skip
    for obj in everything:
        assert validate_builtin(obj) == [], obj["metadata"]["name"]


def test_the_schemas_fail_what_is_wrong(root: Path) -> None:
    (module,), _ = rendered(root, "module", "demo", "-k", RELEASE)
    container = module["spec"]["moduleLoader"]["container"]
    container["kernelMapping"] = container.pop("kernelMappings")
    container["modprobe"]["parameters"] = "speed=3"
    problems = validate_module(module)
    assert "spec.moduleLoader.container: 'kernelMappings' is a required property" in problems, problems
    assert any("'kernelMapping' was unexpected" in p for p in problems), problems
    assert any(p.startswith("spec.moduleLoader.container.modprobe.parameters:") for p in problems), problems
    del module["spec"]["selector"]
    assert "spec: 'selector' is a required property" in validate_module(module)
    objects, _ = rendered(root, "daemonset", "demo", "--kvc-image", "k:1", "-k", RELEASE)
    daemonset = objects[-1]
    agent = daemonset["spec"]["template"]["spec"]["containers"][0]
    agent["imagePulPolicy"] = agent.pop("imagePullPolicy")
    problems = validate_builtin(daemonset)
    assert len([p for p in problems if "'imagePulPolicy' was unexpected" in p]) == 2, problems
    agent["imagePullPolicy"] = agent.pop("imagePulPolicy")
    daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30"
    problems = validate_builtin(daemonset)
    assert len([p for p in problems if "terminationGracePeriodSeconds: '30' is not of type" in p]) == 2, problems
    assert validate_builtin(crd()) == []


# ---- the node side ---------------------------------------------------------------------------------------------


def module_tree(base: Path, version: str, *, speed_default: int = 1) -> Path:
    """An init container's copy: base/lib/modules/KVER/extra/{demo_core,demo_net}.ko of ``version``."""
    extra = base / "lib" / "modules" / RELEASE / "extra"
    extra.mkdir(parents=True)
    for name, params in (("demo_core", []), ("demo_net", [Param("speed", default=speed_default)])):
        spec = ModuleSpec(
            name=name,
            vermagic=f"{RELEASE} SMP preempt mod_unload modversions ",
            params=params,
            crcs={"param_ops_int": PARAM_OPS_CRC},
            modinfo=[("license", "GPL"), ("version", version), ("srcversion", f"SRC{version.replace('.', '')}")],
        )
        (extra / f"{name}.ko").write_bytes(build_module(spec))
    return base


def start_agent(root: Path, modules: Path) -> tuple[subprocess.Popen[str], str]:
    """The agent, once it waits, and what it said until then."""
    agent = subprocess.Popen(
        [sys.executable, "-m", "kvc", "k8s", "agent", "demo", "--modules-dir", str(modules)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env(root)},
    )
    assert agent.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = agent.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "waiting (stopping leaves it loaded)" in line:
            return agent, "".join(lines)
    agent.kill()
    raise AssertionError("".join(lines) + (agent.stderr.read() if agent.stderr else ""))


def stop(agent: subprocess.Popen[str]) -> str:
    agent.send_signal(signal.SIGTERM)
    out, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    return out


def loaded(root: Path) -> dict[str, str]:
    kernel = FakeKernel(HostPaths(str(root)))
    states = [kernel.module_state(m.name) for m in kernel.loaded_modules()]
    return {state.name: state.version or "" for state in states if state is not None}


def test_the_agent_loads_waits_and_leaves_the_modules_loaded_when_stopped(root: Path, tmp_path: Path) -> None:
    modules = module_tree(tmp_path / "copy1", "1.0")
    not_yet = kvc(["k8s", "ready", "demo"], env(root))
    assert not_yet.returncode == 6 and "nothing extracted" in not_yet.stderr
    agent, said = start_agent(root, modules)
    assert "loaded demo_core, demo_net" in said and "node label kvc/kube-system.demo.ready not set" in said
    assert loaded(root) == {"demo_core": "1.0", "demo_net": "1.0"}
    net = FakeKernel(HostPaths(str(root))).module_state("demo_net")
    assert net is not None and net.parameters["speed"] == "3"
    assert kvc(["k8s", "ready", "demo"], env(root)).returncode == 0
    assert "stays loaded" in stop(agent)
    assert loaded(root) == {"demo_core": "1.0", "demo_net": "1.0"}
    # A restart of the pod: the same copy, nothing unloaded or loaded again.
    agent, said = start_agent(root, modules)
    assert "loaded nothing new" in said and "replacing" not in said
    stop(agent)
    assert loaded(root) == {"demo_core": "1.0", "demo_net": "1.0"}


def test_a_new_version_replaces_the_loaded_one_and_says_so(root: Path, tmp_path: Path) -> None:
    stop(start_agent(root, module_tree(tmp_path / "copy1", "1.0"))[0])
    write_conf(root, "demo", DEMO_CONF.format(version="1.1", extra=""))
    agent, said = start_agent(root, module_tree(tmp_path / "copy2", "1.1"))
    assert "demo 1.1: replacing what is loaded: demo_core (loaded: version 1.0" in said, said
    assert "unloading the old version of demo first" in said
    assert said.index("unloading the old version") < said.index("loaded demo_core, demo_net")
    assert loaded(root) == {"demo_core": "1.1", "demo_net": "1.1"}
    assert kvc(["k8s", "ready", "demo"], env(root)).returncode == 0
    stop(agent)
    removed = kvc(["unload", "demo"], env(root))
    assert removed.returncode == 0, removed.stderr
    assert loaded(root) == {}
    gone = kvc(["k8s", "ready", "demo"], env(root))
    assert gone.returncode == 6 and "demo_core is not loaded" in gone.stderr


def test_the_agent_refuses_a_copy_for_another_kernel(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "lib" / "modules" / "6.1.0-1-amd64").mkdir(parents=True)
    done = kvc(["k8s", "agent", "demo", "--modules-dir", str(other)], env(root))
    assert done.returncode == 6, done.stderr
    assert f"module image is for kernel 6.1.0-1-amd64, but the node runs {RELEASE}" in done.stderr
    assert loaded(root) == {}
