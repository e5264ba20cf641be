"""Pods start from what crimage pulled: crimaged hands every image to Debian's containerd through containerd's own
API, and containerd's CRI runs it the way kubelet asks (PullImage on crimage's socket, then RunPodSandbox,
CreateContainer with the image ID crimage returned and StartContainer on containerd's). Also the faults: containerd
down, killed while crimaged publishes, restarted with an empty root."""

import os
import re
import signal
import threading
import time

import grpc
import pytest

import fixtures
from conftest import Registry, wait_for

HANDLER_LABEL = "io.crimage.handler"


def crimage_for(daemon_factory, ctd, config=None):
    """crimaged handing its images to `ctd`; no back-off, so a test can retry at once after a fault."""
    base = {"containerd": {"address": ctd.socket}, "pullBackoff": {"enabled": False}}
    base.update(config or {})
    return daemon_factory(config=base)


def wait_cri_image(crt, image_id, present, timeout=30):
    """Waits until containerd's CRI reports `image_id` (present) or no longer does."""
    wait_for(lambda: (crt.image(image_id) is not None) == present, timeout,
             f"containerd's CRI {'showing' if present else 'dropping'} {image_id}")


def crimage_records(ctd, namespace="k8s.io"):
    """containerd's image records in `namespace` that crimage labelled: {name: labels}."""
    out = ctd.ctr("images", "ls", namespace=namespace).stdout.splitlines()[1:]
    records = {}
    for line in out:
        fields = line.split()
        labels = dict(kv.split("=", 1) for kv in fields[-1].split(",") if "=" in kv) if fields else {}
        if any(k.startswith(HANDLER_LABEL) for k in labels):
            records[fields[0]] = labels
    return records


def run_and_remove(d, crt, ctd, pushed, ref=None):
    """The kubelet flow for one image: PullImage on crimage, the pod on containerd, RemoveImage on crimage."""
    ref = ref or pushed.ref()
    image_id = d.client.pull(ref)
    assert image_id == pushed.id_for()
    # Before PullImage returned, containerd's CRI already resolved the ID: no wait here.
    assert crt.image(image_id) is not None
    assert crt.run_pod(image_id, user_image=ref) == (0, pushed.output + "\n")
    d.client.remove(ref)
    wait_cri_image(crt, image_id, False)
    assert not crimage_records(ctd)
    return image_id


@pytest.mark.parametrize("key", ["hello", "hello-docker", "whiteout", "multi-hello"])
def test_pod_starts_from_crimage_pull(daemon_factory, containerd, containerd_cri, runnable_images, key):
    """OCI and Docker schema 2 manifests, a layer stack with whiteouts, and a multi-arch index resolved to this
    machine's entry: each runs from what crimage handed over, and RemoveImage takes it out of containerd again."""
    d = crimage_for(daemon_factory, containerd)
    run_and_remove(d, containerd_cri, containerd, runnable_images[key])


def test_publish_records_labels_and_gc_references(daemon_factory, containerd, containerd_cri, runnable_images):
    """Every name crimage recorded becomes a containerd record labelled for its handler, targeting the manifest
    pulled; the manifest carries containerd's GC references to its config and layers; no lease is left."""
    pushed = runnable_images["whiteout"]
    d = crimage_for(daemon_factory, containerd)
    image_id = d.client.pull(pushed.ref())
    manifest = pushed.single()
    records = crimage_records(containerd)
    assert set(records) == {pushed.ref(), pushed.digest_ref()}
    assert all(labels[HANDLER_LABEL] == "published" for labels in records.values())
    rows = [line.split() for line in containerd.ctr("images", "ls").stdout.splitlines()[1:]]
    targets = {r[0]: r[2] for r in rows}
    assert targets[pushed.ref()] == manifest.manifest_digest
    assert targets[image_id] == manifest.manifest_digest  # the ID record containerd's CRI added

    content = {line.split()[0]: line.split()[-1]
               for line in containerd.ctr("content", "ls").stdout.splitlines()[1:]}
    gc = dict(kv.split("=", 1) for kv in content[manifest.manifest_digest].split(","))
    assert gc["containerd.io/gc.ref.content.config"] == image_id
    for i, layer in enumerate(manifest.layers):
        assert gc[f"containerd.io/gc.ref.content.l.{i}"] == layer.digest
        assert layer.digest in content
    assert not [line for line in containerd.ctr("leases", "ls").stdout.splitlines()[1:] if "crimage-" in line]

    d.client.remove(image_id)
    wait_cri_image(containerd_cri, image_id, False)


