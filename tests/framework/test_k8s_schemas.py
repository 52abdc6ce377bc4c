"""The schemas kvc's Kubernetes output is tested against, tested themselves with objects written
here: KMM's Module schema (tests/support/kmm_schema.py, from KMM's Go types) accepts a minimal
Module and names the path of a misspelled field, a wrong type and each missing required field;
Kubernetes' own schemas (tests/support/k8svalidate.py, kubernetes-validate, strict) accept valid
built-in objects for both versions and refuse unknown fields and wrong types; the Module's
CustomResourceDefinition is one Kubernetes accepts and is structural."""

from __future__ import annotations

import copy
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest

from support.k8svalidate import DEFAULT_VERSIONS, validate_builtin
from support.kmm_schema import MODULE, crd, validate_module

KVER = "6.1.0-28-amd64"


def minimal_module() -> dict[str, Any]:
    return {
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1",
        "kind": "Module",
        "metadata": {"name": "demo", "namespace": "kvc"},
        "spec": {
            "moduleLoader": {
                "container": {
                    "modprobe": {"moduleName": "demo", "parameters": ["speed=3"], "firmwarePath": "/opt/lib/firmware"},
                    "kernelMappings": [{"literal": KVER, "containerImage": f"reg.test/demo:1.0.0-{KVER}"}],
                }
            },
            "imageRepoSecret": {"name": "pull"},
            "selector": {"feature.node.kubernetes.io/kernel-version.full": KVER},
        },
    }


def container_of(module: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = module["spec"]["moduleLoader"]["container"]
    return container


# ---- KMM's Module ------------------------------------------------------------------------------------------------


def test_the_module_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(MODULE)


def test_a_minimal_module_passes() -> None:
    assert validate_module(minimal_module()) == []


def test_a_module_with_every_field_kvc_writes_passes() -> None:
    module = minimal_module()
    container = container_of(module)
    container["modprobe"]["modulesLoadingOrder"] = ["demo", "demo_core"]
    container["modprobe"]["dirName"] = "/opt"
    container["imagePullPolicy"] = "IfNotPresent"
    container["kernelMappings"] = [{"regexp": "^.+$", "containerImage": "reg.test/demo:1.0.0-${KERNEL_FULL_VERSION}"}]
    container["inTreeModulesToRemove"] = ["videodev"]
    module["spec"]["tolerations"] = [{"operator": "Exists"}]
    assert validate_module(module) == []


def test_a_misspelled_field_fails_with_its_path() -> None:
    module = minimal_module()
    container = container_of(module)
    container["kernelMapping"] = container.pop("kernelMappings")
    problems = validate_module(module)
    assert any(
        p.startswith("spec.moduleLoader.container: ") and "'kernelMapping' was unexpected" in p for p in problems
    )
    assert "spec.moduleLoader.container: 'kernelMappings' is a required property" in problems, problems


def test_a_misspelled_field_deep_inside_fails_with_its_path() -> None:
    module = minimal_module()
    container_of(module)["kernelMappings"][0]["literl"] = KVER
    problems = validate_module(module)
    assert len(problems) == 1, problems
    assert problems[0].startswith("spec.moduleLoader.container.kernelMappings.0: ")
    assert "'literl' was unexpected" in problems[0]


def test_a_wrong_type_fails_with_its_path() -> None:
    module = minimal_module()
    container_of(module)["modprobe"]["parameters"] = "speed=3"
    assert validate_module(module) == [
        "spec.moduleLoader.container.modprobe.parameters: 'speed=3' is not of type 'array'"
    ]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("spec", "moduleLoader", "container"), "kernelMappings"),
        (("spec", "moduleLoader", "container"), "modprobe"),
        (("spec", "moduleLoader", "container", "kernelMappings", 0), "containerImage"),
        (("spec",), "selector"),
        (("spec", "moduleLoader"), "container"),
        ((), "apiVersion"),
    ],
)
def test_a_missing_required_field_fails_with_its_path(path: tuple[Any, ...], field: str) -> None:
    module = minimal_module()
    parent: Any = module
    for part in path:
        parent = parent[part]
    del parent[field]
    where = ".".join(str(part) for part in path) or "(top)"
    assert validate_module(module) == [f"{where}: '{field}' is a required property"]


def test_kernel_mappings_need_one_entry() -> None:
    module = minimal_module()
    container_of(module)["kernelMappings"] = []
    assert validate_module(module) == ["spec.moduleLoader.container.kernelMappings: [] should be non-empty"]


def test_a_pull_policy_kubernetes_does_not_have_fails() -> None:
    module = minimal_module()
    container_of(module)["imagePullPolicy"] = "Sometimes"
    (problem,) = validate_module(module)
    assert problem.startswith("spec.moduleLoader.container.imagePullPolicy: 'Sometimes' is not one of")


def test_a_core_type_is_at_least_type_checked() -> None:
    module = minimal_module()
    module["spec"]["tolerations"] = ["Exists"]
    assert validate_module(module) == ["spec.tolerations.0: 'Exists' is not of type 'object'"]


def test_another_kind_or_group_fails() -> None:
    module = minimal_module()
    module["apiVersion"] = "kmm.sigs.x-k8s.io/v1alpha1"
    module["kind"] = "Modules"
    assert [p.split(":")[0] for p in validate_module(module)] == ["apiVersion", "kind"]


# ---- Kubernetes' built-in objects --------------------------------------------------------------------------------


def test_two_recent_versions_are_checked() -> None:
    assert len(DEFAULT_VERSIONS) == 2
    newest = max(DEFAULT_VERSIONS, key=lambda v: tuple(int(part) for part in v.split(".")))
    assert newest.startswith(kubernetes_validate.latest_version())


