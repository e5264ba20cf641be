"""Fixtures for the crimaged integration tests: a CRI client generated from cri/api.proto, a real docker-registry on
127.0.0.1 holding generated fixture images, and a factory that starts crimaged on a temporary root and socket."""

import copy
import hashlib
import http.client
import http.server
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import fixtures  # noqa: E402

# CRIMAGE_TEST_WRAPPER runs the daemon under a tool, e.g. "valgrind --error-exitcode=99 --leak-check=full"; its
# exit status then reports what the tool found, and the timeouts below grow to allow for the slowdown.
WRAPPER = shlex.split(os.environ.get("CRIMAGE_TEST_WRAPPER", ""))
_SCALE = 5 if WRAPPER else 1
RPC_TIMEOUT = 60 * _SCALE  # seconds, every RPC
READY_TIMEOUT = 15 * _SCALE  # seconds for a daemon or registry to come up
STOP_TIMEOUT = 10 * _SCALE  # seconds for a SIGTERM to end the daemon
SERVICE = "runtime.v1.ImageService"


def build_dir():
    return os.environ.get("CRIMAGE_BUILD_DIR") or os.path.join(REPO, "build")


def daemon_exe():
    """The crimaged under test: CRIMAGE_DAEMON (e.g. the packaged /usr/sbin/crimaged, see tests/packaging/run),
    else the one of the build directory."""
    return os.environ.get("CRIMAGE_DAEMON") or os.path.join(build_dir(), "plugin", "crimaged")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, limit=30000):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"<{path}: {e}>"
    text = data.decode("utf-8", "replace")
    return text if len(text) <= limit else "...\n" + text[-limit:]


def wait_for(pred, timeout, what, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode} before it was ready\n"
                               + (tail(log) if log else ""))
        if pred():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout} s\n" + (tail(log) if log else ""))
        time.sleep(0.05)


def stop_process(proc, timeout=STOP_TIMEOUT):
    """SIGTERM, wait, SIGKILL as a last resort. Returns (exit status, whether it needed SIGKILL)."""
    if proc.poll() is not None:
        return proc.returncode, False
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=timeout), True


class QuietHTTPServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server for the small stand-in servers of the tests; a client hanging up is not an error."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


# Headers that concern one connection only: a proxy does not pass them on.
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}


def forward_upstream(handler, upstream, with_body):
    """Sends the request `handler` is serving to `upstream` (host:port) without its hop-by-hop headers; returns
    (status, headers, body, length), body empty and length from Content-Length when not `with_body` (HEAD)."""
    conn = http.client.HTTPConnection(upstream, timeout=60)
    try:
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
        conn.request(handler.command, handler.path, headers=headers)
        resp = conn.getresponse()
        body = resp.read() if with_body else b""
        length = len(body) if with_body else int(resp.getheader("Content-Length") or 0)
        return resp.status, resp.getheaders(), body, length
    finally:
        conn.close()


class ForwardingHandler(http.server.BaseHTTPRequestHandler):
    """A proxy's request handler: GET and HEAD go to _forward(with_body), which subclasses define."""

    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def send_forwarded_head(self, status, headers, length):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self):
        self._forward(True)

    def do_HEAD(self):
        self._forward(False)


class ProxyServer:
    """Serves `handler_class` on a free port of 127.0.0.1 on a thread of its own."""

    def __init__(self, handler_class):
        self.server = QuietHTTPServer(("127.0.0.1", 0), handler_class)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self):
        return f"127.0.0.1:{self.server.server_address[1]}"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(30)


# ---------------------------------------------------------------------------------------------------------------
# CRI client generated from the project's own proto


