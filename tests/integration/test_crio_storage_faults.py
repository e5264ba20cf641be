"""The containers-storage tree under faults: crimaged killed while it writes the tree, with podman reading it all the
while (a reader sees the old consistent state or the new one, never a half-written one), and an image crimage had
before its handler had a tree (ImageStatus says it is absent, so kubelet pulls it, which puts it in the tree)."""

import os
import random
import shutil
import tempfile
import threading
import time

import fixtures
from podman_helpers import StorageTree
from test_crio_storage import assert_runs, podman_factory  # noqa: F401 (podman_factory: a fixture)

LAYERS = 40


def push_many_layers(registry, tmp_path):
    """A runnable image of LAYERS layers (busybox, then one file per layer); its command prints LAYERS - 1."""
    with open(fixtures.BUSYBOX, "rb") as f:
        busybox = f.read()
    layers = [fixtures.Layer([("bin", None), ("bin/busybox", busybox, 0o755), ("bin/sh", ("symlink", "busybox"))])]
    layers += [fixtures.Layer([("d", None), (f"d/f{i}", f"layer {i}\n".encode())]) for i in range(LAYERS - 1)]
    image = fixtures.Image("crio-many", layers, cmd=[fixtures.BUSYBOX, "sh", "-c", "ls /d | wc -l"])
    layout = str(tmp_path / "layout")
    fixtures.write_oci_layout(layout, image, "fixture")
    work = str(tmp_path / "push")
    os.makedirs(work)
    ref = f"{registry.host}/crimage-test/crio-many:1"
    fixtures.skopeo_push(layout, "fixture", ref, fixtures._policy(work), tmpdir=work)
    return ref


def consistent(tree):
    """What containers/storage needs of a tree: every image's layer chain in layers.json, every listed layer's
    directory with its diff, and no name on two images."""
    layers = {lay["id"]: lay for lay in tree.layers()}
    names = [n for i in tree.images() for n in i.get("names", [])]
    assert len(names) == len(set(names)), names
    for img in tree.images():
        lid = img.get("layer", "")
        while lid:
            assert lid in layers, f"image {img['id']} names layer {lid}, which layers.json lacks"
            lid = layers[lid].get("parent", "")
    for lid in layers:
        assert os.path.exists(tree.path("overlay", lid, "diff")), f"layer {lid} listed without its directory"


def test_killed_while_writing_the_tree(request, daemon_factory, podman_factory, registry, runnable_images,  # noqa: F811
                                       tmp_path):
    """SIGKILL at several points of pulls that write the tree, while podman inspects every image it lists: podman
    never fails, and the tree is consistent after each kill; once crimaged runs again the image is complete, runs,
    and nothing the kills left stays behind."""
    ref = push_many_layers(registry, tmp_path)
    hello = runnable_images["hello"]
    # A short path: containers/storage 1.43 names each lower layer by its absolute short link (<tree>/overlay/l/<26
    # characters>) in the overlay mount's options, which must fit one page; past that it names them relative to its
    # own store, where an additional store's links are not (see docs/integration.md).
    cs = tempfile.mkdtemp(prefix="crimage-cs-", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(cs, ignore_errors=True))
    d = daemon_factory({"containersStorage": {"root": cs}}, config_format="yaml")
    d.client.pull(hello.ref())
    tree = StorageTree(cs)
    pm = podman_factory(crimage_store=cs)
    stop = threading.Event()
    failures = []
    reads = [0]
    # containers/storage's readers take the images lock and the layers lock one after the other, never both: a
    # removal between the two (by any writer, containers/storage's own too) makes a reader see an image whose layers
    # just went ("layer not known", "image not known"). Those are not torn writes: a reader's failure counts unless
    # a RemoveImage overlapped its commands. removals[0] is odd while one runs.
    removals = [0]

    def remove(client):
        removals[0] += 1
        try:
            client.remove(ref)
        finally:
            removals[0] += 1

    def read_all():
        while not stop.is_set():
            before = removals[0]
            out = pm.cmd("images", "-q", "--no-trunc", check=False)
            problems = [] if out.returncode == 0 else [f"podman images: {out.stderr}"]
            for image_id in out.stdout.split() if out.returncode == 0 else []:
                r = pm.cmd("image", "inspect", image_id, check=False)
                if r.returncode != 0:
                    problems.append(f"podman image inspect {image_id}: {r.stderr}")
            if problems and before == removals[0] and before % 2 == 0:
                failures.extend(problems)
                return
            reads[0] += 1

    reader = threading.Thread(target=read_all)
    reader.start()
    # Kills spread over a whole pull (download, unpack, tree): how long one takes here, measured first.
    start = time.monotonic()
    d.client.pull(ref)
    span = time.monotonic() - start
    remove(d.client)
    rng = random.Random(7)
    try:
        for attempt in range(8):
            if attempt:
                d = daemon_factory({"root": d.root, "containersStorage": {"root": cs}}, config_format="yaml")
                consistent(tree)
                remove(d.client)
            puller = threading.Thread(target=lambda c=d.new_client(): _pull_quietly(c, ref))
            puller.start()
            time.sleep(rng.uniform(0, span))
            d.proc.kill()
            d.proc.wait()
            d.stopped = True
            puller.join()
            consistent(tree)
    finally:
        stop.set()
        reader.join()
    assert not failures, failures[0]
    assert reads[0] > 0

    d = daemon_factory({"root": d.root, "containersStorage": {"root": cs}}, config_format="yaml")
    image_id = d.client.pull(ref)
    consistent(tree)
    img = tree.image(image_id.split(":", 1)[1])
    assert img is not None and len(tree.chain(img["layer"])) == LAYERS
    rc, out, err = pm.run(ref)
    assert (rc, out) == (0, f"{LAYERS - 1}\n"), err
    assert_runs(pm, hello.ref(), hello)
    # Nothing but the two images' layers: what the kills left was removed.
    wanted = set(tree.chain(img["layer"])) | set(tree.chain(tree.image(hello.id_for().split(":", 1)[1])["layer"]))
    assert tree.overlay_dirs() == wanted
    assert set(tree.short_links()) == {open(tree.path("overlay", lid, "link")).read() for lid in wanted}


def _pull_quietly(client, ref):
    try:
        client.pull(ref)
    except Exception:  # the daemon is killed under it
        pass
    finally:
        client.close()


def test_image_pulled_before_the_tree(daemon_factory, podman_factory, runnable_images, tmp_path):  # noqa: F811
    """An image crimage pulled without unpacking it, then the handler gets a tree: the start-up leaves it out (its
    layers are not unpacked), ImageStatus says it is absent, the pull kubelet then makes unpacks it and puts it in
    the tree, and podman runs it."""
    hello = runnable_images["hello"]
    d = daemon_factory({"unpackLayers": False}, config_format="yaml")
    image_id = d.client.pull(hello.ref())
    assert d.client.image(hello.ref()) is not None
    assert d.stop() == 0
    cs = str(tmp_path / "cs")
    d2 = daemon_factory({"root": d.root, "containersStorage": {"root": cs}}, config_format="yaml")
    tree = StorageTree(cs)
    assert tree.images() == []
    assert d2.client.image(hello.ref()) is None
    assert d2.client.pull(hello.ref()) == image_id
    assert d2.client.image(hello.ref()).id == image_id
    assert tree.image(image_id.split(":", 1)[1])["names"] == [hello.ref()]
    pm = podman_factory(crimage_store=cs)
    assert_runs(pm, hello.ref(), hello)
