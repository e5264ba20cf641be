"""The container-runtime side of the tests on its own: Debian's containerd pulls the runnable fixture images
through its own CRI PullImage and runs them the way kubelet would (host network, the image by ID), and the
Containerd helper leaves no process, mount or socket behind when it is killed mid-pod. Tests of crimage feeding
containerd rely on exactly this."""

import io
import os
import tarfile

import grpc
import pytest

import containerd_helpers as ch
import fixtures
from conftest import Registry


def cgroup_dirs(ctd):
    """The directories of ctd's cgroup parent in the cgroup hierarchies."""
    return [d for d in (os.path.join(m, ctd.cgroup_parent.lstrip("/")) for m in ch.cgroup_mounts()) if os.path.isdir(d)]


def pull_and_run(crt, pushed, auth=None):
    """Pulls `pushed` through containerd's CRI, checks the image ID, runs it by that ID; returns (exit code,
    output)."""
    ref = pushed.ref()
    image_id = crt.pull(ref, auth=auth)
    assert image_id == pushed.id_for()
    return crt.run_pod(image_id, user_image=ref)


def test_runnable_images_are_deterministic():
    """The same installed busybox gives the same digests; busybox is executable and the whiteouts are in layer 3."""
    a, b = fixtures.build_runnable_catalog(), fixtures.build_runnable_catalog()
    assert {k: v.manifest_digest for k, v in a.items()} == {k: v.manifest_digest for k, v in b.items()}
    with tarfile.open(fileobj=io.BytesIO(a["hello"].layers[0].tar)) as tar:
        assert tar.getmember("bin/busybox").mode == 0o755
    with tarfile.open(fileobj=io.BytesIO(a["whiteout"].layers[2].tar)) as tar:
        assert {"data/.wh.gone.txt", "old/.wh..wh..opq"} <= set(tar.getnames())
    multi = a["multi-hello"]
    assert {img.arch for img in multi.images} == {fixtures.host_arch(), fixtures.other_arch()}


@pytest.mark.parametrize("key", ["hello", "hello-docker", "whiteout", "multi-hello"])
def test_containerd_pulls_and_runs_fixture(containerd, containerd_cri, runnable_images, key):
    """Each runnable fixture prints its line under runc: the whiteout image only when layer 3's whiteout and
    opaque whiteout took effect, the multi-arch index with the entry for this machine."""
    pushed = runnable_images[key]
    assert pull_and_run(containerd_cri, pushed) == (0, pushed.output + "\n")
    assert pushed.ref() in containerd.images()
    assert pushed.id_for() in containerd.content()


def test_sandbox_image_is_the_pause_fixture(containerd, containerd_cri, runnable_images):
    """RunPodSandbox pulled the configured pause fixture from the test registry by itself."""
    containerd_cri.run_pod(runnable_images["hello"].ref())
    assert runnable_images["pause"].ref() in containerd.images()
    assert containerd_cri.version().runtime_name == "containerd"


def test_private_registry(containerd_factory, cri, runtime_pb, tmp_path):
    """The runnable images can be pushed to a registry that requires credentials, and containerd pulls them with
    the AuthConfig kubelet would pass."""
    reg = Registry(str(tmp_path / "private"), users={"bob": "Bob-pw-4Kx9"}).start()
    try:
        pushed = fixtures.push_runnable(str(tmp_path / "push"), reg.host, creds="bob:Bob-pw-4Kx9")
        ctd = containerd_factory(registries=[reg.host])
        crt = ctd.client(cri, runtime_pb)
        try:
            with pytest.raises(grpc.RpcError):
                crt.pull(pushed["hello"].ref())
            auth = cri.AuthConfig(username="bob", password="Bob-pw-4Kx9")
            assert pull_and_run(crt, pushed["hello"], auth) == (0, pushed["hello"].output + "\n")
        finally:
            crt.close()
    finally:
        reg.stop()


def test_kill_restart_wipe_leave_nothing(containerd_factory, cri, runtime_pb, runnable_images, tmp_path):
    """A pod still running when containerd and its shims are SIGKILLed survives as orphaned processes; containerd
    started again still answers, and wiping the root forgets every image and leaves no mount, shim or shim socket
    of this instance behind."""
    ctd = containerd_factory()
    crt = ctd.client(cri, runtime_pb)
    try:
        pause = runnable_images["pause"]
        image_id = crt.pull(pause.ref())
        sandbox = crt.sandbox_config("sleeper", str(tmp_path))
        pod_id = crt.run_sandbox(sandbox)
        cid = crt.create_container(pod_id, crt.container_config("sleeper", image_id, pause.ref()), sandbox)
        crt.start_container(cid)
        assert crt.container_status(cid).state == runtime_pb.CONTAINER_RUNNING
        shims = ch.shims_of(ctd.socket)
        assert shims
        assert ch.mounts_under(ctd.state)
        assert cgroup_dirs(ctd)

        ctd.kill()
        assert not ch.shims_of(ctd.socket)
        ctd.start()
        assert crt.image(pause.ref()) is not None

        ctd.wipe_root()
        assert not ch.mounts_under(ctd.root, ctd.state)
        assert not cgroup_dirs(ctd)
        assert not any(os.path.exists(ch.shim_socket(ctd.socket, ns, tid)) for ns, tid in shims.values())
        ctd.start()
        assert crt.image(pause.ref()) is None
        assert not ctd.images()
        assert not crt.list_sandboxes()
    finally:
        crt.close()
