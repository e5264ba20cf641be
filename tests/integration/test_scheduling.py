"""The pull scheduler seen from outside: serialized and parallel pulls, one pull at a time per pod, identical pulls
sharing one download, back-off after a failure, StreamImages. A throttling proxy in front of the registry makes
every pull last long enough to overlap with others; when pulls ran is read from the daemon's own progress service
(crimage.v1.PullProgress, ListPulls with the ended ones). Assertions are about overlap counts and order, never
about durations."""

import re
import threading

import grpc
import pytest

from slowproxy import ProgressClient, SlowProxy, generate_progress_module, max_overlap

SMALL = ["layers", "shared", "user1002", "userwww", "user1003", "dockerfmt"]


@pytest.fixture(scope="module")
def ppb(tmp_path_factory):
    return generate_progress_module(str(tmp_path_factory.mktemp("progress-gen")))


@pytest.fixture
def slow(registry):
    p = SlowProxy(registry.host).start()
    yield p
    p.stop()


def start(daemon_factory, slow, **config):
    return daemon_factory(dict({"registries": {slow.host: {"insecure": True}}}, **config))


def pull_request(pb, ref, pod=None, handler=""):
    req = pb.PullImageRequest(image=pb.ImageSpec(image=ref, runtime_handler=handler))
    if pod:
        req.sandbox_config.metadata.uid = pod
    return req


def pull_concurrently(d, jobs):
    """jobs: [(ref, pod uid or None)]. Fires every PullImage at once; returns [image_ref or RpcError]."""
    results = [None] * len(jobs)
    go = threading.Barrier(len(jobs))

    def run(i, ref, pod):
        c = d.new_client()
        try:
            go.wait(30)
            results[i] = c.call("PullImage", pull_request(d.pb, ref, pod)).image_ref
        except grpc.RpcError as e:
            results[i] = e
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(i, ref, pod), daemon=True) for i, (ref, pod) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def ended_pulls(d, ppb):
    pc = ProgressClient(ppb, d.socket)
    try:
        return [p for p in pc.list(include_ended=True)]
    finally:
        pc.close()


def intervals(pulls):
    return [(p.started_unix_ms, p.ended_unix_ms) for p in pulls]


def check_all_pulled(d, ppb, images, slow, names, results):
    for name, res in zip(names, results):
        assert not isinstance(res, Exception), res
        assert res == images[name].id_for()
    pulls = ended_pulls(d, ppb)
    refs = {f"{slow.host}/{n}:v1" for n in names}
    mine = [p for p in pulls if p.reference in refs]
    assert len(mine) == len(names), pulls
    for p in mine:
        assert p.state == ppb.SUCCEEDED, p
        assert 0 < p.created_unix_ms <= p.started_unix_ms <= p.ended_unix_ms, p
    return mine


