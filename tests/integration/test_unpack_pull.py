"""Layers unpacked in the download pass (unpackLayers): one overlay-ready directory per diff_id under
<root>/layers/sha256, shared between images, removed with the last image that lists it, counted by ImageFsInfo,
redone after a crash, and an overlay mount of an image's layers is its rootfs."""

import os
import signal
import subprocess
import tempfile
import threading

import grpc

import fixtures
from conftest import wait_for


def layer_dir(d, diff_id):
    return os.path.join(d.root, "layers", "sha256", diff_id.split(":", 1)[1])


def unpacked(d):
    base = os.path.join(d.root, "layers", "sha256")
    return {n for n in os.listdir(base) if not n.startswith(".")} if os.path.isdir(base) else set()


def overlay_rootfs(dirs):
    """A read-only overlay of the layer directories (lowest last in `dirs` order: top first), as a context-less
    mount the caller unmounts."""
    mnt = tempfile.mkdtemp(prefix="crimage-ovl-")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "ro,lowerdir=" + ":".join(dirs), mnt], check=True,
                   timeout=30)
    return mnt


def umount(mnt):
    subprocess.run(["umount", mnt], check=True, timeout=30)
    os.rmdir(mnt)


def test_overlay_of_unpacked_layers_is_the_rootfs(daemon_factory, runnable_images):
    """The whiteout image's three layers overlaid: the whiteout and the opaque directory took effect, the image's
    own command runs in it (chroot) and prints its line."""
    pushed = runnable_images["whiteout"]
    d = daemon_factory(config={"unpackLayers": True})
    d.client.pull(pushed.ref())
    img = pushed.single()
    dirs = [layer_dir(d, layer.diff_id) for layer in img.layers]
    assert all(os.path.isdir(p) for p in dirs)
    # the whiteout of layer 3 is an overlay whiteout (a 0/0 character device), the opaque dir an xattr
    st = os.lstat(os.path.join(dirs[2], "data", "gone.txt"))
    assert (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0
    assert os.getxattr(os.path.join(dirs[2], "old"), "trusted.overlay.opaque") == b"y"
    mnt = overlay_rootfs(list(reversed(dirs)))
    try:
        assert not os.path.exists(os.path.join(mnt, "data", "gone.txt"))
        assert os.path.exists(os.path.join(mnt, "data", "kept.txt"))
        assert not os.path.exists(os.path.join(mnt, "old", "a.txt"))
        out = subprocess.run(["chroot", mnt] + img.config["config"]["Cmd"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0 and out.stdout == pushed.output + "\n", out
    finally:
        umount(mnt)


def test_shared_layer_removed_with_its_last_image(daemon_factory, runnable_images):
    """hello and whiteout share the busybox layer: it is unpacked once and stays until both are removed; a layer
    of whiteout alone goes with whiteout."""
    hello, whiteout = runnable_images["hello"], runnable_images["whiteout"]
    d = daemon_factory(config={"unpackLayers": True})
    d.client.pull(hello.ref())
    base = hello.single().layers[0].diff_id.split(":", 1)[1]
    assert unpacked(d) == {base}
    d.client.pull(whiteout.ref())
    assert unpacked(d) == {layer.diff_id.split(":", 1)[1] for layer in whiteout.single().layers}
    d.client.remove(whiteout.ref())
    assert unpacked(d) == {base}
    d.client.remove(hello.ref())
    assert unpacked(d) == set()


def test_fsinfo_counts_unpacked_layers(daemon_factory, runnable_images):
    """ImageFsInfo's bytes and inodes grow by the unpacked trees."""
    pushed = runnable_images["whiteout"]
    plain = daemon_factory()
    plain.client.pull(pushed.ref())
    unpacking = daemon_factory(config={"unpackLayers": True})
    unpacking.client.pull(pushed.ref())
    a = plain.client.fsinfo().image_filesystems[0]
    b = unpacking.client.fsinfo().image_filesystems[0]
    assert b.inodes_used.value >= a.inodes_used.value + 10
    assert b.used_bytes.value > a.used_bytes.value + 500_000  # busybox itself, once more


def test_handler_switch_and_later_unpack(daemon_factory, runnable_images):
    """A handler with unpackLayers off gets blobs only; the same image pulled later for a handler that unpacks is
    unpacked from the stored blobs, without downloading them again."""
    pushed = runnable_images["hello"]
    d = daemon_factory(config={"unpackLayers": True, "runtimeHandlers": {"vm": {"unpackLayers": False}}})
    d.client.pull(pushed.ref(), handler="vm")
    assert unpacked(d) == set()
    d.client.pull(pushed.ref())
    assert unpacked(d) == {pushed.single().layers[0].diff_id.split(":", 1)[1]}


def test_killed_during_unpack_completes_after_restart(daemon_factory, registry, tmp_path):
    """crimaged SIGKILLed while it unpacks a big layer leaves no half layer visible; after a restart the pull
    completes and every layer is there."""
    files = [(f"big/f{i}", os.urandom(256 * 1024)) for i in range(64)]  # 16 MiB that gzip cannot shrink
    image = fixtures.Image("unpack-kill", [fixtures.Layer([("big", None)] + files)])
    layout = str(tmp_path / "layout")
    fixtures.write_oci_layout(layout, image, "fixture")
    work = str(tmp_path / "push")
    os.makedirs(work)
    ref = f"{registry.host}/crimage-test/unpack-kill:1"
    fixtures.skopeo_push(layout, "fixture", ref, fixtures._policy(work), tmpdir=work)
    diff_hex = image.layers[0].diff_id.split(":", 1)[1]

    d = daemon_factory(config={"unpackLayers": True})
    base = os.path.join(d.root, "layers", "sha256")
    t = threading.Thread(target=_pull_ignoring_errors, args=(d, ref))
    t.start()
    wait_for(lambda: any(n.startswith(".") for n in os.listdir(base)), 60, "an unpack in progress")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(30)
    d.stopped = True
    t.join(60)
    assert unpacked(d) == set()  # nothing half-unpacked is visible

    d2 = daemon_factory(config={"root": d.root, "unpackLayers": True})
    assert not [n for n in os.listdir(base) if n.startswith(".")]  # the stale temporary tree is gone
    d2.client.pull(ref)
    assert unpacked(d2) == {diff_hex}
    assert len(os.listdir(os.path.join(base, diff_hex, "big"))) == 64


def _pull_ignoring_errors(d, ref):
    try:
        d.new_client(timeout=60).pull(ref)
    except grpc.RpcError:
        pass  # the daemon is killed under this call on purpose