def daemonset() -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "kvc-demo"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "kvc-demo-0123abcd", "namespace": "kvc", "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"feature.node.kubernetes.io/kernel-version.full": KVER},
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "terminationGracePeriodSeconds": 30,
                    "initContainers": [
                        {
                            "name": "modules",
                            "image": f"reg.test/demo:1.0.0-{KVER}",
                            "command": ["/bin/sh", "-c", "mkdir -p /kvc-modules && cp -R /opt/lib /kvc-modules/"],
                            "volumeMounts": [{"name": "modules", "mountPath": "/kvc-modules"}],
                        }
                    ],
                    "containers": [
                        {
                            "name": "kvc",
                            "image": "reg.test/kvc:1",
                            "imagePullPolicy": "IfNotPresent",
                            "args": ["k8s", "agent", "demo", "--modules-dir", "/kvc-modules"],
                            "securityContext": {"privileged": True},
                            "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                            "readinessProbe": {"exec": {"command": ["kvc", "k8s", "ready", "demo"]}},
                            "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
                            "volumeMounts": [
                                {"name": "modules", "mountPath": "/kvc-modules"},
                                {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "modules", "emptyDir": {}},
                        {"name": "lib-modules", "hostPath": {"path": "/lib/modules", "type": "Directory"}},
                    ],
                },
            },
        },
    }


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def other_builtins() -> Iterator[dict[str, Any]]:
    meta = {"name": "kvc-demo", "namespace": "kvc"}
    yield {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}
    yield {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"demo.conf": 'KVC_VERSION="1.0.0"\n'}}
    yield {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "kvc-demo-node-label"},
        "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}],
    }
    yield {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "kvc-demo-node-label"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kvc-demo-node-label"},
        "subjects": [{"kind": "ServiceAccount", "name": "kvc-demo", "namespace": "kvc"}],
    }
    template = copy.deepcopy(daemonset()["spec"]["template"])
    template["spec"]["restartPolicy"] = "OnFailure"
    template["spec"]["nodeName"] = "node-1"
    yield {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {"template": template}}
    yield {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}


@pytest.mark.parametrize("version", DEFAULT_VERSIONS)
def test_a_valid_daemonset_passes(version: str) -> None:
    assert validate_builtin(daemonset(), versions=(version,)) == []


@pytest.mark.parametrize("obj", list(other_builtins()), ids=lambda obj: str(obj["kind"]))
def test_each_kind_kvc_writes_passes(obj: dict[str, Any]) -> None:
    assert validate_builtin(obj) == []


def test_an_unknown_field_fails_for_both_versions() -> None:
    obj = daemonset()
    agent = pod_spec(obj)["containers"][0]
    agent["imagePulPolicy"] = agent.pop("imagePullPolicy")
    problems = validate_builtin(obj)
    assert [p.split(" ")[0] for p in problems] == list(DEFAULT_VERSIONS), problems
    for problem in problems:
        assert "DaemonSet: spec.template.spec.containers.0: " in problem
        assert "'imagePulPolicy' was unexpected" in problem


def test_an_unknown_field_in_another_kind_fails() -> None:
    obj = next(o for o in other_builtins() if o["kind"] == "ClusterRoleBinding")
    obj["roleRef"]["namespace"] = "kvc"
    problems = validate_builtin(obj)
    assert len(problems) == 2, problems
    assert all("roleRef: " in p and "'namespace' was unexpected" in p for p in problems), problems


def test_a_wrong_type_fails_for_both_versions() -> None:
    obj = daemonset()
    pod_spec(obj)["terminationGracePeriodSeconds"] = "30"
    problems = validate_builtin(obj)
    assert len(problems) == 2, problems
    assert all("spec.template.spec.terminationGracePeriodSeconds: '30' is not of type" in p for p in problems)


def test_a_missing_required_field_fails() -> None:
    obj = daemonset()
    del pod_spec(obj)["containers"][0]["name"]
    problems = validate_builtin(obj)
    assert len(problems) == 2, problems
    assert all("spec.template.spec.containers.0: 'name' is a required property" in p for p in problems), problems


def test_a_kind_without_a_schema_is_an_error_not_a_pass() -> None:
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_builtin(minimal_module())


# ---- the Module's CustomResourceDefinition -----------------------------------------------------------------------


def test_the_crd_validates_for_both_versions() -> None:
    assert validate_builtin(crd()) == []


def test_the_crd_names_the_module_kind() -> None:
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == "modules.kmm.sigs.x-k8s.io"
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["plural"]) == (
        "kmm.sigs.x-k8s.io",
        "Namespaced",
        "Module",
        "modules",
    )
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1beta1", True, True)
    assert version["subresources"] == {"status": {}}


def schemas_in(schema: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(schema, dict):
        yield path, schema
        for key, value in schema.items():
            yield from schemas_in(value, f"{path}.{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from schemas_in(value, f"{path}.{index}")


def test_the_crd_schema_is_structural() -> None:
    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    nodes = [(path, node) for path, node in schemas_in(root) if not path.endswith(".properties")]
    assert nodes
    for path, node in nodes:
        if "properties" in node:
            assert node.get("type") == "object", path
            assert "additionalProperties" not in node, path
        assert "$schema" not in node and "const" not in node, path
        assert node.get("default") != "", path
        assert "type" in node, path  # structural: every value schema says its type
    container = root["properties"]["spec"]["properties"]["moduleLoader"]["properties"]["container"]
    assert container["properties"]["modprobe"]["properties"]["dirName"]["default"] == "/opt"
    assert container["required"] == ["kernelMappings", "modprobe"]


def test_the_crd_keeps_the_core_types_it_does_not_describe() -> None:
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["tolerations"]["items"] == {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
