"""The Kubernetes objects that deploy an instance: a KMM ``Module`` (kmm.sigs.x-k8s.io/v1beta1,
field for field as KMM's ``api/v1beta1/module_types.go`` names them), or, without KMM, kvc's own
per-kernel DaemonSets with what they need (ServiceAccount, RBAC for the node label, the conf as a
ConfigMap) and per-node removal Jobs. Pure functions of the instance and the options: they read
nothing and write nothing; what KMM cannot express comes back as warnings.

Why one DaemonSet per kernel: a pod template names one image, and kvc's images are per kernel. A
DaemonSet per kernel, selected by the node's kernel label, lets the kubelet pull exactly the
node's image with the cluster's pull secrets, as NVIDIA's precompiled drivers do; a single
DaemonSet choosing its image per node would have to pull from inside the pod, with registry
credentials in it."""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from kvc.config import InstanceConfig
from kvc.errors import ConfigError, UsageError
from kvc.images import encode_tag, image_repository, registry_tags
from kvc.kmmimage import DIR_NAME as KMM_DIR_NAME
from kvc.kmmimage import FIRMWARE_PATH as KMM_FIRMWARE_PATH
from kvc.registry import Reference

KMM_API_VERSION = "kmm.sigs.x-k8s.io/v1beta1"
NFD_KERNEL_LABEL = "feature.node.kubernetes.io/kernel-version.full"
LABEL_PREFIX = "kvc"  # node and object labels kvc sets: kvc/...
# The kernel label kvc's own labeller DaemonSet sets (for clusters without NFD): the release as a
# tag writes it ('+' as '__'), since a label value cannot hold every release.
KVC_KERNEL_LABEL = f"{LABEL_PREFIX}/kernel-release"
LABELLER = "kvc-kernel-label"
MODULES_DIR = "/kvc-modules"  # the init container's copy of the image's /opt/lib, in an emptyDir
CONF_DIR = "/etc/kvc"
DEFAULT_NAMESPACE = "kube-system"
DEFAULT_SELECTOR = {"kubernetes.io/os": "linux"}

# The node's paths the kvc container needs, as kvc-container@.service mounts them (the host's
# container storage aside: the module image comes through the init container instead).
HOST_MOUNTS = (
    ("lib-modules", "/lib/modules", True, "Directory"),
    ("sys", "/sys", False, "Directory"),
    ("var-lib-kvc", "/var/lib/kvc", False, "DirectoryOrCreate"),
    ("run-kvc", "/run/kvc", False, "DirectoryOrCreate"),
    ("lib-firmware", "/lib/firmware", True, "DirectoryOrCreate"),
)

_DNS_LABEL_BAD = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?")
_LABEL_KEY = re.compile(r"([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Rendered:
    """Objects to apply, in order, and what the user must know about them."""

    objects: tuple[dict[str, Any], ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class FleetOptions:
    """What a command line says about the cluster."""

    repository: Optional[Reference] = None
    namespace: str = DEFAULT_NAMESPACE
    pull_secret: str = ""
    kvc_image: str = ""
    kernel_label: str = NFD_KERNEL_LABEL
    selector: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SELECTOR))


def dns_name(*parts: str, limit: int = 63) -> str:
    """A DNS-1123 label from ``parts`` (lowercase, '-' for anything else), cut with a hash of the
    whole so that two long names stay apart."""
    text = _DNS_LABEL_BAD.sub("-", "-".join(parts).lower()).strip("-")
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{text[: limit - 9].rstrip('-')}-{digest}"


def check_label(key: str, value: str, what: str) -> None:
    if not _LABEL_KEY.fullmatch(key):
        raise UsageError(f"{what}: {key!r} is not a valid label key", hint="give PREFIX/NAME, e.g. example.com/kernel")
    if not _LABEL_VALUE.fullmatch(value):
        raise UsageError(
            f"{what}: {value!r} is not a valid label value (at most 63 letters, digits, '-', '_', '.')",
            hint=f"use kvc's own node label: --kernel-label {KVC_KERNEL_LABEL} (its labeller writes '+' as '__')",
        )


def ready_label(namespace: str, name: str) -> str:
    """The node label the agent sets once the instance is loaded, like KMM's
    ``kmm.node.kubernetes.io/NAMESPACE.MODULE.ready``."""
    return f"{LABEL_PREFIX}/{namespace}.{name}.ready"


def module_image(repo: Reference, instance: InstanceConfig, kernel_release: str) -> str:
    return str(repo.with_tag(registry_tags(instance, kernel_release)[0]))