def test_pull_by_digest_only(daemon_factory, containerd, containerd_cri, runnable_images):
    """An image pulled by digest has no tag: containerd gets the name@digest record only, and the pod runs."""
    pushed = runnable_images["hello"]
    d = crimage_for(daemon_factory, containerd)
    image_id = d.client.pull(pushed.digest_ref())
    assert set(crimage_records(containerd)) == {pushed.digest_ref()}
    assert containerd_cri.run_pod(image_id, user_image=pushed.digest_ref()) == (0, pushed.output + "\n")
    d.client.remove(pushed.digest_ref())
    wait_cri_image(containerd_cri, image_id, False)


def test_private_registry_containerd_needs_no_credentials(daemon_factory, containerd, containerd_cri, tmp_path):
    """crimage pulls with the AuthConfig kubelet passes; containerd, which has no credentials for that registry,
    runs the pod anyway: every blob came from crimage's store over containerd's socket."""
    reg = Registry(str(tmp_path / "private"), users={"kim": "Kim-pw-7Rq2"}).start()
    try:
        pushed = fixtures.push_runnable(str(tmp_path / "push"), reg.host, creds="kim:Kim-pw-7Rq2")["hello"]
        d = crimage_for(daemon_factory, containerd, {"registries": {reg.host: {"insecure": True}}})
        auth = d.pb.AuthConfig(username="kim", password="Kim-pw-7Rq2", server_address=reg.host)
        image_id = d.client.pull(pushed.ref(), auth=auth)
        with pytest.raises(grpc.RpcError):  # containerd on its own cannot pull it
            containerd_cri.pull(pushed.digest_ref())
        assert containerd_cri.run_pod(image_id, user_image=pushed.ref()) == (0, pushed.output + "\n")
        d.client.remove(image_id)
        wait_cri_image(containerd_cri, image_id, False)
    finally:
        reg.stop()


def test_two_handlers_two_namespaces(daemon_factory, containerd, runnable_images):
    """Each runtime handler's images go to its own containerd namespace, labelled for that handler; removing one
    handler's image leaves the other's."""
    pushed = runnable_images["hello"]
    d = crimage_for(daemon_factory, containerd, {"runtimeHandlers": {"vm": {"containerdNamespace": "crimage-vm"}}})
    d.client.pull(pushed.ref())
    d.client.pull(pushed.ref(), handler="vm")
    assert set(crimage_records(containerd)) == {pushed.ref(), pushed.digest_ref()}
    vm = crimage_records(containerd, "crimage-vm")
    assert set(vm) == {pushed.ref(), pushed.digest_ref()}
    assert all(labels == {f"{HANDLER_LABEL}.vm": "published"} for labels in vm.values())

    d.client.remove(pushed.ref(), handler="vm")
    assert not crimage_records(containerd, "crimage-vm")
    assert set(crimage_records(containerd)) == {pushed.ref(), pushed.digest_ref()}
    d.client.remove(pushed.ref())
    assert not crimage_records(containerd)


def test_remove_keeps_records_of_others(daemon_factory, containerd, containerd_cri, runnable_images):
    """A record crimage did not publish (here: a tag made with ctr) survives RemoveImage, and with it the image in
    containerd's CRI."""
    pushed = runnable_images["hello"]
    d = crimage_for(daemon_factory, containerd)
    image_id = d.client.pull(pushed.ref())
    other = f"{pushed.name}:kept-by-someone-else"
    containerd.ctr("images", "tag", pushed.ref(), other)
    d.client.remove(pushed.ref())
    names = set(containerd.images())
    assert other in names and pushed.ref() not in names and pushed.digest_ref() not in names
    assert containerd_cri.image(image_id) is not None
    containerd.ctr("images", "rm", other, image_id)
    wait_cri_image(containerd_cri, image_id, False)


def test_always_pull_republishes_what_containerd_lost(daemon_factory, containerd, containerd_cri, runnable_images):
    """An image crimage has stored but containerd lost gets published again by the next PullImage, also when the
    registry says nothing changed (the `Always` fast path)."""
    pushed = runnable_images["hello"]
    d = crimage_for(daemon_factory, containerd)
    image_id = d.client.pull(pushed.ref())
    containerd.ctr("images", "rm", pushed.ref(), pushed.digest_ref(), image_id)
    wait_cri_image(containerd_cri, image_id, False)
    assert d.client.pull(pushed.ref()) == image_id
    assert containerd_cri.image(image_id) is not None
    assert containerd_cri.run_pod(image_id, user_image=pushed.ref()) == (0, pushed.output + "\n")
    d.client.remove(image_id)
    wait_cri_image(containerd_cri, image_id, False)


