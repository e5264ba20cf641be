"""crimage's snapshotter as containerd's proxy snapshotter: crimaged serves containerd's snapshot API on
snapshotterSocket, and a private containerd 1.6 uses it through `[proxy_plugins.crimage] type = "snapshot"`.

- `ctr snapshots --snapshotter crimage` prepare, view, mounts, commit, rm, ls, usage, info and label go through
  containerd's own metadata store to crimaged, and what Mounts returns is mounted here with mount(2) the way
  containerd mounts it (a layer written through one mount is seen through the next, overlay whiteouts included).
- Calls straight to the socket check what containerd's store hides: the error codes, List filters, Update masks,
  usage, Cleanup, bounds, and the remote-snapshot answer (Prepare with containerd.io/snapshot.ref of a known
  chain: ALREADY_EXISTS, nothing created).
- containerd's CRI with `snapshotter = "crimage"` pulls the runnable fixtures itself, unpacking every layer into
  crimage's snapshotter through Prepare and Commit, and runs them (the pause sandbox too); a container writes into
  the upper directory crimage owns; a second containerd on the same snapshotter finds the layers through the
  remote-snapshot protocol and unpacks nothing.
- crimaged SIGKILLed and started again: the snapshots are still there and containerd's calls still answer.
"""

import ctypes
import errno
import json
import os
import signal
import stat

import grpc
import pytest

import containerd_helpers as ch
import fixtures
from conftest import REPO, RPC_TIMEOUT, generate_proto_module, wait_for
from test_daemon import run_daemon_expecting_failure

SNAPSHOTTER = "crimage"
SERVICE = "containerd.services.snapshots.v1.Snapshots"
REF_LABEL = "containerd.io/snapshot.ref"

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
# What containerd's mount package (mount_linux.go) takes as flags; every other option is filesystem data.
MOUNT_FLAGS = {"ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False), "bind": (MS_BIND, True),
               "rbind": (MS_BIND | MS_REC, True)}