def _module_parameters(instance: InstanceConfig, module: str) -> list[str]:
    """KVC_MODULE_PARAMS_<module> as the words KMM passes to modprobe."""
    try:
        return shlex.split(instance.module_params.get(module, ""))
    except ValueError as exc:  # an unclosed quote
        raise ConfigError(
            f"{instance.source}: KVC_MODULE_PARAMS_{module} cannot be split into modprobe arguments: {exc}",
            hint="close the quote, or quote the value so that its own quotes come in pairs",
        ) from None


def _load_order(instance: InstanceConfig) -> list[str]:
    return [name.replace("-", "_") for name in instance.module_names]


def _kmm_warnings(instance: InstanceConfig, intree_depends: Sequence[str]) -> list[str]:
    warnings = []
    top = _load_order(instance)[-1]
    others = sorted(module for module in instance.module_params if module != top)
    if others:
        warnings.append(
            f"KMM passes parameters to moduleName ({top}) only: the parameters of {', '.join(others)} "
            "(KVC_MODULE_PARAMS_*) are not in the Module; ship them as a modprobe.d file or use "
            "'kvc k8s daemonset'"
        )
    needed = sorted({*instance.intree_modules, *intree_depends})
    if needed:
        warnings.append(
            f"the modules need in-tree modules ({', '.join(needed)}) that KMM's 'modprobe -d {KMM_DIR_NAME}' "
            "cannot find in the image: load them on the nodes first, or use 'kvc k8s daemonset' (kvc loads them "
            "from the node's tree)"
        )
    if instance.modprobe_conf or instance.udev_rules:
        warnings.append(
            "KMM does not install the conf's KVC_MODPROBE_CONF and KVC_UDEV_RULES files; 'kvc k8s daemonset' does"
        )
    return warnings


def kmm_module(
    instance: InstanceConfig,
    kernels: Sequence[str],
    options: FleetOptions,
    *,
    regexp: bool = False,
    intree_depends: Sequence[str] = (),
) -> Rendered:
    """A KMM ``Module`` for the instance: one literal kernel mapping per kernel (each naming the
    fixed tag kvc pushed), or with ``regexp`` one mapping for every kernel whose image the
    registry has under ``VERSION-${KERNEL_FULL_VERSION}``."""
    assert options.repository is not None
    order = _load_order(instance)
    warnings = _kmm_warnings(instance, intree_depends)
    if regexp:
        image = f"{options.repository}:{encode_tag(instance.software_version)}-${{KERNEL_FULL_VERSION}}"
        mappings: list[dict[str, Any]] = [{"regexp": "^.+$", "containerImage": image}]
        warnings.append(
            "a regexp mapping names the kernel as the node reports it: a release with characters a tag cannot "
            "hold ('+') has no image under that tag; list such kernels with --kernel instead"
        )
    else:
        if not kernels:
            raise UsageError("kvc k8s module needs --kernel KVER (or --regexp)", hint="name each kernel kvc pushed")
        mappings = [
            {"literal": kernel, "containerImage": module_image(options.repository, instance, kernel)}
            for kernel in kernels
        ]
    modprobe: dict[str, Any] = {"moduleName": order[-1], "dirName": KMM_DIR_NAME}
    parameters = _module_parameters(instance, order[-1])
    if parameters:
        modprobe["parameters"] = parameters
    if instance.firmware:
        modprobe["firmwarePath"] = KMM_FIRMWARE_PATH
    if len(order) > 1:
        # KMM wants the topmost module first, then what it needs loaded before it.
        modprobe["modulesLoadingOrder"] = list(reversed(order))
    spec: dict[str, Any] = {
        "moduleLoader": {"container": {"modprobe": modprobe, "kernelMappings": mappings}},
        "selector": dict(options.selector),
    }
    if options.pull_secret:
        spec["imageRepoSecret"] = {"name": options.pull_secret}
    module = {
        "apiVersion": KMM_API_VERSION,
        "kind": "Module",
        "metadata": {"name": dns_name(instance.name), "namespace": options.namespace, "labels": _labels(instance)},
        "spec": spec,
    }
    return Rendered((module,), tuple(warnings))


# ---- kvc's own DaemonSets -------------------------------------------------------------------------------------


def _labels(instance: InstanceConfig, kernel_release: str = "") -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "kvc", "app.kubernetes.io/instance": dns_name(instance.name)}
    if kernel_release:
        tag = encode_tag(kernel_release)
        labels[f"{LABEL_PREFIX}/kernel"] = tag if _LABEL_VALUE.fullmatch(tag) else dns_name(tag)
    return labels


