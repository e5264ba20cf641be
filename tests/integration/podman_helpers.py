"""Debian's podman (4.3, containers/storage 1.43) as the tests' reader of containers-storage trees: crimage publishes
what it pulls into a tree that CRI-O and podman read as an additional image store (storage.conf
`additionalimagestores`), and podman, which links the same containers/storage library as CRI-O, is the judge of
whether that tree is one they can use.

Each Podman has a private configuration and touches nothing of the host's: storage.conf (CONTAINERS_STORAGE_CONF:
the overlay driver, graphroot under the instance's directory, runroot in a short directory of its own under /tmp
(see __init__), the additional image stores it is given), containers.conf (CONTAINERS_CONF: runc, no network, file
events, tmp_dir and network_config_dir of its own), registries.conf (CONTAINERS_REGISTRIES_CONF: no
unqualified-search registries, so a short name never reaches a public registry; the test registries are marked
insecure) and an auth file of its own (REGISTRY_AUTH_FILE). Containers run with `--network none` under a cgroup
parent of the instance's own (removed at cleanup) and `--cgroups=no-conmon`. What the machine needs:

- runc, named explicitly: podman prefers crun where it is installed, and crun does not work with this machine's
  hybrid cgroup layout (crun is not installed here; without a runtime setting podman 4.3 takes runc).
- `default_ulimits = []`: podman raises RLIMIT_NOFILE by default, which needs the missing CAP_SYS_RESOURCE ("error
  setting rlimit type 7: operation not permitted").
- `--cgroups=disabled` is refused with runc ("requested OCI runtime runc is not compatible with NoCgroups"), hence a
  private cgroup parent.
- a short runroot: with one of 76 characters every `podman run` waited 20 s for conmon ("Exceeded conmon timeout
  waiting for container ... to exit"); 46 were fine.
- `podman image mount` answers "layer not known" for an image of an additional store; a container's rootfs
  (`podman create` + `podman mount`) is used to look at an image's files instead.

The one thing of the host's podman writes is c/image's blob-info cache, /var/lib/containers/cache/
blob-info-cache-v1.boltdb (root's path; podman 4.3 offers no setting for it): it records which blob was seen at which
registry, 127.0.0.1 ones here.

The packaged storage.conf fragment (packaging/config/storage-crimage.conf, installed under
/usr/share/crimage/config, CRIMAGE_SNIPPETS in tests/packaging/run) is what an operator merges into
/etc/containers/storage.conf: a Podman reading a crimage tree gets its storage.conf built from that fragment, with
the packaged tree /var/lib/crimage/containers-storage replaced by the test's (see storage_conf()).
"""

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
import tomllib
import uuid

from conftest import REPO
from containerd_helpers import _merge, _toml_dump, remove_cgroups, unmount_all

PODMAN = shutil.which("podman") or "/usr/bin/podman"
RUNC = "/usr/sbin/runc"
PODMAN_TIMEOUT = 120  # seconds, every podman command

# The packaged storage.conf fragment and the tree it names.
PACKAGED_STORAGE_SNIPPET = "storage-crimage.conf"
PACKAGED_CS_ROOT = "/var/lib/crimage/containers-storage"


def packaged_storage_snippet():
    """The path of the packaged storage.conf fragment: the installed one with CRIMAGE_SNIPPETS, else the
    repository's packaging/config/storage-crimage.conf; None when there is none (then storage.conf is written from
    scratch)."""
    snippets = os.environ.get("CRIMAGE_SNIPPETS")
    candidates = [os.path.join(snippets, PACKAGED_STORAGE_SNIPPET)] if snippets else []
    candidates.append(os.path.join(REPO, "packaging", "config", PACKAGED_STORAGE_SNIPPET))
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


def _replace_strings(value, old, new):
    """`value` (TOML data) with every string equal to `old`, or under it, pointing at `new` instead; returns (the
    new value, how many strings changed)."""
    if isinstance(value, str):
        base = old.rstrip("/")
        if value == old or value == base:
            return new, 1
        if value.startswith(base + "/"):
            return new.rstrip("/") + value[len(base):], 1
        return value, 0
    if isinstance(value, list):
        out, n = [], 0
        for v in value:
            v, k = _replace_strings(v, old, new)
            out.append(v)
            n += k
        return out, n
    if isinstance(value, dict):
        out, n = {}, 0
        for key, v in value.items():
            v, k = _replace_strings(v, old, new)
            out[key] = v
            n += k
        return out, n
    return value, 0


