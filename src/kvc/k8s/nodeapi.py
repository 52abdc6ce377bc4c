"""The one call kvc makes to the Kubernetes API: set or remove labels on the node a pod runs on,
with the pod's service account (in-cluster configuration: ``KUBERNETES_SERVICE_HOST`` and
``_PORT``, the token and CA in the service account directory). A merge patch of the node's
labels, over HTTPS with the cluster's CA."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Mapping, Optional

from kvc.errors import KvcError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TIMEOUT = 20.0


class NodeAPIError(KvcError):
    pass


@dataclass(frozen=True)
class InClusterAPI:
    base_url: str
    token_file: str  # read at each call: the kubelet rotates projected tokens
    ca_file: str

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Optional[InClusterAPI]:
        """The API server as a pod sees it; None outside a cluster (no service host, or no token)."""
        host = environ.get("KUBERNETES_SERVICE_HOST", "")
        port = environ.get("KUBERNETES_SERVICE_PORT", "443")
        directory = environ.get("KVC_K8S_SERVICE_ACCOUNT_DIR", SERVICE_ACCOUNT_DIR)
        token = os.path.join(directory, "token")
        if not host or not os.path.isfile(token):
            return None
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", token, os.path.join(directory, "ca.crt"))

    def label_node(self, node: str, labels: Mapping[str, Optional[str]]) -> None:
        """Set each label (None removes it) on ``node``."""
        body = json.dumps({"metadata": {"labels": dict(labels)}}).encode()
        url = f"{self.base_url}/api/v1/nodes/{urllib.parse.quote(node, safe='')}"
        try:
            with open(self.token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
            request = urllib.request.Request(
                url,
                data=body,
                method="PATCH",
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
            )
            context = ssl.create_default_context(cafile=self.ca_file)
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:500]
            raise NodeAPIError(
                f"the Kubernetes API refused to label node {node}: HTTP {exc.code}",
                details=detail,
                hint="check the ServiceAccount's ClusterRole (nodes: get, patch) from 'kvc k8s daemonset'",
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise NodeAPIError(
                f"cannot reach the Kubernetes API at {self.base_url} to label node {node}: {exc}",
                hint="check the pod's network and service account",
            ) from None