def mount_all(mounts, target):
    """Mounts what a snapshotter returned at `target` as containerd does: flags out of the options, a bind mount
    made read-only by a remount. `mounts` are (type, source, options) triples."""
    assert len(mounts) == 1, mounts
    typ, source, options = mounts[0]
    flags, data = 0, []
    for o in options:
        if o in MOUNT_FLAGS:
            bit, on = MOUNT_FLAGS[o]
            flags = flags | bit if on else flags & ~bit
        else:
            data.append(o)
    if _libc.mount(source.encode(), target.encode(), typ.encode(), flags, ",".join(data).encode() or None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {typ} {source} {target} {options}: {os.strerror(e)}")
    if flags & MS_BIND and flags & MS_RDONLY:
        if _libc.mount(None, target.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0:
            e = ctypes.get_errno()
            ch.unmount_all(target)
            raise OSError(e, f"remount {target} read-only: {os.strerror(e)}")


def mounted(mounts, target):
    """A context manager: mounts, then unmounts whatever happened."""
    class _Mounted:
        def __enter__(self):
            os.makedirs(target, exist_ok=True)
            mount_all(mounts, target)
            return target

        def __exit__(self, *exc):
            ch.unmount_all(target)
            return False
    return _Mounted()


def from_ctr_json(text):
    """The mounts ctr prints with --mounts, as (type, source, options)."""
    return [(m["Type"], m["Source"], m.get("Options") or []) for m in json.loads(text)]


def option(mounts, name):
    """The value of option `name`= of the only mount, None when absent."""
    for o in mounts[0][2]:
        if o.startswith(name + "="):
            return o[len(name) + 1:]
    return None


# ---------------------------------------------------------------------------------------------------------------
# A client of crimaged's snapshot socket, from the project's own protos


@pytest.fixture(scope="session")
def snap_pb(tmp_path_factory):
    """The generated messages of cri/containerd/snapshots.proto (and the types it imports)."""
    out = str(tmp_path_factory.mktemp("snap-gen"))
    protos = os.path.join(REPO, "cri", "containerd")
    wk = generate_proto_module(out, "wellknown.proto", "crimage_wellknown_pb2", lambda m: m.Empty(), subdir="wk",
                               proto_dir=protos)
    mnt = generate_proto_module(out, "mount.proto", "crimage_mount_pb2", lambda m: m.Mount(type="bind"),
                                subdir="mnt", proto_dir=protos)
    return generate_proto_module(out, "snapshots.proto", "crimage_snapshots_pb2",
                                 lambda m: m.Info(name="x").SerializeToString(), subdir="snap", proto_dir=protos,
                                 deps={"wellknown_pb2": wk, "mount_pb2": mnt})


class SnapClient:
    """containerd.services.snapshots.v1.Snapshots on a unix socket; every call has a deadline."""

    def __init__(self, pb, socket_path):
        self.pb = pb
        # A connection of its own: gRPC would otherwise share one with an earlier client of the same socket, which
        # may be the dead connection to a crimaged that was killed.
        # containerd's client takes messages of up to 16 MiB, and so does this one.
        self.channel = grpc.insecure_channel("unix:" + socket_path, options=[
            ("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 16 << 20)])

    def close(self):
        self.channel.close()

    def _unary(self, method, request, reply):
        stub = self.channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=reply)
        return stub(request, timeout=RPC_TIMEOUT)

    @staticmethod
    def _mounts(reply):
        return [(m.type, m.source, list(m.options)) for m in reply.mounts]

    def prepare(self, key, parent="", labels=None):
        req = self.pb.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent, labels=labels or {})
        return self._mounts(self._unary("Prepare", req, self.pb.PrepareSnapshotResponse.FromString))

    def view(self, key, parent="", labels=None):
        req = self.pb.ViewSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent, labels=labels or {})
        return self._mounts(self._unary("View", req, self.pb.ViewSnapshotResponse.FromString))

    def mounts(self, key):
        req = self.pb.MountsRequest(snapshotter=SNAPSHOTTER, key=key)
        return self._mounts(self._unary("Mounts", req, self.pb.MountsResponse.FromString))

    def commit(self, name, key, labels=None):
        req = self.pb.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=name, key=key, labels=labels or {})
        self._unary("Commit", req, lambda b: b)

    def remove(self, key):
        self._unary("Remove", self.pb.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key), lambda b: b)

    def stat(self, key):
        req = self.pb.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=key)
        return self._unary("Stat", req, self.pb.StatSnapshotResponse.FromString).info

    def update(self, name, labels, paths=()):
        req = self.pb.UpdateSnapshotRequest(snapshotter=SNAPSHOTTER, info=self.pb.Info(name=name, labels=labels))
        req.update_mask.paths.extend(paths)
        return self._unary("Update", req, self.pb.UpdateSnapshotResponse.FromString).info

    def list_batches(self, *filters):
        stub = self.channel.unary_stream(f"/{SERVICE}/List", request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=self.pb.ListSnapshotsResponse.FromString)
        return [list(msg.info) for msg in stub(self.pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER,
                                                                            filters=list(filters)),
                                               timeout=RPC_TIMEOUT)]

    def list(self, *filters):
        return [info for batch in self.list_batches(*filters) for info in batch]

    def names(self, *filters):
        return [info.name for info in self.list(*filters)]

    def usage(self, key):
        r = self._unary("Usage", self.pb.UsageRequest(snapshotter=SNAPSHOTTER, key=key),
                        self.pb.UsageResponse.FromString)
        return r.size, r.inodes

    def cleanup(self):
        self._unary("Cleanup", self.pb.CleanupRequest(snapshotter=SNAPSHOTTER), lambda b: b)


def expect_code(code, fn, *args, naming=None, **kwargs):
    """Calls fn and expects the gRPC status `code`, with `naming` in the message."""
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kwargs)
    assert e.value.code() == code, e.value.details()
    if naming is not None:
        assert naming in e.value.details()
    return e.value.details()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: crimaged with its snapshotter, containerd using it


