"""Image records keyed by (image, runtime handler), and per-handler platforms for multi-arch images."""

import json
import os

import grpc
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


# ---------------------------------------------------------------------------------------------------------------
# Handler names: what the service stores and returns stays valid


BAD_HANDLERS = ["Kata", "kata_qemu", "kata.qemu", "-kata", "kata-", "k" * 64, "k\u00e4ta", "a/b"]


@pytest.mark.parametrize("handler", BAD_HANDLERS)
def test_invalid_handler_is_invalid_argument(daemon, cri, images, handler):
    # a handler is a key of the store and goes into every ListImages reply: only names kubelet can send (a
    # RuntimeClass handler is a DNS label) are taken
    c, p = daemon.client, images["layers"]
    calls = [
        ("PullImage", cri.PullImageRequest(image=cri.ImageSpec(image=p.ref(), runtime_handler=handler))),
        ("PullImage", cri.PullImageRequest(
            image=cri.ImageSpec(image=p.ref()),
            sandbox_config=cri.PodSandboxConfig(annotations={"io.containerd.cri.runtime-handler": handler}))),
        ("ImageStatus", cri.ImageStatusRequest(image=cri.ImageSpec(image=p.ref(), runtime_handler=handler))),
        ("RemoveImage", cri.RemoveImageRequest(image=cri.ImageSpec(image=p.ref(), runtime_handler=handler))),
        ("ListImages", cri.ListImagesRequest(filter=cri.ImageFilter(image=cri.ImageSpec(runtime_handler=handler)))),
    ]
    for method, req in calls:
        with pytest.raises(grpc.RpcError) as e:
            c.call(method, req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.value)
        assert "invalid runtime handler" in e.value.details() and "DNS label" in e.value.details(), e.value.details()
    assert c.list() == []
    assert daemon.alive()


def test_invalid_handler_in_config_is_refused(daemon_factory):
    with pytest.raises(RuntimeError) as e:
        daemon_factory({"runtimeHandlers": {"Kata_QEMU": {}}})
    assert "runtimeHandlers" in str(e.value) and "Kata_QEMU" in str(e.value), str(e.value)[-2000:]


def test_bad_record_in_index_never_breaks_list(daemon_factory, images):
    """A record whose handler is not UTF-8 made every ListImages reply invalid protobuf (strict clients refuse it),
    also after a restart. Loading the store drops that record; the other images are listed as before."""
    d = daemon_factory()
    c = d.client
    good, bad = images["layers"], images["shared"]
    c.pull(good.ref())
    c.pull(bad.ref(), handler="kata")
    assert d.stop() == 0
    index = os.path.join(d.root, "index.json")
    with open(index, "rb") as f:
        text = f.read()
    marker = b'"io.crimage.runtime-handler":"kata"'
    assert marker in text
    with open(index, "wb") as f:
        f.write(text.replace(marker, b'"io.crimage.runtime-handler":"k\xffta"'))
    d2 = daemon_factory({"root": d.root})
    listed = d2.client.list()  # the generated client parses strictly: invalid UTF-8 would raise here
    assert [(i.id, i.spec.runtime_handler) for i in listed] == [(good.id_for(), "")]
    assert d2.client.image(good.ref()).id == good.id_for()
    # the bad record is gone for good: the store rewrote its index without it
    with open(index, "rb") as f:
        assert b"k\xffta" not in f.read()
    assert d2.client.pull(bad.ref(), handler="kata") == bad.id_for()
    assert {(i.id, i.spec.runtime_handler) for i in d2.client.list()} == {(good.id_for(), ""), (bad.id_for(), "kata")}
