"""Image records keyed by (image, runtime handler), and per-handler platforms for multi-arch images."""

import json

import pytest

import fixtures

HOST = f"linux/{fixtures.host_arch()}"


@pytest.fixture
def hdaemon(daemon_factory):
    return daemon_factory({"runtimeHandlers": {
        "runc": {"platform": HOST},
        "kata": {"platform": HOST},
        "armh": {"platform": "linux/arm64"},
        "amdh": {"platform": "linux/amd64"},
    }})


def ids(images_):
    return sorted(i.id for i in images_)


def test_pulled_for_one_handler_absent_for_another(hdaemon, images):
    c, p = hdaemon.client, images["layers"]
    ref = c.pull(p.ref(), handler="runc")
    assert ref == p.id_for()
    img = c.image(p.ref(), handler="runc")
    assert img is not None and img.id == ref
    assert img.spec.runtime_handler == "runc"
    for key in (p.ref(), ref, p.digest_ref()):
        assert c.image(key, handler="kata") is None, key
    assert c.list(handler="kata") == []
    assert ids(c.list(handler="runc")) == [ref]
    assert ids(c.list(image=p.ref(), handler="runc")) == [ref]
    assert c.list(image=p.ref(), handler="kata") == []

    blobs = hdaemon.blob_files()
    assert c.pull(p.ref(), handler="kata") == ref
    assert hdaemon.blob_files() == blobs  # the blobs are shared, only the record is new
    kimg = c.image(p.ref(), handler="kata")
    assert kimg.id == ref and kimg.spec.runtime_handler == "kata"
    assert ids(c.list(handler="kata")) == [ref]
    handlers = {i.spec.runtime_handler for i in c.list() if i.id == ref}
    assert {"runc", "kata"} <= handlers


def test_remove_for_one_handler_keeps_the_other(hdaemon, images):
    c, p = hdaemon.client, images["layers"]
    c.pull(p.ref(), handler="runc")
    c.pull(p.ref(), handler="kata")
    blobs = hdaemon.blob_files()
    c.remove(p.ref(), handler="kata")
    assert c.image(p.ref(), handler="kata") is None
    assert c.list(handler="kata") == []
    img = c.image(p.ref(), handler="runc")
    assert img is not None and img.id == p.id_for()
    assert hdaemon.blob_files() == blobs  # still referenced by the runc record
    c.remove(p.ref(), handler="kata")  # idempotent
    c.remove(p.ref(), handler="runc")
    assert c.image(p.ref(), handler="runc") is None
    assert hdaemon.blob_files() == set()


def test_multiarch_default_handler_gets_host_platform(hdaemon, images):
    c, p = hdaemon.client, images["multi"]
    ref = c.pull(p.ref())
    assert ref == p.id_for(HOST)
    img = c.image(p.ref())
    assert img.id == ref
    assert list(img.repo_digests) == [p.digest_ref()]  # the index digest
    info = json.loads(c.status(p.ref(), verbose=True).info["info"])
    assert info["imageSpec"]["architecture"] == fixtures.host_arch()
    for layer in p.single(HOST).layers:
        assert hdaemon.has_blob(layer.digest)


def test_multiarch_handler_platform(hdaemon, images):
    c, p = hdaemon.client, images["multi"]
    arm, amd = p.single("linux/arm64"), p.single("linux/amd64")
    assert c.pull(p.ref(), handler="armh") == arm.config_digest
    assert c.pull(p.ref(), handler="amdh") == amd.config_digest
    a = c.image(p.ref(), handler="armh")
    assert a.id == arm.config_digest
    assert a.spec.runtime_handler == "armh"
    assert list(a.repo_digests) == [p.digest_ref()]
    assert json.loads(c.status(p.ref(), handler="armh", verbose=True).info["info"])["imageSpec"] == arm.config
    assert c.image(p.ref(), handler="amdh").id == amd.config_digest
    # the arm64 image is known to the armh handler only
    assert c.image(arm.config_digest, handler="armh").id == arm.config_digest
    assert c.image(arm.config_digest, handler="amdh") is None
    for layer in arm.layers + amd.layers:
        assert hdaemon.has_blob(layer.digest)
    # removing the arm64 record frees the arm64 blobs only
    c.remove(p.ref(), handler="armh")
    for layer in arm.layers:
        assert not hdaemon.has_blob(layer.digest)
    for layer in amd.layers:
        assert hdaemon.has_blob(layer.digest)
    assert c.image(p.ref(), handler="amdh").id == amd.config_digest


def test_list_reports_handler(hdaemon, images):
    c = hdaemon.client
    c.pull(images["layers"].ref(), handler="kata")
    c.pull(images["shared"].ref(), handler="runc")
    by_handler = {(i.id, i.spec.runtime_handler) for i in c.list()}
    assert (images["layers"].id_for(), "kata") in by_handler
    assert (images["shared"].id_for(), "runc") in by_handler
    assert ids(c.list(handler="kata")) == [images["layers"].id_for()]
    assert ids(c.list(handler="runc")) == [images["shared"].id_for()]