class Watcher:
    """Polls ListPulls while pulls run and keeps the largest numbers of queued and running pulls seen at once."""

    def __init__(self, d, ppb):
        self.pc = ProgressClient(ppb, d.socket)
        self.ppb = ppb
        self.max_queued = self.max_running = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            pulls = self.pc.list()
            self.max_queued = max(self.max_queued, sum(p.state == self.ppb.QUEUED for p in pulls))
            self.max_running = max(self.max_running, sum(p.state == self.ppb.RUNNING for p in pulls))
            self.stop.wait(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
        self.pc.close()


def test_serialized_pulls_never_overlap(daemon_factory, slow, ppb, images):
    d = start(daemon_factory, slow, serializeImagePulls=True)
    names = SMALL[:4]
    with Watcher(d, ppb) as w:
        results = pull_concurrently(d, [(f"{slow.host}/{n}:v1", f"pod-{n}") for n in names])
    mine = check_all_pulled(d, ppb, images, slow, names, results)
    assert max_overlap(intervals(mine)) == 1
    assert w.max_running <= 1
    assert w.max_queued >= 1  # the scheduler held the others back
    # FIFO: each pull started after the previous one ended
    ordered = sorted(mine, key=lambda p: p.started_unix_ms)
    for a, b in zip(ordered, ordered[1:]):
        assert a.ended_unix_ms <= b.started_unix_ms


def test_pulls_run_in_parallel_by_default(daemon_factory, slow, ppb, images):
    # kubelet schedules its own pulls: as containerd and CRI-O, the service does not serialize them again, so one
    # slow registry does not hold back the pulls of other pods
    d = start(daemon_factory, slow)
    names = SMALL[:3]
    results = pull_concurrently(d, [(f"{slow.host}/{n}:v1", f"pod-{n}") for n in names])
    mine = check_all_pulled(d, ppb, images, slow, names, results)
    assert max_overlap(intervals(mine)) >= 2


def test_parallel_pulls_at_most_two(daemon_factory, slow, ppb, images):
    d = start(daemon_factory, slow, serializeImagePulls=False, maxParallelImagePulls=2)
    names = SMALL[:5]
    with Watcher(d, ppb) as w:
        results = pull_concurrently(d, [(f"{slow.host}/{n}:v1", f"pod-{n}") for n in names])
    mine = check_all_pulled(d, ppb, images, slow, names, results)
    assert max_overlap(intervals(mine)) == 2
    assert w.max_running <= 2


def test_one_pod_pulls_one_at_a_time(daemon_factory, slow, ppb, images):
    d = start(daemon_factory, slow, serializeImagePulls=False)  # no node-wide limit
    pods = {"layers": "pod-a", "shared": "pod-a", "user1002": "pod-a", "userwww": "pod-b", "user1003": "pod-b"}
    names = list(pods)
    results = pull_concurrently(d, [(f"{slow.host}/{n}:v1", pods[n]) for n in names])
    mine = check_all_pulled(d, ppb, images, slow, names, results)
    for pod in ("pod-a", "pod-b"):
        same = [p for p in mine if p.pod_uid == pod]
        assert len(same) == len([n for n in names if pods[n] == pod])
        assert max_overlap(intervals(same)) == 1, pod
    # pulls of different pods did run side by side
    assert max_overlap(intervals(mine)) >= 2


def test_identical_pulls_download_each_blob_once(daemon_factory, slow, ppb, images):
    d = start(daemon_factory, slow, serializeImagePulls=False)
    p = images["layers"]
    ref = f"{slow.host}/layers:v1"
    results = pull_concurrently(d, [(ref, None)] * 4)
    assert results == [p.id_for()] * 4
    gets = slow.blob_gets()
    wanted = [layer.digest for layer in p.image.layers] + [p.image.config_digest]
    for digest in wanted:
        assert gets.get(digest) == 1, gets
    assert [q.reference for q in ended_pulls(d, ppb)].count(ref) == 1


def backoff_seconds(err):
    m = re.search(r"next try in (\d+) s", err.details())
    assert m, err.details()
    return int(m.group(1))


def test_backoff_after_failure(daemon_factory, slow, images):
    d = start(daemon_factory, slow, pullBackoff={"initial": "2s", "max": "4s"})
    c = d.client
    ref = f"{slow.host}/layers:no-such-tag"
    with pytest.raises(grpc.RpcError) as e:
        c.pull(ref)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    seen = len(slow.snapshot())
    with pytest.raises(grpc.RpcError) as e:
        c.pull(ref)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f'Back-off pulling image "{ref}"' in e.value.details()
    assert backoff_seconds(e.value) == 2
    assert len(slow.snapshot()) == seen  # refused without touching the network
    # another image is not held back
    assert c.pull(f"{slow.host}/shared:v1") == images["shared"].id_for()

    # once the window is over the pull is tried again, fails again, and the window doubles
    for _ in range(200):
        with pytest.raises(grpc.RpcError) as e:
            c.pull(ref)
        if e.value.code() != grpc.StatusCode.UNAVAILABLE:
            break
        threading.Event().wait(0.1)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        c.pull(ref)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert backoff_seconds(e.value) == 4


def test_backoff_off(daemon_factory, slow):
    d = start(daemon_factory, slow, pullBackoff={"enabled": False})
    ref = f"{slow.host}/layers:no-such-tag"
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as e:
            d.client.pull(ref)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def stream_images(d, image="", handler=""):
    req = d.pb.StreamImagesRequest()
    req.filter.image.image = image
    req.filter.image.runtime_handler = handler
    stub = d.client.channel.unary_stream("/runtime.v1.ImageService/StreamImages",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=d.pb.StreamImagesResponse.FromString)
    return [list(batch.images) for batch in stub(req, timeout=60)]


def test_stream_images_matches_list_images(daemon_factory, slow, images):
    d = start(daemon_factory, slow, runtimeHandlers={"kata": {}}, rejectUnknownRuntimeHandlers=True)
    c = d.client
    assert stream_images(d) == []  # nothing stored: the stream ends without a batch
    c.pull(f"{slow.host}/layers:v1")
    c.pull(f"{slow.host}/shared:v1", handler="kata")
    streamed = [img for batch in stream_images(d) for img in batch]
    listed = c.list()
    key = lambda i: (i.id, i.spec.runtime_handler)  # noqa: E731
    assert sorted(map(key, streamed)) == sorted(map(key, listed))
    assert len(streamed) == 2
    kata = [img for batch in stream_images(d, handler="kata") for img in batch]
    assert [(i.id, i.spec.runtime_handler) for i in kata] == [(images["shared"].id_for(), "kata")]
    one = [img for batch in stream_images(d, image=f"{slow.host}/layers:v1") for img in batch]
    assert [i.id for i in one] == [images["layers"].id_for()]
    assert stream_images(d, image=f"{slow.host}/layers:v1", handler="kata") == []
    with pytest.raises(grpc.RpcError) as e:
        stream_images(d, handler="no-such-handler")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def blob_names(root):
    import os
    d = os.path.join(root, "blobs", "sha256")
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def test_handler_with_a_store_of_its_own(daemon_factory, slow, images, tmp_path):
    kata_root = str(tmp_path / "kata-root")
    d = start(daemon_factory, slow, runtimeHandlers={"kata": {"root": kata_root}, "runc": {}})
    c = d.client
    p = images["layers"]
    ref = f"{slow.host}/layers:v1"
    assert c.pull(ref, handler="kata") == p.id_for()
    digests = {layer.digest.split(":")[1] for layer in p.image.layers}
    assert digests <= blob_names(kata_root)
    assert not digests & blob_names(d.root)
    assert c.image(ref) is None and c.image(ref, handler="runc") is None
    assert c.image(ref, handler="kata").spec.runtime_handler == "kata"

    assert c.pull(ref, handler="runc") == p.id_for()
    assert digests <= blob_names(d.root)
    fs = c.fsinfo().image_filesystems
    assert len(fs) == 2
    assert all(f.used_bytes.value > 0 for f in fs)
    listed = {(i.id, i.spec.runtime_handler) for i in c.list()}
    assert listed == {(p.id_for(), "kata"), (p.id_for(), "runc")}
    assert [i.spec.runtime_handler for i in c.list(handler="kata")] == ["kata"]
    streamed = {(i.id, i.spec.runtime_handler) for batch in stream_images(d) for i in batch}
    assert streamed == listed

    c.remove(ref, handler="kata")
    assert not digests & blob_names(kata_root)
    assert digests <= blob_names(d.root)
    assert [(i.id, i.spec.runtime_handler) for i in c.list()] == [(p.id_for(), "runc")]


def test_handler_root_must_be_absolute(daemon_factory, slow):
    with pytest.raises(RuntimeError) as e:
        start(daemon_factory, slow, runtimeHandlers={"kata": {"root": "relative/dir"}})
    assert "runtimeHandlers.kata.root" in str(e.value)
