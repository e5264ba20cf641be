"""Mirrors: a second docker-registry in proxy mode (a pull-through cache of the session registry) configured as the
mirror of the upstream; a mirror that is down and one that stalls fall through to the next and to the upstream."""

import os
import socket
import threading

import grpc
import pytest

from conftest import free_port, wait_for
from registry_helpers import RegistryProcess


@pytest.fixture
def mirror(registry, images, tmp_path):
    m = RegistryProcess(str(tmp_path / "mirror"),
                        extra=f"proxy:\n  remoteurl: http://{registry.host}\n").start()
    yield m
    m.stop()


@pytest.fixture
def stalled(tmp_path):
    """A server that accepts connections and never answers."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    stop = threading.Event()

    def run():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}", held
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def config(registry, *endpoints, **extra):
    return dict({"registries": {registry.host: {"insecure": True,
                                                "mirrors": [{"endpoint": e} for e in endpoints]}}}, **extra)


def config_hex(images, repo):
    return images[repo].image.id.split(":", 1)[1]


def test_pull_through_mirror(daemon_factory, registry, images, mirror):
    d = daemon_factory(config(registry, f"http://{mirror.host}"))
    ref = d.client.pull(f"{registry.host}/layers:v1")
    assert ref == images["layers"].image.id
    # the mirror fetched the image from the upstream for us: its cache now holds the config blob
    wait_for(lambda: config_hex(images, "layers") in mirror.blob_digests(), 30, "mirror cache")
    assert not d.corrupt_blobs()


def test_mirror_down_falls_through(daemon_factory, registry, images, mirror):
    down = f"http://127.0.0.1:{free_port()}"
    d = daemon_factory(config(registry, down, f"http://{mirror.host}"))
    ref = d.client.pull(f"{registry.host}/shared:v1")
    assert ref == images["shared"].image.id
    wait_for(lambda: config_hex(images, "shared") in mirror.blob_digests(), 30, "mirror cache")


def test_mirror_stall_falls_through_to_next_mirror(daemon_factory, registry, images, mirror, stalled):
    host, held = stalled
    down = f"http://127.0.0.1:{free_port()}"
    d = daemon_factory(config(registry, f"http://{host}", down, f"http://{mirror.host}", pullProgressTimeout="2s"))
    ref = d.client.pull(f"{registry.host}/user1002:v1")
    assert ref == images["user1002"].image.id
    assert held, "the stalled mirror was never tried"
    # the timeout on the first mirror did not skip the others: the last mirror served the pull
    wait_for(lambda: config_hex(images, "user1002") in mirror.blob_digests(), 30, "mirror cache")


def test_mirror_stall_falls_through_to_upstream(daemon_factory, registry, images, stalled):
    host, held = stalled
    d = daemon_factory(config(registry, f"http://{host}", pullProgressTimeout="2s"))
    ref = d.client.pull(f"{registry.host}/userwww:v1")
    assert ref == images["userwww"].image.id
    assert held


def test_error_names_mirrors_tried(daemon_factory, registry, images, mirror):
    down = f"http://127.0.0.1:{free_port()}"
    d = daemon_factory(config(registry, down, f"http://{mirror.host}"))
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(f"{registry.host}/layers:no-such-tag")
    msg = e.value.details()
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, msg
    assert registry.host in msg and "MANIFEST_UNKNOWN" in msg and "HTTP 404" in msg, msg
    assert down in msg and mirror.host in msg, msg


def test_error_names_stalled_mirror(daemon_factory, registry, images, stalled):
    host, held = stalled
    d = daemon_factory(config(registry, f"http://{host}", pullProgressTimeout="1s"))
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(f"{registry.host}/layers:no-such-tag")
    msg = e.value.details()
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, msg
    assert f"mirror http://{host}: UNAVAILABLE" in msg and registry.host in msg and "MANIFEST_UNKNOWN" in msg, msg
    # the daemon's log has the mirror's own reason
    with open(d.log) as f:
        assert f"registry {host}: manifest layers:no-such-tag: no progress for 1 s" in f.read()


def closed_port_host():
    """host:port of a local port nothing listens on: the upstream of the mirrors-only tests (never a public name)."""
    return f"127.0.0.1:{free_port()}"


def mirrors_only(upstream, *endpoints, **extra):
    return dict({"registries": {upstream: {"upstream": False,
                                           "mirrors": [{"endpoint": e} for e in endpoints]}}}, **extra)


def test_mirrors_only_serves_without_upstream(daemon_factory, images, mirror):
    upstream = closed_port_host()
    d = daemon_factory(mirrors_only(upstream, f"http://{mirror.host}"))
    ref = d.client.pull(f"{upstream}/layers:v1")
    assert ref == images["layers"].image.id
    assert d.client.image(f"{upstream}/layers:v1") is not None
    # what the mirror lacks is NOT_FOUND with the mirror's answer, and the upstream was never asked
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(f"{upstream}/layers:no-such-tag")
    msg = e.value.details()
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, msg
    assert f"registry {mirror.host}:" in msg and "MANIFEST_UNKNOWN" in msg, msg
    assert "upstream" not in msg and f"registry {upstream}:" not in msg, msg
    with open(d.log) as f:
        assert f"registry {upstream}:" not in f.read()


def test_mirrors_only_every_mirror_down(daemon_factory, images):
    upstream = closed_port_host()
    down1, down2 = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    d = daemon_factory(mirrors_only(upstream, down1, down2))
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(f"{upstream}/layers:v1")
    msg = e.value.details()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, msg
    assert f"every endpoint failed: mirror {down1}: UNAVAILABLE" in msg and f"; mirror {down2}: UNAVAILABLE" in msg, msg
    assert "upstream" not in msg and f"registry {upstream}:" not in msg, msg


def test_mirror_not_found_beats_unreachable_upstream(daemon_factory, images, mirror):
    """With the upstream still configured but unreachable, the mirror's answer (the manifest is unknown) decides the
    status, and each endpoint's result is named."""
    upstream = closed_port_host()
    d = daemon_factory({"registries": {upstream: {"insecure": True, "mirrors": [{"endpoint": f"http://{mirror.host}"}]}}})
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(f"{upstream}/layers:no-such-tag")
    msg = e.value.details()
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, msg
    assert f"mirror http://{mirror.host}: NOT_FOUND: registry {mirror.host}:" in msg and "MANIFEST_UNKNOWN" in msg, msg
    assert f"; upstream {upstream}: UNAVAILABLE: registry {upstream}:" in msg, msg


def test_mirrors_only_needs_a_mirror(daemon_factory):
    upstream = closed_port_host()
    with pytest.raises(RuntimeError) as e:
        daemon_factory({"registries": {upstream: {"upstream": False}}})
    assert f"registries.{upstream}: upstream: false needs at least one mirror" in str(e.value)