def start_snapshotter_daemon(daemon_factory, sock, root=None):
    config = {"snapshotterSocket": sock}
    if root:
        config["root"] = root
    d = daemon_factory(config=config)
    d.snapshot_socket = sock
    d.snapshot_root = os.path.join(d.root, "snapshots")
    return d


@pytest.fixture
def snap_daemon(short_dir, daemon_factory):
    """crimaged serving its snapshotter on <short dir>/snap.sock; snapshots in <root>/snapshots."""
    return start_snapshotter_daemon(daemon_factory, os.path.join(short_dir, "snap.sock"))


@pytest.fixture
def snap(snap_daemon, snap_pb):
    client = SnapClient(snap_pb, snap_daemon.snapshot_socket)
    yield client
    client.close()


@pytest.fixture
def snap_ctd(snap_daemon, containerd_factory):
    """A containerd whose CRI plugin unpacks into and runs from crimage's snapshotter (set up after crimaged, so
    torn down, with its pods and mounts, before it)."""
    return containerd_factory(snapshotter=SNAPSHOTTER, proxy_snapshotters={SNAPSHOTTER: snap_daemon.snapshot_socket},
                              auto_gc=False)


def own_dirs(d):
    """The snapshot directories crimaged has, <root>/snapshots/snapshots/<n>."""
    top = os.path.join(d.snapshot_root, "snapshots")
    return sorted(os.listdir(top)) if os.path.isdir(top) else []


def ctr_snap(ctd, *args, namespace="default", check=True):
    return ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, *args, namespace=namespace, check=check)


def ctr_table(ctd, *args, namespace="default"):
    """Rows of a ctr table (header dropped), split on whitespace."""
    return [line.split() for line in ctr_snap(ctd, *args, namespace=namespace).stdout.splitlines()[1:]]


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("case", ["the CRI socket", "not a string", "a root overlay cannot name"])
def test_invalid_snapshotter_settings_named(tmp_path, short_dir, case):
    sock, snap_sock = os.path.join(short_dir, "s.sock"), os.path.join(short_dir, "snap.sock")
    settings, named = {
        "the CRI socket": ({"snapshotterSocket": sock}, "snapshotterSocket must not be the CRI socket"),
        "not a string": ({"snapshotterSocket": 7}, "config key snapshotterSocket: expected a string"),
        "a root overlay cannot name": ({"snapshotterSocket": snap_sock, "root": str(tmp_path / "root:x")},
                                       "holds ',' or ':'"),
    }[case]
    cfg = dict({"root": str(tmp_path / "root"), "socket": sock}, **settings)
    err = run_daemon_expecting_failure(tmp_path, json.dumps(cfg))
    assert named in err, err
    assert not os.path.exists(snap_sock)


def test_snapshotter_socket_of_a_live_server_refused(snap_daemon, tmp_path, short_dir):
    """crimaged never takes over a socket another server answers on (here: the first crimaged's snapshotter)."""
    cfg = {"root": str(tmp_path / "other-root"), "socket": os.path.join(short_dir, "other.sock"),
           "snapshotterSocket": snap_daemon.snapshot_socket}
    err = run_daemon_expecting_failure(tmp_path, json.dumps(cfg))
    assert "snapshotterSocket" in err and "another server is listening" in err, err
    assert (os.stat(snap_daemon.snapshot_socket).st_mode & 0o777) == 0o660


# ---------------------------------------------------------------------------------------------------------------
# ctr, through containerd's metadata store


