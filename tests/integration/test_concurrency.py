"""A slow pull never blocks the other RPCs, a cancelled pull stops, SIGTERM ends the daemon during a pull.

The registry is put behind a small HTTP proxy that holds the large layer of the `big` image after its first bytes
until the test releases it. Assertions are about the order of events, never about durations.
"""

import os
import select
import socket
import threading
import time

import grpc
import pytest

from conftest import SERVICE, ForwardingHandler, ProxyServer, forward_upstream

HOLD_ABOVE = 1 << 20  # blobs larger than this are held (only the big layer is)
CHUNK = 64 << 10


class GatedProxy(ProxyServer):
    """Forwards every request to the registry; sends the first CHUNK of a large blob, then waits for `release`."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.held = threading.Event()  # a large blob download is in progress and held
        self.release = threading.Event()
        self.aborted = threading.Event()  # the client closed a held download
        self.requests = []
        proxy = self

        class Handler(ForwardingHandler):
            def _forward(self, with_body):
                proxy.requests.append((self.command, self.path))
                status, resp_headers, body, length = forward_upstream(self, proxy.upstream, with_body)
                self.send_forwarded_head(status, resp_headers, length)
                if not with_body:
                    return
                try:
                    if "/blobs/" in self.path and len(body) > HOLD_ABOVE and status == 200:
                        self.wfile.write(body[:CHUNK])
                        self.wfile.flush()
                        proxy.held.set()
                        if not self._hold():
                            return
                        for off in range(CHUNK, len(body), CHUNK):
                            self.wfile.write(body[off:off + CHUNK])
                            self.wfile.flush()
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _hold(self):
                """Waits for `release`; False when the client hung up meanwhile (it gave up the download)."""
                deadline = time.monotonic() + 120
                while not proxy.release.wait(0.05) and time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    if readable:
                        try:
                            data = self.connection.recv(1, socket.MSG_PEEK)
                        except OSError:
                            data = b""
                        if not data:
                            proxy.aborted.set()
                            self.close_connection = True
                            return False
                return True

        super().__init__(Handler)

    def stop(self):
        self.release.set()
        super().stop()


@pytest.fixture
def proxy(registry):
    p = GatedProxy(registry.host).start()
    yield p
    p.stop()


@pytest.fixture
def pdaemon(daemon_factory, proxy):
    """A daemon that reaches the registry only through the proxy."""
    return daemon_factory({"registries": {proxy.host: {"insecure": True}}})


def start_pull(d, ref, timeout=120):
    """Runs PullImage in a thread; returns (thread, result dict, event log)."""
    result, events = {}, []

    def run():
        c = d.new_client(timeout=timeout)
        try:
            result["ref"] = c.pull(ref)
        except grpc.RpcError as e:
            result["err"] = e
        finally:
            events.append("pull-done")
            c.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result, events


def test_status_answers_during_slow_pull(pdaemon, proxy, images):
    small = f"{proxy.host}/shared:v1"
    big = f"{proxy.host}/big:v1"
    assert pdaemon.client.pull(small) == images["shared"].id_for()

    t, result, events = start_pull(pdaemon, big)
    try:
        assert proxy.held.wait(60), "the pull never reached the large layer"
        c = pdaemon.new_client()
        img = c.image(small)
        events.append("status-done")
        assert img is not None and img.id == images["shared"].id_for()
        assert c.image(big) is None  # not recorded before it is complete
        assert [i.id for i in c.list()] == [images["shared"].id_for()]
        assert c.fsinfo().image_filesystems
        events.append("others-done")
        c.close()
        assert t.is_alive()
    finally:
        proxy.release.set()
        t.join(120)
    assert not t.is_alive()
    assert events == ["status-done", "others-done", "pull-done"]
    assert "err" not in result, result.get("err")
    assert result["ref"] == images["big"].id_for()
    img = pdaemon.client.image(big)
    assert img.id == images["big"].id_for()
    assert img.size >= 4 << 20


def test_cancelled_pull_stops_leaves_nothing_and_can_be_retried(daemon_factory, proxy, images):
    d = daemon_factory({"registries": {proxy.host: {"insecure": True}}})
    big = f"{proxy.host}/big:v1"
    t, result, events = start_pull(d, big, timeout=5)  # the client gives up while the layer is held
    assert proxy.held.wait(60)
    t.join(60)
    assert not t.is_alive()
    assert result["err"].code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    # the daemon notices and drops the download (the proxy sees the connection closed)
    assert proxy.aborted.wait(60), "the download went on after the caller had gone"
    assert d.client.image(big) is None
    assert not d.has_blob(images["big"].single().layers[1].digest)
    proxy.release.set()
    assert d.alive()
    assert d.client.pull(big) == images["big"].id_for()
    assert d.has_blob(images["big"].single().layers[1].digest)


def test_one_caller_giving_up_does_not_fail_another(daemon_factory, proxy, images):
    """Two PullImage calls for the same image while its download is held; the first caller's deadline expires.
    The second caller must still get the image (pulls of one image may share a download: not its cancellation)."""
    d = daemon_factory({"registries": {proxy.host: {"insecure": True}}, "serializeImagePulls": False})
    big = f"{proxy.host}/big:v1"
    ta, ra, _ = start_pull(d, big, timeout=5)
    assert proxy.held.wait(60)
    tb, rb, eb = start_pull(d, big, timeout=120)
    ta.join(60)
    assert not ta.is_alive()
    assert ra["err"].code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    assert tb.is_alive()
    assert d.alive()
    proxy.release.set()
    tb.join(120)
    assert not tb.is_alive()
    assert "err" not in rb, rb.get("err")
    assert rb["ref"] == images["big"].id_for()
    assert d.client.image(big).id == images["big"].id_for()


def test_sigterm_during_pull_exits_cleanly(daemon_factory, proxy, images):
    d = daemon_factory({"registries": {proxy.host: {"insecure": True}}, "shutdownGracePeriod": "1s"})
    big = f"{proxy.host}/big:v1"
    t, result, events = start_pull(d, big)
    assert proxy.held.wait(60)
    # the layer stays held: after the grace period the daemon must cancel the pull by itself to stop
    assert d.stop() == 0
    t.join(60)
    assert not t.is_alive()
    assert "err" in result
    assert result["err"].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                    grpc.StatusCode.ABORTED), result["err"]


def test_sigkill_during_pull_then_restart(daemon_factory, proxy, images):
    """A crash mid-pull leaves neither a corrupt blob nor a half-recorded image, and no stale lock."""
    cfg = {"registries": {proxy.host: {"insecure": True}}}
    d = daemon_factory(cfg)
    big = f"{proxy.host}/big:v1"
    small = f"{proxy.host}/shared:v1"
    assert d.client.pull(small) == images["shared"].id_for()
    t, result, _ = start_pull(d, big)
    assert proxy.held.wait(60)
    d.proc.kill()
    d.proc.wait(30)
    d.stopped = True
    t.join(60)
    assert "err" in result
    d2 = daemon_factory(dict(cfg, root=d.root))
    assert d2.client.image(big) is None
    assert d2.client.image(small).id == images["shared"].id_for()
    assert d2.corrupt_blobs() == []
    assert not d2.has_blob(images["big"].single().layers[1].digest)
    proxy.release.set()
    assert d2.client.pull(big) == images["big"].id_for()
    assert d2.corrupt_blobs() == []


def test_many_parallel_calls(daemon, images):
    """Many clients at once, each on its own channel: every call is answered, with consistent results."""
    p = images["layers"]
    daemon.client.pull(p.ref())
    errors, answers = [], []

    def worker():
        c = daemon.new_client()
        try:
            for _ in range(25):
                img = c.image(p.ref())
                answers.append(img.id if img else None)
                c.list()
        except grpc.RpcError as e:
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert answers == [p.id_for()] * 16 * 25


def daemon_threads(d):
    return len(os.listdir(f"/proc/{d.proc.pid}/task"))


def test_calls_that_never_send_their_request_hold_no_worker(daemon, images):
    """A client that opens calls and never sends the request message held a worker per call until it went away (the
    receive had no deadline); more of them than there are workers (1,280) and kubelet's ImageStatus timed out.
    Calls now reach a worker only once their request has arrived, so ImageStatus answers as usual."""
    p = images["layers"]
    daemon.client.pull(p.ref())
    stop = threading.Event()

    def never():
        stop.wait()  # the request message that never comes
        return
        yield

    stalled = 1400
    channels = [grpc.insecure_channel("unix:" + daemon.socket) for _ in range(stalled // 100)]
    calls = []
    base = daemon_threads(daemon)
    try:
        for i in range(stalled):
            stub = channels[i % len(channels)].stream_unary(f"/{SERVICE}/ImageStatus",
                                                            request_serializer=lambda b: b,
                                                            response_deserializer=lambda b: b)
            calls.append(stub.future(never(), timeout=300))
        # kubelet's ImageStatus, on a connection of its own, answers within its usual deadline
        c = daemon.new_client(timeout=10)
        try:
            for _ in range(3):
                assert c.image(p.ref()).id == p.id_for()
        finally:
            c.close()
        # and the stalled calls took no thread each
        assert daemon_threads(daemon) < base + 100, (base, daemon_threads(daemon))
        assert not any(f.done() for f in calls)
    finally:
        stop.set()
        for f in calls:
            f.cancel()
        for ch in channels:
            ch.close()
    assert daemon.alive()
