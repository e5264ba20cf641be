"""Progress an operator can see, and `crimage pull --policy`: the daemon's PullProgress service (WatchPull, ListPulls),
`crimage pull` drawing per-layer bars on a terminal (run under tmux, the screen captured) and plain lines
otherwise, `crimage pulls`, and what each pull policy sends over the network (requests counted at a proxy)."""

import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid

import grpc
import pytest

import fixtures
from conftest import build_dir
from slowproxy import ProgressClient, SlowProxy, generate_progress_module

BAR = re.compile(r"\[[#-]{24}\]\s+\d+%")


@pytest.fixture(scope="module")
def ppb(tmp_path_factory):
    return generate_progress_module(str(tmp_path_factory.mktemp("progress-gen")))


@pytest.fixture
def slow(registry):
    # the 4 MiB layer of `big` takes a few seconds: long enough to watch
    p = SlowProxy(registry.host, blob_delay=0.2, chunk=32 << 10, chunk_delay=0.04).start()
    yield p
    p.stop()


@pytest.fixture
def pd(daemon_factory, slow):
    return daemon_factory({
        "registries": {slow.host: {"insecure": True}},
        "runtimeHandlers": {"armh": {"platform": "linux/arm64"}, "amdh": {"platform": "linux/amd64"}},
    })


def cli_path():
    return os.path.join(build_dir(), "plugin", "crimage")


def crimage(d, *args, timeout=120):
    return subprocess.run([cli_path(), "--socket", d.socket, *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def wait_until(pred, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_watch_pull_streams_until_the_end(pd, slow, ppb, images):
    ref = f"{slow.host}/big:v1"
    pc = ProgressClient(ppb, pd.socket)
    with pytest.raises(grpc.RpcError) as e:
        list(pc.watch(ref))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    result = {}
    t = threading.Thread(target=lambda: result.update(ref=pd.new_client().pull(ref)), daemon=True)
    t.start()
    wait_until(lambda: any(p.reference == ref for p in pc.list()), "the pull to be listed")
    updates = list(pc.watch(ref))
    t.join(120)
    assert result["ref"] == images["big"].id_for()
    assert updates[-1].state == ppb.SUCCEEDED
    assert all(u.state in (ppb.QUEUED, ppb.RUNNING) for u in updates[:-1])
    last = updates[-1]
    assert last.bytes_total > 0 and last.bytes_done == last.bytes_total
    big_layer = images["big"].image.layers[-1]
    blob = [b for b in last.blobs if b.digest == big_layer.digest]
    assert blob and blob[0].finished and blob[0].total == big_layer.size
    # the big layer was seen part-way
    assert any(0 < b.done < b.total for u in updates for b in u.blobs if b.digest == big_layer.digest)
    dones = [u.bytes_done for u in updates]
    assert dones == sorted(dones)
    assert pc.list() == []
    pc.close()


def test_pull_progress_plain_lines(pd, slow, images):
    ref = f"{slow.host}/big:v1"
    r = crimage(pd, "pull", ref)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"Image is up to date for {images['big'].id_for()}"
    lines = r.stderr.splitlines()
    assert any(re.match(rf"pull {re.escape(ref)}: running, \d+/\d+ blobs, .* of .* \(\d+%\)", ln) for ln in lines), \
        r.stderr
    assert "\033" not in r.stderr  # no terminal control on a pipe


def test_pull_quiet_shows_no_progress(pd, slow):
    r = crimage(pd, "pull", "-q", f"{slow.host}/layers:v1")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


@pytest.mark.skipif(not shutil.which("tmux"), reason="tmux is not installed")
def test_pull_progress_bar_on_a_terminal(pd, slow, images, tmp_path):
    ref = f"{slow.host}/big:v1"
    sock = f"crimage-test-{uuid.uuid4().hex[:8]}"
    done = tmp_path / "done"
    cmd = f"{cli_path()} --socket {pd.socket} pull {ref}; echo EXIT=$? > {done}; sleep 120"
    subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-x", "150", "-y", "30", "-s", "pull", cmd], check=True,
                   timeout=30)
    try:
        def screen():
            return subprocess.run(["tmux", "-L", sock, "capture-pane", "-p", "-t", "pull"], capture_output=True,
                                  text=True, timeout=30).stdout

        big_layer = images["big"].image.layers[-1]
        short = big_layer.digest.split(":")[1][:12]
        layer_bar = re.compile(re.escape(short) + r"\s+" + BAR.pattern)
        during = wait_until(lambda: (lambda s: s if layer_bar.search(s) and "Pulling" in s else None)(screen()),
                            "a progress bar of the big layer on the screen")
        wait_until(lambda: done.exists(), "the pull to end", timeout=120)
        final = screen()
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], timeout=30)
    assert f"Pulling {ref}" in during
    assert re.search(r"/s\s+ETA ", during)
    assert done.read_text().strip() == "EXIT=0"
    assert f"Image is up to date for {images['big'].id_for()}" in final
    # redrawn in place: the header is on the screen once, not once per update
    assert final.count(f"Pulling {ref}") == 1
    assert "100%" in final