def test_ctr_snapshot_commands_and_mounts(snap_daemon, snap_ctd, snap, tmp_path):
    d, ctd = snap_daemon, snap_ctd
    own = os.path.join(d.snapshot_root, "snapshots")
    m = str(tmp_path / "m")

    base = from_ctr_json(ctr_snap(ctd, "prepare", "--mounts", "base").stdout)
    assert base[0][0] == "bind" and base[0][2] == ["rw", "rbind"]
    assert os.path.dirname(os.path.dirname(base[0][1])) == own and base[0][1].endswith("/fs")
    with mounted(base, m):
        os.makedirs(f"{m}/etc")
        os.makedirs(f"{m}/old")
        with open(f"{m}/etc/base.txt", "w") as f:
            f.write("base\n")
        with open(f"{m}/old/a.txt", "w") as f:
            f.write("a\n")
    ctr_snap(ctd, "commit", "layer1", "base")

    top = from_ctr_json(ctr_snap(ctd, "prepare", "--mounts", "k2", "layer1").stdout)
    assert top[0][:2] == ("overlay", "overlay")
    assert option(top, "lowerdir") == base[0][1]
    upper = option(top, "upperdir")
    assert os.path.dirname(upper) == os.path.dirname(option(top, "workdir"))
    assert ("index=off" in top[0][2]) == os.path.exists("/sys/module/overlay/parameters/index")
    with mounted(top, m):
        assert open(f"{m}/etc/base.txt").read() == "base\n"
        with open(f"{m}/etc/new.txt", "w") as f:
            f.write("new\n")
        os.unlink(f"{m}/etc/base.txt")
    # overlayfs recorded the deletion in crimage's upper directory as a whiteout: a 0/0 character device.
    st = os.lstat(f"{upper}/etc/base.txt")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    # ctr prints the mount command of an active snapshot from Mounts.
    text = ctr_snap(ctd, "mounts", "/mnt/x", "k2").stdout
    assert text.startswith("mount -t overlay overlay /mnt/x -o ") and f"upperdir={upper}" in text
    ctr_snap(ctd, "commit", "layer2", "k2")

    # A view of two layers: a read-only overlay of both; of one layer: a read-only bind mount of it.
    v2 = from_ctr_json(ctr_snap(ctd, "view", "--mounts", "v2", "layer2").stdout)
    assert v2[0][0] == "overlay" and option(v2, "lowerdir") == f"{upper}:{base[0][1]}"
    assert option(v2, "upperdir") is None and option(v2, "workdir") is None
    with mounted(v2, m):
        assert sorted(os.listdir(f"{m}/etc")) == ["new.txt"]
        assert open(f"{m}/old/a.txt").read() == "a\n"
        with pytest.raises(OSError) as e:
            open(f"{m}/x", "w")
        assert e.value.errno == errno.EROFS
    v1 = from_ctr_json(ctr_snap(ctd, "view", "--mounts", "v1", "layer1").stdout)
    assert v1 == [("bind", base[0][1], ["ro", "rbind"])]
    with mounted(v1, m):
        assert open(f"{m}/etc/base.txt").read() == "base\n"
        with pytest.raises(OSError) as e:
            open(f"{m}/etc/base.txt", "w")
        assert e.value.errno == errno.EROFS

    rows = {r[0]: r[1:] for r in ctr_table(ctd, "ls")}
    assert rows == {"layer1": ["Committed"], "layer2": ["layer1", "Committed"], "v1": ["layer1", "View"],
                    "v2": ["layer2", "View"]}
    usage = {r[0]: r[1:] for r in ctr_table(ctd, "usage", "-b", "layer1", "v2")}
    assert usage["layer1"][1] == "5"  # fs, etc, etc/base.txt, old, old/a.txt
    assert int(usage["layer1"][0]) > 0
    assert usage["v2"] == ["0", "0"]
    info = json.loads(ctr_snap(ctd, "info", "layer2").stdout)
    assert info["Kind"] == "Committed" and info["Parent"] == "layer1"

    # containerd keeps labels of its own; those it passes on (containerd.io/snapshot/...) reach crimage.
    ctr_snap(ctd, "label", "layer2", "containerd.io/snapshot/crimage.test=yes", "local=only")
    info = json.loads(ctr_snap(ctd, "info", "layer2").stdout)
    assert info["Labels"]["containerd.io/snapshot/crimage.test"] == "yes" and info["Labels"]["local"] == "only"
    labelled = snap.list('labels."containerd.io/snapshot/crimage.test"==yes')
    assert [i.name.rsplit("/", 1)[-1] for i in labelled] == ["layer2"]
    assert "local" not in labelled[0].labels
    ctr_snap(ctd, "label", "layer2", "containerd.io/snapshot/crimage.test=")
    assert not snap.list('labels."containerd.io/snapshot/crimage.test"')

    r = ctr_snap(ctd, "rm", "layer1", check=False)
    assert r.returncode != 0 and "child" in r.stderr
    ctr_snap(ctd, "rm", "v1", "v2", "layer2", "layer1")
    # containerd's garbage collector then removes them from crimage, leaves first, and their directories go (each
    # just after its record: a List may see the record gone while that Remove still deletes the directory).
    wait_for(lambda: not snap.list() and own_dirs(d) == [], 30, "containerd's GC removing the snapshots from crimage")


