"""The fixture side on its own: generated images are deterministic and the registry serves what was generated."""

import gzip
import io
import json
import tarfile

import fixtures


def test_generation_is_deterministic():
    a, b = fixtures.build_catalog(), fixtures.build_catalog()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].manifest_digest == b[key].manifest_digest, key


def test_layers_are_valid_gzip_tars():
    cat = fixtures.build_catalog()
    for layer in cat["layers"].layers:
        tar_bytes = gzip.decompress(layer.data)
        assert fixtures.sha256(tar_bytes) == layer.diff_id
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            assert tar.getnames()


def test_shapes():
    cat = fixtures.build_catalog()
    assert len(cat["layers"].layers) == 3
    assert cat["layers"].layers[0].digest == cat["shared"].layers[0].digest  # a shared base layer
    multi = cat["multi"]
    amd, arm = multi.for_platform("linux/amd64"), multi.for_platform("linux/arm64")
    assert amd.config_digest != arm.config_digest
    assert not {layer.digest for layer in amd.layers} & {layer.digest for layer in arm.layers}
    assert cat["user1002"].config["config"]["User"] == "1002"
    assert cat["userwww"].config["config"]["User"] == "www-data"
    assert cat["user1003"].config["config"]["User"] == "1003:1004"
    assert cat["big"].compressed_size() > 4 << 20
    ids = [img.id for key, img in cat.items() if key != "multi"]
    assert len(ids) == len(set(ids))


def test_chain_id():
    d1, d2 = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert fixtures.chain_id([d1]) == d1
    assert fixtures.chain_id([d1, d2]) == fixtures.sha256(f"{d1} {d2}".encode())


def test_registry_serves_pushed_images(images, registry):
    for repo, p in images.items():
        raw = fixtures.registry_get(registry.host, f"/v2/{repo}/manifests/{p.manifest_digest}")
        assert fixtures.sha256(raw) == p.manifest_digest
        doc = json.loads(raw)
        if repo in ("multi", "layers", "big"):
            assert raw == (p.image.index_bytes if repo == "multi" else p.image.manifest_bytes)
        if "manifests" in doc:
            assert {m["platform"]["architecture"] for m in doc["manifests"]} == {"amd64", "arm64"}
            for m in doc["manifests"]:
                child = json.loads(fixtures.registry_get(registry.host, f"/v2/{repo}/manifests/{m['digest']}"))
                expected = p.image.for_platform(f"linux/{m['platform']['architecture']}")
                assert child["config"]["digest"] == expected.config_digest
        else:
            assert doc["config"]["digest"] == p.id_for()
            cfg = fixtures.registry_get(registry.host, f"/v2/{repo}/blobs/{doc['config']['digest']}")
            assert fixtures.sha256(cfg) == p.id_for()


def test_docker_media_types(images, registry):
    raw = fixtures.registry_get(registry.host, "/v2/dockerfmt/manifests/v1")
    doc = json.loads(raw)
    assert doc["mediaType"] == fixtures.MT_DOCKER_MANIFEST
    assert doc["config"]["digest"] == images["dockerfmt"].image.config_digest
    assert images["dockerfmt"].manifest_digest != images["dockerfmt"].image.manifest_digest
    lst = json.loads(fixtures.registry_get(registry.host, "/v2/multilist/manifests/v1"))
    assert lst["mediaType"] == fixtures.MT_DOCKER_LIST
