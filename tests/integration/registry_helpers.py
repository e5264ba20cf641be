"""Helpers for the registry tests: docker-registry processes with auth/TLS/proxy configurations, a test PKI made with
openssl, the token server of tests/unit/data/token-server.py, and a fault-injecting HTTP front for a registry."""

import base64
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

from conftest import READY_TIMEOUT, REPO, ForwardingHandler, ProxyServer, launch_registry, stop_process, wait_for

DATA = os.path.join(REPO, "tests", "unit", "data")


def openssl(*args, cwd=None):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {r.stderr}")


class Pki:
    """A test CA with a server certificate for 127.0.0.1/localhost and a client certificate, all made by openssl."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "pki")
        os.makedirs(self.dir, exist_ok=True)
        d = self.dir
        self.ca_key, self.ca_crt = os.path.join(d, "ca.key"), os.path.join(d, "ca.crt")
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.ca_key, "-out", self.ca_crt,
                "-days", "2", "-subj", "/CN=crimage test CA", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.server_key, self.server_crt = self._issue("server", "127.0.0.1",
                                                       "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                                       "extendedKeyUsage=serverAuth\n")
        self.client_key, self.client_crt = self._issue("client", "crimage test client",
                                                       "extendedKeyUsage=clientAuth\n")

    def _issue(self, name, cn, ext):
        d = self.dir
        key, csr, crt = (os.path.join(d, f"{name}.{x}") for x in ("key", "csr", "crt"))
        extfile = os.path.join(d, f"{name}.ext")
        with open(extfile, "w") as f:
            f.write("basicConstraints=CA:FALSE\n" + ext)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", csr, "-CA", self.ca_crt, "-CAkey", self.ca_key, "-CAcreateserial", "-out",
                crt, "-days", "2", "-extfile", extfile)
        return key, crt


class RegistryProcess:
    """Debian's docker-registry with a config of the test's choice.

    storage: the filesystem root (pass the session registry's to serve the images already pushed there);
    http_extra: YAML lines under `http:` (indented two spaces), extra: top-level YAML (auth, proxy)."""

    def __init__(self, workdir, storage=None, http_extra="", extra=""):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.storage = storage or os.path.join(workdir, "storage")
        os.makedirs(self.storage, exist_ok=True)
        self.http_extra = http_extra
        self.extra = extra
        self.log = os.path.join(workdir, "registry.log")
        self.proc = None
        self.port = None

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    def _accepts(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def start(self):
        return launch_registry(self, lambda port: f"""version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {self.storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: crimage-registry-tests
{self.http_extra}
{self.extra}
""", self._accepts)

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def blob_digests(self):
        """sha256 hex digests of the blobs in this registry's storage."""
        d = os.path.join(self.storage, "docker", "registry", "v2", "blobs", "sha256")
        out = set()
        if os.path.isdir(d):
            for prefix in os.listdir(d):
                out.update(os.listdir(os.path.join(d, prefix)))
        return out


class TokenServer:
    """tests/unit/data/token-server.py with a fresh key and certificate; `auth_yaml` is the registry's auth section."""

    SERVICE = "crimage-test-registry"
    ISSUER = "crimage-test-issuer"

    def __init__(self, workdir, user=None, password=None, refresh=None, post=None, expires=None):
        self.dir = os.path.join(workdir, "token")
        os.makedirs(self.dir, exist_ok=True)
        self.key, self.crt = os.path.join(self.dir, "token.key"), os.path.join(self.dir, "token.crt")
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out", self.crt, "-days", "2",
                "-subj", "/CN=crimage-test-token")
        self.requests_log = os.path.join(self.dir, "requests.log")
        self.log = os.path.join(self.dir, "server.log")
        portfile = os.path.join(self.dir, "port")
        env = dict(os.environ)
        for k, v in (("TOKEN_USER", user), ("TOKEN_PASS", password), ("TOKEN_REFRESH", refresh),
                     ("TOKEN_POST", post), ("TOKEN_EXPIRES", expires)):
            if v is not None:
                env[k] = str(v)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, os.path.join(DATA, "token-server.py"), portfile, self.key,
                                      self.crt, self.ISSUER, self.SERVICE, self.requests_log],
                                     stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()
        wait_for(lambda: os.path.exists(portfile), READY_TIMEOUT, "token server", self.proc, self.log)
        with open(portfile) as f:
            self.port = int(f.read())
        self.realm = f"http://127.0.0.1:{self.port}/token"

    @property
    def auth_yaml(self):
        return (f"auth:\n  token:\n    realm: {self.realm}\n    service: {self.SERVICE}\n    issuer: {self.ISSUER}\n"
                f"    rootcertbundle: {self.crt}\n")

    def requests(self):
        if not os.path.exists(self.requests_log):
            return []
        with open(self.requests_log) as f:
            return [json.loads(line) for line in f if line.strip()]

    def stop(self):
        stop_process(self.proc)