# ---------------------------------------------------------------------------------------------------------------
# The socket itself


def test_semantics_and_errors(snap_daemon, snap):
    code = grpc.StatusCode
    assert snap.prepare("a") == [("bind", f"{snap_daemon.snapshot_root}/snapshots/1/fs", ["rw", "rbind"])]
    expect_code(code.ALREADY_EXISTS, snap.prepare, "a", naming="`a`")
    expect_code(code.NOT_FOUND, snap.prepare, "b", "nothere", naming="nothere")
    expect_code(code.INVALID_ARGUMENT, snap.prepare, "b", "a", naming="`a` is not a committed")
    expect_code(code.NOT_FOUND, snap.commit, "c", "nothere", naming="nothere")
    with open(f"{snap_daemon.snapshot_root}/snapshots/1/fs/file", "w") as f:
        f.write("x" * 10000)
    size, inodes = snap.usage("a")
    assert inodes == 2 and size >= 10000
    snap.commit("c1", "a", labels={"k": "v"})
    expect_code(code.NOT_FOUND, snap.stat, "a", naming="`a`")
    expect_code(code.FAILED_PRECONDITION, snap.commit, "c2", "c1", naming="c1")
    expect_code(code.FAILED_PRECONDITION, snap.mounts, "c1", naming="c1")
    assert snap.usage("c1") == (size, inodes)
    snap.prepare("child", "c1")
    snap.view("view", "c1")
    expect_code(code.ALREADY_EXISTS, snap.commit, "c1", "child", naming="c1")
    expect_code(code.FAILED_PRECONDITION, snap.remove, "c1", naming="child")
    expect_code(code.NOT_FOUND, snap.remove, "nothere", naming="nothere")

    info = snap.stat("c1")
    assert (info.name, info.parent, info.kind, dict(info.labels)) == ("c1", "", snap.pb.COMMITTED, {"k": "v"})
    assert info.created_at.seconds > 0 and info.created_at == info.updated_at
    assert snap.stat("child").kind == snap.pb.ACTIVE and snap.stat("view").kind == snap.pb.VIEW
    # Update: labels.<key> sets or (absent from info) removes one label, "labels" or no mask replaces them all.
    info = snap.update("c1", {"k": "w", "n": "1"}, ["labels.n"])
    assert dict(info.labels) == {"k": "v", "n": "1"} and info.updated_at.ToNanoseconds() > 0
    assert dict(snap.update("c1", {}, ["labels.k"]).labels) == {"n": "1"}
    assert dict(snap.update("c1", {"z": "9"}).labels) == {"z": "9"}
    assert dict(snap.update("c1", {"y": "8"}, ["labels"]).labels) == {"y": "8"}
    expect_code(code.INVALID_ARGUMENT, snap.update, "c1", {}, ["parent"], naming="parent")
    expect_code(code.NOT_FOUND, snap.update, "nothere", {}, naming="nothere")

    # List: filters as containerd writes them, OR across filters, batches of at most 100.
    assert snap.names() == ["c1", "child", "view"]
    assert snap.names("kind==active", "kind==view") == ["child", "view"]
    assert snap.names('parent==""') == ["c1"]
    assert snap.names("parent==c1,kind!=view") == ["child"]
    assert snap.names("labels.y==8") == ["c1"]
    assert snap.names("name~=^ch") == ["child"]
    expect_code(code.INVALID_ARGUMENT, snap.list, "kind=active", naming="kind=active")
    expect_code(code.INVALID_ARGUMENT, snap.list, 'labels."open', naming="open")
    for i in range(230):
        snap.view(f"v{i:03d}", "c1")
    batches = snap.list_batches()
    assert [len(b) for b in batches] == [100, 100, 33]
    assert len({i.name for b in batches for i in b}) == 233

    # Bounds: key length, label size, label count.
    expect_code(code.INVALID_ARGUMENT, snap.prepare, "k" * 5000, naming="key")
    expect_code(code.INVALID_ARGUMENT, snap.prepare, "big", labels={"a": "b" * 5000}, naming="maximum size")
    expect_code(code.INVALID_ARGUMENT, snap.prepare, "many", labels={f"l{i}": "v" for i in range(300)},
                naming="labels")
    expect_code(code.INVALID_ARGUMENT, snap.prepare, "", naming="empty")

    # Remove: a snapshot's directory goes with it; Cleanup removes what no snapshot owns.
    child_dir = os.path.dirname(option(snap.mounts("child"), "upperdir"))
    snap.remove("child")
    assert not os.path.exists(child_dir)
    stray = f"{snap_daemon.snapshot_root}/snapshots/999999"
    os.makedirs(f"{stray}/fs/deep")
    snap.cleanup()
    assert not os.path.exists(stray)
    assert os.path.isdir(f"{snap_daemon.snapshot_root}/snapshots/1/fs")