def pod_conf(instance: InstanceConfig, repo: Optional[Reference]) -> str:
    """The instance's conf as the pods read it: only what a load needs (no build context: the
    modules come from the init container's copy of the image)."""
    values: list[tuple[str, str]] = [
        ("KMOD_SOFTWARE_VERSION", instance.software_version),
        ("KMOD_NAMES", " ".join(instance.module_names)),
    ]
    if repo is not None:
        values += [("KVC_REGISTRY", str(repo)), ("KVC_REGISTRY_FALLBACK", "fail")]
    else:
        values.append(("KVC_IMAGE", instance.image or f"{image_repository(instance)}:{{kver}}"))
    values += [(f"KVC_MODULE_PARAMS_{module}", params) for module, params in sorted(instance.module_params.items())]
    for key, items in (
        ("KVC_INTREE_MODULES", instance.intree_modules),
        ("KVC_FIRMWARE", instance.firmware),
        ("KVC_MODPROBE_CONF", instance.modprobe_conf),
        ("KVC_UDEV_RULES", instance.udev_rules),
    ):
        if items:
            values.append((key, " ".join(items)))
    if instance.delivery.value != "direct":
        values.append(("KVC_DELIVERY", instance.delivery.value))
    header = f"# {instance.name}.conf for kvc's pods: written by 'kvc k8s' from the instance's conf\n"
    return header + "".join(f"{key}={shlex.quote(value)}\n" for key, value in values)


def _host_volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes = [{"name": n, "hostPath": {"path": p, "type": t}} for n, p, _ro, t in HOST_MOUNTS]
    mounts: list[dict[str, Any]] = []
    for name, path, read_only, _type in HOST_MOUNTS:
        mount: dict[str, Any] = {"name": name, "mountPath": path}
        if read_only:
            mount["readOnly"] = True
        mounts.append(mount)
    return volumes, mounts


def _kvc_container(
    instance: InstanceConfig, options: FleetOptions, args: list[str], extra_mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    _volumes, mounts = _host_volumes()
    return {
        "name": "kvc",
        "image": options.kvc_image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "KVC_K8S_NAMESPACE", "value": options.namespace},
        ],
        # finit_module and delete_module need CAP_SYS_MODULE in the initial user namespace, and the
        # default seccomp profile allows them only with it; /sys must be writable for parameters.
        "securityContext": {"privileged": True},
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [*extra_mounts, {"name": "conf", "mountPath": CONF_DIR, "readOnly": True}, *mounts],
    }


def _pod_spec(instance: InstanceConfig, options: FleetOptions, containers: list[dict[str, Any]]) -> dict[str, Any]:
    volumes, _mounts = _host_volumes()
    spec: dict[str, Any] = {
        "serviceAccountName": _service_account(instance),
        "priorityClassName": "system-node-critical",
        # Modules are the node's, not a workload's: run on every matching node, tainted or not.
        "tolerations": [{"operator": "Exists"}],
        "containers": containers,
        "volumes": [{"name": "conf", "configMap": {"name": _conf_map(instance)}}, *volumes],
    }
    if options.pull_secret:
        spec["imagePullSecrets"] = [{"name": options.pull_secret}]
    return spec


def _service_account(instance: InstanceConfig) -> str:
    return dns_name("kvc", instance.name)


def _conf_map(instance: InstanceConfig) -> str:
    return dns_name("kvc", instance.name, "conf")


def support_objects(instance: InstanceConfig, options: FleetOptions) -> list[dict[str, Any]]:
    """ServiceAccount, the ClusterRole and binding that let the agent label its own node, and the
    conf as a ConfigMap."""
    account = _service_account(instance)
    role = dns_name("kvc", instance.name, "node-label")
    meta = {"namespace": options.namespace, "labels": _labels(instance)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role, "labels": _labels(instance)},
            "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role, "labels": _labels(instance)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": options.namespace}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": _conf_map(instance), **meta},
            "data": {f"{instance.name}.conf": pod_conf(instance, options.repository)},
        },
    ]


def daemonset_name(instance: InstanceConfig, kernel_release: str) -> str:
    return dns_name("kvc", instance.name, encode_tag(kernel_release))


