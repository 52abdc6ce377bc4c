"""A real Kubernetes control plane for the ``k8s`` tier: Debian's etcd, and kube-apiserver,
kube-controller-manager and kube-scheduler 1.20.2 built from Debian's ``kubernetes`` source package,
all four in the directory scripts/build-k8s-control-plane.sh fills. There is no kubelet: nodes are
Node objects the tests make (:meth:`ControlPlane.add_node`), so pods are validated, admitted,
scheduled and bound, never run.

:class:`ControlPlane` makes everything in a private temporary directory: a test CA and the
apiserver's serving certificate (IP SAN 127.0.0.1), the service-account key pair (openssl), a token
file with one ``system:masters`` user and a kubeconfig for the controllers; starts etcd and the three
servers on free ports of 127.0.0.1 (RBAC, ``--allow-privileged``; the daemonset, job, namespace and
service-account controllers) and waits for ``/readyz``. It talks to the API over HTTPS with urllib:
:meth:`ControlPlane.apply` is a server-side apply (discovery finds each kind's resource).
Leaving the ``with`` block stops every process and removes the directory.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Optional, TypeVar

K8S_VERSION = "1.20.2"
ROOT = Path(__file__).resolve().parent.parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build-k8s-control-plane.sh"
DEFAULT_BIN_DIR = Path("/var/cache/kvc-k8s") / K8S_VERSION
FIELD_MANAGER = "kvc-tests"
KERNEL_LABEL = "feature.node.kubernetes.io/kernel-version.full"

Obj = dict[str, Any]
T = TypeVar("T")


class APIError(Exception):
    """A request the apiserver refused: the HTTP status and its Status object's reason and message."""

    def __init__(self, method: str, path: str, code: int, body: bytes) -> None:
        try:
            status = json.loads(body)
        except ValueError:
            status = {}
        if not isinstance(status, dict):
            status = {}
        self.code = code
        self.reason = str(status.get("reason", ""))
        self.message = str(status.get("message", body.decode(errors="replace")))
        super().__init__(f"{method} {path}: {code} {self.reason}: {self.message}")