def test_list_messages_stay_small(snap):
    """Snapshots with as many and as large labels as allowed (about 1 MiB each) come in messages containerd's
    16 MiB limit takes."""
    labels = {f"l{i:03d}": "v" * (4096 - 4) for i in range(256)}
    for i in range(18):  # more than 16 MiB together
        snap.prepare(f"big{i:02d}", labels=labels)
    batches = snap.list_batches()
    assert sum(len(b) for b in batches) == 18 and len(batches) >= 5
    assert all(dict(i.labels) == labels for b in batches for i in b)


def test_remote_snapshot_answer(snap, snap_daemon):
    """A Prepare labelled containerd.io/snapshot.ref=<chain> for a chain committed on the same parent answers
    ALREADY_EXISTS and creates nothing; containerd's metadata store then finds the target with exactly this List."""
    code = grpc.StatusCode
    snap.prepare("k8s.io/1/extract-1 sha256:c1", labels={REF_LABEL: "sha256:c1"})
    snap.commit("k8s.io/2/sha256:c1", "k8s.io/1/extract-1 sha256:c1", labels={REF_LABEL: "sha256:c1"})
    before = snap.names()
    dirs = own_dirs(snap_daemon)
    expect_code(code.ALREADY_EXISTS, snap.prepare, "default/3/extract-2 sha256:c1", labels={REF_LABEL: "sha256:c1"},
                naming="sha256:c1")
    assert snap.names() == before and own_dirs(snap_daemon) == dirs
    found = snap.list(f'labels."{REF_LABEL}"==sha256:c1,parent==""')
    assert [i.name for i in found] == ["k8s.io/2/sha256:c1"]
    # On another parent, or for a chain not known, Prepare is an ordinary one.
    snap.prepare("default/4/extract-3 sha256:c1", "k8s.io/2/sha256:c1", labels={REF_LABEL: "sha256:c1"})
    snap.prepare("default/5/extract-4 sha256:c9", labels={REF_LABEL: "sha256:c9"})
    assert len(snap.names()) == len(before) + 2