def generate_proto_module(outdir, proto, module_name, probe, subdir="gen", proto_dir=None, include_dirs=(),
                          deps=None):
    """Compiles `proto` (in `proto_dir`, default cri/) to a Python message module in `outdir` and imports it as
    `module_name`; `probe(mod)` must succeed on the loaded module. A proto that imports others names their
    directories in `include_dirs`, and in `deps` the modules already loaded for them under the names its generated
    code imports ({"api_pb2": cri}), so that both share one set of message classes.

    Debian's grpc_tools bundles its own protoc; should its output not load with the installed protobuf runtime, the
    standalone protoc (protobuf-compiler) is tried instead. Only the message module is needed: the clients call
    methods through generic channel stubs, so no generated service code is involved.
    """
    proto_dir = proto_dir or os.path.join(REPO, "cri")
    deps = deps or {}
    attempts = [[sys.executable, "-m", "grpc_tools.protoc"]]
    if shutil.which("protoc"):
        attempts.append(["protoc"])
    errors = []
    for i, tool in enumerate(attempts):
        d = os.path.join(outdir, f"{subdir}{i}")
        os.makedirs(d, exist_ok=True)
        r = subprocess.run(tool + [f"-I{proto_dir}"] + [f"-I{inc}" for inc in include_dirs]
                           + [f"--python_out={d}", os.path.join(proto_dir, proto)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            errors.append(f"{tool}: {r.stderr}")
            continue
        try:
            pb2 = os.path.splitext(proto)[0] + "_pb2.py"
            spec = importlib.util.spec_from_file_location(module_name, os.path.join(d, pb2))
            mod = importlib.util.module_from_spec(spec)
            shadowed = {name: sys.modules.get(name) for name in deps}
            sys.modules.update(deps)
            try:
                spec.loader.exec_module(mod)
            finally:
                for name, old in shadowed.items():
                    if old is None:
                        del sys.modules[name]
                    else:
                        sys.modules[name] = old
            probe(mod)
            return mod
        except Exception as e:  # noqa: BLE001 -- any failure to load means: try the next generator
            errors.append(f"{tool}: generated module does not load: {e!r}")
    raise RuntimeError(f"cannot generate a Python client from {os.path.join(proto_dir, proto)}:\n"
                       + "\n".join(errors))


def generate_cri_module(outdir):
    """Compiles cri/api.proto to a Python message module in `outdir` and imports it."""
    return generate_proto_module(outdir, "api.proto", "crimage_cri_api_pb2",
                                 lambda mod: mod.ImageSpec(image="x", runtime_handler="y").SerializeToString())


class CriClient:
    """A small CRI ImageService client over a unix socket; every call has a deadline."""

    RESPONSES = {
        "ListImages": "ListImagesResponse",
        "ImageStatus": "ImageStatusResponse",
        "PullImage": "PullImageResponse",
        "RemoveImage": "RemoveImageResponse",
        "ImageFsInfo": "ImageFsInfoResponse",
    }

    def __init__(self, pb, socket_path, timeout=RPC_TIMEOUT):
        self.pb = pb
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            "unix:" + socket_path,
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                     ("grpc.enable_retries", 0)])

    def close(self):
        self.channel.close()

    def call(self, method, request, timeout=None):
        resp_cls = getattr(self.pb, self.RESPONSES[method])
        stub = self.channel.unary_unary(f"/{SERVICE}/{method}",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=resp_cls.FromString)
        return stub(request, timeout=timeout or self.timeout)

    def raw(self, path, payload, timeout=None):
        """Sends `payload` bytes as they are to method `path` and returns the raw reply bytes."""
        stub = self.channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return stub(payload, timeout=timeout or self.timeout)

    def spec(self, image, handler=""):
        return self.pb.ImageSpec(image=image, runtime_handler=handler)

    def pull(self, image, handler="", timeout=None, auth=None):
        req = self.pb.PullImageRequest(image=self.spec(image, handler))
        if auth is not None:
            req.auth.CopyFrom(auth)
        return self.call("PullImage", req, timeout).image_ref

    def status(self, image, handler="", verbose=False, timeout=None):
        return self.call("ImageStatus",
                         self.pb.ImageStatusRequest(image=self.spec(image, handler), verbose=verbose), timeout)

    def image(self, image, handler=""):
        """The Image for `image`, or None when ImageStatus reports none."""
        resp = self.status(image, handler)
        return resp.image if resp.HasField("image") else None

    def list(self, image=None, handler=None, timeout=None):
        req = self.pb.ListImagesRequest()
        if image is not None or handler is not None:
            req.filter.image.image = image or ""
            req.filter.image.runtime_handler = handler or ""
        return list(self.call("ListImages", req, timeout).images)

    def remove(self, image, handler="", timeout=None):
        return self.call("RemoveImage", self.pb.RemoveImageRequest(image=self.spec(image, handler)), timeout)

    def fsinfo(self, timeout=None):
        return self.call("ImageFsInfo", self.pb.ImageFsInfoRequest(), timeout)


@pytest.fixture(scope="session")
def cri(tmp_path_factory):
    """The generated CRI message module (api_pb2)."""
    return generate_cri_module(str(tmp_path_factory.mktemp("cri-gen")))


# ---------------------------------------------------------------------------------------------------------------
# Registry


