"""kvc.registry: references, credentials from auth files, podman's matching arguments, and the
token (Bearer) flow against an in-process TLS server standing for a registry with a token service
(Debian's docker-registry does basic auth only: tests/framework/test_registry_flow.py)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvc.errors import UsageError
from kvc.registry import (
    Reference,
    RegistryClient,
    RegistryError,
    RegistryOptions,
    _challenge,
    credentials,
    transport_args,
)


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
TOKEN = "tok-123"


class TokenRegistry(http.server.BaseHTTPRequestHandler):
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
        if self.path.startswith("/token"):
            good = "Basic " + base64.b64encode(b"robot:secret").decode()
            if self.headers.get("Authorization") != good:
                self._send(401)
            else:
                self._send(200, json.dumps({"token": TOKEN}).encode())
            return
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            realm = f"https://127.0.0.1:{self.server.server_port}/token"  # type: ignore[attr-defined]
            challenge = f'Bearer realm="{realm}",service="test",scope="repository:kvc/x:pull"'
            self._send(401, b"{}", {"WWW-Authenticate": challenge})
        elif self.path == "/v2/kvc/x/manifests/1":
            self._send(200, MANIFEST, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        elif self.path == f"/v2/kvc/x/blobs/{CONFIG_DIGEST}":
            self._send(200, CONFIG)
        else:
            self._send(404, json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN"}]}).encode())


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", "key.pem", "-out", "cert.pem"],
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
    TokenRegistry.seen = []
    yield host, tmp_path
    server.shutdown()


def test_a_token_is_fetched_with_the_credentials_and_used(token_registry: tuple[str, Path]) -> None:
    host, tmp_path = token_registry
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(b"robot:secret").decode()}}}))
    client = RegistryClient(RegistryOptions(auth_file=str(auth), certs_dir=str(tmp_path / "certs")))
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