def storage_conf(graphroot, runroot, additional_stores=(), crimage_store=None):
    """storage.conf for a private podman: the overlay driver on `graphroot`/`runroot`, reading
    `additional_stores` and, when given, the crimage tree `crimage_store` as additional image stores.

    With a crimage tree and a packaged fragment (packaged_storage_snippet()), the fragment is merged key by key as
    an operator merges it into /etc/containers/storage.conf, /var/lib/crimage/containers-storage becoming
    `crimage_store`; the fragment must name that tree. graphroot and runroot stay the test's whatever it says."""
    conf = {"storage": {"driver": "overlay", "graphroot": graphroot, "runroot": runroot,
                        "options": {"additionalimagestores": list(additional_stores)}}}
    if crimage_store is not None:
        path = packaged_storage_snippet()
        if path is None:
            conf["storage"]["options"]["additionalimagestores"].insert(0, crimage_store)
        else:
            with open(path, "rb") as f:
                snippet = tomllib.load(f)
            snippet, replaced = _replace_strings(snippet, PACKAGED_CS_ROOT, crimage_store)
            stores = snippet.get("storage", {}).get("options", {}).get("additionalimagestores", [])
            if not replaced or crimage_store not in stores:
                raise AssertionError(f"{path} does not name {PACKAGED_CS_ROOT} in [storage.options] "
                                     f"additionalimagestores: {snippet}")
            others = [s for s in additional_stores if s not in stores]
            _merge(conf, snippet)
            conf["storage"]["options"]["additionalimagestores"] = stores + others
            conf["storage"]["graphroot"] = graphroot
            conf["storage"]["runroot"] = runroot
    return _toml_dump(conf) + "\n"


class PodmanError(AssertionError):
    pass