def test_pulls_verb_lists_a_running_pull(pd, slow, images):
    ref = f"{slow.host}/big:v1"
    proc = subprocess.Popen([cli_path(), "--socket", pd.socket, "pull", "-q", "--pod-uid", "pod-9", ref],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def running():
            out = json.loads(crimage(pd, "-o", "json", "pulls").stdout)["pulls"]
            return [p for p in out if p["reference"] == ref and p["state"] == "running"]

        listed = wait_until(running, "the pull to run")[0]
        assert listed["podUid"] == "pod-9"
        assert listed["runtimeHandler"] == ""
        table = crimage(pd, "pulls")
        assert table.returncode == 0
        assert ref in table.stdout and "running" in table.stdout and "pod-9" in table.stdout
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(crimage(pd, "-o", "json", "pulls").stdout)["pulls"] == []
    ended = json.loads(crimage(pd, "-o", "json", "pulls", "--all").stdout)["pulls"]
    assert [p["state"] for p in ended if p["reference"] == ref] == ["succeeded"]


def test_policy_network_behaviour(pd, slow, images):
    p = images["layers"]
    ref = f"{slow.host}/layers:v1"

    # a tag other than latest defaults to IfNotPresent: absent, so it is pulled
    r = crimage(pd, "pull", "-q", ref)
    assert r.returncode == 0, r.stderr
    assert slow.blob_gets()
    # present: no request at all
    slow.reset()
    for args in ([], ["--policy", "IfNotPresent"], ["--policy", "Never"]):
        r = crimage(pd, "pull", "-q", *args, ref)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"Image is up to date for {p.id_for()}"
    assert slow.snapshot() == []
    # Always resolves the tag, and downloads nothing that is unchanged
    r = crimage(pd, "pull", "-q", "--policy", "Always", ref)
    assert r.returncode == 0, r.stderr
    assert any("/manifests/" in path for _, path in slow.snapshot())
    assert slow.blob_gets() == {}

    # Never, absent: a clear error, nothing sent
    slow.reset()
    r = crimage(pd, "pull", "--policy", "Never", f"{slow.host}/shared:v1")
    assert r.returncode == 1
    assert "not present" in r.stderr and "Never" in r.stderr
    assert slow.snapshot() == []

    # `latest` defaults to Always: the tag is resolved every time
    r = crimage(pd, "pull", "-q", f"{slow.host}/layers:latest")
    assert r.returncode == 0, r.stderr
    slow.reset()
    r = crimage(pd, "pull", "-q", f"{slow.host}/layers:latest")
    assert r.returncode == 0, r.stderr
    assert any("/manifests/" in path for _, path in slow.snapshot())
    assert slow.blob_gets() == {}

    r = crimage(pd, "pull", "--policy", "Sometimes", ref)
    assert r.returncode == 2
    assert "Always, IfNotPresent or Never" in r.stderr


def test_policy_per_handler_and_platform(pd, slow, images):
    p = images["multi"]
    ref = f"{slow.host}/multi:v1"
    arm, amd = p.single("linux/arm64"), p.single("linux/amd64")
    r = crimage(pd, "pull", "-q", "--runtime-handler", "armh", "--policy", "IfNotPresent", ref)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"Image is up to date for {arm.config_digest}"
    assert set(slow.blob_gets()) >= {layer.digest for layer in arm.layers}

    # present for armh only: amdh still pulls, its own platform
    slow.reset()
    r = crimage(pd, "pull", "-q", "--runtime-handler", "amdh", "--policy", "IfNotPresent", ref)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"Image is up to date for {amd.config_digest}"
    assert set(slow.blob_gets()) == {layer.digest for layer in amd.layers} | {amd.config_digest}

    slow.reset()
    r = crimage(pd, "pull", "-q", "--runtime-handler", "armh", "--policy", "Never", ref)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"Image is up to date for {arm.config_digest}"
    r = crimage(pd, "pull", "-q", "--policy", "Never", ref)  # the default handler has nothing
    assert r.returncode == 1 and "not present" in r.stderr
    r = crimage(pd, "pull", "-q", "--runtime-handler", "kata", "--policy", "Never", ref)
    assert r.returncode == 1 and 'runtime handler "kata"' in r.stderr
    assert slow.snapshot() == []
    host = f"linux/{fixtures.host_arch()}"
    assert host  # the default handler would pull the host's entry; not needed here