def daemonset(instance: InstanceConfig, kernel_release: str, options: FleetOptions) -> dict[str, Any]:
    """The DaemonSet that loads the instance on every node running ``kernel_release``."""
    assert options.repository is not None
    labels = _labels(instance, kernel_release)
    copy = f"rm -rf {MODULES_DIR}/lib && cp -R {KMM_DIR_NAME}/lib {MODULES_DIR}/"
    init = {
        "name": "modules",
        "image": module_image(options.repository, instance, kernel_release),
        "imagePullPolicy": "IfNotPresent",
        # KMM's layout in the image: /opt/lib/modules/KVER (and /opt/lib/firmware), copied for kvc.
        "command": ["/bin/sh", "-c", copy],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "volumeMounts": [{"name": "modules", "mountPath": MODULES_DIR}],
    }
    agent = _kvc_container(
        instance,
        options,
        ["k8s", "agent", instance.name, "--modules-dir", MODULES_DIR],
        [{"name": "modules", "mountPath": MODULES_DIR, "readOnly": True}],
    )
    agent["readinessProbe"] = {
        "exec": {"command": ["kvc", "k8s", "ready", instance.name]},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
    }
    # No preStop: a restart or an update of this pod must leave the modules loaded. The next pod
    # unloads an old version itself, and removal is the explicit 'kvc k8s unload-job'.
    spec = _pod_spec(instance, options, [agent])
    spec["initContainers"] = [init]
    spec["nodeSelector"] = {options.kernel_label: kernel_label_value(options.kernel_label, kernel_release)}
    spec["terminationGracePeriodSeconds"] = 30
    spec["volumes"].insert(0, {"name": "modules", "emptyDir": {}})
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": daemonset_name(instance, kernel_release),
            "namespace": options.namespace,
            "labels": labels,
        },
        "spec": {
            "selector": {"matchLabels": labels},
            # Node by node: the next node's pod is replaced once this one is ready (loaded).
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {f"{LABEL_PREFIX}/version": instance.software_version},
                },
                "spec": spec,
            },
        },
    }


def kernel_label_value(key: str, kernel_release: str) -> str:
    """The value of the node label ``key`` on a node running ``kernel_release``."""
    return encode_tag(kernel_release) if key == KVC_KERNEL_LABEL else kernel_release


def labeller_objects(options: FleetOptions) -> list[dict[str, Any]]:
    """kvc's stand-in for NFD's kernel label: a DaemonSet on every Linux node whose pod labels its
    node ``kvc/kernel-release`` with the kernel it runs (a container sees the node's kernel) each
    time it starts, so after a kernel update and reboot the node moves to that kernel's DaemonSet.
    The same objects for every instance: applying them again changes nothing."""
    labels = {"app.kubernetes.io/name": "kvc", "app.kubernetes.io/component": "kernel-label"}
    meta = {"namespace": options.namespace, "labels": labels}
    spec: dict[str, Any] = {
        "serviceAccountName": LABELLER,
        "priorityClassName": "system-node-critical",
        "tolerations": [{"operator": "Exists"}],
        "nodeSelector": dict(DEFAULT_SELECTOR),
        "containers": [
            {
                "name": "label",
                "image": options.kvc_image,
                "imagePullPolicy": "IfNotPresent",
                "args": ["k8s", "label-node"],
                "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                "resources": {"requests": {"cpu": "5m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
            }
        ],
    }
    if options.pull_secret:
        spec["imagePullSecrets"] = [{"name": options.pull_secret}]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": LABELLER, **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": LABELLER, "labels": labels},
            "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": LABELLER, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": LABELLER},
            "subjects": [{"kind": "ServiceAccount", "name": LABELLER, "namespace": options.namespace}],
        },
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": LABELLER, **meta},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": spec},
            },
        },
    ]


def daemonsets(instance: InstanceConfig, kernels: Sequence[str], options: FleetOptions) -> Rendered:
    if not kernels:
        raise UsageError("kvc k8s daemonset needs --kernel KVER", hint="name each kernel the fleet runs")
    for kernel in kernels:
        check_label(options.kernel_label, kernel_label_value(options.kernel_label, kernel), f"kernel {kernel}")
    objects = [*support_objects(instance, options), *(daemonset(instance, k, options) for k in kernels)]
    if options.kernel_label == KVC_KERNEL_LABEL:
        objects += labeller_objects(options)
    return Rendered(tuple(objects))


def unload_jobs(instance: InstanceConfig, nodes: Sequence[str], options: FleetOptions) -> Rendered:
    """One Job per node that unloads the instance there (``kvc unload NAME``): removal is explicit,
    after the DaemonSets are deleted (their pods leave the modules loaded)."""
    if not nodes:
        raise UsageError("kvc k8s unload-job needs --node NODE", hint="name each node to unload the instance on")
    jobs = []
    for node in nodes:
        spec = _pod_spec(instance, options, [_kvc_container(instance, options, ["unload", instance.name], [])])
        spec["nodeName"] = node
        spec["restartPolicy"] = "OnFailure"
        jobs.append(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {
                    "name": dns_name("kvc", instance.name, "unload", node),
                    "namespace": options.namespace,
                    "labels": _labels(instance),
                },
                "spec": {"backoffLimit": 3, "template": {"metadata": {"labels": _labels(instance)}, "spec": spec}},
            }
        )
    return Rendered((*support_objects(instance, options), *jobs))