def registry_answers(host, auth=False):
    """True once docker-registry at `host` answers /v2/ (with 401 too when `auth`: up, and asking for
    credentials)."""
    try:
        with urllib.request.urlopen(f"http://{host}/v2/", timeout=2) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 401 and auth
    except (urllib.error.URLError, OSError):
        return False


def registry_config(port, storage, auth="", delete=True):
    """docker-registry's YAML for the tests: warnings only, filesystem `storage` (deletes allowed when `delete`),
    127.0.0.1:port, then the `auth` section."""
    delete_yaml = "  delete:\n    enabled: true\n" if delete else ""
    return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
{delete_yaml}http:
  addr: 127.0.0.1:{port}
  secret: crimage-integration-tests
{auth}"""


def launch_registry(reg, config_text, ready, what="docker-registry"):
    """Starts Debian's docker-registry for `reg` (an object with workdir, log, port and proc attributes) on a free
    port of 127.0.0.1, with the YAML that config_text(port) returns, and waits until ready() holds. Sets reg.port and
    reg.proc and returns reg."""
    exe = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    config = os.path.join(reg.workdir, "config.yml")
    for _ in range(5):  # the free port can be taken between probing and binding: retry with another
        reg.port = free_port()
        with open(config, "w") as f:
            f.write(config_text(reg.port))
        logf = open(reg.log, "ab")
        reg.proc = subprocess.Popen([exe, "serve", config], stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT)
        logf.close()
        try:
            wait_for(ready, READY_TIMEOUT, "docker-registry", reg.proc, reg.log)
            return reg
        except RuntimeError:
            stop_process(reg.proc)
            reg.proc = None
    raise RuntimeError(f"{what} did not start:\n" + tail(reg.log))


class Registry:
    """docker-registry on 127.0.0.1; with `users` ({name: password}) it requires HTTP basic auth (htpasswd)."""

    def __init__(self, workdir, users=None):
        self.workdir = workdir
        self.users = dict(users or {})
        self.port = None
        self.proc = None
        self.log = os.path.join(workdir, "registry.log")

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    def _answers(self):
        return registry_answers(self.host, auth=bool(self.users))

    def _auth_config(self):
        if not self.users:
            return ""
        path = os.path.join(self.workdir, "htpasswd")
        with open(path, "w") as f:
            for user, password in self.users.items():
                r = subprocess.run(["htpasswd", "-nbB", user, password], capture_output=True, text=True, timeout=60,
                                   check=True)
                f.write(r.stdout.strip() + "\n")
        return f"""auth:
  htpasswd:
    realm: crimage-tests
    path: {path}
"""

    def start(self):
        storage = os.path.join(self.workdir, "storage")
        os.makedirs(storage, exist_ok=True)
        auth = self._auth_config()
        return launch_registry(self, lambda port: registry_config(port, storage, auth), self._answers)

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """Debian's docker-registry on 127.0.0.1 with a free port and a temporary storage root."""
    reg = Registry(str(tmp_path_factory.mktemp("registry"))).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def images(registry, tmp_path_factory):
    """Every fixture image generated and pushed: {repository: fixtures.PushedImage}."""
    return fixtures.push_all(str(tmp_path_factory.mktemp("images")), registry.host)


# ---------------------------------------------------------------------------------------------------------------
# Daemon


def _deep_merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:  # None deletes a default
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _yaml_scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(str(v))  # a JSON string is a valid YAML double-quoted scalar


def to_yaml(obj, indent=0):
    """Block-style YAML for the plain dicts, lists and scalars of a daemon config."""
    pad = "  " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = json.dumps(str(k))
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{key}:")
                lines.append(to_yaml(v, indent + 1))
            elif isinstance(v, dict):
                lines.append(f"{pad}{key}: {{}}")
            elif isinstance(v, list):
                lines.append(f"{pad}{key}: []")
            else:
                lines.append(f"{pad}{key}: {_yaml_scalar(v)}")
    else:
        for v in obj:
            if isinstance(v, (dict, list)) and v:
                inner = to_yaml(v, indent + 1).lstrip()
                lines.append(f"{pad}- {inner}")
            else:
                lines.append(f"{pad}- {_yaml_scalar(v)}")
    return "\n".join(lines)