def test_containerd_down_then_up(daemon_factory, containerd_factory, cri, runtime_pb, runnable_images):
    """With containerd stopped, PullImage fails with UNAVAILABLE naming containerd's socket and the step, while
    crimage's own store keeps the image; once containerd is back, crimaged publishes it by itself and the pod
    runs."""
    ctd = containerd_factory()
    pushed = runnable_images["hello"]
    d = crimage_for(daemon_factory, ctd)
    ctd.stop()
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(pushed.ref())
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ctd.socket in e.value.details() and "checking the image records" in e.value.details()
    assert d.client.image(pushed.ref()) is not None  # crimage's store is consistent: the pull itself succeeded

    ctd.start()
    crt = ctd.client(cri, runtime_pb)
    try:
        wait_cri_image(crt, pushed.id_for(), True)
        assert crt.run_pod(pushed.id_for(), user_image=pushed.ref()) == (0, pushed.output + "\n")
    finally:
        crt.close()
    with open(d.log) as f:
        assert re.search(r"containerd reconcile: 1 of 1 images published again, 0 failed, in \d+ ms", f.read())


def test_containerd_killed_during_publish(daemon_factory, containerd_factory, cri, runtime_pb, runnable_images):
    """containerd frozen while crimaged publishes, then SIGKILLed: PullImage fails with UNAVAILABLE naming the
    socket; containerd holds no record of the image; the next PullImage, with containerd back, publishes it and
    leaves no lease behind."""
    ctd = containerd_factory()
    pushed = runnable_images["whiteout"]
    d = crimage_for(daemon_factory, ctd)
    os.kill(ctd.proc.pid, signal.SIGSTOP)
    outcome = {}

    def pull():
        try:
            outcome["id"] = d.new_client(timeout=120).pull(pushed.ref())
        except grpc.RpcError as e:
            outcome["error"] = e

    t = threading.Thread(target=pull)
    t.start()
    try:
        # The registry part is done and the publish waits on the frozen containerd.
        wait_for(lambda: f"pulled {pushed.ref()}" in open(d.log).read(), 60, "crimaged finishing the pull")
        time.sleep(0.2)
    finally:
        ctd.kill()
    t.join(60)
    assert "error" in outcome, outcome
    assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert ctd.socket in outcome["error"].details()

    ctd.start()
    crt = ctd.client(cri, runtime_pb)
    try:
        # The reconcile may get there first; either way the records appear only complete, and the retry works.
        assert d.client.pull(pushed.ref()) == pushed.id_for()
        assert set(crimage_records(ctd)) == {pushed.ref(), pushed.digest_ref()}
        assert not [line for line in ctd.ctr("leases", "ls").stdout.splitlines()[1:] if "crimage-" in line]
        assert crt.run_pod(pushed.id_for(), user_image=pushed.ref()) == (0, pushed.output + "\n")
    finally:
        crt.close()


def test_containerd_root_wiped_crimage_reconciles(daemon_factory, containerd_factory, cri, runtime_pb,
                                                  runnable_images):
    """containerd restarted with an empty root has none of crimage's images; crimaged notices it came back, hands
    them over again (its log says how many and how long) and the pod starts again."""
    ctd = containerd_factory()
    pushed = runnable_images["multi-hello"]
    d = crimage_for(daemon_factory, ctd)
    image_id = d.client.pull(pushed.ref())
    crt = ctd.client(cri, runtime_pb)
    try:
        assert crt.run_pod(image_id, user_image=pushed.ref()) == (0, pushed.output + "\n")
    finally:
        crt.close()

    ctd.wipe_root()
    ctd.start()
    crt = ctd.client(cri, runtime_pb)
    try:
        wait_cri_image(crt, image_id, True)
        assert crt.run_pod(image_id, user_image=pushed.ref()) == (0, pushed.output + "\n")
    finally:
        crt.close()
    with open(d.log) as f:
        log = f.read()
    assert "is unreachable; images are published again when it is back" in log
    assert re.search(r"containerd reconcile: 1 of 1 images published again, 0 failed, in \d+ ms", log)