# ---------------------------------------------------------------------------------------------------------------
# containerd's CRI unpacking into crimage's snapshotter and running from it


def chain_ids(pushed):
    diff_ids = [layer.diff_id for layer in pushed.single().layers]
    return [fixtures.chain_id(diff_ids[:i + 1]) for i in range(len(diff_ids))]


def committed_chains(snap):
    """{chain ID: snapshot name} of crimage's committed snapshots, by the ref label containerd's unpacker set."""
    return {i.labels[REF_LABEL]: i.name for i in snap.list("kind==committed") if REF_LABEL in i.labels}


@pytest.mark.parametrize("key", ["hello", "whiteout", "multi-hello"])
def test_cri_unpacks_into_crimage_and_runs(snap_daemon, snap_ctd, snap, cri, runtime_pb, runnable_images, key):
    """containerd's CRI pulls the image itself and unpacks every layer into crimage's snapshotter (Prepare, the
    differ writing into the upper directory crimage returned, Commit under the chain ID); the pod runs from it, the
    whiteout image only when the whiteouts written as overlay whiteouts took effect; the sandbox's pause image is
    unpacked there too."""
    pushed, pause = runnable_images[key], runnable_images["pause"]
    crt = snap_ctd.client(cri, runtime_pb)
    try:
        image_id = crt.pull(pushed.ref())
        assert image_id == pushed.id_for()
        chains = committed_chains(snap)
        assert set(chain_ids(pushed)) <= set(chains)
        for name in chains.values():
            assert name.startswith("k8s.io/")
        assert crt.run_pod(image_id, user_image=pushed.ref()) == (0, pushed.output + "\n")
        assert set(chain_ids(pause)) <= set(committed_chains(snap))
        listed = {r[0] for r in ctr_table(snap_ctd, "ls", namespace="k8s.io")}
        assert set(chain_ids(pushed)) <= listed
    finally:
        crt.close()
    # Nothing of the image lives in containerd's own overlayfs snapshotter.
    overlay = os.path.join(snap_ctd.root, "io.containerd.snapshotter.v1.overlayfs", "snapshots")
    assert not os.path.isdir(overlay) or not os.listdir(overlay)


def test_container_writes_into_crimage_upper(snap_daemon, snap_ctd, snap, cri, runtime_pb, runnable_images,
                                            tmp_path):
    """The container's writable layer is an active snapshot of crimage's: what the container writes lands in the
    upper directory crimage owns, and goes with the container."""
    hello = runnable_images["hello"]
    crt = snap_ctd.client(cri, runtime_pb)
    try:
        image_id = crt.pull(hello.ref())
        sandbox = crt.sandbox_config("writer", str(tmp_path))
        pod_id = crt.run_sandbox(sandbox)
        try:
            config = crt.container_config("writer", image_id, hello.ref(), command=[
                "/bin/busybox", "sh", "-c", "echo written-by-the-container > /probe.txt && cat /probe.txt"])
            cid = crt.create_container(pod_id, config, sandbox)
            crt.start_container(cid)
            assert crt.wait_exited(cid, 60).exit_code == 0
            uppers = [option(snap.mounts(i.name), "upperdir") for i in snap.list("kind==active")]
            written = [u for u in uppers if os.path.exists(f"{u}/probe.txt")]
            assert len(written) == 1
            assert os.path.dirname(os.path.dirname(written[0])) == os.path.join(snap_daemon.snapshot_root,
                                                                                 "snapshots")
            assert open(f"{written[0]}/probe.txt").read() == "written-by-the-container\n"
            # Only there: the image's layers are untouched.
            own = os.path.join(snap_daemon.snapshot_root, "snapshots")
            assert [n for n in own_dirs(snap_daemon) if os.path.exists(f"{own}/{n}/fs/probe.txt")] == \
                [os.path.basename(os.path.dirname(written[0]))]
            crt.remove_container(cid)
        finally:
            crt.stop_sandbox(pod_id)
            crt.remove_sandbox(pod_id)
    finally:
        crt.close()
    wait_for(lambda: not os.path.exists(written[0]), 30, "the container's upper directory going with it")


