"""Helpers of the credential tests: docker-registry instances that require HTTP Basic or token auth (serving the
storage of the session registry, so the fixture images are there without pushing again), docker config files,
Secrets made by kubectl, credential-provider plugins and docker credential helpers written as small executables."""

import base64
import json
import os
import subprocess
import sys

from conftest import launch_registry, registry_answers, registry_config, stop_process
from registry_helpers import TokenServer, htpasswd

PROVIDER_API = "credentialprovider.kubelet.k8s.io/v1"


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
        self.token_server = None
        self.log = os.path.join(workdir, "registry.log")
        self.token_requests = os.path.join(workdir, "token", "requests.log")  # token mode: the token server's log

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    def _answers(self):
        return registry_answers(self.host, auth=True)

    def _auth_section(self):
        if self.mode == "htpasswd":
            path = os.path.join(self.workdir, "htpasswd")
            htpasswd(path, self.user, self.password)
            return f"auth:\n  htpasswd:\n    realm: crimage-test\n    path: {path}\n"
        self.token_server = TokenServer(self.workdir, user=self.user, password=self.password)
        self.token_requests = self.token_server.requests_log
        return self.token_server.auth_yaml

    def start(self):
        auth = self._auth_section()
        try:
            return launch_registry(self, lambda port: registry_config(port, self.storage, auth, delete=False),
                                   self._answers,
                                   "docker-registry with auth")
        except RuntimeError:
            self.stop()
            raise

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)
        if self.token_server is not None:
            self.token_server.stop()
        self.proc = self.token_server = None


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



def _write_provider_config(config_path, name, match):
    """A kubelet CredentialProviderConfig with the one plugin `name` for the images `match` matches."""
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": [{"name": name, "matchImages": list(match), "defaultCacheDuration": "1m",
                       "apiVersion": PROVIDER_API}],
    }
    with open(config_path, "w") as f:
        json.dump(config, f)

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
    _write_provider_config(config_path, name, match)
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
    _write_provider_config(config_path, name, match)
    return config_path