class Daemon:
    def __init__(self, pb, workdir, sockdir, config, args, config_format):
        self.pb = pb
        self.workdir = workdir
        self.root = config.get("root") or os.path.join(workdir, "root")
        self.socket = config.get("socket") or os.path.join(sockdir, "crimaged.sock")
        self.config = dict(config, root=self.root, socket=self.socket)
        self.args = list(args)
        # flags override the file: where the daemon really is follows them
        for flag, attr in (("--root", "root"), ("--socket", "socket")):
            for i, a in enumerate(self.args):
                if a == flag and i + 1 < len(self.args):
                    setattr(self, attr, self.args[i + 1])
                elif a.startswith(flag + "="):
                    setattr(self, attr, a[len(flag) + 1:])
        self.config_format = config_format
        self.log = os.path.join(workdir, "crimaged.log")
        self.proc = None
        self._client = None
        self.exit_status = None
        self.stopped = False

    @property
    def exe(self):
        return daemon_exe()

    def _socket_accepts(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.socket)
                return True
            except OSError:
                return False

    def start(self):
        if not os.access(self.exe, os.X_OK):
            raise RuntimeError(f"{self.exe} does not exist (set CRIMAGE_BUILD_DIR to the meson build directory, "
                               "or CRIMAGE_DAEMON to a crimaged)")
        text = to_yaml(self.config) + "\n" if self.config_format == "yaml" else json.dumps(self.config, indent=2)
        base = os.environ.get("CRIMAGE_CONFIG")
        if base:
            # A packaged config as shipped, with the test's settings in a drop-in beside it, as an operator would.
            cfg_path = os.path.join(self.workdir, "crimaged.yaml")
            shutil.copyfile(base, cfg_path)
            os.makedirs(cfg_path + ".d", exist_ok=True)
            dropin = os.path.join(cfg_path + ".d", "50-test." + ("yaml" if self.config_format == "yaml" else "json"))
            with open(dropin, "w") as f:
                f.write(text)
        else:
            cfg_path = os.path.join(self.workdir, "crimaged." + ("yaml" if self.config_format == "yaml" else "json"))
            with open(cfg_path, "w") as f:
                f.write(text)
        self.config_path = cfg_path
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(WRAPPER + [self.exe, "--config", cfg_path] + self.args, stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=logf, cwd=self.workdir)
        logf.close()
        try:
            wait_for(self._socket_accepts, READY_TIMEOUT, "crimaged", self.proc, self.log)
        except RuntimeError:
            stop_process(self.proc)
            raise
        return self

    @property
    def client(self):
        if self._client is None:
            self._client = CriClient(self.pb, self.socket)
        return self._client

    def new_client(self, timeout=RPC_TIMEOUT):
        return CriClient(self.pb, self.socket, timeout)

    def alive(self):
        """True when the process runs and answers ImageFsInfo."""
        if self.proc.poll() is not None:
            return False
        c = self.new_client(timeout=30)
        try:
            c.fsinfo()
            return True
        finally:
            c.close()

    def blob_files(self):
        """Names of the files under <root>/blobs/sha256 (the content store's blobs)."""
        d = os.path.join(self.root, "blobs", "sha256")
        if not os.path.isdir(d):
            return set()
        return {name for name in os.listdir(d) if os.path.isfile(os.path.join(d, name))}

    def corrupt_blobs(self):
        """Blob files whose content does not hash to their name (there must never be any)."""
        bad = []
        for name in self.blob_files():
            with open(os.path.join(self.root, "blobs", "sha256", name), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != name:
                    bad.append(name)
        return bad

    def has_blob(self, digest):
        return os.path.isfile(os.path.join(self.root, "blobs", *digest.split(":", 1)))

    def stop(self):
        """SIGTERM; returns the exit status (None if SIGKILL was needed)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is None:
            return self.exit_status
        if not self.stopped:
            self.stopped = True
            status, killed = stop_process(self.proc)
            self.exit_status = None if killed else status
        return self.exit_status


@pytest.fixture
def daemon_factory(request, cri, registry, tmp_path):
    """Starts crimaged: `daemon_factory(config={...}, args=[...], config_format="json"|"yaml")`.

    The config is deep-merged over defaults (temporary root and socket, debug logging, the test registry insecure).
    At teardown each daemon gets SIGTERM and must exit 0 within a few seconds; its stderr is attached to the report
    of a failing test.
    """
    started = []
    logs = []
    request.node._crimage_logs = logs

    def start(config=None, args=(), config_format="json"):
        n = len(started)
        workdir = str(tmp_path / f"daemon{n}")
        os.makedirs(workdir, exist_ok=True)
        # unix socket paths are limited to 107 bytes: keep the socket in a short directory of its own
        sockdir = tempfile.mkdtemp(prefix="crimage-it-", dir="/tmp")
        defaults = {
            "logLevel": "debug",
            "registries": {registry.host: {"insecure": True}},
        }
        d = Daemon(cri, workdir, sockdir, _deep_merge(defaults, config or {}), args, config_format)
        d.sockdir = sockdir
        logs.append(d.log)
        try:
            d.start()
        except BaseException:
            shutil.rmtree(sockdir, ignore_errors=True)
            raise
        started.append(d)
        return d

    yield start

    problems = []
    for d in started:
        if d.stopped:  # stopped by the test itself, which checked the outcome
            shutil.rmtree(d.sockdir, ignore_errors=True)
            continue
        status = d.stop()
        if status != 0:
            problems.append(f"crimaged ({d.log}) exited with {status!r} after SIGTERM"
                            + (" (needed SIGKILL)" if status is None else ""))
        shutil.rmtree(d.sockdir, ignore_errors=True)
    assert not problems, "\n".join(problems)


@pytest.fixture
def short_dir():
    """A directory with a short path, for unix sockets (their paths are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="crimage-it-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory):
    """One crimaged with the default test configuration."""
    return daemon_factory()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for log in getattr(item, "_crimage_logs", []):
            rep.sections.append((f"crimaged stderr {log}", tail(log)))
        if getattr(item, "_containerd_logs", None):
            from containerd_helpers import log_since
            for log, offset in item._containerd_logs:
                rep.sections.append((f"containerd log {log}", log_since(log, offset)))


# ---------------------------------------------------------------------------------------------------------------
# Runnable images and containerd (containerd_helpers imports this module, hence the imports inside the fixtures)


@pytest.fixture(scope="session")
def runnable_images(registry, tmp_path_factory):
    """The runnable fixture images (pause, hello, hello-docker, whiteout, multi-hello) pushed to the session
    registry: {key: fixtures.PushedRunnable}."""
    return fixtures.push_runnable(str(tmp_path_factory.mktemp("runnable")), registry.host)


@pytest.fixture(scope="session")
def runtime_pb(cri, tmp_path_factory):
    """The generated CRI RuntimeService message module (protos/cri_runtime.proto), sharing cri's messages."""
    import containerd_helpers
    return containerd_helpers.generate_runtime_module(str(tmp_path_factory.mktemp("runtime-gen")), cri)


def _containerd_logs(request):
    if not hasattr(request.node, "_containerd_logs"):
        request.node._containerd_logs = []
    return request.node._containerd_logs


@pytest.fixture(scope="session")
def shared_containerd(registry, runnable_images, tmp_path_factory):
    """One containerd for the session (tests use it through `containerd`): the pause fixture as sandbox image, the
    session registry reachable over plain HTTP."""
    import containerd_helpers
    ctd = containerd_helpers.Containerd(str(tmp_path_factory.mktemp("containerd")), runnable_images["pause"].ref(),
                                        registries=[registry.host])
    try:
        ctd.start()
        yield ctd
    finally:
        ctd.cleanup()


@pytest.fixture
def containerd(request, shared_containerd):
    """The session's containerd, for tests that neither stop, kill nor wipe it (those use containerd_factory); the
    report of a failing test gets what containerd logged during the test."""
    _containerd_logs(request).append((shared_containerd.log, os.path.getsize(shared_containerd.log)))
    return shared_containerd


@pytest.fixture
def containerd_cri(containerd, cri, runtime_pb):
    """A CriRuntime on the session's containerd. A test must not leave pods behind: any left are removed and the
    test fails."""
    client = containerd.client(cri, runtime_pb)
    yield client
    try:
        left = client.remove_all_sandboxes()
    finally:
        client.close()
    assert not left, f"the test left pod sandboxes behind: {left}"


@pytest.fixture
def containerd_factory(request, registry, runnable_images, tmp_path):
    """Starts a containerd of the test's own, which it may stop, kill, restart or wipe:
    containerd_factory(registries=(), handlers=("runc",), start=True, **options), options being the other keyword
    arguments of containerd_helpers.Containerd (snapshotter, proxy_snapshotters, ...). The session registry is
    always reachable and the pause fixture is the sandbox image. Every instance is cleaned up at teardown (no
    process, mount or socket left) and a failing test's report gets its log."""
    import containerd_helpers
    made = []

    def make(registries=(), handlers=("runc",), start=True, **options):
        ctd = containerd_helpers.Containerd(str(tmp_path / f"containerd{len(made)}"), runnable_images["pause"].ref(),
                                            registries=[registry.host, *registries], handlers=handlers, **options)
        made.append(ctd)
        _containerd_logs(request).append((ctd.log, 0))
        return ctd.start() if start else ctd

    yield make
    for ctd in made:
        ctd.cleanup()
