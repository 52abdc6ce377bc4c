"""kvc.registry: references, credentials from auth files, podman's matching arguments; the client
against a real registry (Debian's docker-registry with TLS and basic auth, tests/support/registry.py:
an image podman pushed is read from its manifest and config alone, and each way of being refused
gets its own error); and the token (Bearer) flow, pagination, redirects and lying registries against
an in-process TLS server standing for a registry with a token service (docker-registry does basic
auth only). kvc's commands over the same registry: tests/framework/test_registry_flow.py."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import platform
import secrets
import socket
import ssl
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvc.errors import ExitCode, UsageError
from kvc.registry import (
    _GOARCH,
    Reference,
    RegistryClient,
    RegistryError,
    RegistryOptions,
    _challenge,
    credentials,
    transport_args,
)
from support.registry import LocalRegistry


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("127.0.0.1:5000/kvc/simple-kmod", ("127.0.0.1:5000", "kvc/simple-kmod", "", "")),
        ("reg.example/a/b:6.12.9__bpo-amd64", ("reg.example", "a/b", "6.12.9__bpo-amd64", "")),
        ("localhost/x@sha256:" + "a" * 64, ("localhost", "x", "", "sha256:" + "a" * 64)),
        ("reg.example:443/x:1@sha256:" + "b" * 64, ("reg.example:443", "x", "1", "sha256:" + "b" * 64)),
    ],
)
def test_references_parse(text: str, parts: tuple[str, str, str, str]) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == parts
    assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("simple-kmod:1", "does not start with a registry host"),
        ("library/x", "does not start with a registry host"),
        ("reg.example/Upper/x", "must be lowercase"),
        ("reg.example/x:+bad", "is not a valid tag"),
        ("reg.example/x@sha256:12", "not sha256"),
        ("reg.example/", "must be lowercase"),
    ],
)
def test_bad_references_get_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Reference.parse(text)


def test_credentials_prefer_the_most_specific_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def auth(user: str) -> dict[str, str]:
        return {"auth": base64.b64encode(f"{user}:pw-{user}".encode()).decode()}

    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"auths": {"reg.example": auth("host"), "reg.example/team": auth("team")}}))
    options = RegistryOptions(auth_file=str(path))
    assert credentials(options, Reference.parse("reg.example/team/x")) == ("team", "pw-team")
    assert credentials(options, Reference.parse("reg.example/other/x")) == ("host", "pw-host")
    assert credentials(options, Reference.parse("other.example/x")) is None
    fields = {"auths": {"https://reg.example": {"username": "u", "password": "p:w"}}}
    path.write_text(json.dumps(fields))
    assert credentials(options, Reference.parse("reg.example/x")) == ("u", "p:w")
    path.write_text(json.dumps({"auths": {"reg.example": auth("host"), "reg.example/team": auth("team")}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
    assert credentials(RegistryOptions(), Reference.parse("reg.example/x")) == ("host", "pw-host")
    path.write_text("{not json")
    with pytest.raises(RegistryError, match="cannot be read") as bad:
        credentials(options, Reference.parse("reg.example/x"))
    assert "pw-" not in str(bad.value.brief) + bad.value.hint


def test_podman_gets_paths_and_switches_never_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    (tmp_path / "certs" / "reg.example:5000").mkdir(parents=True)
    options = RegistryOptions(auth_file="/etc/kvc/auth.json", certs_dir=str(tmp_path / "certs"))
    assert transport_args(options, "reg.example:5000") == [
        "--authfile",
        "/etc/kvc/auth.json",
        "--cert-dir",
        str(tmp_path / "certs" / "reg.example:5000"),
    ]
    assert transport_args(RegistryOptions(tls_verify=False), "other:1") == ["--tls-verify=false"]


def test_challenges_are_parsed() -> None:
    scheme, params = _challenge('Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "reg", "scope": "repository:a/b:pull"}
    assert _challenge('Basic realm="x"') == ("basic", {"realm": "x"})


# ---- a real registry ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pushed:
    ref: Reference  # the tag in the registry
    image_id: str  # podman's, before the push
    digest: str  # what podman push --digestfile wrote


@pytest.fixture(scope="module")
def pushed(local_registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    """A one-label image on the Debian base, built and pushed with podman under a unique name, then
    removed from podman's storage (the session's registry goes away with its directory)."""
    work = tmp_path_factory.mktemp("pushed")
    (work / "Containerfile").write_text("FROM localhost/debian:bookworm\nLABEL kvc.test=yes\n")
    unique = f"kvcregistry{uuid.uuid4().hex[:8]}"
    local = f"localhost/{unique}:1"
    ref = Reference.parse(f"{local_registry.host}/kvc/{unique}:t1")
    options = RegistryOptions(auth_file=local_registry.auth_file, certs_dir=local_registry.certs_dir)
    try:
        subprocess.run(["podman", "build", "-q", "-t", local, str(work)], check=True, capture_output=True)
        image_id = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Id}}", local], check=True, capture_output=True, text=True
        ).stdout.strip()
        # transport_args is what kvc gives podman: the push proves podman reads them as meant.
        push = ["podman", "push", *transport_args(options, ref.registry), "--digestfile", str(work / "digest")]
        subprocess.run([*push, local, f"docker://{ref}"], check=True, capture_output=True)
        yield Pushed(ref, image_id, (work / "digest").read_text().strip())
    finally:
        subprocess.run(["podman", "rmi", "-f", local], capture_output=True)


def client_for(registry: LocalRegistry, **changes: Any) -> RegistryClient:
    settings = {"auth_file": registry.auth_file, "certs_dir": registry.certs_dir, **changes}
    return RegistryClient(RegistryOptions(**settings))


@pytest.mark.registry
@pytest.mark.podman
def test_an_image_podman_pushed_is_read_from_its_manifest_and_config_only(
    local_registry: LocalRegistry, pushed: Pushed, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvc.registry")
    before = local_registry.requests()
    client = client_for(local_registry)
    image = client.inspect(pushed.ref)
    assert image is not None and image.reference == pushed.ref
    assert image.labels["kvc.test"] == "yes"
    assert image.config_digest == f"sha256:{pushed.image_id}"
    assert image.digest == pushed.digest and image.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert image.layers and image.size > 0 and image.created
    assert client.exists(pushed.ref) == pushed.digest
    by_digest = client.inspect(pushed.ref.with_digest(pushed.digest))
    assert by_digest is not None and by_digest.config_digest == image.config_digest
    assert client.tags(pushed.ref.with_tag("")) == ["t1"]
    requests = local_registry.requests()[len(before) :]
    blobs = [path for method, path in requests if "/blobs/" in path]
    assert blobs and all(path.endswith(f"/blobs/{image.config_digest}") for path in blobs), requests
    assert not [path for path in blobs if any(layer in path for layer in image.layers)]
    logged = [record.getMessage() for record in caplog.records if record.name == "kvc.registry"]
    assert f"GET https://{pushed.ref.registry}/v2/{pushed.ref.repository}/manifests/t1" in logged
    secret = base64.b64encode(f"{local_registry.user}:{local_registry.password}".encode()).decode()
    assert not [line for line in logged if local_registry.password in line or secret in line]


@pytest.mark.registry
@pytest.mark.podman
def test_what_the_registry_does_not_have_is_none(local_registry: LocalRegistry, pushed: Pushed) -> None:
    client = client_for(local_registry)
    assert client.inspect(pushed.ref.with_tag("no-such-tag")) is None
    assert client.exists(pushed.ref.with_tag("no-such-tag")) is None
    assert client.inspect(pushed.ref.with_digest("sha256:" + "e" * 64).with_tag("")) is None
    nowhere = Reference.parse(f"{local_registry.host}/kvc/no-such-repository:1")
    assert client.inspect(nowhere) is None and client.tags(nowhere) == []


@pytest.mark.registry
@pytest.mark.podman
def test_refused_credentials_name_the_fix_and_never_the_password(
    local_registry: LocalRegistry, pushed: Pushed, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = secrets.token_urlsafe(12)
    auth = tmp_path / "auth.json"
    auth.write_text(
        json.dumps({"auths": {pushed.ref.registry: {"auth": base64.b64encode(f"kvc:{wrong}".encode()).decode()}}})
    )
    with pytest.raises(RegistryError) as refused:
        client_for(local_registry, auth_file=str(auth)).inspect(pushed.ref)
    error = refused.value
    assert error.exit_code == ExitCode.EXTERNAL
    assert error.brief == f"{pushed.ref}: the registry refused the credentials"
    assert f"podman login --authfile FILE {pushed.ref.registry}" in error.hint
    for secret in (wrong, base64.b64encode(f"kvc:{wrong}".encode()).decode(), local_registry.password):
        assert secret not in str(error) + error.brief + error.details + error.hint + caplog.text
    with pytest.raises(RegistryError, match="wants credentials and there are none") as anonymous:
        client_for(local_registry, auth_file=str(tmp_path / "missing.json")).inspect(pushed.ref)
    assert "podman login --authfile FILE" in anonymous.value.hint and "REGISTRY_AUTH_FILE" in anonymous.value.hint


@pytest.mark.registry
@pytest.mark.podman
def test_an_untrusted_certificate_names_certs_d_and_tls_verify_off_reads_anyway(
    local_registry: LocalRegistry, pushed: Pushed, tmp_path: Path
) -> None:
    with pytest.raises(RegistryError, match="TLS certificate is not trusted") as untrusted:
        client_for(local_registry, certs_dir=str(tmp_path)).inspect(pushed.ref)
    assert f"/etc/containers/certs.d/{pushed.ref.registry}/ca.crt" in untrusted.value.hint
    image = client_for(local_registry, certs_dir=str(tmp_path), tls_verify=False).inspect(pushed.ref)
    assert image is not None and image.digest == pushed.digest


def test_a_registry_that_is_not_there() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(RegistryError, match=f"the registry {closed} cannot be reached") as unreachable:
        RegistryClient(RegistryOptions(timeout=5)).inspect(Reference.parse(f"{closed}/kvc/x:1"))
    assert "\n" not in unreachable.value.brief


# ---- the token flow ---------------------------------------------------------------------------------------------

CONFIG = json.dumps(
    {"created": "2026-12-01T00:00:00Z", "config": {"Labels": {"kvc.kernel": "6.1.0-57-amd64"}}}
).encode()
CONFIG_DIGEST = "sha256:" + hashlib.sha256(CONFIG).hexdigest()
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": CONFIG_DIGEST, "size": len(CONFIG)},
        "layers": [{"digest": "sha256:" + "c" * 64, "size": 1234}],
    }
).encode()
GOARCH = _GOARCH.get(platform.machine(), platform.machine())
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
# This machine's image after another platform's, as multi-arch indexes list them.
INDEX = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"digest": "sha256:" + "d" * 64, "platform": {"os": "linux", "architecture": "mips64le"}},
            {"digest": MANIFEST_DIGEST, "platform": {"os": "linux", "architecture": GOARCH}},
        ],
    }
).encode()
TOKEN = "tok-123"
WRONG = "sha256:" + "1" * 64  # a digest the manifest that the fake registry serves under it does not have


class TokenRegistry(http.server.BaseHTTPRequestHandler):
    """A registry that hands out tokens: every /v2/ request needs ``Bearer TOKEN``, got from /token
    with robot:secret. /storage/ stands for blob storage on another host (no auth of its own)."""

    seen: list[tuple[str, str, str]] = []

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, self.headers.get("Authorization", "")))
        port = self.server.server_port  # type: ignore[attr-defined]
        if self.path.startswith("/token"):
            good = "Basic " + base64.b64encode(b"robot:secret").decode()
            if self.headers.get("Authorization") != good:
                self._send(401)
            else:
                self._send(200, json.dumps({"token": TOKEN}).encode())
        elif self.path == "/storage/config":
            self._send(200, CONFIG)
        elif self.headers.get("Authorization") != f"Bearer {TOKEN}":
            repository = self.path[len("/v2/") :].split("/manifests/")[0].split("/blobs/")[0].split("/tags/")[0]
            challenge = (
                f'Bearer realm="https://127.0.0.1:{port}/token",service="test",scope="repository:{repository}:pull"'
            )
            self._send(401, b"{}", {"WWW-Authenticate": challenge})
        elif self.path in ("/v2/kvc/x/manifests/1", "/v2/kvc/moved/manifests/1", f"/v2/kvc/x/manifests/{WRONG}"):
            self._send(200, MANIFEST, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        elif self.path in ("/v2/kvc/x/manifests/multi", f"/v2/kvc/x/manifests/{MANIFEST_DIGEST}"):
            # By digest with the digest the registry computes, as docker-registry sends it.
            body = INDEX if self.path.endswith("/multi") else MANIFEST
            self._send(200, body, {"Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()})
        elif self.path == "/v2/kvc/x/manifests/lying":
            self._send(200, MANIFEST, {"Docker-Content-Digest": "sha256:" + "0" * 64})
        elif self.path == "/v2/kvc/x/manifests/garbled":
            self.wfile.write(b"NOT-HTTP at all\r\n\r\n")
        elif self.path == f"/v2/kvc/x/blobs/{CONFIG_DIGEST}":
            self._send(200, CONFIG)
        elif self.path == f"/v2/kvc/moved/blobs/{CONFIG_DIGEST}":
            self._send(307, b"", {"Location": f"https://localhost:{port}/storage/config"})
        elif self.path == "/v2/kvc/x/tags/list":
            link = '</v2/kvc/x/tags/list?last=a&n=1>; rel="next"'
            self._send(200, json.dumps({"name": "kvc/x", "tags": ["a"]}).encode(), {"Link": link})
        elif self.path == "/v2/kvc/x/tags/list?last=a&n=1":
            self._send(200, json.dumps({"name": "kvc/x", "tags": ["b"]}).encode())
        else:
            self._send(404, json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN"}]}).encode())


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", "key.pem", "-out", "cert.pem"],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenRegistry)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    (tmp_path / "certs" / host).mkdir(parents=True)
    (tmp_path / "certs" / host / "ca.crt").write_bytes((tmp_path / "cert.pem").read_bytes())
    (tmp_path / "auth.json").write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(b"robot:secret").decode()}}})
    )
    TokenRegistry.seen = []
    yield host, tmp_path
    server.shutdown()


def robot(tmp_path: Path) -> RegistryClient:
    return RegistryClient(RegistryOptions(auth_file=str(tmp_path / "auth.json"), certs_dir=str(tmp_path / "certs")))


def test_a_token_is_fetched_with_the_credentials_and_used(token_registry: tuple[str, Path]) -> None:
    host, tmp_path = token_registry
    client = robot(tmp_path)
    image = client.inspect(Reference.parse(f"{host}/kvc/x:1"))
    assert image is not None
    assert image.config_digest == CONFIG_DIGEST and image.labels == {"kvc.kernel": "6.1.0-57-amd64"}
    assert image.digest == "sha256:" + hashlib.sha256(MANIFEST).hexdigest() and image.size == 1234
    assert not [path for _m, path, _a in TokenRegistry.seen if "c" * 64 in path]
    tokens = [path for _m, path, _a in TokenRegistry.seen if path.startswith("/token")]
    assert len(tokens) == 1 and "scope=repository%3Akvc%2Fx%3Apull" in tokens[0]
    assert client.inspect(Reference.parse(f"{host}/kvc/x:2")) is None
    assert len([p for _m, p, _a in TokenRegistry.seen if p.startswith("/token")]) == 1  # the token is reused


def test_a_refused_token_request_names_the_fix_and_not_the_secret(token_registry: tuple[str, Path]) -> None:
    host, tmp_path = token_registry
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(b"robot:wrong-secret").decode()}}}))
    client = RegistryClient(RegistryOptions(auth_file=str(auth), certs_dir=str(tmp_path / "certs")))
    with pytest.raises(RegistryError, match="refused the credentials") as refused:
        client.inspect(Reference.parse(f"{host}/kvc/x:1"))
    assert "wrong-secret" not in refused.value.brief + refused.value.hint + refused.value.details
    assert "podman login" in refused.value.hint
    anonymous = RegistryClient(
        RegistryOptions(auth_file=str(tmp_path / "none.json"), certs_dir=str(tmp_path / "certs"))
    )
    with pytest.raises(RegistryError, match="wants credentials"):
        anonymous.inspect(Reference.parse(f"{host}/kvc/x:1"))


def test_tags_follow_the_link_header_and_blob_redirects_lose_the_authorization(
    token_registry: tuple[str, Path],
) -> None:
    host, tmp_path = token_registry
    client = robot(tmp_path)
    assert client.tags(Reference.parse(f"{host}/kvc/x")) == ["a", "b"]
    image = client.inspect(Reference.parse(f"{host}/kvc/moved:1"))
    assert image is not None and image.labels == {"kvc.kernel": "6.1.0-57-amd64"}
    (redirected,) = [auth for _m, path, auth in TokenRegistry.seen if path == "/storage/config"]
    assert redirected == ""  # another host: the registry's token stays with the registry


def test_a_manifest_that_is_not_what_the_registry_says_or_garbage_is_an_error(
    token_registry: tuple[str, Path],
) -> None:
    host, tmp_path = token_registry
    client = robot(tmp_path)
    with pytest.raises(RegistryError, match="its bytes hash to sha256:"):
        client.inspect(Reference.parse(f"{host}/kvc/x:lying"))
    with pytest.raises(RegistryError, match="the registry served a manifest whose digest is"):
        client.inspect(Reference.parse(f"{host}/kvc/x@{WRONG}"))
    with pytest.raises(RegistryError, match=r"the registry .* cannot be reached") as garbled:
        client.inspect(Reference.parse(f"{host}/kvc/x:garbled"))
    assert "\n" not in garbled.value.brief and "\r" not in garbled.value.brief


def test_an_index_gives_this_machines_image(token_registry: tuple[str, Path]) -> None:
    host, tmp_path = token_registry
    image = robot(tmp_path).inspect(Reference.parse(f"{host}/kvc/x:multi"))
    assert image is not None and image.digest == MANIFEST_DIGEST and image.reference.digest == MANIFEST_DIGEST
    assert image.labels == {"kvc.kernel": "6.1.0-57-amd64"}
