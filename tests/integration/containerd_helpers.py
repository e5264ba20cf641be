"""Debian's containerd (1.6, with its CRI plugin, runc and containerd-shim-runc-v2) as the tests' container runtime,
and a CRI client for it: the integration tests run pods the way kubelet does, to prove that what crimage pulled is
what containerd runs.

Each Containerd has a root, a state directory and a socket of its own and touches nothing of the host's: plugins
that would (modprobe, /opt/containerd, btrfs, zfs, devmapper) are disabled, CNI looks only at an empty private
directory (pods use the host network), runc keeps its state under the private state directory and the stream
server listens on a random port of 127.0.0.1. The one exception is containerd 1.6's own: every shim
puts its socket in /run/containerd/s whatever the state directory, so cleanup() removes the sockets of the shims
this instance started and the directories when they are empty and did not exist before.

The machine lacks CAP_SYS_RESOURCE, so containerd runs with restrict_oom_score_adj (a sandbox's -998 would be
refused). Pods get a cgroup parent of their containerd's own, as kubelet gives its kubepods one (without one,
containerd would put every container in /k8s.io/<id> of each hierarchy, a directory shared with any other
containerd); cleanup() removes it from every cgroup hierarchy.
"""

import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import grpc

from conftest import (HERE, READY_TIMEOUT, REPO, RPC_TIMEOUT, STOP_TIMEOUT, CriClient, generate_proto_module,
                      wait_for)

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"
SHIM = "containerd-shim-runc-v2"
NAMESPACE = "k8s.io"  # the namespace of the CRI plugin
RUNTIME_SERVICE = "runtime.v1.RuntimeService"
# containerd 1.6 keeps every shim's socket here, as sha256(<containerd socket>/<namespace>/<id>).
SHIM_SOCKET_DIR = "/run/containerd/s"
SHIM_SOCKET_PARENT = os.path.dirname(SHIM_SOCKET_DIR)