def control_plane_binaries() -> Path:
    """The directory with etcd and the three servers: $KVC_K8S_BIN_DIR, or the build script's default
    output, built by the script when missing (it returns at once when they are there)."""
    given = os.environ.get("KVC_K8S_BIN_DIR")
    bin_dir = Path(given) if given else DEFAULT_BIN_DIR
    done = subprocess.run(["bash", str(BUILD_SCRIPT), str(bin_dir)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT.name} failed: {(done.stderr or done.stdout).strip()}")
    return bin_dir


def wait_until(probe: Callable[[], Optional[T]], what: str, timeout: float = 60.0, interval: float = 0.25) -> T:
    """``probe()``'s first value that is not None (or falsy), polled until ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _openssl(directory: Path, *argv: str) -> None:
    subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=directory)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on 127.0.0.1, for one ``with`` block."""

    def __init__(self, bin_dir: Path) -> None:
        for program in ("openssl", *(str(bin_dir / name) for name in ("etcd", *self._servers()))):
            if not shutil.which(program):
                raise RuntimeError(f"{program} is missing: run scripts/build-k8s-control-plane.sh")
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="kvc-k8s-"))
        self.token = os.urandom(16).hex()
        self.port = _free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.ca_file = self.dir / "ca.crt"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._tls: Optional[ssl.SSLContext] = None
        self._resources: dict[tuple[str, str], tuple[str, bool]] = {}

    @staticmethod
    def _servers() -> tuple[str, ...]:
        return ("kube-apiserver", "kube-controller-manager", "kube-scheduler")

    # -- lifecycle
    def __enter__(self) -> ControlPlane:
        try:
            self._files()
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()

    def close(self) -> None:
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _files(self) -> None:
        d = self.dir
        _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kvc k8s test CA",
                 "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
        _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver", "-keyout", "server.key",
                 "-out", "server.csr")  # fmt: skip
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
        _openssl(d, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip
        _openssl(d, "genrsa", "-out", "sa.key", "2048")
        _openssl(d, "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        (d / "tokens.csv").write_text(f'{self.token},kvc-test-admin,1,"system:masters"\n')
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "kvc", "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)}}
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "kvc", "context": {"cluster": "kvc", "user": "admin"}}],
            "current-context": "kvc",
        }
        (d / "kubeconfig").write_text(json.dumps(kubeconfig))
        for path in (d / "ca.key", d / "sa.key", d / "server.key", d / "tokens.csv", d / "kubeconfig"):
            path.chmod(0o600)

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.dir / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _check_running(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}:\n{self.log_tail(name)}")

    def _start(self) -> None:
        d, b = self.dir, self.bin_dir
        etcd_port, peer_port = _free_port(), _free_port()
        etcd = f"http://127.0.0.1:{etcd_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self._spawn("etcd", [str(b / "etcd"), "--name", "kvc", "--data-dir", str(d / "etcd"),
                             "--listen-client-urls", etcd, "--advertise-client-urls", etcd,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"kvc={peer}"])  # fmt: skip
        self._spawn("kube-apiserver", [
            str(b / "kube-apiserver"), f"--etcd-servers={etcd}", "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1", f"--secure-port={self.port}", f"--cert-dir={d / 'certs'}",
            f"--tls-cert-file={d / 'server.crt'}", f"--tls-private-key-file={d / 'server.key'}",
            f"--token-auth-file={d / 'tokens.csv'}", "--authorization-mode=RBAC", "--allow-privileged=true",
            "--service-account-issuer=https://kvc.test", f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}", "--service-cluster-ip-range=10.96.0.0/16",
        ])  # fmt: skip
        wait_until(self._ready, "kube-apiserver's /readyz", timeout=180)
        kubeconfig = f"--kubeconfig={d / 'kubeconfig'}"
        self._spawn("kube-controller-manager", [
            str(b / "kube-controller-manager"), kubeconfig, "--secure-port=0", "--port=0", "--leader-elect=false",
            "--controllers=daemonset,job,namespace,serviceaccount,serviceaccount-token",
            f"--service-account-private-key-file={d / 'sa.key'}", f"--root-ca-file={self.ca_file}",
        ])  # fmt: skip
        self._spawn("kube-scheduler", [
            str(b / "kube-scheduler"), kubeconfig, "--secure-port=0", "--port=0", "--leader-elect=false",
        ])  # fmt: skip
        # The controllers are up once the token controller has given kube-system's default account its token.
        wait_until(self._controllers_working, "the service-account token controller", timeout=120)

    def _ready(self) -> bool:
        self._check_running()
        try:
            self.request("GET", "/readyz")
        except (APIError, OSError):
            return False
        return True

    def _controllers_working(self) -> bool:
        self._check_running()
        account = self.request("GET", "/api/v1/namespaces/kube-system/serviceaccounts/default", missing_ok=True)
        return bool(account and account.get("secrets"))

    # -- HTTP
    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=str(self.ca_file))
        return self._tls

    def request(
        self,
        method: str,
        path: str,
        body: Optional[Obj] = None,
        *,
        content_type: str = "application/json",
        query: Optional[dict[str, str]] = None,
        missing_ok: bool = False,
    ) -> Optional[Obj]:
        """The decoded answer to one request (None for a 404 when ``missing_ok``); APIError otherwise."""
        url = self.server + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self._context(), timeout=30) as answer:
                text = answer.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            raise APIError(method, path, exc.code, exc.read()) from None
        if not text.strip().startswith(b"{"):
            return {"text": text.decode(errors="replace")}
        decoded = json.loads(text)
        assert isinstance(decoded, dict)
        return decoded

    def _resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """The collection path prefix of a kind (``/apis/apps/v1``, ``daemonsets``) and whether it is namespaced."""
        key = (api_version, kind)
        if key not in self._resources:
            base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            listing = self.request("GET", base, missing_ok=True) or {}
            for resource in listing.get("resources", []):
                if "/" not in resource["name"]:
                    self._resources[(api_version, resource["kind"])] = (
                        f"{base}/{resource['name']}",
                        bool(resource["namespaced"]),
                    )
            if key not in self._resources:
                raise APIError(
                    "GET", base, 404, json.dumps({"message": f"no resource for {kind} in {api_version}"}).encode()
                )
        return self._resources[key]

    def path(self, api_version: str, kind: str, name: str = "", namespace: Optional[str] = None) -> str:
        collection, namespaced = self._resource(api_version, kind)
        if namespaced:
            base, plural = collection.rsplit("/", 1)
            collection = f"{base}/namespaces/{namespace or 'default'}/{plural}"
        return f"{collection}/{name}" if name else collection

    # -- objects
    def apply(self, obj: Obj, *, dry_run: bool = False) -> Obj:
        """Server-side apply of ``obj`` (created or updated; the apiserver's answer)."""
        meta = obj["metadata"]
        path = self.path(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        query = {"fieldManager": FIELD_MANAGER, "force": "true", **({"dryRun": "All"} if dry_run else {})}
        answer = self.request("PATCH", path, obj, content_type="application/apply-patch+yaml", query=query)
        assert answer is not None
        return answer

    def create(self, obj: Obj, *, dry_run: bool = False) -> Obj:
        """POST ``obj`` (the plain create every client can do)."""
        meta = obj["metadata"]
        path = self.path(obj["apiVersion"], obj["kind"], namespace=meta.get("namespace"))
        answer = self.request("POST", path, obj, query={"dryRun": "All"} if dry_run else None)
        assert answer is not None
        return answer

    def get(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None) -> Optional[Obj]:
        return self.request("GET", self.path(api_version, kind, name, namespace), missing_ok=True)

    def list(self, api_version: str, kind: str, namespace: Optional[str] = None, label_selector: str = "") -> list[Obj]:
        query = {"labelSelector": label_selector} if label_selector else None
        answer = self.request("GET", self.path(api_version, kind, namespace=namespace), query=query)
        assert answer is not None
        return list(answer.get("items", []))

    def delete(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None) -> None:
        self.request("DELETE", self.path(api_version, kind, name, namespace), missing_ok=True)

    def apply_crd(self, crd: Obj) -> Obj:
        """Apply a CustomResourceDefinition and wait until it is established (its kind is served)."""
        self.apply(crd)
        name = crd["metadata"]["name"]

        def established() -> Optional[Obj]:
            current = self.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name) or {}
            conditions = (current.get("status") or {}).get("conditions") or []
            return current if any(c["type"] == "Established" and c["status"] == "True" for c in conditions) else None

        current = wait_until(established, f"CustomResourceDefinition {name} to be established")
        self._resources.clear()  # discovery now lists the new kind
        return current

    def service_account_dir(self, namespace: str, name: str, directory: Path) -> Path:
        """``directory`` holding ``token`` and ``ca.crt`` of the ServiceAccount, as a pod sees them in
        /var/run/secrets/kubernetes.io/serviceaccount (once the token controller has made them)."""

        def token_secret() -> str:
            account = self.get("v1", "ServiceAccount", name, namespace) or {}
            return str(next((ref["name"] for ref in account.get("secrets") or []), ""))

        secret = self.get("v1", "Secret", wait_until(token_secret, f"a token for {namespace}/{name}"), namespace)
        assert secret is not None
        directory.mkdir(parents=True, exist_ok=True)
        for key in ("token", "ca.crt"):
            (directory / key).write_bytes(base64.b64decode(secret["data"][key]))
        return directory

    def in_cluster_environment(self, account_dir: Path, node: str) -> dict[str, str]:
        """The environment a container of a pod on ``node`` has for reaching the API (the service
        host and port, its service account's files, NODE_NAME from the downward API)."""
        return {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.port),
            "KVC_K8S_SERVICE_ACCOUNT_DIR": str(account_dir),
            "NODE_NAME": node,
        }

    # -- nodes
    def add_node(self, name: str, labels: dict[str, str], kernel_version: str) -> Obj:
        """A schedulable fake node: created with ``labels``, Ready with room for pods, reporting
        ``kernel_version``, without the not-ready taint the apiserver gives new nodes."""
        node_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        self.create(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {**node_labels, **labels}}}
        )
        path = f"/api/v1/nodes/{name}"
        self.request("PATCH", path, {"spec": {"taints": None}}, content_type="application/merge-patch+json")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        resources = {"cpu": "2", "memory": "4Gi", "pods": "110", "ephemeral-storage": "20Gi"}
        status = {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "fake node of kvc's tests",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
            ],
            "nodeInfo": {
                "kernelVersion": kernel_version,
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "podman://4.3.1",
                "kubeletVersion": f"v{K8S_VERSION}",
                "kubeProxyVersion": f"v{K8S_VERSION}",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        node = self.request("PATCH", f"{path}/status", {"status": status}, content_type="application/merge-patch+json")
        assert node is not None
        return node
