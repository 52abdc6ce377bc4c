"""KMM's ``Module`` (kmm.sigs.x-k8s.io/v1beta1) as a JSON schema, written for kvc's tests from
KMM's Go types (kubernetes-sigs/kernel-module-management ``api/v1beta1/module_types.go``): a field
without ``+optional`` and without ``omitempty`` is required, ``+kubebuilder:validation:MinItems``
becomes ``minItems``, and every struct of KMM's own refuses fields it does not have. The core/v1
types a Module embeds (LocalObjectReference, Toleration, EnvVar, ResourceRequirements, VolumeMount,
Volume) are checked for their kind only.

:func:`validate_module` judges an object; :func:`crd` turns the schema into the
CustomResourceDefinition a control plane takes (a structural schema: unknown fields are pruned
there, not refused, and ``dirName`` gets KMM's default ``/opt``)."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema

GROUP = "kmm.sigs.x-k8s.io"
VERSION = "v1beta1"

STRING: dict[str, Any] = {"type": "string"}
BOOLEAN: dict[str, Any] = {"type": "boolean"}
STRINGS: dict[str, Any] = {"type": "array", "items": STRING}
STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": STRING}
OBJECT: dict[str, Any] = {"type": "object"}  # a core/v1 type: its kind only
OBJECTS: dict[str, Any] = {"type": "array", "items": OBJECT}
PULL_POLICY: dict[str, Any] = {"type": "string", "enum": ["Always", "Never", "IfNotPresent"]}


def struct(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """One of KMM's Go structs: these fields only."""
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


LOCAL_OBJECT_REFERENCE = struct({"name": STRING})
TLS_OPTIONS = struct({"insecure": BOOLEAN, "insecureSkipTLSVerify": BOOLEAN})
BUILD = struct(
    {
        "buildArgs": {"type": "array", "items": struct({"name": STRING, "value": STRING}, ("name", "value"))},
        "dockerfileConfigMap": LOCAL_OBJECT_REFERENCE,
        "baseImageRegistryTLS": TLS_OPTIONS,
        "secrets": {"type": "array", "items": LOCAL_OBJECT_REFERENCE},
        "kanikoParams": struct({"tag": STRING}),
        "selector": STRING_MAP,
    },
    ("dockerfileConfigMap",),
)
SIGN = struct(
    {
        "unsignedImage": STRING,
        "unsignedImageRegistryTLS": TLS_OPTIONS,
        "keySecret": LOCAL_OBJECT_REFERENCE,
        "certSecret": LOCAL_OBJECT_REFERENCE,
        "filesToSign": STRINGS,
    },
    ("keySecret", "certSecret"),
)
KERNEL_MAPPING = struct(
    {
        "build": BUILD,
        "sign": SIGN,
        "containerImage": STRING,
        "literal": STRING,
        "registryTLS": TLS_OPTIONS,
        "regexp": STRING,
        "inTreeModuleToRemove": STRING,
        "inTreeModulesToRemove": STRINGS,
    },
    ("containerImage",),
)
MODPROBE_ARGS = struct(
    {"load": {**STRINGS, "minItems": 1}, "unload": {**STRINGS, "minItems": 1}},
)
MODPROBE = struct(
    {
        "moduleName": STRING,
        "parameters": STRINGS,
        "dirName": STRING,
        "args": MODPROBE_ARGS,
        "rawArgs": MODPROBE_ARGS,
        "firmwarePath": STRING,
        "modulesLoadingOrder": STRINGS,
    }
)
MODULE_LOADER_CONTAINER = struct(
    {
        "build": BUILD,
        "sign": SIGN,
        "version": STRING,
        "containerImage": STRING,
        "imagePullPolicy": PULL_POLICY,
        "kernelMappings": {"type": "array", "items": KERNEL_MAPPING, "minItems": 1},
        "modprobe": MODPROBE,
        "registryTLS": TLS_OPTIONS,
        "inTreeModuleToRemove": STRING,
        "inTreeModulesToRemove": STRINGS,
    },
    ("kernelMappings", "modprobe"),
)
COMMON_CONTAINER = struct(
    {
        "command": STRINGS,
        "args": STRINGS,
        "env": OBJECTS,
        "image": STRING,
        "imagePullPolicy": PULL_POLICY,
        "resources": OBJECT,
        "volumeMounts": OBJECTS,
    },
    ("image",),
)
DEVICE_PLUGIN = struct(
    {
        "container": COMMON_CONTAINER,
        "initContainer": COMMON_CONTAINER,
        "serviceAccountName": STRING,
        "volumes": OBJECTS,
        "automountServiceAccountToken": BOOLEAN,
    },
    ("container",),
)
DRA = struct(
    {
        "container": COMMON_CONTAINER,
        "initContainer": COMMON_CONTAINER,
        "serviceAccountName": STRING,
        "volumes": OBJECTS,
        "automountServiceAccountToken": BOOLEAN,
        "driverName": STRING,
        "deviceClasses": {
            "type": "array",
            "items": struct(
                {
                    "name": {**STRING, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
                    "selectors": {**OBJECTS, "maxItems": 32},
                    "config": {**OBJECTS, "maxItems": 32},
                },
                ("name",),
            ),
        },
    },
    ("container", "driverName"),
)
MODULE_SPEC = struct(
    {
        "devicePlugin": DEVICE_PLUGIN,
        "dra": DRA,
        "moduleLoader": struct(
            {"container": MODULE_LOADER_CONTAINER, "serviceAccountName": STRING},
            ("container",),
        ),
        "imageRepoSecret": LOCAL_OBJECT_REFERENCE,
        "selector": STRING_MAP,
        "tolerations": OBJECTS,
        "imageRebuildTriggerGeneration": {"type": "integer"},
    },
    ("selector",),
)
MODULE: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "apiVersion": {"const": f"{GROUP}/{VERSION}"},
        "kind": {"const": "Module"},
        "metadata": {
            "type": "object",
            "properties": {"name": STRING, "namespace": STRING, "labels": STRING_MAP, "annotations": STRING_MAP},
            "required": ["name"],
        },
        "spec": MODULE_SPEC,
        "status": OBJECT,
    },
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
}


