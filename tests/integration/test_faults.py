"""Fault injection between crimaged and a real registry (registry_helpers.FaultProxy in front of the session's
docker-registry): a connection dropped mid-blob, a corrupted byte, a trickling blob, 500 and 429 answers, blobs
redirected to another host. Each case ends in recovery or in a clear error, with nothing corrupt in the store."""

import time

import grpc
import pytest

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