# Plugins that would touch the host: modprobe (aufs), /opt/containerd (opt) and filesystems or devices the tests
# do not use. The legacy v1 runtime stays: the tasks service needs it loaded (it gets private directories below).
DISABLED_PLUGINS = [
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.internal.v1.opt",
]

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _toml(s):
    """A TOML basic string (its escapes are JSON's for the paths and names used here)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return _toml(str(v))


def _toml_dump(d, prefix=()):
    """TOML for nested dicts of strings, numbers, booleans and lists (what containerd's config holds)."""
    out = [f"{_toml(k) if not k.isidentifier() else k} = {_toml_value(v)}" for k, v in d.items()
           if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            name = prefix + (k,)
            out.append("[" + ".".join(_toml(p) if not p.replace("_", "a").isalnum() else p for p in name) + "]")
            out.append(_toml_dump(v, name))
    return "\n".join(line for line in out if line)


def _merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def merge_packaged_snippet(text):
    """With CRIMAGE_SNIPPETS (tests/packaging/run: the installed /usr/share/crimage/config), the packaged
    containerd-crimage.toml is merged into the test's containerd config key by key, as an operator merges it into
    /etc/containerd/config.toml (containerd's own `imports` would replace whole plugin sections)."""
    snippets = os.environ.get("CRIMAGE_SNIPPETS")
    if not snippets:
        return text
    import tomllib
    with open(os.path.join(snippets, "containerd-crimage.toml"), "rb") as f:
        snippet = tomllib.load(f)
    snippet.pop("version", None)
    return _toml_dump(_merge(tomllib.loads(text), snippet)) + "\n"


def _unescape_mountinfo(field):
    """/proc/self/mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(*dirs):
    """Mount points at or below any of `dirs`, deepest first."""
    prefixes = [os.path.realpath(d).rstrip("/") for d in dirs]
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount_all(*dirs):
    """Detaches every mount at or below `dirs` (overlay rootfs, sandbox shm, ...); returns what was mounted."""
    points = mounts_under(*dirs)
    for point in points:
        if _libc.umount2(point.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (22, 2):  # EINVAL: no longer a mount point (a parent went first); ENOENT: gone
                raise OSError(err, f"umount2 {point}: {os.strerror(err)}")
    return points


def cgroup_mounts():
    """Mount points of the cgroup hierarchies (v1 controllers and the v2 unified one)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2"):
                points.append(_unescape_mountinfo(fields[4]))
    return points


def remove_cgroups(parent):
    """Removes the cgroup `parent` (an absolute cgroup path) and everything below it from every hierarchy; their
    processes must be gone. Returns the directories that were there."""
    removed = []
    for mount in cgroup_mounts():
        top = os.path.join(mount, parent.lstrip("/"))
        if not os.path.isdir(top):
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
            os.rmdir(dirpath)  # a cgroup directory goes with its control files
            removed.append(dirpath)
    return removed


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _flag(args, name):
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def shims_of(socket_path):
    """{pid: (namespace, id)} of the containerd-shim-runc-v2 processes serving the containerd at `socket_path`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        args = _cmdline(entry)
        if args and os.path.basename(args[0]) == SHIM and _flag(args, "-address") == socket_path:
            found[int(entry)] = (_flag(args, "-namespace"), _flag(args, "-id"))
    return found


def shim_socket(socket_path, namespace, task_id):
    """Where containerd 1.6 puts the socket of the shim for `task_id`."""
    digest = hashlib.sha256(os.path.join(socket_path, namespace, task_id).encode()).hexdigest()
    return os.path.join(SHIM_SOCKET_DIR, digest)


def _alive(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pids, timeout):
    """Waits until `pids` are gone. They are not our children: init reaps them, so a zombie may linger a little;
    it must not still be running after `timeout` s."""
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    running = [pid for pid in pids if _alive(pid)]
    if running:
        raise RuntimeError(f"processes {running} still run {timeout} s after SIGKILL")


def _kill_and_wait(pids, timeout):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_gone(pids, timeout)


class Containerd:
    """containerd on a private root, state directory and socket, its CRI plugin configured for the tests.

    `sandbox_image` is the pause image (a runnable fixture in the test registry); `registries` are host:port of
    plain-HTTP registries containerd's own pulls may use (RunPodSandbox pulls the sandbox image itself; comparison
    tests call containerd's PullImage); `handlers` are the runtime handlers (RuntimeClasses) it serves, all runc.
    `proxy_snapshotters` ({name: socket}) are snapshotters containerd reaches over their own socket
    (`[proxy_plugins.<name>] type = "snapshot"`); `snapshotter` is the one its CRI plugin unpacks images into and
    creates containers from (overlayfs, or one of those names). The log (containerd and its shims) is `log`."""

    def __init__(self, workdir, sandbox_image, registries=(), handlers=("runc",), log_level="debug",
                 snapshotter="overlayfs", proxy_snapshotters=None, auto_gc=True):
        self.workdir = workdir
        self.sandbox_image = sandbox_image
        self.registries = list(registries)
        self.handlers = list(handlers)
        self.log_level = log_level
        self.snapshotter = snapshotter
        self.proxy_snapshotters = dict(proxy_snapshotters or {})
        self.auto_gc = auto_gc
        os.makedirs(workdir, exist_ok=True)
        # unix socket paths are limited to 107 bytes; the state holds the shims' fifos and runc's state: both short
        self.sockdir = tempfile.mkdtemp(prefix="crimage-ctd-", dir="/tmp")
        self.socket = os.path.join(self.sockdir, "containerd.sock")
        self.state = os.path.join(self.sockdir, "state")
        self.root = os.path.join(workdir, "root")
        self.cgroup_parent = "/" + os.path.basename(self.sockdir)
        self.config_path = os.path.join(workdir, "containerd.toml")
        self.log = os.path.join(workdir, "containerd.log")
        self.proc = None
        self.task_ids = set()  # (namespace, id) of every task a shim served, for the shim sockets left behind
        self.orphans = set()  # pids of the containers kill() left running, for cleanup to wait for
        self._shim_dirs_existed = (os.path.exists(SHIM_SOCKET_PARENT), os.path.exists(SHIM_SOCKET_DIR))

    def config_text(self):
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        lines = [
            "version = 2",
            f"root = {_toml(self.root)}",
            f"state = {_toml(self.state)}",
            f"temp = {_toml(os.path.join(self.workdir, 'tmp'))}",
            "disabled_plugins = [" + ", ".join(_toml(p) for p in DISABLED_PLUGINS) + "]",
            "[grpc]",
            f"  address = {_toml(self.socket)}",
            "[debug]",
            f"  level = {_toml(self.log_level)}",
            '[plugins."io.containerd.runtime.v1.linux"]',
            f"  runtime_root = {_toml(os.path.join(self.state, 'runc-v1'))}",
            f"[{cri}]",
            f"  sandbox_image = {_toml(self.sandbox_image)}",
            "  restrict_oom_score_adj = true",
            "  disable_apparmor = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            f"[{cri}.containerd]",
            f"  snapshotter = {_toml(self.snapshotter)}",
            f"  default_runtime_name = {_toml(self.handlers[0])}",
        ]
        for h in self.handlers:
            lines += [
                f"[{cri}.containerd.runtimes.{_toml(h)}]",
                '  runtime_type = "io.containerd.runc.v2"',
                f"[{cri}.containerd.runtimes.{_toml(h)}.options]",
                f"  Root = {_toml(os.path.join(self.state, 'runc'))}",
            ]
        lines += [
            f"[{cri}.cni]",
            f"  bin_dir = {_toml(os.path.join(self.workdir, 'cni', 'bin'))}",
            f"  conf_dir = {_toml(os.path.join(self.workdir, 'cni', 'net.d'))}",
        ]
        for host in self.registries:
            lines += [f"[{cri}.registry.mirrors.{_toml(host)}]", f"  endpoint = [{_toml('http://' + host)}]"]
        for name, address in self.proxy_snapshotters.items():
            lines += [f"[proxy_plugins.{_toml(name)}]", '  type = "snapshot"', f"  address = {_toml(address)}"]
        if not self.auto_gc:
            # Snapshots made with ctr are unreferenced once ctr's lease ends; containerd's scheduler collects them
            # after 100 metadata changes. A test that lists them afterwards turns that off.
            lines += ['[plugins."io.containerd.gc.v1.scheduler"]', "  mutation_threshold = 1000000000",
                      "  deletion_threshold = 0"]
        return "\n".join(lines) + "\n"

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _cri_answers(self):
        """True once the CRI plugin answers Version (it starts after the socket is up)."""
        channel = grpc.insecure_channel("unix:" + self.socket)
        try:
            stub = channel.unary_unary(f"/{RUNTIME_SERVICE}/Version", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            stub(b"", timeout=2)
            return True
        except grpc.RpcError:
            return False
        finally:
            channel.close()

    def start(self):
        """Starts containerd and waits until its CRI plugin answers."""
        if self.running():
            raise RuntimeError("containerd is already running")
        os.makedirs(os.path.join(self.workdir, "tmp"), exist_ok=True)
        with open(self.config_path, "w") as f:
            f.write(merge_packaged_snippet(self.config_text()))
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([CONTAINERD, "--config", self.config_path], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir)
        logf.close()
        try:
            wait_for(self._cri_answers, READY_TIMEOUT, "containerd", self.proc, self.log)
        except RuntimeError:
            self.kill()
            raise
        return self

    def _note_shims(self):
        shims = shims_of(self.socket)
        self.task_ids.update(shims.values())
        return shims

    def stop(self):
        """SIGTERM (SIGKILL after a while): containerd ends, its shims and containers keep running, as on a node.
        Returns containerd's exit status."""
        self._note_shims()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        status, self.proc = self.proc.returncode, None
        return status

    def kill(self):
        """SIGKILL for containerd and every shim it started: a crash. The containers' processes are orphaned and
        keep running until containerd, started again, cleans up after the dead shims (or cleanup() does)."""
        shims = self._note_shims()
        self.orphans.update(pid for pid in self._container_pids().values() if pid)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
            self.proc = None
        _kill_and_wait(list(shims), STOP_TIMEOUT)

    def restart(self):
        """stop() then start(): containerd reconnects to the shims that kept running."""
        self.stop()
        return self.start()

    def _runc_roots(self):
        base = os.path.join(self.state, "runc")
        if not os.path.isdir(base):
            return []
        return [os.path.join(base, ns) for ns in sorted(os.listdir(base))]

    def _bundle_ids(self):
        base = os.path.join(self.state, "io.containerd.runtime.v2.task")
        if not os.path.isdir(base):
            return set()
        return {(ns, task_id) for ns in os.listdir(base) for task_id in os.listdir(os.path.join(base, ns))}

    def _runc(self, root, *args):
        return subprocess.run([RUNC, "--root", root, *args], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    def _container_pids(self):
        """{(runc root, container id): pid of its init} for what runc knows."""
        pids = {}
        for root in self._runc_roots():
            for cid in sorted(os.listdir(root)):
                state = self._runc(root, "state", cid)
                pids[(root, cid)] = json.loads(state.stdout).get("pid", 0) if state.returncode == 0 else 0
        return pids

    def _force_delete_containers(self):
        """runc delete --force for every container runc still knows (kills its processes, removes its cgroups),
        then waits until those and the containers orphaned by kill() are gone."""
        pids = self._container_pids()
        for root, cid in pids:
            r = self._runc(root, "delete", "--force", cid)
            if r.returncode != 0 and os.path.exists(os.path.join(root, cid)):
                raise RuntimeError(f"runc delete --force {cid} failed: {r.stderr}")
        _wait_gone([pid for pid in {*pids.values(), *self.orphans} if pid], STOP_TIMEOUT)
        self.orphans.clear()

    def _remove_shim_sockets(self):
        for ns, task_id in self.task_ids | self._bundle_ids():
            try:
                os.unlink(shim_socket(self.socket, ns, task_id))
            except FileNotFoundError:
                pass
        for path, existed in ((SHIM_SOCKET_DIR, self._shim_dirs_existed[1]),
                              (SHIM_SOCKET_PARENT, self._shim_dirs_existed[0])):
            if not existed:
                try:
                    os.rmdir(path)
                except OSError:  # not empty (another containerd's shims) or already gone
                    pass

    def wipe_root(self):
        """Kills containerd, its shims and containers, unmounts what they mounted and removes root, state and the
        pods' cgroups: the next start() finds nothing, like a node whose containerd root was wiped."""
        self.kill()
        self._force_delete_containers()
        remove_cgroups(self.cgroup_parent)
        unmount_all(self.root, self.state)
        self._remove_shim_sockets()
        leftover = mounts_under(self.root, self.state)
        if leftover:
            raise RuntimeError(f"still mounted after unmounting: {leftover}")
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)

    def cleanup(self):
        """wipe_root(), then removes the socket directory: no process, mount or socket of this instance is left.
        Its log and config stay in the workdir."""
        self.wipe_root()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    # ---- ctr ----

    def ctr(self, *args, namespace=NAMESPACE, check=True, timeout=60):
        """Runs `ctr --address <socket> -n <namespace> args...`; returns the CompletedProcess (text)."""
        r = subprocess.run([CTR, "--address", self.socket, "-n", namespace, *args], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def images(self, namespace=NAMESPACE):
        """The image names in `namespace` (`ctr images ls -q`)."""
        return set(self.ctr("images", "ls", "-q", namespace=namespace).stdout.split())

    def content(self, namespace=NAMESPACE):
        """The digests of the blobs in `namespace`'s content store (`ctr content ls -q`)."""
        return set(self.ctr("content", "ls", "-q", namespace=namespace).stdout.split())

    def client(self, cri, rt, timeout=RPC_TIMEOUT):
        """A CriRuntime on this containerd's socket whose pods get this instance's cgroup parent."""
        return CriRuntime(cri, rt, self.socket, timeout, cgroup_parent=self.cgroup_parent)


# ---------------------------------------------------------------------------------------------------------------
# CRI RuntimeService client


def generate_runtime_module(outdir, cri):
    """Compiles protos/cri_runtime.proto (the RuntimeService subset, importing cri/api.proto) into `outdir`; its
    messages share the already loaded `cri` module's classes for what comes from api.proto."""
    return generate_proto_module(
        outdir, "cri_runtime.proto", "crimage_cri_runtime_pb2",
        lambda mod: mod.RunPodSandboxRequest(config=cri.PodSandboxConfig(log_directory="/x")).SerializeToString(),
        subdir="rtgen", proto_dir=os.path.join(HERE, "protos"), include_dirs=[os.path.join(REPO, "cri")],
        deps={"api_pb2": cri})


def parse_cri_log(text):
    """The output in a CRI log file: lines "<timestamp> <stream> <P|F> <text>"; P (partial) lines continue in the
    next one, F ends a line."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3:
            continue
        out.append(parts[3] if len(parts) == 4 else "")
        if parts[2] == "F":
            out.append("\n")
    return "".join(out)


def read_cri_log(path):
    """The output in the CRI log file at `path`; "" while there is none."""
    try:
        with open(path, errors="replace") as f:
            return parse_cri_log(f.read())
    except FileNotFoundError:
        return ""


class PodRunError(RuntimeError):
    """A container did not exit in time."""


class CriRuntime(CriClient):
    """A CRI client for containerd: the ImageService calls of CriClient (cri is the api.proto module) plus the
    RuntimeService calls of `rt` (the cri_runtime.proto module). The pods it configures get `cgroup_parent` (use
    Containerd.client(), which passes the instance's own). Every call has a deadline."""

    RUNTIME_RESPONSES = {
        "Version": "VersionResponse",
        "RunPodSandbox": "RunPodSandboxResponse",
        "StopPodSandbox": "StopPodSandboxResponse",
        "RemovePodSandbox": "RemovePodSandboxResponse",
        "PodSandboxStatus": "PodSandboxStatusResponse",
        "ListPodSandbox": "ListPodSandboxResponse",
        "CreateContainer": "CreateContainerResponse",
        "StartContainer": "StartContainerResponse",
        "StopContainer": "StopContainerResponse",
        "RemoveContainer": "RemoveContainerResponse",
        "ListContainers": "ListContainersResponse",
        "ContainerStatus": "ContainerStatusResponse",
    }

    def __init__(self, cri, rt, socket_path, timeout=RPC_TIMEOUT, cgroup_parent=""):
        super().__init__(cri, socket_path, timeout)
        self.rt = rt
        self.cgroup_parent = cgroup_parent

    def rcall(self, method, request, timeout=None):
        resp_cls = getattr(self.rt, self.RUNTIME_RESPONSES[method])
        stub = self.channel.unary_unary(f"/{RUNTIME_SERVICE}/{method}",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=resp_cls.FromString)
        return stub(request, timeout=timeout or self.timeout)

    def version(self):
        return self.rcall("Version", self.rt.VersionRequest(version="v1"))

    def sandbox_config(self, name, log_directory, uid=None):
        """A PodSandboxConfig as kubelet sends for a host-network pod: network NODE, pid CONTAINER, ipc POD (the
        CRI defaults kubelet spells out), the client's cgroup parent."""
        pb = self.pb
        ns = pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD)
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid or uuid.uuid4().hex, namespace="default"),
            log_directory=log_directory,
            labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": "default"},
            linux=pb.LinuxPodSandboxConfig(cgroup_parent=self.cgroup_parent,
                                           security_context=pb.LinuxSandboxSecurityContext(namespace_options=ns)))

    def container_config(self, name, image, user_image="", handler="", command=(), args=()):
        """A ContainerConfig as kubelet sends: the image by the ID the image service returned, the reference the
        pod spec names as user_specified_image, the log at <name>/0.log of the pod's log directory."""
        pb, rt = self.pb, self.rt
        ns = pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD)
        return rt.ContainerConfig(
            metadata=rt.ContainerMetadata(name=name),
            image=pb.ImageSpec(image=image, user_specified_image=user_image, runtime_handler=handler),
            command=list(command), args=list(args), log_path=f"{name}/0.log",
            labels={"io.kubernetes.container.name": name},
            linux=rt.LinuxContainerConfig(security_context=rt.LinuxContainerSecurityContext(namespace_options=ns)))

    def run_sandbox(self, config, handler=""):
        return self.rcall("RunPodSandbox", self.rt.RunPodSandboxRequest(config=config, runtime_handler=handler),
                          ).pod_sandbox_id

    def stop_sandbox(self, pod_id):
        self.rcall("StopPodSandbox", self.rt.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_sandbox(self, pod_id):
        self.rcall("RemovePodSandbox", self.rt.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def sandbox_status(self, pod_id):
        return self.rcall("PodSandboxStatus", self.rt.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status

    def list_sandboxes(self):
        return list(self.rcall("ListPodSandbox", self.rt.ListPodSandboxRequest()).items)

    def create_container(self, pod_id, config, sandbox_config):
        req = self.rt.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config)
        return self.rcall("CreateContainer", req).container_id

    def start_container(self, cid):
        self.rcall("StartContainer", self.rt.StartContainerRequest(container_id=cid))

    def stop_container(self, cid, timeout=0):
        self.rcall("StopContainer", self.rt.StopContainerRequest(container_id=cid, timeout=timeout))

    def remove_container(self, cid):
        self.rcall("RemoveContainer", self.rt.RemoveContainerRequest(container_id=cid))

    def container_status(self, cid):
        return self.rcall("ContainerStatus", self.rt.ContainerStatusRequest(container_id=cid)).status

    def list_containers(self, pod_id=""):
        req = self.rt.ListContainersRequest(filter=self.rt.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self.rcall("ListContainers", req).containers)

    def wait_exited(self, cid, timeout):
        """Polls ContainerStatus until the container has exited; returns that status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(cid)
            if status.state == self.rt.CONTAINER_EXITED:
                return status
            if time.monotonic() > deadline:
                raise PodRunError(f"container {cid} has not exited after {timeout} s: state "
                                  f"{self.rt.ContainerState.Name(status.state)} {status.reason} {status.message}")
            time.sleep(0.05)

    def run_pod(self, image, user_image="", handler="", command=(), args=(), name="app", timeout=60):
        """What kubelet does for a pod of one container that runs to completion: RunPodSandbox (host network, a
        temporary log directory), CreateContainer with `image` (the image ID the image service returned, or a
        reference), StartContainer, wait at most `timeout` s for the container to exit, read its log, then
        StopPodSandbox and RemovePodSandbox whatever happened. Returns (exit code, output): the output is the
        text of the CRI log, stdout and stderr as they came.

        containerd records the exit only after it has copied the container's output to the log (it waits for the
        output streams when it deletes the task), so the log is complete once ContainerStatus says
        CONTAINER_EXITED; 40000 lines on both streams arrive whole here."""
        log_dir = tempfile.mkdtemp(prefix="crimage-pod-logs-")
        log_path = os.path.join(log_dir, name, "0.log")
        sandbox = self.sandbox_config(f"{name}-pod", log_dir)
        pod_id = None
        try:
            pod_id = self.run_sandbox(sandbox, handler)
            cid = self.create_container(pod_id, self.container_config(name, image, user_image, handler, command,
                                                                      args), sandbox)
            self.start_container(cid)
            try:
                status = self.wait_exited(cid, timeout)
            except PodRunError as e:
                raise PodRunError(f"{e}; its output so far:\n{read_cri_log(log_path)}") from None
            return status.exit_code, read_cri_log(log_path)
        finally:
            if pod_id is not None:
                self.stop_sandbox(pod_id)
                self.remove_sandbox(pod_id)
            shutil.rmtree(log_dir, ignore_errors=True)

    def remove_all_sandboxes(self):
        """Stops and removes every pod sandbox; returns the IDs of those there were."""
        ids = [p.id for p in self.list_sandboxes()]
        for pod_id in ids:
            self.stop_sandbox(pod_id)
            self.remove_sandbox(pod_id)
        return ids


def log_since(path, offset, limit=30000):
    """The log at `path` from byte `offset` on (its last `limit` characters), for a failing test's report."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<{path}: {e}>"
    return text if len(text) <= limit else "...\n" + text[-limit:]