def log_count(path, text):
    with open(path, errors="replace") as f:
        return f.read().count(text)


def test_second_containerd_finds_layers_as_remote_snapshots(snap_daemon, snap_ctd, snap, containerd_factory, cri,
                                                             runtime_pb, runnable_images):
    """A second containerd on the same snapshotter pulls an image the first one unpacked: every layer's Prepare
    (labelled with its chain ID) is answered ALREADY_EXISTS, containerd finds the snapshot with List and records
    it, and unpacks nothing; its pod runs from those layers.

    Both containerds start before anything is unpacked, and the first one removes nothing afterwards: a
    containerd's garbage collector removes every snapshot of the backend it does not know itself."""
    other = containerd_factory(snapshotter=SNAPSHOTTER, proxy_snapshotters={SNAPSHOTTER: snap_daemon.snapshot_socket})
    whiteout = runnable_images["whiteout"]
    first = snap_ctd.client(cri, runtime_pb)
    second = other.client(cri, runtime_pb)
    try:
        gc_runs = log_count(snap_ctd.log, "msg=\"garbage collected\"")
        first.pull(whiteout.ref())
        # The first containerd collects garbage once its pull's lease is gone; let that pass before the second
        # one creates snapshots the first does not know.
        try:
            wait_for(lambda: log_count(snap_ctd.log, "msg=\"garbage collected\"") > gc_runs, 10, "a GC run")
        except RuntimeError:
            pass
        before = snap.names()
        image_id = second.pull(whiteout.ref())
        assert snap.names() == before  # nothing new: no layer was unpacked a second time
        listed = {r[0] for r in ctr_table(other, "ls", namespace="k8s.io")}
        assert set(chain_ids(whiteout)) <= listed
        assert second.run_pod(image_id, user_image=whiteout.ref()) == (0, whiteout.output + "\n")
    finally:
        first.close()
        second.close()


# ---------------------------------------------------------------------------------------------------------------
# crimaged killed


def test_sigkill_and_restart_keeps_snapshots(snap_daemon, snap_ctd, snap, snap_pb, daemon_factory, cri, runtime_pb,
                                              runnable_images):
    """crimaged SIGKILLed while containerd uses its snapshots, then started again on the same root and socket:
    every snapshot is there with its labels, containerd's Stat of the image's chain answers again, and a pod
    starts from the layers unpacked before the kill."""
    hello = runnable_images["hello"]
    crt = snap_ctd.client(cri, runtime_pb)
    try:
        image_id = crt.pull(hello.ref())
        snap.prepare("extra", labels={"keep": "me"})
        before = {i.name: (i.kind, i.parent, dict(i.labels), i.created_at.ToNanoseconds()) for i in snap.list()}

        snap_daemon.proc.send_signal(signal.SIGKILL)
        snap_daemon.proc.wait(timeout=30)
        snap_daemon.stopped = True  # killed on purpose: not a failed shutdown
        again = start_snapshotter_daemon(daemon_factory, snap_daemon.snapshot_socket, root=snap_daemon.root)
        client = SnapClient(snap_pb, again.snapshot_socket)
        try:
            after = {i.name: (i.kind, i.parent, dict(i.labels), i.created_at.ToNanoseconds()) for i in client.list()}
            assert after == before
            assert client.stat("extra").labels["keep"] == "me"
        finally:
            client.close()
        top = chain_ids(hello)[-1]
        wait_for(lambda: ctr_snap(snap_ctd, "info", top, namespace="k8s.io", check=False).returncode == 0, 30,
                 "containerd's Stat through the restarted crimaged")
        assert json.loads(ctr_snap(snap_ctd, "info", top, namespace="k8s.io").stdout)["Kind"] == "Committed"
        assert crt.run_pod(image_id, user_image=hello.ref()) == (0, hello.output + "\n")
    finally:
        crt.close()
