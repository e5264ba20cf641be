"""The five ImageService RPCs end to end: crimaged pulling from a real registry into a temporary store."""

import json
import os
import subprocess

import grpc
import pytest

import fixtures


def tags_of(img):
    return sorted(img.repo_tags)


# ---------------------------------------------------------------------------------------------------------------
# ImageFsInfo


def test_imagefsinfo_empty_store(daemon):
    resp = daemon.client.fsinfo()
    assert len(resp.image_filesystems) >= 1
    fs = resp.image_filesystems[0]
    assert fs.fs_id.mountpoint
    assert os.path.isabs(fs.fs_id.mountpoint)
    assert fs.timestamp > 0
    assert fs.HasField("used_bytes") and fs.HasField("inodes_used")


def test_imagefsinfo_counts_pulled_content(daemon, images):
    before = daemon.client.fsinfo().image_filesystems[0]
    daemon.client.pull(images["big"].ref())
    after = daemon.client.fsinfo().image_filesystems[0]
    assert after.used_bytes.value > 0
    assert after.inodes_used.value > 0
    # the big image alone holds more than 4 MiB of incompressible data
    assert after.used_bytes.value >= before.used_bytes.value + (4 << 20)
    assert after.inodes_used.value > before.inodes_used.value
    assert after.timestamp > 0
    # the mountpoint names the store (or a directory above it)
    assert os.path.realpath(daemon.root).startswith(os.path.realpath(after.fs_id.mountpoint))


# ---------------------------------------------------------------------------------------------------------------
# PullImage


def test_pull_returns_config_digest(daemon, images):
    p = images["layers"]
    ref = daemon.client.pull(p.ref("v1"))
    assert ref == p.id_for() == fixtures.sha256(p.image.config_bytes)
    img = daemon.client.image(ref)
    assert img is not None
    assert img.id == ref
    assert tags_of(img) == [p.ref("v1")]
    assert list(img.repo_digests) == [p.digest_ref()]
    assert img.size >= min(p.image.compressed_size(), p.image.uncompressed_size())


def test_pull_implied_latest_normalized(daemon, images):
    p = images["layers"]
    ref = daemon.client.pull(p.name)  # no tag: latest
    assert ref == p.id_for()
    img = daemon.client.image(ref)
    assert tags_of(img) == [f"{p.name}:latest"]


def test_pull_second_tag_adds_tag_to_same_image(daemon, images):
    p = images["layers"]
    a = daemon.client.pull(p.ref("v1"))
    b = daemon.client.pull(p.ref("latest"))
    assert a == b == p.id_for()
    img = daemon.client.image(a)
    assert tags_of(img) == sorted([p.ref("v1"), p.ref("latest")])
    assert list(img.repo_digests) == [p.digest_ref()]
    assert len([i for i in daemon.client.list() if i.id == a]) == 1


def test_pull_is_idempotent(daemon, images):
    p = images["shared"]
    assert daemon.client.pull(p.ref()) == daemon.client.pull(p.ref()) == p.id_for()
    assert [i.id for i in daemon.client.list()] == [p.id_for()]


def test_pull_by_digest_has_no_tags(daemon, images):
    p = images["layers"]
    ref = daemon.client.pull(p.digest_ref())
    assert ref == p.id_for()
    img = daemon.client.image(ref)
    assert list(img.repo_tags) == []
    assert list(img.repo_digests) == [p.digest_ref()]
    assert daemon.client.image(p.ref("v1")) is None
    # pulling it by tag afterwards adds the tag to the same image
    assert daemon.client.pull(p.ref("v1")) == ref
    img = daemon.client.image(p.digest_ref())
    assert list(img.repo_tags) == [p.ref("v1")]
    assert len(daemon.client.list()) == 1


def test_pull_tag_and_digest_pulls_the_digest(daemon, images):
    # the tag names nothing in the registry: only the digest may be used
    p = images["layers"]
    ref = daemon.client.pull(f"{p.name}:no-such-tag@{p.manifest_digest}")
    assert ref == p.id_for()
    img = daemon.client.image(ref)
    assert p.digest_ref() in img.repo_digests


def test_pull_docker_schema2(daemon, images):
    p = images["dockerfmt"]
    ref = daemon.client.pull(p.ref())
    assert ref == p.id_for()
    img = daemon.client.image(ref)
    assert list(img.repo_digests) == [p.digest_ref()]  # the digest of the Docker manifest served
    assert tags_of(img) == [p.ref()]


def test_pull_docker_manifest_list(daemon, images):
    p = images["multilist"]
    ref = daemon.client.pull(p.ref())
    assert ref == p.id_for(f"linux/{fixtures.host_arch()}")
    assert list(daemon.client.image(ref).repo_digests) == [p.digest_ref()]


