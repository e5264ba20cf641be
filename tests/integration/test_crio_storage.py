"""crimage's images in a containers-storage additional image store, read by Debian's podman 4.3 (the same
containers/storage library CRI-O links).

crimaged with `containersStorage: {root: DIR}` publishes every image it pulls into DIR in the overlay driver's
layout (overlay-images/images.json, overlay-layers/layers.json with their lock files, overlay/<layer>/diff as a
symlink to crimage's own unpacked layer, overlay/l/ short links); a podman whose storage.conf lists DIR in
`additionalimagestores` must then see, name and run those images as if it had pulled them itself.

The first tests involve podman only: an additional image store works on this machine, and podman's own pull of the
same fixture images is the oracle (image ID, layer IDs, digest, layout files, the root filesystem a container
gets, which umoci's unpack must match). The tests of crimage compare against that oracle. Needs root, podman and
runc; podman_helpers.py says what the private podman configuration contains and why."""

import os
import shutil
import subprocess
import tomllib

import pytest

import fixtures
from conftest import READY_TIMEOUT, wait_for
from podman_helpers import (PACKAGED_CS_ROOT, RUNC, Podman, StorageTree, describe_tree, expected_layer_ids, hex_of,
                            packaged_storage_snippet, storage_conf, tree_differences)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="podman's overlay stores need root"),
    pytest.mark.skipif(not shutil.which("podman"), reason="podman is not installed"),
    pytest.mark.skipif(not os.access(RUNC, os.X_OK), reason="runc is not installed"),
]

RUNNABLE = ("hello", "hello-docker", "whiteout", "multi-hello")
IN_ORACLE_STORE = ("hello", "whiteout", "multi-hello")  # the keys of the oracle's main store


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def podman_factory(tmp_path):
    """podman_factory(additional_stores=(), crimage_store=None) -> a Podman of the test's own; every one is cleaned
    up (containers, mounts, cgroups) at teardown."""
    made = []

    def make(additional_stores=(), crimage_store=None, registries=()):
        pm = Podman(str(tmp_path / f"podman{len(made)}"), additional_stores, crimage_store, registries)
        made.append(pm)
        return pm

    yield make
    for pm in made:
        pm.cleanup()


class Pulled:
    """What podman made of one image it pulled into its own store."""

    def __init__(self, pm, ref):
        self.ref = ref
        self.store = pm.graphroot
        self.id = pm.pull(ref)
        self.inspect = pm.inspect(ref)
        self.top = Podman.top_layer(self.inspect)
        self.chain = StorageTree(pm.graphroot).chain(self.top)
        self.digest = self.inspect["Digest"]


@pytest.fixture(scope="module")
def oracle(registry, runnable_images, tmp_path_factory):
    """podman's own store with the runnable fixtures pulled by podman itself: (Podman, {key: Pulled}).
    hello-docker goes to a store of its own: it has hello's config, so podman would only add its name to hello's
    image, which keeps the digest of the first pull."""
    pm = Podman(str(tmp_path_factory.mktemp("podman-oracle")), registries=[registry.host])
    docker = Podman(str(tmp_path_factory.mktemp("podman-oracle-docker")), registries=[registry.host])
    try:
        pulled = {key: Pulled(pm, runnable_images[key].ref()) for key in IN_ORACLE_STORE}
        pulled["hello-docker"] = Pulled(docker, runnable_images["hello-docker"].ref())
        yield pm, pulled
    finally:
        docker.cleanup()
        pm.cleanup()


def umoci_rootfs(image, workdir):
    """The root filesystem umoci unpacks from `image` (a fixtures.Image), as a path."""
    layout = os.path.join(workdir, "umoci-layout")
    fixtures.write_oci_layout(layout, image, "fixture")
    bundle = os.path.join(workdir, "umoci-bundle")
    r = subprocess.run(["umoci", "unpack", "--image", layout + ":fixture", bundle], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, "umoci unpack: " + r.stderr
    return os.path.join(bundle, "rootfs")


def assert_runs(pm, ref, pushed):
    """`podman run` of `ref` prints the fixture's line."""
    rc, out, err = pm.run(ref)
    assert (rc, out) == (0, pushed.output + "\n"), f"podman run {ref}: {rc}\n{err}\n{pm.history()}"


def check_layout(tree, chain):
    """The overlay driver's files of the layers `chain` (base first) in `tree`: each layer a directory with `diff`,
    a `link` naming its short link l/<link> -> ../<id>/diff, and, above the base, `lower` listing the short links
    of the layers below, nearest first (as podman writes them, see test_podman_layout_is_the_documented_one)."""
    links = {}
    for i, lid in enumerate(chain):
        d = tree.path("overlay", lid)
        assert os.path.isdir(os.path.join(d, "diff")), f"{d}/diff"
        with open(os.path.join(d, "link")) as f:
            links[lid] = f.read().strip()
        assert len(links[lid]) == 26 and links[lid].isalnum() and links[lid].isupper(), links[lid]
        assert os.readlink(tree.path("overlay", "l", links[lid])) == f"../{lid}/diff"
        assert os.path.isdir(tree.path("overlay", "l", links[lid]))
        if i == 0:
            assert not os.path.exists(os.path.join(d, "lower")), f"{d}/lower on the base layer"
        else:
            with open(os.path.join(d, "lower")) as f:
                assert f.read().strip() == ":".join("l/" + links[p] for p in reversed(chain[:i]))
    return links


def crimaged(daemon_factory, tmp_path, **config):
    """crimaged publishing into <tmp_path>/cs: (daemon, tree root)."""
    cs = str(tmp_path / "cs")
    cfg = {"containersStorage": {"root": cs}}
    cfg.update(config)
    return daemon_factory(cfg, config_format="yaml"), cs


def tree_state(tree):
    """What a reader relies on in a tree: images (ID, names, digest, top layer), layers (ID, parent) and layer
    directories."""
    images = sorted((i["id"], tuple(sorted(i.get("names") or [])), i.get("digest"), i.get("layer"))
                    for i in tree.images())
    layers = sorted((lay["id"], lay.get("parent", "")) for lay in tree.layers())
    return images, layers, tree.overlay_dirs()


# ---------------------------------------------------------------------------------------------------------------
# podman on its own: the harness and the oracle


def test_podman_reads_an_additional_image_store(oracle, podman_factory, runnable_images):
    """A second podman with the first one's graphroot in additionalimagestores lists its images read-only, by the
    same ID, names, digest and top layer, and runs them (the multi-arch one with this machine's entry)."""
    a, pulled = oracle
    b = podman_factory(additional_stores=[a.graphroot])
    listed = {img["id"]: img for img in b.images()}
    assert set(listed) == {pulled[key].id for key in IN_ORACLE_STORE}
    for key in IN_ORACLE_STORE:
        p, pushed = pulled[key], runnable_images[key]
        assert p.id == hex_of(pushed.id_for()), key
        assert p.digest == pushed.manifest_digest, key
        img = listed[p.id]
        assert img["read_only"] is True, img
        assert pushed.ref() in img["names"], img
        got = b.inspect(pushed.ref())
        assert (got["Id"], got["Digest"], Podman.top_layer(got)) == (p.id, p.digest, p.top), key
        assert got["GraphDriver"]["Data"]["UpperDir"].startswith(a.graphroot + "/"), got["GraphDriver"]
    assert b.images() and not StorageTree(b.graphroot).images()  # nothing was copied into b's own store
    for key in ("hello", "multi-hello"):
        assert_runs(b, runnable_images[key].ref(), runnable_images[key])


def test_podman_layout_is_the_documented_one(oracle, runnable_images):
    """podman's own tree has what DESIGN.md section 11 says crimage writes: image ID = config digest, layer IDs
    diff_id then sha256("<parent>+<diff_id>"), each layer once in layers.json, the overlay files check_layout()
    expects, the repository digest (the index's for a multi-arch image) in images.json."""
    _, pulled = oracle
    for key in RUNNABLE:
        p, pushed = pulled[key], runnable_images[key]
        tree = StorageTree(p.store)
        ids = [lay["id"] for lay in tree.layers()]
        assert len(ids) == len(set(ids)), ids
        assert p.chain == expected_layer_ids(pushed.single()), key
        img = tree.image(p.id)
        assert (img["layer"], img["digest"]) == (p.top, pushed.manifest_digest), img
        assert pushed.ref() in img["names"]
        for lid, layer in zip(p.chain, pushed.single().layers):
            assert tree.layer(lid)["diff-digest"] == layer.diff_id
        check_layout(tree, p.chain)
    # hello, hello-docker and multi-hello's entry for this machine are one layer: the busybox base of whiteout
    assert pulled["hello"].chain == pulled["whiteout"].chain[:1] == pulled["multi-hello"].chain
    assert pulled["hello-docker"].id == pulled["hello"].id


def test_podman_whiteout_rootfs_matches_umoci(oracle, podman_factory, runnable_images, tmp_path):
    """A container of the whiteout image, from an additional store, starts with exactly the tree umoci unpacks
    (the whiteout and the opaque whiteout applied), and its command says so."""
    a, _ = oracle
    b = podman_factory(additional_stores=[a.graphroot])
    pushed = runnable_images["whiteout"]
    want = describe_tree(umoci_rootfs(pushed.image, str(tmp_path)))
    assert "data/kept.txt" in want and "data/gone.txt" not in want and "old/a.txt" not in want
    with b.rootfs(pushed.ref()) as root:
        assert tree_differences(want, describe_tree(root)) == []
    assert_runs(b, pushed.ref(), pushed)


def test_podman_renews_the_lock_markers(podman_factory, registry, runnable_images):
    """podman writes a new 64-byte last-writer marker into images.lock with every image it adds, and into
    layers.lock with every layer: what a reading podman or CRI-O compares to reload a store."""
    pm = podman_factory(registries=[registry.host])
    tree = StorageTree(pm.graphroot)
    pm.pull(runnable_images["hello"].ref())
    images0, layers0 = tree.lock_marker("images"), tree.lock_marker("layers")
    assert len(images0) == len(layers0) == 64
    pm.pull(runnable_images["whiteout"].ref())
    assert tree.lock_marker("images") != images0
    assert tree.lock_marker("layers") != layers0


def test_storage_conf(tmp_path):
    """The private storage.conf: overlay on the test's directories, the crimage tree first among the additional
    stores; with the packaged fragment, the packaged tree replaced by the test's."""
    conf = storage_conf("/g", "/r", ["/other"], crimage_store=str(tmp_path / "cs"))
    parsed = tomllib.loads(conf)
    assert parsed["storage"]["driver"] == "overlay"
    assert (parsed["storage"]["graphroot"], parsed["storage"]["runroot"]) == ("/g", "/r")
    assert parsed["storage"]["options"]["additionalimagestores"] == [str(tmp_path / "cs"), "/other"]
    assert PACKAGED_CS_ROOT not in conf


def test_packaged_storage_snippet():
    """The packaged storage.conf fragment names crimage's packaged tree as an additional image store."""
    path = packaged_storage_snippet()
    if path is None:
        pytest.skip("no packaged storage.conf fragment (packaging/config/storage-crimage.conf) yet")
    with open(path, "rb") as f:
        snippet = tomllib.load(f)
    assert PACKAGED_CS_ROOT in snippet["storage"]["options"]["additionalimagestores"], snippet


# ---------------------------------------------------------------------------------------------------------------
# crimage's tree


@pytest.mark.parametrize("key", ["hello", "hello-docker"])
def test_pull_publishes_into_the_tree(daemon_factory, podman_factory, oracle, runnable_images, key, tmp_path):
    """PullImage puts the image into the tree before it answers: podman finds it by crimage's ID, names and repo
    digest, read-only, with the ID and layers podman computes itself, and runs it. The layers are crimage's own
    unpacked directories (unpackLayers is implied), each `diff` an absolute symlink to one."""
    _, pulled = oracle
    pushed = runnable_images[key]
    d, cs = crimaged(daemon_factory, tmp_path)
    image_ref = d.client.pull(pushed.ref())
    status = d.client.image(pushed.ref())
    assert list(status.repo_tags) == [pushed.ref()] and list(status.repo_digests) == [pushed.digest_ref()]

    tree = StorageTree(cs)
    for name in ("overlay-images/images.lock", "overlay-layers/layers.lock", "overlay-images/images.json",
                 "overlay-layers/layers.json"):
        assert os.path.isfile(tree.path(name)), name
    img = tree.image(hex_of(image_ref))
    assert img is not None, tree.images()
    assert sorted(img["names"]) == sorted(status.repo_tags)
    assert img["digest"] == pushed.manifest_digest
    assert img["layer"] == pulled[key].top
    chain = tree.chain(img["layer"])
    assert chain == pulled[key].chain
    check_layout(tree, chain)
    for lid, layer in zip(chain, pushed.single().layers):
        target = os.readlink(tree.path("overlay", lid, "diff"))
        assert os.path.isabs(target), target
        assert os.path.realpath(target) == os.path.realpath(os.path.join(d.root, "layers", "sha256",
                                                                         hex_of(layer.diff_id)))
        assert os.path.isfile(os.path.join(target, "bin", "busybox"))
        assert tree.layer(lid)["diff-digest"] == layer.diff_id

    pm = podman_factory(crimage_store=cs)
    got = pm.inspect(pushed.ref())
    assert got is not None, pm.history()
    assert got["Id"] == hex_of(image_ref) == pulled[key].id
    assert Podman.top_layer(got) == pulled[key].top
    assert got["Digest"] == pushed.manifest_digest
    assert got["RepoTags"] == list(status.repo_tags)
    assert pushed.digest_ref() in got["RepoDigests"]
    assert [img["read_only"] for img in pm.images()] == [True]
    assert pm.inspect(hex_of(image_ref))["Id"] == got["Id"]  # by ID too, as CRI-O's CreateContainer names it
    assert_runs(pm, pushed.ref(), pushed)


def test_pull_renews_the_images_lock_marker(daemon_factory, runnable_images, tmp_path):
    """The lock files exist from the start; each pull that changes the tree writes a new last-writer marker (the
    first 64 bytes) into images.lock, and into layers.lock when it adds layers."""
    d, cs = crimaged(daemon_factory, tmp_path)
    tree = StorageTree(cs)
    for name in ("overlay-images/images.lock", "overlay-layers/layers.lock"):
        assert os.path.isfile(tree.path(name)), name
    images0, layers0 = tree.lock_marker("images"), tree.lock_marker("layers")
    d.client.pull(runnable_images["hello"].ref())
    images1, layers1 = tree.lock_marker("images"), tree.lock_marker("layers")
    assert len(images1) == len(layers1) == 64
    assert images1 != images0 and layers1 != layers0
    d.client.pull(runnable_images["whiteout"].ref())
    assert tree.lock_marker("images") != images1
    assert tree.lock_marker("layers") != layers1


def test_whiteout_image_matches_umoci(daemon_factory, podman_factory, oracle, runnable_images, tmp_path):
    """A container of the whiteout image from crimage's tree starts with exactly umoci's tree (and so podman's
    own, see test_podman_whiteout_rootfs_matches_umoci): crimage's unpacked layers carry the whiteouts the way
    overlayfs applies them."""
    _, pulled = oracle
    pushed = runnable_images["whiteout"]
    d, cs = crimaged(daemon_factory, tmp_path)
    assert d.client.pull(pushed.ref()) == pushed.id_for()
    assert StorageTree(cs).chain(pulled["whiteout"].top) == pulled["whiteout"].chain
    pm = podman_factory(crimage_store=cs)
    want = describe_tree(umoci_rootfs(pushed.image, str(tmp_path)))
    with pm.rootfs(pushed.ref()) as root:
        assert tree_differences(want, describe_tree(root)) == []
    assert_runs(pm, pushed.ref(), pushed)


def test_multi_arch_index(daemon_factory, podman_factory, oracle, runnable_images, tmp_path):
    """A multi-arch index is this machine's entry under the index's digest, as podman pulls it."""
    _, pulled = oracle
    pushed = runnable_images["multi-hello"]
    d, cs = crimaged(daemon_factory, tmp_path)
    image_ref = d.client.pull(pushed.ref())
    assert image_ref == pushed.id_for() == "sha256:" + pulled["multi-hello"].id
    img = StorageTree(cs).image(hex_of(image_ref))
    assert (img["digest"], img["layer"]) == (pushed.manifest_digest, pulled["multi-hello"].top), img
    pm = podman_factory(crimage_store=cs)
    got = pm.inspect(pushed.ref())
    assert (got["Id"], got["Digest"], got["Architecture"]) == (hex_of(image_ref), pushed.manifest_digest,
                                                              fixtures.host_arch())
    assert_runs(pm, pushed.ref(), pushed)


def test_pulled_by_digest_only(daemon_factory, podman_factory, runnable_images, tmp_path):
    """An image pulled by digest only (no repo tag) is named repo@sha256:... and runs by that name."""
    pushed = runnable_images["hello"]
    d, cs = crimaged(daemon_factory, tmp_path)
    image_ref = d.client.pull(pushed.digest_ref())
    assert list(d.client.image(pushed.digest_ref()).repo_tags) == []
    img = StorageTree(cs).image(hex_of(image_ref))
    assert img["names"] == [pushed.digest_ref()], img
    assert img["digest"] == pushed.manifest_digest
    pm = podman_factory(crimage_store=cs)
    assert not pm.exists(pushed.ref())
    assert_runs(pm, pushed.digest_ref(), pushed)


def test_one_image_two_repositories(daemon_factory, podman_factory, runnable_images, tmp_path):
    """hello and hello-docker have the same config, hence the same image ID: one image in the tree, named by
    both repositories, runnable by either name; removing it by ID removes both."""
    hello, docker = runnable_images["hello"], runnable_images["hello-docker"]
    d, cs = crimaged(daemon_factory, tmp_path)
    assert d.client.pull(hello.ref()) == d.client.pull(docker.ref()) == hello.id_for()
    tree = StorageTree(cs)
    assert [i["id"] for i in tree.images()] == [hex_of(hello.id_for())]
    assert sorted(tree.images()[0]["names"]) == sorted([hello.ref(), docker.ref()])
    pm = podman_factory(crimage_store=cs)
    assert_runs(pm, hello.ref(), hello)
    assert_runs(pm, docker.ref(), docker)
    d.client.remove(hello.id_for())
    assert tree.images() == [] and tree.layers() == []
    assert pm.images() == []


def test_shared_layers_once_and_remove(daemon_factory, podman_factory, oracle, runnable_images, tmp_path):
    """hello and whiteout share the busybox layer: it is in layers.json once. RemoveImage of whiteout takes it out
    of podman's view and its two own layers out of layers.json, overlay/ and overlay/l/, while hello keeps
    running on the shared layer; removing hello too leaves an empty tree."""
    _, pulled = oracle
    hello, whiteout = runnable_images["hello"], runnable_images["whiteout"]
    d, cs = crimaged(daemon_factory, tmp_path)
    d.client.pull(hello.ref())
    d.client.pull(whiteout.ref())
    tree = StorageTree(cs)
    chain = pulled["whiteout"].chain
    base, own = chain[0], chain[1:]
    ids = [lay["id"] for lay in tree.layers()]
    assert sorted(ids) == sorted(chain), ids
    links = check_layout(tree, chain)
    pm = podman_factory(crimage_store=cs)
    assert pm.image_ids() == {hex_of(hello.id_for()), hex_of(whiteout.id_for())}

    d.client.remove(whiteout.ref())
    assert d.client.image(whiteout.ref()) is None
    assert not pm.exists(whiteout.ref()) and not pm.exists(hex_of(whiteout.id_for()))
    assert [lay["id"] for lay in tree.layers()] == [base]
    assert tree.overlay_dirs() == {base}
    assert set(tree.short_links()) == {links[base]}
    assert pm.image_ids() == {hex_of(hello.id_for())}
    assert_runs(pm, hello.ref(), hello)

    d.client.remove(hello.ref())
    assert pm.images() == []
    assert (tree.images(), tree.layers(), tree.overlay_dirs(), tree.short_links()) == ([], [], set(), {})
    for lid in own + [base]:
        assert not os.path.lexists(tree.path("overlay", lid))


def test_runtime_handler_trees(daemon_factory, podman_factory, runnable_images, tmp_path):
    """runtimeHandlers.<h>.containersStorage.root gives a handler's images a tree of their own; root "" gives a
    handler none; the other handlers use the top-level tree."""
    hello, whiteout, multi = runnable_images["hello"], runnable_images["whiteout"], runnable_images["multi-hello"]
    kata_cs = str(tmp_path / "cs-kata")
    d, cs = crimaged(daemon_factory, tmp_path, runtimeHandlers={
        "kata": {"containersStorage": {"root": kata_cs}},
        "plain": {"containersStorage": {"root": ""}},
    })
    d.client.pull(hello.ref(), handler="kata")
    d.client.pull(whiteout.ref())
    d.client.pull(multi.ref(), handler="plain")
    main_tree, kata_tree = StorageTree(cs), StorageTree(kata_cs)
    assert [i["id"] for i in kata_tree.images()] == [hex_of(hello.id_for())]
    assert [i["id"] for i in main_tree.images()] == [hex_of(whiteout.id_for())]
    assert [lay["id"] for lay in kata_tree.layers()] == expected_layer_ids(hello.single())
    for tree in (main_tree, kata_tree):
        assert tree.image(hex_of(multi.id_for())) is None

    kata = podman_factory(crimage_store=kata_cs)
    assert_runs(kata, hello.ref(), hello)
    assert not kata.exists(whiteout.ref())
    main = podman_factory(crimage_store=cs)
    assert main.image_ids() == {hex_of(whiteout.id_for())}
    assert_runs(main, whiteout.ref(), whiteout)


def test_restart_keeps_the_tree(daemon_factory, podman_factory, runnable_images, tmp_path):
    """crimaged stopped and started again on the same root leaves the tree as it was, and podman runs from it."""
    whiteout, hello = runnable_images["whiteout"], runnable_images["hello"]
    d, cs = crimaged(daemon_factory, tmp_path)
    d.client.pull(whiteout.ref())
    d.client.pull(hello.digest_ref())
    tree = StorageTree(cs)
    before = tree_state(tree)
    assert d.stop() == 0
    d2 = daemon_factory({"root": d.root, "containersStorage": {"root": cs}}, config_format="yaml")
    assert d2.client.image(whiteout.ref()).id == whiteout.id_for()
    assert tree_state(tree) == before
    pm = podman_factory(crimage_store=cs)
    assert_runs(pm, whiteout.ref(), whiteout)
    assert_runs(pm, hello.digest_ref(), hello)


@pytest.mark.parametrize("lost", ["images.json", "tree"])
def test_start_rebuilds_a_lost_tree(daemon_factory, podman_factory, oracle, runnable_images, tmp_path, lost):
    """crimaged started on a tree whose images.json was deleted, or with the tree gone altogether, publishes its
    images there again: podman runs them as before."""
    _, pulled = oracle
    whiteout, hello = runnable_images["whiteout"], runnable_images["hello"]
    d, cs = crimaged(daemon_factory, tmp_path)
    d.client.pull(whiteout.ref())
    d.client.pull(hello.ref())
    tree = StorageTree(cs)
    before = tree_state(tree)
    assert d.stop() == 0
    if lost == "tree":
        shutil.rmtree(cs)
    else:
        os.unlink(tree.path("overlay-images", "images.json"))
    daemon_factory({"root": d.root, "containersStorage": {"root": cs}}, config_format="yaml")
    wait_for(lambda: len(tree.images()) == 2, 2 * READY_TIMEOUT, "crimaged publishing its images again")
    assert tree_state(tree) == before
    check_layout(tree, pulled["whiteout"].chain)
    pm = podman_factory(crimage_store=cs)
    assert_runs(pm, whiteout.ref(), whiteout)
    assert_runs(pm, hello.ref(), hello)
