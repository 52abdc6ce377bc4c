"""A real registry for tests: Debian's docker-registry (2.8.2) on a free port of 127.0.0.1, with TLS
from a test CA (made with openssl) and htpasswd basic auth (``htpasswd -B``), as registries are.

:class:`LocalRegistry` makes the CA, the server certificate (IP SAN 127.0.0.1), a user with a random
password, a containers auth file (0600) and a certs.d directory (``certs_dir/127.0.0.1:PORT/ca.crt``),
starts the registry and waits for its ``/v2/`` to answer 401. :meth:`LocalRegistry.requests` lists
the (method, path) of every request it logged, so tests can tell that no layer was fetched. The
``local_registry`` fixture (tests/conftest.py) shares one registry per test session.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Optional

REGISTRY = "/usr/bin/docker-registry"
# The access log's lines: 127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 ...
_REQUEST = re.compile(r'^\S+ - \S+ \[[^\]]*\] "([A-Z]+) (\S+) HTTP/[0-9.]+"')


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run(*argv: str, cwd: Path) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, cwd=cwd)


class LocalRegistry:
    user = "kvc"

    def __init__(self) -> None:
        for program in (REGISTRY, "openssl", "htpasswd"):
            if not shutil.which(program):
                raise RuntimeError(f"{program} is missing: run scripts/setup.sh")
        self.dir = Path(tempfile.mkdtemp(prefix="kvc-registry-"))
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(18)
        self.certs_dir = str(self.dir / "certs.d")
        self.ca_file = str(self.dir / "ca.crt")
        self.auth_file = str(self.dir / "auth.json")
        self.log_path = str(self.dir / "registry.log")
        self.process: Optional[subprocess.Popen[bytes]] = None

    # -- setup
    def _certificates(self) -> None:
        d = self.dir
        _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kvc test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
        _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=d)  # fmt: skip
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        _run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=d)  # fmt: skip
        host_dir = Path(self.certs_dir) / self.host
        host_dir.mkdir(parents=True)
        shutil.copyfile(d / "ca.crt", host_dir / "ca.crt")

    def _credentials(self) -> None:
        subprocess.run(
            ["htpasswd", "-B", "-i", "-c", str(self.dir / "htpasswd"), self.user],
            input=self.password.encode(),
            check=True,
            capture_output=True,
        )
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        fd = os.open(self.auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"auths": {self.host: {"auth": token}}}, handle)

    def _config(self) -> Path:
        config = self.dir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: text\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'storage'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n  tls:\n    certificate: {self.dir / 'server.crt'}\n"
            f"    key: {self.dir / 'server.key'}\n"
            f"auth:\n  htpasswd:\n    realm: kvc-test\n    path: {self.dir / 'htpasswd'}\n"
        )
        return config

    def start(self) -> LocalRegistry:
        self._certificates()
        self._credentials()
        config = self._config()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [REGISTRY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        context = ssl.create_default_context(cafile=self.ca_file)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {Path(self.log_path).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"https://{self.host}/v2/", context=context, timeout=2)
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("docker-registry did not answer within 30 s")

    # -- use
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of each request the registry has logged so far, in order."""
        time.sleep(0.2)  # the registry logs a request after answering it
        text = Path(self.log_path).read_text(errors="replace")
        return [(m.group(1), m.group(2)) for m in map(_REQUEST.match, text.splitlines()) if m]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(
        self, kind: Optional[type[BaseException]], value: Optional[BaseException], trace: Optional[TracebackType]
    ) -> None:
        self.stop()