def test_pull_default_registry(daemon_factory, images, registry):
    p = images["team/app"]
    d = daemon_factory({"defaultRegistry": registry.host})
    ref = d.client.pull("team/app:v1")
    assert ref == p.id_for()
    assert tags_of(d.client.image(ref)) == [p.ref("v1")]
    assert d.client.image("team/app:v1").id == ref


def test_pull_unknown_tag_fails_not_found(daemon, images):
    with pytest.raises(grpc.RpcError) as e:
        daemon.client.pull(images["layers"].ref("does-not-exist"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    assert "does-not-exist" in e.value.details()
    assert daemon.client.list() == []


def test_pull_unknown_digest_error_names_repo_at_digest(daemon, images, registry):
    missing = "sha256:" + "0" * 64
    with pytest.raises(grpc.RpcError) as e:
        daemon.client.pull(f"{registry.host}/layers@{missing}")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    # a repository and a digest are joined with "@", as a reference writes them
    assert f"layers@{missing}" in e.value.details(), e.value.details()
    assert f"layers:{missing}" not in e.value.details(), e.value.details()


def test_pull_stores_blobs(daemon, images):
    p = images["layers"]
    daemon.client.pull(p.ref())
    for digest in [p.image.config_digest] + [layer.digest for layer in p.image.layers]:
        assert daemon.has_blob(digest), digest


# ---------------------------------------------------------------------------------------------------------------
# ImageStatus


@pytest.fixture
def pulled(daemon, images):
    """The daemon with `layers:v1` and `shared:v1` pulled."""
    for repo in ("layers", "shared"):
        daemon.client.pull(images[repo].ref("v1"))
    return daemon


def test_status_lookups(pulled, images):
    p = images["layers"]
    full = p.id_for()
    hexid = full.split(":", 1)[1]
    lookups = {
        "full id": full,
        "short id": hexid[:12],
        "bare hex": hexid,
        "tag": p.ref("v1"),
        "repo digest": p.digest_ref(),
    }
    for what, key in lookups.items():
        img = pulled.client.image(key)
        assert img is not None, f"ImageStatus by {what} ({key}) found nothing"
        assert img.id == full, what
        assert img.size > 0, what


def test_status_short_name_implies_latest(daemon, images):
    p = images["layers"]
    daemon.client.pull(p.ref("latest"))
    assert daemon.client.image(p.name).id == p.id_for()
    assert daemon.client.image(p.ref("v1")) is None  # not pulled under that tag


def test_status_unknown_image_is_ok_without_image(pulled, images):
    for key in [f"{images['layers'].name}:nope", "127.0.0.1:1/none:latest", "sha256:" + "0" * 64, "abcdef012345",
                images["big"].ref()]:
        resp = pulled.client.status(key)
        assert not resp.HasField("image"), key


def test_status_other_image_is_distinct(pulled, images):
    a = pulled.client.image(images["layers"].ref("v1"))
    b = pulled.client.image(images["shared"].ref("v1"))
    assert a.id != b.id
    assert b.id == images["shared"].id_for()


def test_status_verbose(pulled, images):
    p = images["layers"]
    resp = pulled.client.status(p.ref("v1"), verbose=True)
    assert resp.image.id == p.id_for()
    assert "info" in resp.info
    info = json.loads(resp.info["info"])
    assert info["imageSpec"] == p.image.config
    assert info["chainID"] == p.image.chain_id
    # written as containerd (Go's encoding/json) writes it: "/" is not escaped as "\/"
    assert "/" in resp.info["info"] and "\\/" not in resp.info["info"], resp.info["info"][:200]


def test_proto_image_is_upstream_subset(cri):
    # runtime.v1.Image of upstream cri-api has fields 1-8; a field of our own would be misread once upstream
    # assigns its number
    assert sorted(f.number for f in cri.Image.DESCRIPTOR.fields) == list(range(1, 9))


def test_status_not_verbose_has_no_info(pulled, images):
    resp = pulled.client.status(images["layers"].ref("v1"))
    assert "info" not in resp.info


@pytest.mark.parametrize("repo,uid,username", [
    ("user1002", 1002, ""),
    ("userwww", None, "www-data"),
    ("user1003", 1003, ""),
    ("layers", None, ""),
])
def test_status_user(daemon, images, repo, uid, username):
    p = images[repo]
    daemon.client.pull(p.ref())
    img = daemon.client.image(p.ref())
    assert img.id == p.id_for()
    if uid is None:
        assert not img.HasField("uid")
    else:
        assert img.HasField("uid") and img.uid.value == uid
    assert img.username == username
    assert img.size > 0


# ---------------------------------------------------------------------------------------------------------------
# ListImages


def test_list_empty(daemon):
    assert daemon.client.list() == []
    assert daemon.client.list(image="") == []


def test_list_all_and_filtered(pulled, images):
    layers, shared = images["layers"], images["shared"]
    all_images = pulled.client.list()
    assert sorted(i.id for i in all_images) == sorted([layers.id_for(), shared.id_for()])
    for i in all_images:
        assert i.size > 0
        assert i.repo_tags and i.repo_digests
    by_tag = pulled.client.list(image=layers.ref("v1"))
    assert [i.id for i in by_tag] == [layers.id_for()]
    by_id = pulled.client.list(image=shared.id_for())
    assert [i.id for i in by_id] == [shared.id_for()]
    assert pulled.client.list(image=images["big"].ref()) == []


def test_list_filter_by_repository_matches_every_tag(daemon, images, registry, tmp_path):
    # `crictl images busybox` listed nothing when only busybox:1.36 was there: a repository without tag or digest
    # selects every image of it, as `docker images` and CRI-O do
    a = fixtures.push_one(str(tmp_path), registry.host, "layers", "repofilter", "a", None)
    b = fixtures.push_one(str(tmp_path), registry.host, "shared", "repofilter", "b", None)
    u = images["user1002"]
    c = daemon.client
    c.pull(a.ref("a"))
    c.pull(b.ref("b"))
    c.pull(u.digest_ref())  # by digest only: no tag names it, its repo digest does
    c.pull(images["layers"].ref("v1"))  # the same image as repofilter:a, in another repository

    def ids(listed):
        return sorted(i.id for i in listed)

    assert ids(c.list(image=a.name)) == sorted([a.id_for(), b.id_for()])
    assert ids(c.list(image=images["layers"].name)) == [a.id_for()]
    assert ids(c.list(image=u.name)) == [u.id_for()]
    # a tag, a digest or an ID still selects exactly one image
    assert ids(c.list(image=a.ref("a"))) == [a.id_for()]
    assert ids(c.list(image=b.ref("b"))) == [b.id_for()]
    assert c.list(image=a.ref("latest")) == []
    assert ids(c.list(image=u.digest_ref())) == [u.id_for()]
    assert ids(c.list(image=b.id_for())) == [b.id_for()]
    assert ids(c.list(image=b.id_for().split(":", 1)[1][:12])) == [b.id_for()]
    # a repository whose name merely starts the same is another one; the handler scope is as for any filter
    assert c.list(image=a.name[:-1]) == []
    assert c.list(image=a.name + "/sub") == []
    assert c.list(image=a.name, handler="kata") == []


def test_list_matches_status(pulled, images):
    for i in pulled.client.list():
        s = pulled.client.image(i.id)
        assert s.id == i.id
        assert sorted(s.repo_tags) == sorted(i.repo_tags)
        assert sorted(s.repo_digests) == sorted(i.repo_digests)
        assert s.size == i.size


# ---------------------------------------------------------------------------------------------------------------
# RemoveImage


def test_remove_is_idempotent_and_removes_all_tags(daemon, images):
    p = images["layers"]
    daemon.client.pull(p.ref("v1"))
    daemon.client.pull(p.ref("latest"))
    daemon.client.remove(p.ref("v1"))
    for key in (p.ref("v1"), p.ref("latest"), p.id_for(), p.digest_ref()):
        assert daemon.client.image(key) is None, key
    assert daemon.client.list() == []
    daemon.client.remove(p.ref("v1"))  # again: still OK
    daemon.client.remove(p.id_for())
    daemon.client.remove("127.0.0.1:1/never/pulled:latest")


def test_remove_by_id(pulled, images):
    pulled.client.remove(images["shared"].id_for())
    assert pulled.client.image(images["shared"].ref("v1")) is None
    assert pulled.client.image(images["layers"].ref("v1")).id == images["layers"].id_for()


def test_remove_frees_blobs_but_keeps_shared_layers(daemon, images):
    layers, shared = images["layers"].image, images["shared"].image
    assert daemon.blob_files() == set()
    daemon.client.pull(images["layers"].ref())
    n_layers = len(daemon.blob_files())
    daemon.client.pull(images["shared"].ref())
    files = daemon.blob_files()
    # the base layer is common to both: stored once
    assert layers.layers[0].digest == shared.layers[0].digest
    assert len(files) == n_layers + 3  # shared's manifest, config and second layer
    daemon.client.remove(images["shared"].ref())
    assert len(daemon.blob_files()) == n_layers
    assert not daemon.has_blob(shared.config_digest)
    assert not daemon.has_blob(shared.layers[1].digest)
    assert daemon.has_blob(shared.layers[0].digest)  # still used by `layers`
    daemon.client.remove(images["layers"].ref())
    assert daemon.blob_files() == set()


def test_store_survives_restart(daemon_factory, images, registry):
    d = daemon_factory()
    p = images["layers"]
    d.client.pull(p.ref("v1"))
    assert d.stop() == 0
    d2 = daemon_factory({"root": d.root})
    img = d2.client.image(p.ref("v1"))
    assert img is not None and img.id == p.id_for()
    assert list(img.repo_digests) == [p.digest_ref()]


# ---------------------------------------------------------------------------------------------------------------
# The store is an OCI image layout other tools can read


def test_skopeo_inspects_store(daemon, images):
    p = images["layers"]
    daemon.client.pull(p.ref("v1"))
    assert os.path.isfile(os.path.join(daemon.root, "oci-layout"))
    assert os.path.isfile(os.path.join(daemon.root, "index.json"))
    out = subprocess.run(["skopeo", "inspect", f"oci:{daemon.root}:{p.ref('v1')}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["Digest"] == p.image.manifest_digest
    assert info["Layers"] == [layer.digest for layer in p.image.layers]
    cfg = subprocess.run(["skopeo", "inspect", "--raw", "--config", f"oci:{daemon.root}:{p.ref('v1')}"],
                         capture_output=True, timeout=60)
    assert cfg.returncode == 0, cfg.stderr
    assert fixtures.sha256(cfg.stdout) == p.id_for()


# ---------------------------------------------------------------------------------------------------------------
# A crictl-like sequence: every crictl image command first calls ImageFsInfo


def test_crictl_like_sequence(daemon, images):
    c = daemon.client
    p = images["user1002"]
    assert c.fsinfo().image_filesystems
    assert c.list(image="") == []  # crictl always sends a filter, possibly empty
    assert c.fsinfo().image_filesystems
    ref = c.pull(p.ref())
    assert ref == p.id_for()
    assert c.fsinfo().image_filesystems
    listed = c.list(image="")
    assert [i.id for i in listed] == [ref]
    assert listed[0].repo_tags == [p.ref()]
    st = c.status(p.ref(), verbose=True)  # crictl inspecti
    assert st.image.id and st.image.size > 0
    assert json.loads(st.info["info"])["imageSpec"]["config"]["User"] == "1002"
    c.remove(p.ref())  # crictl rmi resolves and removes by id
    assert c.list(image="") == []
    assert c.image(p.ref()) is None


def test_yaml_config_and_flags(daemon_factory, images, registry, tmp_path):
    """The config file may be YAML; command-line flags override it."""
    flag_root = str(tmp_path / "flag-root")
    d = daemon_factory({"root": str(tmp_path / "file-root"), "logLevel": "info"}, config_format="yaml",
                       args=["--root", flag_root])
    assert d.root == flag_root
    p = images["shared"]
    assert d.client.pull(p.ref()) == p.id_for()
    assert d.has_blob(p.image.config_digest)
    assert not os.path.exists(os.path.join(str(tmp_path / "file-root"), "blobs"))


def test_flags_override_config(short_dir, daemon_factory, images, registry):
    sock = os.path.join(short_dir, "flag.sock")
    d = daemon_factory({"defaultRegistry": "registry.example.invalid", "logLevel": "error"},
                       args=["--default-registry", registry.host, "--log-level", "debug", "--socket", sock])
    assert d.socket == sock
    assert not os.path.exists(d.config["socket"])
    p = images["team/app"]
    assert d.client.pull("team/app:v1") == p.id_for()
    assert tags_of(d.client.image(p.id_for())) == [p.ref("v1")]
    with open(d.log) as f:
        assert " debug " in f.read()  # --log-level debug won over the file's "error"


def test_insecure_registry_flag(daemon_factory, images, registry):
    d = daemon_factory({"registries": None}, args=["--insecure-registry", registry.host])
    p = images["shared"]
    assert d.client.pull(p.ref()) == p.id_for()


def test_pinned_images(daemon_factory, images):
    """Images named in pinnedImages (by tag or by digest) report pinned, so kubelet's image GC leaves them alone."""
    pinned, other = images["user1002"], images["shared"]
    d = daemon_factory({"pinnedImages": [pinned.ref()]})
    c = d.client
    c.pull(pinned.ref())
    c.pull(other.ref())
    assert c.image(pinned.ref()).pinned
    assert not c.image(other.ref()).pinned
    listed = {i.id: i.pinned for i in c.list(image="")}
    assert listed == {pinned.id_for(): True, other.id_for(): False}