def validate_module(obj: Any) -> list[str]:
    """Every way ``obj`` is not a Module KMM's API accepts, each with its path ([] when it is)."""
    validator = jsonschema.Draft202012Validator(MODULE)
    return sorted(
        f"{'.'.join(str(part) for part in error.absolute_path) or '(top)'}: {error.message}"
        for error in validator.iter_errors(obj)
    )


def _structural(schema: Any) -> Any:
    """The schema as a CRD's openAPIV3Schema takes it: no ``$schema``/``const``, and no
    ``additionalProperties: false`` (the API server prunes unknown fields instead)."""
    if isinstance(schema, dict):
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key == "$schema" or (key == "additionalProperties" and value is False):
                continue
            if key == "const":
                out["type"] = "string"
                out["enum"] = [value]
                continue
            out[key] = _structural(value)
        if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
            out["x-kubernetes-preserve-unknown-fields"] = True  # a core/v1 type: kept as given
        return out
    if isinstance(schema, list):
        return [_structural(item) for item in schema]
    return schema


def crd() -> dict[str, Any]:
    """The Module's CustomResourceDefinition (apiextensions.k8s.io/v1) from this schema."""
    schema = _structural(copy.deepcopy(MODULE))
    schema["properties"]["metadata"] = {"type": "object"}  # the API server's own
    for key in ("apiVersion", "kind"):
        schema["properties"][key] = {"type": "string"}
    modprobe = schema["properties"]["spec"]["properties"]["moduleLoader"]["properties"]["container"]["properties"][
        "modprobe"
    ]
    modprobe["properties"]["dirName"]["default"] = "/opt"
    schema["properties"]["status"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"modules.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": "Module", "listKind": "ModuleList", "plural": "modules", "singular": "module"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }
