"""An OCI registry's metadata, read without pulling layers: manifests, configs and tags over the
distribution API (the adapter for registries; podman moves the layers).

Credentials come only from an auth file in the containers-auth.json(5) format (``auths`` keyed by
``host[:port]`` or ``host[:port]/path``, each with ``auth`` = base64 of ``user:password``): the one
:class:`RegistryOptions` names, else ``$REGISTRY_AUTH_FILE``, ``${XDG_RUNTIME_DIR}/containers/auth.json``,
``/run/containers/UID/auth.json``, ``~/.config/containers/auth.json``, ``~/.docker/config.json``. A
registry that answers 401 with ``Basic`` gets them directly; one that answers ``Bearer`` gets a token
from its realm (with them, or anonymously). Credentials and tokens never appear in a log line or an
error. Requests are logged (``kvc -v``) as ``GET URL``.

TLS is always verified unless turned off: the system's CAs plus the registry's own from a certs.d
directory (``/etc/containers/certs.d/HOST:PORT/*.crt``, then ``/etc/docker/certs.d``), where a
client certificate (``*.cert`` with its ``*.key``) is also taken, as podman does.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import http.client
import json
import logging
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from kvc.errors import ExitCode, KvcError, UsageError

log = logging.getLogger("kvc.registry")

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
DEFAULT_CERTS_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")
_MAX_DOCUMENT = 4 << 20
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
)
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


class RegistryError(KvcError):
    """A registry refused or could not be reached."""

    exit_code = ExitCode.EXTERNAL


# ---- references ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """An image reference with an explicit registry: ``REGISTRY/PATH[:TAG][@DIGEST]``."""

    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    @classmethod
    def parse(cls, text: str) -> Reference:
        def bad(why: str, hint: str = "write REGISTRY[:PORT]/PATH[:TAG][@sha256:DIGEST]") -> UsageError:
            return UsageError(f"image reference {text!r}: {why}", hint=hint)

        rest, _sep, digest = text.partition("@")
        if digest and not _DIGEST.fullmatch(digest):
            raise bad("the digest is not sha256:<64 hex digits>")
        registry, slash, path = rest.partition("/")
        if not slash or not (
            ("." in registry or ":" in registry or registry == "localhost") and _HOST.fullmatch(registry)
        ):
            raise bad(
                "it does not start with a registry host",
                hint="name the registry explicitly (e.g. registry.example:5000/team/module); kvc assumes no default",
            )
        tag = ""
        if ":" in path:
            path, tag = path.rsplit(":", 1)
            if not _TAG.fullmatch(tag):
                raise bad(f"tag {tag!r} is not a valid tag (letters, digits, _ . -, at most 128, no leading . or -)")
        if not path or not all(_PATH_COMPONENT.fullmatch(part) for part in path.split("/")):
            raise bad("the repository path must be lowercase letters, digits and single separators . _ -")
        return cls(registry, path, tag, digest)

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, "")

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_ref(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


# ---- settings: credentials and trust ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryOptions:
    auth_file: str = ""  # "" = $REGISTRY_AUTH_FILE, then containers' lookup
    certs_dir: str = ""  # a certs.d root; "" = /etc/containers/certs.d, then /etc/docker/certs.d
    tls_verify: bool = True
    timeout: float = 30.0


def auth_file_candidates(options: RegistryOptions, environ: Optional[Mapping[str, str]] = None) -> list[str]:
    env = os.environ if environ is None else environ
    if options.auth_file:
        return [options.auth_file]
    if env.get("REGISTRY_AUTH_FILE"):
        return [env["REGISTRY_AUTH_FILE"]]
    home = env.get("HOME", os.path.expanduser("~"))
    found = []
    if env.get("XDG_RUNTIME_DIR"):
        found.append(os.path.join(env["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    found += [
        f"/run/containers/{os.getuid()}/auth.json",
        os.path.join(home, ".config", "containers", "auth.json"),
        os.path.join(home, ".docker", "config.json"),
    ]
    return found


def _explicit_auth_file(options: RegistryOptions) -> str:
    return options.auth_file or os.environ.get("REGISTRY_AUTH_FILE", "")


def credentials(options: RegistryOptions, ref: Reference) -> Optional[tuple[str, str]]:
    """(user, password) for ``ref`` from the first auth file that has an entry for it: the most
    specific key first (``host/path/...``, then ``host``)."""
    keys = []
    parts = ref.repository.split("/")
    for count in range(len(parts), 0, -1):
        keys.append(f"{ref.registry}/{'/'.join(parts[:count])}")
    keys += [ref.registry, f"https://{ref.registry}", f"http://{ref.registry}"]
    for path in auth_file_candidates(options):
        try:
            with open(path, encoding="utf-8") as handle:
                auths = json.load(handle).get("auths", {})
        except FileNotFoundError:
            continue
        except (OSError, ValueError, AttributeError) as exc:
            raise RegistryError(
                f"the auth file {path} cannot be read: {type(exc).__name__}",
                hint="fix it or log in again ('podman login --authfile FILE REGISTRY')",
            ) from None
        for key in keys:
            entry = auths.get(key) if isinstance(auths, dict) else None
            if not isinstance(entry, dict):
                continue
            if entry.get("auth"):
                try:
                    user, sep, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    sep = ""
                if not sep:
                    raise RegistryError(
                        f"the auth file {path} has a malformed entry for {key}",
                        hint="log in again ('podman login --authfile FILE REGISTRY')",
                    )
                return user, password
            if entry.get("username"):
                return str(entry["username"]), str(entry.get("password", ""))
    return None


def host_certs_dir(options: RegistryOptions, registry: str) -> str:
    """The certs.d directory of ``registry`` ("" when there is none)."""
    roots = (options.certs_dir,) if options.certs_dir else DEFAULT_CERTS_DIRS
    for root in roots:
        candidate = os.path.join(root, registry)
        if os.path.isdir(candidate):
            return candidate
    return ""


def transport_args(options: RegistryOptions, registry: str) -> list[str]:
    """podman push/pull/login arguments for the same credentials and trust as this client's: paths
    and switches only, never a credential."""
    args = []
    auth_file = _explicit_auth_file(options)
    if auth_file:
        args += ["--authfile", auth_file]
    certs = host_certs_dir(options, registry) if options.certs_dir else ""
    if certs:
        args += ["--cert-dir", certs]
    if not options.tls_verify:
        args.append("--tls-verify=false")
    return args


def ssl_context(options: RegistryOptions, registry: str) -> ssl.SSLContext:
    if not options.tls_verify:
        return ssl._create_unverified_context()  # KVC_REGISTRY_TLS_VERIFY=no: the user turned it off
    context = ssl.create_default_context()
    directory = host_certs_dir(options, registry)
    if directory:
        for ca in sorted(glob.glob(os.path.join(glob.escape(directory), "*.crt"))):
            context.load_verify_locations(cafile=ca)
        for cert in sorted(glob.glob(os.path.join(glob.escape(directory), "*.cert"))):
            key = cert[: -len(".cert")] + ".key"
            if os.path.isfile(key):
                context.load_cert_chain(cert, key)
    return context


# ---- the client -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteImage:
    """One image in a registry, as its manifest and config describe it."""

    reference: Reference
    digest: str  # the manifest's digest
    media_type: str
    config_digest: str  # "sha256:..." — the image id podman gives it
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    created: str = ""
    layers: tuple[str, ...] = ()
    size: int = 0  # of the compressed layers
    architecture: str = ""  # the config's (amd64, arm64)


class _NoRedirectAuth(urllib.request.HTTPRedirectHandler):
    """Redirects (blob storage elsewhere) are followed without the registry's Authorization header."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


@dataclass(frozen=True)
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """(scheme, parameters) of a WWW-Authenticate header: ``Bearer realm="...",service="..."``."""
    scheme, _sep, rest = header.strip().partition(" ")
    params = {key.lower(): value for key, value in re.findall(r'(\w+)="([^"]*)"', rest)}
    params.update(
        {key.lower(): value for key, value in re.findall(r'(\w+)=([^",\s]+)', rest) if key.lower() not in params}
    )
    return scheme.lower(), params


class RegistryClient:
    """Reads manifests, configs and tags. One instance keeps the tokens it was given."""

    def __init__(self, options: RegistryOptions = RegistryOptions()) -> None:
        self.options = options
        self._tokens: dict[tuple[str, str], str] = {}
        self._basic: dict[str, str] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}

    # -- HTTP
    def _context(self, registry: str) -> ssl.SSLContext:
        """The TLS context for ``registry``, its CA files read once per client."""
        if registry not in self._contexts:
            self._contexts[registry] = ssl_context(self.options, registry)
        return self._contexts[registry]

    def _open(self, ref: Reference, method: str, url: str, headers: Mapping[str, str]) -> _Response:
        request = urllib.request.Request(url, method=method, headers=dict(headers))
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self._context(ref.registry)), _NoRedirectAuth()
        )
        log.info("%s %s", method, url)
        try:
            with opener.open(request, timeout=self.options.timeout) as response:
                body = response.read(_MAX_DOCUMENT + 1) if method != "HEAD" else b""
                return _Response(response.status, {k.lower(): v for k, v in response.headers.items()}, body)
        except urllib.error.HTTPError as exc:
            body = exc.read(64 << 10) if exc.fp is not None else b""
            return _Response(exc.code, {k.lower(): v for k, v in (exc.headers or {}).items()}, body)
        # http.client's own exceptions (a garbled status line, a bad port in a token realm) are not
        # OSErrors; they are the registry being unreachable all the same.
        except (urllib.error.URLError, OSError, ssl.SSLError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(reason):
                why = getattr(reason, "verify_message", reason)
                raise RegistryError(
                    f"{ref}: the registry's TLS certificate is not trusted ({why})",
                    hint=f"put the registry's CA in /etc/containers/certs.d/{ref.registry}/ca.crt (or in "
                    f"KVC_REGISTRY_CERTS_DIR/{ref.registry}/), or set KVC_REGISTRY_TLS_VERIFY=no",
                ) from None
            # One line whatever the cause: a garbled status line arrives with its CR LF.
            why = " ".join(str(reason).split()) or type(exc).__name__
            host = urllib.parse.urlsplit(url).netloc
            where = f"the registry {host}" if host == ref.registry else f"{host}, the registry's token service,"
            raise RegistryError(
                f"{ref}: {where} cannot be reached ({why})",
                hint="check the registry's address, the network, proxy and DNS settings",
            ) from None

    def _token(self, ref: Reference, params: Mapping[str, str]) -> str:
        realm = params.get("realm", "")
        if not realm.startswith("https://") and not realm.startswith("http://"):
            raise RegistryError(
                f"{ref}: the registry asked for a token from no usable realm", hint="check the registry"
            )
        query = {
            "service": params.get("service", ""),
            "scope": params.get("scope", "") or f"repository:{ref.repository}:pull",
        }
        key = (ref.registry, query["scope"])
        if key in self._tokens:
            return self._tokens[key]
        headers = {}
        found = credentials(self.options, ref)
        if found is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{found[0]}:{found[1]}".encode()).decode()
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        response = self._open(ref, "GET", url, headers)
        if response.status in (401, 403):
            raise self._denied(ref, found is not None)
        try:
            data = json.loads(response.body)
            token = str(data.get("token") or data.get("access_token") or "")
        except (ValueError, AttributeError):
            token = ""
        if response.status != 200 or not token:
            raise RegistryError(
                f"{ref}: the registry's token service answered {response.status}", hint="check the registry"
            )
        self._tokens[key] = token
        return token

    def _denied(self, ref: Reference, had_credentials: bool) -> RegistryError:
        if had_credentials:
            return RegistryError(
                f"{ref}: the registry refused the credentials",
                hint=f"log in again: podman login --authfile FILE {ref.registry} (FILE: KVC_REGISTRY_AUTH_FILE or "
                "REGISTRY_AUTH_FILE), and check access to the repository",
            )
        return RegistryError(
            f"{ref}: the registry wants credentials and there are none for {ref.registry}",
            hint=f"log in: podman login --authfile FILE {ref.registry}, and set KVC_REGISTRY_AUTH_FILE "
            "(or REGISTRY_AUTH_FILE) to FILE",
        )

    def _request(self, ref: Reference, method: str, path: str, accept: str = "") -> _Response:
        url = f"https://{ref.registry}/v2/{ref.repository}/{path}"
        headers = {"Accept": accept} if accept else {}
        if ref.registry in self._basic:
            headers["Authorization"] = self._basic[ref.registry]
        response = self._open(ref, method, url, headers)
        if response.status != 401:
            return response
        scheme, params = _challenge(response.headers.get("www-authenticate", ""))
        if scheme == "basic":
            found = credentials(self.options, ref)
            if found is None:
                raise self._denied(ref, False)
            self._basic[ref.registry] = "Basic " + base64.b64encode(f"{found[0]}:{found[1]}".encode()).decode()
            headers["Authorization"] = self._basic[ref.registry]
        elif scheme == "bearer":
            headers["Authorization"] = "Bearer " + self._token(ref, params)
        else:
            raise RegistryError(f"{ref}: the registry asks for authentication kvc does not know ({scheme or 'none'})")
        response = self._open(ref, method, url, headers)
        if response.status in (401, 403):
            raise self._denied(ref, scheme == "basic" or credentials(self.options, ref) is not None)
        return response

    @staticmethod
    def _missing(response: _Response) -> bool:
        if response.status != 404:
            return False
        try:
            codes = {str(e.get("code")) for e in json.loads(response.body).get("errors", [])}
        except (ValueError, AttributeError, TypeError):
            return True
        return not codes or bool(codes & {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN", "NOT_FOUND"})

    def _failed(self, ref: Reference, response: _Response, what: str) -> RegistryError:
        if response.status == 403:
            return self._denied(ref, True)
        return RegistryError(
            f"{ref}: reading the {what} failed: the registry answered {response.status}",
            details=response.body[:300].decode(errors="replace"),
            hint="check the reference and the registry's state",
        )

    def _document(self, ref: Reference, path: str, accept: str, what: str) -> Optional[tuple[_Response, Any]]:
        response = self._request(ref, "GET", path, accept)
        if self._missing(response):
            return None
        if response.status != 200:
            raise self._failed(ref, response, what)
        if len(response.body) > _MAX_DOCUMENT:
            raise RegistryError(f"{ref}: the {what} is larger than {_MAX_DOCUMENT} bytes", hint="check the reference")
        try:
            return response, json.loads(response.body)
        except ValueError:
            raise RegistryError(f"{ref}: the {what} is not JSON", hint="check the registry") from None

    # -- API
    def exists(self, ref: Reference) -> Optional[str]:
        """The manifest digest ``ref`` names, or None when the registry has no such image."""
        response = self._request(ref, "HEAD", f"manifests/{ref.manifest_ref}", ", ".join(MANIFEST_TYPES + INDEX_TYPES))
        if response.status == 404:
            return None
        if response.status != 200:
            raise self._failed(ref, response, "manifest")
        digest = response.headers.get("docker-content-digest", "")
        if not digest:
            image = self.inspect(ref)
            return image.digest if image else None
        return digest

    def inspect(self, ref: Reference) -> Optional[RemoteImage]:
        """The image ``ref`` names (from an index: this machine's platform's), from its manifest and
        config; None when the registry has no such tag, digest or repository."""
        found = self._document(
            ref, f"manifests/{ref.manifest_ref}", ", ".join(MANIFEST_TYPES + INDEX_TYPES), "manifest"
        )
        if found is None:
            return None
        response, manifest = found
        digest = "sha256:" + hashlib.sha256(response.body).hexdigest()
        if ref.digest and digest != ref.digest:
            raise RegistryError(
                f"{ref}: the registry served a manifest whose digest is {digest}", hint="check the registry"
            )
        served = response.headers.get("docker-content-digest", "")
        if served and served != digest:
            raise RegistryError(
                f"{ref}: the registry says the manifest's digest is {served}, its bytes hash to {digest}",
                hint="check the registry (or a proxy in front of it that rewrites manifests)",
            )
        media_type = str(manifest.get("mediaType") or response.headers.get("content-type", "")).split(";")[0]
        if media_type in INDEX_TYPES or "manifests" in manifest:
            chosen = self._platform_manifest(ref, manifest)
            return self.inspect(ref.with_digest(chosen))
        try:
            config_digest = str(manifest["config"]["digest"])
            layers = tuple(str(layer["digest"]) for layer in manifest.get("layers", []))
            size = sum(int(layer.get("size", 0)) for layer in manifest.get("layers", []))
        except (KeyError, TypeError, ValueError):
            raise RegistryError(f"{ref}: the manifest is not an image manifest", hint="check the reference") from None
        config_doc = self._document(ref, f"blobs/{config_digest}", "", "image config")
        if config_doc is None:
            raise RegistryError(
                f"{ref}: the registry lacks the image's config {config_digest}", hint="push the image again"
            )
        config_response, config = config_doc
        if "sha256:" + hashlib.sha256(config_response.body).hexdigest() != config_digest:
            raise RegistryError(f"{ref}: the image config does not match its digest", hint="check the registry")
        labels = (config.get("config") or {}).get("Labels") or {} if isinstance(config, dict) else {}
        return RemoteImage(
            reference=ref,
            digest=digest,
            media_type=media_type,
            config_digest=config_digest,
            labels={str(k): str(v) for k, v in labels.items()},
            annotations={str(k): str(v) for k, v in (manifest.get("annotations") or {}).items()},
            created=str(config.get("created", "")) if isinstance(config, dict) else "",
            layers=layers,
            size=size,
            architecture=str(config.get("architecture", "")) if isinstance(config, dict) else "",
        )

    def _platform_manifest(self, ref: Reference, index: Mapping[str, Any]) -> str:
        arch = _GOARCH.get(os.uname().machine, os.uname().machine)
        for entry in index.get("manifests", []):
            wanted = entry.get("platform", {}) if isinstance(entry, dict) else {}
            if wanted.get("os") == "linux" and wanted.get("architecture") == arch:
                return str(entry["digest"])
        raise RegistryError(f"{ref}: the image index has no linux/{arch} image", hint="push an image for this platform")

    def tags(self, ref: Reference) -> list[str]:
        """The repository's tags (following the registry's pagination)."""
        found: list[str] = []
        path = "tags/list"
        while path:
            document = self._document(ref, path, "", "tag list")
            if document is None:
                return found
            response, data = document
            found += [str(tag) for tag in (data.get("tags") or [])]
            link = re.match(r"<([^>]*)>", response.headers.get("link", ""))
            path = link.group(1).split(f"/v2/{ref.repository}/", 1)[-1] if link else ""
        return found
