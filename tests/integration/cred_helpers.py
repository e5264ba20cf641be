"""Helpers of the credential tests: docker-registry instances that require HTTP Basic or token auth (serving the
storage of the session registry, so the fixture images are there without pushing again), docker config files,
Secrets made by kubectl, credential-provider plugins and docker credential helpers written as small executables."""

import base64
import json
import os
import shutil
import subprocess
import sys

from conftest import READY_TIMEOUT, REPO, free_port, stop_process, tail, wait_for

PROVIDER_API = "credentialprovider.kubelet.k8s.io/v1"
TOKEN_SERVER = os.path.join(REPO, "tests", "unit", "data", "token-server.py")


class AuthRegistry:
    """docker-registry on 127.0.0.1 over `storage`, with auth "htpasswd" (Basic) or "token" (a token server that
    accepts user/password over Basic or OAuth2, and anonymous requests)."""

    def __init__(self, workdir, storage, mode, user, password):
        self.workdir = workdir
        self.storage = storage
        self.mode = mode
        self.user = user
        self.password = password
        self.port = None
        self.proc = None
        self.token_proc = None
        self.log = os.path.join(workdir, "registry.log")
        self.token_requests = os.path.join(workdir, "token-requests.log")

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    def _answers(self):
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2):
                return True
        except urllib.error.HTTPError as e:
            return e.code == 401  # up, and asking for credentials
        except (urllib.error.URLError, OSError):
            return False

    def _auth_section(self):
        if self.mode == "htpasswd":
            path = os.path.join(self.workdir, "htpasswd")
            subprocess.run(["htpasswd", "-Bbc", path, self.user, self.password], check=True, capture_output=True,
                           timeout=60)
            return f"auth:\n  htpasswd:\n    realm: crimage-test\n    path: {path}\n"
        key = os.path.join(self.workdir, "token.key")
        crt = os.path.join(self.workdir, "token.crt")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
                        "-days", "2", "-subj", "/CN=crimage-test-token"], check=True, capture_output=True, timeout=120)
        portfile = os.path.join(self.workdir, "token.port")
        env = dict(os.environ, TOKEN_USER=self.user, TOKEN_PASS=self.password)
        logf = open(os.path.join(self.workdir, "token-server.log"), "ab")
        self.token_proc = subprocess.Popen([sys.executable, TOKEN_SERVER, portfile, key, crt, "crimage-test-issuer",
                                            "crimage-test-registry", self.token_requests],
                                           stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()

        def port_ready():
            try:
                with open(portfile) as f:
                    return f.read().strip().isdigit()
            except OSError:
                return False

        wait_for(port_ready, READY_TIMEOUT, "token server", self.token_proc)
        with open(portfile) as f:
            port = int(f.read().strip())
        return (f"auth:\n  token:\n    realm: http://127.0.0.1:{port}/token\n    service: crimage-test-registry\n"
                f"    issuer: crimage-test-issuer\n    rootcertbundle: {crt}\n")

    def start(self):
        exe = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        auth = self._auth_section()
        for _ in range(5):
            self.port = free_port()
            config = os.path.join(self.workdir, "config.yml")
            with open(config, "w") as f:
                f.write(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.storage}
http:
  addr: 127.0.0.1:{self.port}
  secret: crimage-integration-tests
{auth}""")
            logf = open(self.log, "ab")
            self.proc = subprocess.Popen([exe, "serve", config], stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT)
            logf.close()
            try:
                wait_for(self._answers, READY_TIMEOUT, "docker-registry", self.proc, self.log)
                return self
            except RuntimeError:
                stop_process(self.proc)
                self.proc = None
        self.stop()
        raise RuntimeError("docker-registry with auth did not start:\n" + tail(self.log))

    def stop(self):
        for p in (self.proc, self.token_proc):
            if p is not None:
                stop_process(p)
        self.proc = self.token_proc = None


def b64(s):
    return base64.b64encode(s.encode()).decode()


def write_docker_config(path, auths=None, cred_helpers=None):
    """A config.json: auths is [(key, user, password)] (kept in this order), cred_helpers {host: helper}."""
    doc = {"auths": {k: {"auth": b64(f"{u}:{p}")} for k, u, p in (auths or [])}}
    if cred_helpers:
        doc["credHelpers"] = cred_helpers
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def kubectl_secret(path, name, server, user, password, namespace="default"):
    """A Secret manifest as `kubectl create secret docker-registry --dry-run=client -o yaml` writes it."""
    r = subprocess.run(["kubectl", "create", "secret", "docker-registry", name, "--namespace", namespace,
                        f"--docker-server={server}", f"--docker-username={user}", f"--docker-password={password}",
                        "--dry-run=client", "-o", "yaml"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(r.stdout)
    return path


def _write_exe(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def write_provider(bin_dir, config_path, name, match, auth, calls_file=None):
    """A credential-provider plugin <bin_dir>/<name> answering `auth` ({pattern: (user, password)}) for images
    matching `match` (a list of matchImages patterns), and the CredentialProviderConfig naming it. Each run appends
    the image asked for to calls_file."""
    answer = {
        "kind": "CredentialProviderResponse",
        "apiVersion": PROVIDER_API,
        "cacheKeyType": "Registry",
        "cacheDuration": "0s",
        "auth": {k: {"username": u, "password": p} for k, (u, p) in auth.items()},
    }
    _write_exe(os.path.join(bin_dir, name), f"""#!{sys.executable}
import json, sys
req = json.load(sys.stdin)
assert req["kind"] == "CredentialProviderRequest", req
calls = {calls_file!r}
if calls:
    with open(calls, "a") as f:
        f.write(req["image"] + "\\n")
json.dump({answer!r}, sys.stdout)
""")
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": [{"name": name, "matchImages": list(match), "defaultCacheDuration": "1m",
                       "apiVersion": PROVIDER_API}],
    }
    with open(config_path, "w") as f:
        json.dump(config, f)
    return config_path


def write_cred_helper(bin_dir, name, server, user, secret, calls_file=None):
    """docker-credential-<name>: `get` answers user/secret for server (and "credentials not found" for others)."""
    return _write_exe(os.path.join(bin_dir, f"docker-credential-{name}"), f"""#!{sys.executable}
import json, sys
if sys.argv[1:] != ["get"]:
    sys.exit(2)
url = sys.stdin.read().strip()
calls = {calls_file!r}
if calls:
    with open(calls, "a") as f:
        f.write(url + "\\n")
if url != {server!r}:
    print("credentials not found in native keychain")
    sys.exit(1)
json.dump({{"ServerURL": url, "Username": {user!r}, "Secret": {secret!r}}}, sys.stdout)
""")


def write_failing_provider(bin_dir, config_path, name, match, stdout_text, stderr_text):
    """A credential-provider plugin that prints stdout_text and stderr_text and exits 1."""
    _write_exe(os.path.join(bin_dir, name), f"""#!{sys.executable}
import sys
sys.stdin.read()
sys.stdout.write({stdout_text!r})
sys.stderr.write({stderr_text!r})
sys.exit(1)
""")
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": [{"name": name, "matchImages": list(match), "defaultCacheDuration": "1m",
                       "apiVersion": PROVIDER_API}],
    }
    with open(config_path, "w") as f:
        json.dump(config, f)
    return config_path