class Podman:
    """podman with a configuration, store and state of its own under `workdir`; `additional_stores` (paths) and
    `crimage_store` (a crimage tree, see storage_conf()) are its additional image stores; `registries` (host:port)
    are reached over plain HTTP."""

    def __init__(self, workdir, additional_stores=(), crimage_store=None, registries=()):
        self.workdir = os.path.abspath(workdir)
        self.graphroot = os.path.join(self.workdir, "graph")
        # runroot and tmp_dir in a short directory of their own: with a runroot of 76 characters (under pytest's
        # tmp_path) every `podman run` waited 20 s for conmon ("Exceeded conmon timeout waiting for container
        # ... to exit"), conmon's sockets and fifos there being limited in length.
        self.shortdir = tempfile.mkdtemp(prefix="crimage-pm-", dir="/tmp")
        self.runroot = os.path.join(self.shortdir, "run")
        self.cgroup_parent = f"/crimage-podman-{uuid.uuid4().hex[:12]}"
        cfg = os.path.join(self.workdir, "config")
        tmp = os.path.join(self.workdir, "tmp")
        for d in (cfg, tmp, self.graphroot, self.runroot):
            os.makedirs(d, exist_ok=True)
        self.storage_conf = os.path.join(cfg, "storage.conf")
        with open(self.storage_conf, "w") as f:
            f.write(storage_conf(self.graphroot, self.runroot, additional_stores, crimage_store))
        self.containers_conf = os.path.join(cfg, "containers.conf")
        with open(self.containers_conf, "w") as f:
            f.write(_toml_dump({
                "containers": {"default_ulimits": [], "netns": "none", "cgroups": "no-conmon"},
                "engine": {"runtime": "runc", "cgroup_manager": "cgroupfs", "events_logger": "file",
                           "events_logfile_path": os.path.join(self.workdir, "events.log"),
                           "tmp_dir": os.path.join(self.shortdir, "tmp"),
                           "volume_path": os.path.join(self.workdir, "volumes"),
                           "runtimes": {"runc": [RUNC]}},
                "network": {"network_config_dir": os.path.join(self.workdir, "networks")},
            }) + "\n")
        self.registries_conf = os.path.join(cfg, "registries.conf")
        with open(self.registries_conf, "w") as f:
            f.write(_toml_dump({"unqualified-search-registries": []}) + "\n")
            for host in registries:
                f.write(f'\n[[registry]]\nlocation = "{host}"\ninsecure = true\n')
        self.auth_file = os.path.join(cfg, "auth.json")
        with open(self.auth_file, "w") as f:
            f.write('{"auths": {}}\n')
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=self.storage_conf, CONTAINERS_CONF=self.containers_conf,
                        CONTAINERS_REGISTRIES_CONF=self.registries_conf, REGISTRY_AUTH_FILE=self.auth_file,
                        TMPDIR=tmp)
        self.env.pop("CONTAINER_HOST", None)
        self.env.pop("CONTAINER_CONNECTION", None)
        self.log = []  # (argv, returncode, stdout, stderr, seconds) of every command

    # ---- running podman ----

    def cmd(self, *args, check=True, timeout=PODMAN_TIMEOUT):
        """Runs `podman args...`; returns the CompletedProcess (text). With `check`, a nonzero status raises
        PodmanError with the command and its stderr."""
        argv = [PODMAN, *args]
        start = time.monotonic()
        r = subprocess.run(argv, env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
        self.log.append((argv, r.returncode, r.stdout, r.stderr, time.monotonic() - start))
        if check and r.returncode != 0:
            raise PodmanError(f"{' '.join(argv)} exited with {r.returncode}:\n{r.stderr}{r.stdout}")
        return r

    def history(self):
        """The last commands with their status, duration and stderr, for failure messages."""
        return "\n".join(f"$ {' '.join(a)}  -> {rc} in {t:.1f} s\n{err}" for a, rc, _, err, t in self.log[-20:])

    def pull(self, ref):
        """`podman pull` into this instance's own store; returns the image ID podman printed."""
        r = self.cmd("pull", "--quiet", "--tls-verify=false", ref)
        return r.stdout.strip().splitlines()[-1]

    def inspect(self, ref):
        """`podman image inspect` of `ref` (a name or an ID), or None when podman knows no such image."""
        r = self.cmd("image", "inspect", ref, check=False)
        if r.returncode != 0:
            if "image not known" in r.stderr or "no such image" in r.stderr.lower():
                return None
            raise PodmanError(f"podman image inspect {ref} exited with {r.returncode}:\n{r.stderr}")
        return json.loads(r.stdout)[0]

    def exists(self, ref):
        return self.cmd("image", "exists", ref, check=False).returncode == 0

    def images(self):
        """Every image podman lists: [{"id", "names", "digest", "read_only"}], IDs without "sha256:"."""
        r = self.cmd("images", "--all", "--no-trunc", "--format",
                     "{{.ID}}\t{{.ReadOnly}}\t{{.Digest}}\t{{json .Names}}")
        out = []
        for line in r.stdout.splitlines():
            if not line.strip():
                continue
            image_id, read_only, digest, names = line.split("\t", 3)
            out.append({"id": image_id.split(":", 1)[-1], "read_only": read_only == "true", "digest": digest,
                        "names": json.loads(names) or []})
        return out

    def image_ids(self):
        return {img["id"] for img in self.images()}

    @staticmethod
    def top_layer(inspected):
        """The ID of an inspected image's top layer (podman 4.3's inspect has no TopLayer: its GraphDriver
        UpperDir is <store>/overlay/<top layer>/diff)."""
        return os.path.basename(os.path.dirname(inspected["GraphDriver"]["Data"]["UpperDir"]))

    def _container_args(self):
        return ["--network", "none", "--runtime", "runc", "--cgroup-parent", self.cgroup_parent,
                "--cgroups", "no-conmon"]

    def run(self, image, *command):
        """`podman run --rm` of `image` (its own command unless `command`): returns (exit status, stdout,
        stderr)."""
        r = self.cmd("run", "--rm", *self._container_args(), image, *command, check=False)
        return r.returncode, r.stdout, r.stderr

    @contextlib.contextmanager
    def rootfs(self, image):
        """The root filesystem a container of `image` starts with (`podman create` + `podman mount`, before
        anything ran in it), as a path; unmounted and removed afterwards."""
        cid = self.cmd("create", *self._container_args(), image).stdout.strip().splitlines()[-1]
        try:
            yield self.cmd("mount", cid).stdout.strip()
        finally:
            self.cmd("umount", cid, check=False)
            self.cmd("rm", "--force", cid, check=False)

    def cleanup(self):
        """Removes this instance's containers, mounts and cgroups (its files stay for the test's tmp_path)."""
        if os.path.isdir(self.graphroot):
            self.cmd("rm", "--all", "--force", check=False)
        unmount_all(self.workdir, self.shortdir)
        remove_cgroups(self.cgroup_parent)
        shutil.rmtree(self.shortdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# A containers-storage tree as files


class StorageTree:
    """The overlay-driver files of a containers-storage tree at `root` (a podman graphroot or crimage's tree)."""

    def __init__(self, root):
        self.root = root

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def _load(self, *parts):
        p = self.path(*parts)
        if not os.path.exists(p):
            return []
        with open(p) as f:
            text = f.read()
        return json.loads(text) if text.strip() else []

    def images(self):
        """overlay-images/images.json ([] when absent)."""
        return self._load("overlay-images", "images.json")

    def layers(self):
        """overlay-layers/layers.json ([] when absent)."""
        return self._load("overlay-layers", "layers.json")

    def image(self, image_id):
        return next((i for i in self.images() if i["id"] == image_id), None)

    def layer(self, layer_id):
        return next((lay for lay in self.layers() if lay["id"] == layer_id), None)

    def chain(self, top_layer):
        """Layer IDs from the base to `top_layer`, following the parents in layers.json."""
        by_id = {lay["id"]: lay for lay in self.layers()}
        out, lid = [], top_layer
        while lid:
            out.append(lid)
            lid = by_id[lid].get("parent", "")
        return out[::-1]

    def lock_marker(self, which="images"):
        """The first 64 bytes of overlay-<which>/<which>.lock: the last writer's ID, which readers compare to
        reload."""
        with open(self.path(f"overlay-{which}", f"{which}.lock"), "rb") as f:
            return f.read(64)

    def overlay_dirs(self):
        """The layer directories under overlay/ (not l/)."""
        d = self.path("overlay")
        if not os.path.isdir(d):
            return set()
        return {n for n in os.listdir(d) if n != "l" and os.path.isdir(os.path.join(d, n))}

    def short_links(self):
        """overlay/l/: {short name: link target}."""
        d = self.path("overlay", "l")
        if not os.path.isdir(d):
            return {}
        return {n: os.readlink(os.path.join(d, n)) for n in os.listdir(d)}


def expected_layer_ids(image):
    """containers/storage's layer IDs for `image` (a fixtures.Image), base first: the base layer's diff_id, then
    sha256("<parent ID>+<diff_id>") (hex, as c/image's storage destination computes them)."""
    ids, parent = [], None
    for layer in image.layers:
        hexid = layer.diff_id.split(":", 1)[1]
        lid = hexid if parent is None else hashlib.sha256(f"{parent}+{hexid}".encode()).hexdigest()
        ids.append(lid)
        parent = lid
    return ids


def hex_of(digest):
    return digest.split(":", 1)[1]


# ---------------------------------------------------------------------------------------------------------------
# Comparing trees


def describe_tree(root):
    """path -> (type, mode, uid, gid, size, sha256 or link target) of the tree under `root`, not following symlinks
    (directory timestamps left out: an overlay shows the upper directory's)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            else:
                what = None
            out[rel] = (stat.S_IFMT(st.st_mode), oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
                        st.st_size if stat.S_ISREG(st.st_mode) else None, what)
    return out


def tree_differences(want, got):
    """What differs between two describe_tree() results, one line each."""
    problems = []
    for p in sorted(set(want) | set(got)):
        if p not in got:
            problems.append(f"missing: {p} {want[p]}")
        elif p not in want:
            problems.append(f"extra: {p} {got[p]}")
        elif want[p] != got[p]:
            problems.append(f"differs: {p}: {want[p]} != {got[p]}")
    return problems