def htpasswd(path, user, password):
    subprocess.run(["htpasswd", "-Bbc", path, user, password], check=True, capture_output=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# A fault-injecting front for a registry


class FaultProxy(ProxyServer):
    """Forwards GET/HEAD to `upstream` (host:port, plain HTTP) and misbehaves as told by its attributes:

    basic            (user, password): require HTTP Basic auth on /v2/ (401 with a Basic challenge otherwise)
    drop_blob        digest: the first GET of that blob without a Range header is cut after half its bytes
    corrupt_blob     digest: the first GET of that blob has one byte flipped
    trickle_blob     digest: every GET of that blob sends `trickle_bytes` bytes per second
    manifest_errors  list of (status, headers): answered in turn to the first manifest GETs
    redirect_blobs   True: blob GETs get a 307 to http://localhost:<port>/redirected/... (another host name)
    fail_blobs       {digest: status}: every GET of that blob is answered with that status (a blob that always fails)

    `requests` records every request: dict(method, path, range, auth (bool), kind).
    """

    def __init__(self, upstream):
        self.upstream = upstream
        self.basic = None
        self.drop_blob = None
        self.corrupt_blob = None
        self.trickle_blob = None
        self.trickle_bytes = 64
        self.manifest_errors = []
        self.redirect_blobs = False
        self.fail_blobs = {}
        self.requests = []
        self.lock = threading.Lock()
        self._done = set()
        proxy = self

        class Handler(ForwardingHandler):
            def _forward(self, with_body):
                proxy._handle(self, head=not with_body)

        super().__init__(Handler)
        self.port = self.server.server_address[1]
        self.start()

    def count(self, **kv):
        with self.lock:
            return sum(1 for r in self.requests if all(r.get(k) == v for k, v in kv.items()))

    def _once(self, key):
        with self.lock:
            if key in self._done:
                return False
            self._done.add(key)
            return True

    def _record(self, h, kind):
        with self.lock:
            self.requests.append({"method": h.command, "path": h.path, "range": h.headers.get("Range"),
                                  "auth": "Authorization" in h.headers, "kind": kind})

    @staticmethod
    def _simple(h, status, headers=(), body=b""):
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _handle(self, h, head):
        path = h.path
        if path.startswith("/redirected/"):
            self._record(h, "redirected")
            return self._forward(h, path[len("/redirected"):], head, "redirected")
        if self.basic and path.startswith("/v2/"):
            want = "Basic " + base64.b64encode(("%s:%s" % self.basic).encode()).decode()
            if h.headers.get("Authorization") != want:
                self._record(h, "challenge")
                return self._simple(h, 401, [("WWW-Authenticate", 'Basic realm="fault proxy"')])
        if "/manifests/" in path and not head:
            with self.lock:
                err = self.manifest_errors.pop(0) if self.manifest_errors else None
            if err:
                status, headers = err
                self._record(h, f"error{status}")
                body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE",
                                               "message": "injected"}]}).encode()
                return self._simple(h, status, list(headers) + [("Content-Type", "application/json")], body)
        failing = self.fail_blobs.get(path.rsplit("/", 1)[-1]) if "/blobs/" in path else None
        if failing:
            self._record(h, f"fail{failing}")
            body = json.dumps({"errors": [{"code": "BLOB_UNKNOWN", "message": "injected"}]}).encode()
            return self._simple(h, failing, [("Content-Type", "application/json")], body)
        if "/blobs/" in path and self.redirect_blobs:
            self._record(h, "redirect")
            return self._simple(h, 307, [("Location", f"http://localhost:{self.port}/redirected{path}")])
        self._record(h, "forward")
        return self._forward(h, path, head, "forward")

    def _forward(self, h, path, head, kind):
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        headers = {k: h.headers[k] for k in ("Accept", "Range") if k in h.headers}
        conn.request("HEAD" if head else "GET", path, headers=headers)
        resp = conn.getresponse()
        body = b"" if head else resp.read()
        conn.close()
        digest = path.rsplit("/", 1)[-1] if "/blobs/" in path else None
        h.send_response(resp.status)
        for k in ("Content-Type", "Content-Range", "Docker-Content-Digest", "WWW-Authenticate", "Location"):
            v = resp.getheader(k)
            if v is not None:
                h.send_header(k, v)
        if head:
            h.send_header("Content-Length", resp.getheader("Content-Length", "0"))
            h.end_headers()
            return
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if resp.status == 200 and digest and digest == self.drop_blob and not h.headers.get("Range") \
                and self._once(("drop", digest)):
            h.wfile.write(body[:len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if resp.status == 200 and digest and digest == self.corrupt_blob and self._once(("corrupt", digest)):
            i = len(body) // 3
            body = body[:i] + bytes([body[i] ^ 0x5A]) + body[i + 1:]
        if resp.status in (200, 206) and digest and digest == self.trickle_blob:
            for i in range(0, len(body), self.trickle_bytes):
                try:
                    h.wfile.write(body[i:i + self.trickle_bytes])
                    h.wfile.flush()
                except OSError:
                    h.close_connection = True
                    return
                time.sleep(1)
            return
        h.wfile.write(body)


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
