"""Pods start from layers crimage unpacked while it downloaded them: containerd's CRI uses crimage's snapshotter
(`[proxy_plugins.crimage]`, CRI `snapshotter = "crimage"`), crimaged publishes images without their layer blobs
(containerd.snapshotter: crimage) and creates the snapshot chain through containerd's remote-snapshot protocol, so
containerd downloads and unpacks nothing of them."""

import os
import signal
import threading

import grpc

import fixtures
from conftest import wait_for

SNAPSHOTTER = "crimage"


def start_pair(daemon_factory, containerd_factory, short_dir, config=None):
    """crimaged serving its snapshotter and handing images to a containerd whose CRI plugin uses it."""
    sock = os.path.join(short_dir, "snap.sock")
    ctd = containerd_factory(start=False, snapshotter=SNAPSHOTTER, proxy_snapshotters={SNAPSHOTTER: sock})
    base = {"snapshotterSocket": sock, "pullBackoff": {"enabled": False},
            "containerd": {"address": ctd.socket, "snapshotter": SNAPSHOTTER}}
    base.update(config or {})
    d = daemon_factory(config=base)
    ctd.start()
    return d, ctd


def layer_digests(pushed):
    return {layer.digest for layer in pushed.single().layers}


def test_pod_runs_on_crimage_snapshots(daemon_factory, containerd_factory, short_dir, cri, runtime_pb,
                                       runnable_images):
    """The kubelet flow with containerd on crimage's snapshotter: the container runs and writes to its writable
    layer, containerd's content store holds no layer blob of the image, the chain is containerd's committed
    snapshots on crimage's unpacked layers, and RemoveImage takes the image away again."""
    d, ctd = start_pair(daemon_factory, containerd_factory, short_dir)
    crt = ctd.client(cri, runtime_pb)
    try:
        for key in ("whiteout", "multi-hello"):
            pushed = runnable_images[key]
            image_id = d.client.pull(pushed.ref())
            assert not layer_digests(pushed) & set(ctd.content())
            chain = fixtures.chain_id([layer.diff_id for layer in pushed.single().layers])
            snaps = ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout
            assert chain in snaps
            assert crt.run_pod(image_id, user_image=pushed.ref()) == (0, pushed.output + "\n")
            # the writable layer is the container's own: a write lands in an upper dir crimage owns, not a layer
            code, out = crt.run_pod(image_id, user_image=pushed.ref(),
                                    command=["/bin/busybox", "sh", "-c", "echo written > /new.txt && cat /new.txt"])
            assert (code, out) == (0, "written\n")
            layers = os.path.join(d.root, "layers", "sha256")
            assert not any(os.path.exists(os.path.join(layers, n, "new.txt")) for n in os.listdir(layers))
            d.client.remove(image_id)
            wait_for(lambda: crt.image(image_id) is None, 30, "containerd's CRI dropping the image")
    finally:
        crt.close()


def test_killed_during_unpack_then_pod_starts(daemon_factory, containerd_factory, short_dir, cri, runtime_pb,
                                              registry, tmp_path):
    """crimaged SIGKILLed while it unpacks a layer; started again on the same root, the pull completes and the pod
    starts from the unpacked layers."""
    with open(fixtures.BUSYBOX, "rb") as f:
        busybox = f.read()
    files = [(f"big/f{i}", os.urandom(256 * 1024)) for i in range(48)]  # 12 MiB gzip cannot shrink
    image = fixtures.Image("snap-kill", [
        fixtures.Layer([("bin", None), ("bin/busybox", busybox, 0o755), ("bin/sh", ("symlink", "busybox"))]),
        fixtures.Layer([("big", None)] + files)], cmd=[fixtures.BUSYBOX, "sh", "-c", "ls /big | wc -l"])
    layout = str(tmp_path / "layout")
    fixtures.write_oci_layout(layout, image, "fixture")
    work = str(tmp_path / "push")
    os.makedirs(work)
    ref = f"{registry.host}/crimage-test/snap-kill:1"
    fixtures.skopeo_push(layout, "fixture", ref, fixtures._policy(work), tmpdir=work)

    d, ctd = start_pair(daemon_factory, containerd_factory, short_dir)
    base = os.path.join(d.root, "layers", "sha256")

    def pull():
        try:
            d.new_client(timeout=60).pull(ref)
        except grpc.RpcError:
            pass  # the daemon is killed under this call on purpose

    t = threading.Thread(target=pull)
    t.start()
    wait_for(lambda: any(n.startswith(".") for n in os.listdir(base)), 60, "an unpack in progress")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(30)
    d.stopped = True
    t.join(60)

    d2 = daemon_factory(config={"root": d.root, "snapshotterSocket": os.path.join(short_dir, "snap.sock"),
                                "pullBackoff": {"enabled": False},
                                "containerd": {"address": ctd.socket, "snapshotter": SNAPSHOTTER}})
    image_id = d2.client.pull(ref)
    crt = ctd.client(cri, runtime_pb)
    try:
        assert crt.run_pod(image_id, user_image=ref) == (0, "48\n")
        assert not {layer.digest for layer in image.layers} & set(ctd.content())
    finally:
        crt.close()


def test_image_of_many_layers_starts(daemon_factory, containerd_factory, short_dir, cri, runtime_pb, registry,
                                     tmp_path):
    """70 layers: overlay's options must fit in one page, so the layers are named by short links (<snapshots
    root>/l/<id>), not by their 64-digit diff_ids (65 bytes a layer: at most 61 layers would fit)."""
    with open(fixtures.BUSYBOX, "rb") as f:
        busybox = f.read()
    layers = [fixtures.Layer([("bin", None), ("bin/busybox", busybox, 0o755), ("bin/sh", ("symlink", "busybox"))])]
    layers += [fixtures.Layer([("d", None), (f"d/f{i}", f"layer {i}\n".encode())]) for i in range(69)]
    image = fixtures.Image("many-layers", layers, cmd=[fixtures.BUSYBOX, "sh", "-c", "ls /d | wc -l"])
    layout = str(tmp_path / "layout")
    fixtures.write_oci_layout(layout, image, "fixture")
    work = str(tmp_path / "push")
    os.makedirs(work)
    ref = f"{registry.host}/crimage-test/many-layers:1"
    fixtures.skopeo_push(layout, "fixture", ref, fixtures._policy(work), tmpdir=work)

    d, ctd = start_pair(daemon_factory, containerd_factory, short_dir)
    image_id = d.client.pull(ref)
    crt = ctd.client(cri, runtime_pb)
    try:
        assert crt.run_pod(image_id, user_image=ref) == (0, "69\n")
    finally:
        crt.close()
