"""Fault injection between crimaged and a real registry (registry_helpers.FaultProxy in front of the session's
docker-registry): a connection dropped mid-blob, a corrupted byte, a trickling blob, 500 and 429 answers, blobs
redirected to another host, a blob that always fails. Each case ends in recovery or in a clear error, with nothing
corrupt in the store, and what a failed pull left kept for a retry only as long as its retention."""

import os
import signal
import time

import grpc
import pytest

from conftest import wait_for
from registry_helpers import FaultProxy

BACKOFF = {"pullBackoff": {"initial": "1s", "max": "1s"}}


@pytest.fixture
def proxy(registry, images):
    p = FaultProxy(registry.host)
    yield p
    p.stop()


def big_layer(images):
    return images["big"].image.layers[-1]


def start(daemon_factory, proxy, **extra):
    return daemon_factory(dict({"registries": {proxy.host: {"insecure": True}}}, **BACKOFF, **extra))


def blob_path(digest):
    return f"/v2/big/blobs/{digest}"


def pull_after_backoff(client, ref, **kw):
    """Pulls again once the daemon's back-off for the failed pull has passed."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.pull(ref, **kw)
        except grpc.RpcError as e:
            if "back-off" not in e.details().lower() and "backoff" not in e.details().lower() \
                    or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_drop_mid_blob_resumes_with_range(daemon_factory, proxy, images):
    layer = big_layer(images)
    assert layer.size > 1 << 20
    proxy.drop_blob = layer.digest
    d = start(daemon_factory, proxy)
    ref = d.client.pull(f"{proxy.host}/big:v1")
    assert ref == images["big"].image.id
    gets = [r for r in proxy.requests if r["path"] == blob_path(layer.digest) and r["method"] == "GET"]
    ranged = [r for r in gets if r["range"]]
    assert len(ranged) == 1, gets
    assert ranged[0]["range"].startswith("bytes=") and ranged[0]["range"] != "bytes=0-", ranged
    assert d.has_blob(layer.digest)
    assert not d.corrupt_blobs()


def test_corrupt_byte_is_data_loss_then_retry_succeeds(daemon_factory, proxy, images):
    layer = big_layer(images)
    proxy.corrupt_blob = layer.digest
    d = start(daemon_factory, proxy)
    ref = f"{proxy.host}/big:v1"
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(ref)
    msg = e.value.details()
    assert e.value.code() == grpc.StatusCode.DATA_LOSS, msg
    assert proxy.host in msg and "layer" in msg, msg
    assert not d.has_blob(layer.digest)
    assert not d.corrupt_blobs()
    assert pull_after_backoff(d.client, ref) == images["big"].image.id
    assert d.has_blob(layer.digest)
    assert not d.corrupt_blobs()


def test_500_then_ok_is_retried(daemon_factory, proxy, images):
    proxy.manifest_errors = [(500, []), (503, [("Retry-After", "0")])]
    d = start(daemon_factory, proxy)
    assert d.client.pull(f"{proxy.host}/layers:v1") == images["layers"].image.id
    assert proxy.count(kind="error500") == 1 and proxy.count(kind="error503") == 1


def test_429_with_retry_after_is_retried(daemon_factory, proxy, images):
    proxy.manifest_errors = [(429, [("Retry-After", "1")])]
    d = start(daemon_factory, proxy)
    assert d.client.pull(f"{proxy.host}/shared:v1") == images["shared"].image.id
    assert proxy.count(kind="error429") == 1


def test_huge_retry_after_is_capped_not_negative(daemon_factory, proxy, images):
    # 9300000000000000 s * 1000 overflowed int64: a negative delay, an immediate retry (and UBSan's report)
    proxy.manifest_errors = [(503, [("Retry-After", "9300000000000000")])]
    d = start(daemon_factory, proxy)
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(f"{proxy.host}/shared:v1", timeout=3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    # the daemon waits the longest it allows instead of retrying at once
    assert proxy.count(kind="error503") == 1
    wanted = "retrying in 30000 ms"
    deadline = time.monotonic() + 10
    while wanted not in open(d.log, errors="replace").read():
        assert time.monotonic() < deadline, open(d.log, errors="replace").read()[-3000:]
        time.sleep(0.1)
    assert d.alive()


def test_429_persisting_is_a_clear_error(daemon_factory, proxy, images):
    proxy.manifest_errors = [(429, [("Retry-After", "0")])] * 10
    d = start(daemon_factory, proxy)
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(f"{proxy.host}/shared:v1")
    msg = e.value.details()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    assert proxy.host in msg and "HTTP 429" in msg and "TOOMANYREQUESTS" in msg, msg


def test_redirect_to_other_host_drops_authorization(daemon_factory, proxy, images, cri):
    proxy.basic = ("bob", "b0b:secret")
    proxy.redirect_blobs = True
    d = start(daemon_factory, proxy)
    ref = d.client.pull(f"{proxy.host}/layers:v1", auth=cri.AuthConfig(username="bob", password="b0b:secret"))
    assert ref == images["layers"].image.id
    redirected = [r for r in proxy.requests if r["kind"] == "redirected"]
    assert len(redirected) >= len(images["layers"].image.layers) + 1, proxy.requests
    assert not [r for r in redirected if r["auth"]], redirected
    # the registry itself did get the credentials
    assert proxy.count(kind="redirect", auth=True) >= 1
    assert not d.corrupt_blobs()


def test_trickle_ends_with_throughput_error(daemon_factory, proxy, images):
    """A blob sent at 64 bytes/s stays under the floor (here 1 KiB/s over a 2 s window; the default window is 30 s):
    the pull fails with a message saying so instead of running for hours."""
    layer = big_layer(images)
    proxy.trickle_blob = layer.digest
    d = start(daemon_factory, proxy, pullMinThroughput=1024, pullMinThroughputWindow="2s")
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(f"{proxy.host}/big:v1", timeout=120)
    msg = e.value.details()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, msg
    assert "slower than 1024 bytes/s over 2 s" in msg and layer.digest in msg, msg
    assert not d.has_blob(layer.digest)
    assert not d.corrupt_blobs()


def used_bytes(client):
    return client.fsinfo().image_filesystems[0].used_bytes.value


def blob_gets(proxy, digest):
    return [r for r in proxy.requests if r["method"] == "GET" and r["path"] == f"/v2/layers/blobs/{digest}"]


def ingest_files(d):
    return os.listdir(os.path.join(d.root, "ingest"))


def test_failed_pull_leftovers_are_counted_then_reclaimed(daemon_factory, proxy, images):
    """A pull failing on its last layer leaves the blobs it committed (counted by ImageFsInfo, kept for a retry) and no
    empty partial of the blob that failed; once their retention has passed they are deleted with the daemon
    running."""
    img = images["layers"].image
    last = img.layers[-1].digest
    proxy.fail_blobs = {last: 404}
    # one download at a time: the layers before the last are committed when it fails (in parallel, its failure
    # would cancel them)
    d = start(daemon_factory, proxy, unreferencedBlobRetention="3s", maxConcurrentDownloads=1)
    before = used_bytes(d.client)
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(f"{proxy.host}/layers:v1")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    committed = [img.id] + [layer.digest for layer in img.layers[:-1]]
    assert all(d.has_blob(x) for x in committed)
    assert not d.has_blob(last)
    assert ingest_files(d) == []  # no empty partial of the blob that always fails
    assert used_bytes(d.client) >= before + sum(layer.size for layer in img.layers[:-1])
    assert d.client.list() == []
    wait_for(lambda: not any(d.has_blob(x) for x in committed), 30, "leftovers reclaimed")
    assert d.blob_files() == set()
    assert used_bytes(d.client) < before + sum(layer.size for layer in img.layers[:-1])
    with open(d.log) as f:
        assert "unreferenced" in f.read()


def test_restart_keeps_what_a_failed_pull_verified(daemon_factory, proxy, images):
    """The layers a pull verified before it failed survive a restart (the start-up sweep deleted them), and the retry
    after the restart downloads only what is missing."""
    img = images["layers"].image
    last = img.layers[-1].digest
    proxy.fail_blobs = {last: 404}
    d = start(daemon_factory, proxy, maxConcurrentDownloads=1)
    with pytest.raises(grpc.RpcError):
        d.client.pull(f"{proxy.host}/layers:v1")
    d.proc.send_signal(signal.SIGKILL)  # as an interrupted pull's daemon would go
    d.proc.wait(30)
    d.stopped = True
    proxy.fail_blobs = {}
    d2 = start(daemon_factory, proxy, root=d.root)
    assert all(d2.has_blob(layer.digest) for layer in img.layers[:-1])
    ref = d2.client.pull(f"{proxy.host}/layers:v1")
    assert ref == img.id
    for layer in img.layers[:-1]:
        assert len(blob_gets(proxy, layer.digest)) == 1, layer.digest
    assert not d2.corrupt_blobs()
