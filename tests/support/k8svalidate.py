"""Kubernetes' own OpenAPI schemas for the built-in objects kvc writes (DaemonSet, Job, ConfigMap,
ServiceAccount, RBAC, Pod), from PyPI's ``kubernetes-validate``, strict: an unknown field fails as
a misspelled one would on a server that refuses them."""

from __future__ import annotations

from typing import Any, Sequence

import kubernetes_validate

# The two newest releases kubernetes-validate 1.37 ships schemas for.
DEFAULT_VERSIONS = ("1.36.0", "1.37.0")


def validate_builtin(obj: Any, versions: Sequence[str] = DEFAULT_VERSIONS) -> list[str]:
    """What is wrong with ``obj`` under each version's schema ([] when nothing), one line each."""
    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:  # a jsonschema error, with its path
            where = ".".join(str(part) for part in error.absolute_path) or "(top)"
            problems.append(f"{version} {obj.get('kind')}: {where}: {error.message}")
    return problems
