"""crimaged as a process: configuration errors, the root lock, socket permissions, clean SIGTERM."""

import json
import os
import subprocess
import time

import pytest

from conftest import READY_TIMEOUT, STOP_TIMEOUT, daemon_exe


def run_daemon_expecting_failure(tmp_path, config_text, suffix="json", args=()):
    """Runs crimaged with a config that must make it exit non-zero by itself; returns its stderr."""
    cfg = tmp_path / f"bad.{suffix}"
    cfg.write_text(config_text)
    exe = daemon_exe()
    proc = subprocess.Popen([exe, "--config", str(cfg)] + list(args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=READY_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        pytest.fail("crimaged kept running with an invalid configuration")
    assert proc.returncode not in (0, None), err
    assert err.strip(), "no error message on stderr"
    return err


def test_sigterm_exits_zero(daemon):
    assert daemon.alive()
    assert daemon.stop() == 0


def test_socket_mode(daemon):
    assert (os.stat(daemon.socket).st_mode & 0o777) == 0o660


def test_second_daemon_on_same_root_refused(daemon, tmp_path, short_dir):
    cfg = {"root": daemon.root, "socket": os.path.join(short_dir, "second.sock"), "logLevel": "debug"}
    err = run_daemon_expecting_failure(tmp_path, json.dumps(cfg))
    assert "lock" in err.lower() or daemon.root in err, err
    assert daemon.alive()  # the first one is untouched, its socket still answers


def test_unknown_config_key_named(tmp_path, short_dir):
    cfg = {"root": str(tmp_path / "root"), "socket": os.path.join(short_dir, "s.sock"), "noSuchSetting": 1}
    err = run_daemon_expecting_failure(tmp_path, json.dumps(cfg))
    assert "noSuchSetting" in err


def test_wrong_type_config_value_named(tmp_path, short_dir):
    cfg = {"root": str(tmp_path / "root"), "socket": os.path.join(short_dir, "s.sock"),
           "maxConcurrentDownloads": "many"}
    err = run_daemon_expecting_failure(tmp_path, json.dumps(cfg))
    assert "maxConcurrentDownloads" in err


@pytest.mark.parametrize("text,suffix", [
    ('{"root": "/tmp/x", ', "json"),
    ("root: [unclosed\n", "yaml"),
    ("\x00\x01\x02", "yaml"),
])
def test_malformed_config_file(tmp_path, text, suffix):
    run_daemon_expecting_failure(tmp_path, text, suffix)


def test_missing_config_file(tmp_path):
    exe = daemon_exe()
    r = subprocess.run([exe, "--config", str(tmp_path / "absent.yaml")], capture_output=True, text=True,
                       timeout=READY_TIMEOUT)
    assert r.returncode != 0
    assert "absent.yaml" in r.stderr


def test_invalid_pinned_image_named(tmp_path, short_dir):
    cfg = {"root": str(tmp_path / "root"), "socket": os.path.join(short_dir, "s.sock"),
           "pinnedImages": ["Not//A Reference"]}
    err = run_daemon_expecting_failure(tmp_path, json.dumps(cfg))
    assert "pinned image" in err and "Not//A Reference" in err


@pytest.mark.parametrize("settings,named", [
    ({"containerd": {"address": "/run/c.sock", "socket": "/run/c.sock"}}, "containerd.socket"),
    ({"containerd": {"namespace": 7}}, "containerd.namespace"),
    ({"containerd": {"namespace": "k8s..io"}}, "containerd.namespace \"k8s..io\""),
    ({"containerd": {"namespace": "-k8s"}}, "containerd.namespace \"-k8s\""),
    ({"containerd": "unix:///run/containerd/containerd.sock"}, "containerd: expected a map"),
    ({"runtimeHandlers": {"vm": {"containerdNamespace": "a/b"}}}, "runtimeHandlers.vm.containerdNamespace \"a/b\""),
])
def test_invalid_containerd_settings_named(tmp_path, short_dir, settings, named):
    """containerd's own rule for namespaces (letters and digits joined by single '.', '_' or '-') is checked at
    start-up, where a typo is found, rather than on every publish."""
    cfg = dict({"root": str(tmp_path / "root"), "socket": os.path.join(short_dir, "s.sock")}, **settings)
    err = run_daemon_expecting_failure(tmp_path, json.dumps(cfg))
    assert named in err, err


def test_config_dropins_merge_in_name_order(tmp_path, short_dir):
    """<config>.d/*.yaml|json are merged over the file in name order: the last one to set a key wins, a handler
    named again keeps what it had, and a bad drop-in is named in the error."""
    main = tmp_path / "crimage.yaml"
    main.write_text(f"root: {tmp_path / 'root'}\nsocket: {os.path.join(short_dir, 'first.sock')}\n"
                    "runtimeHandlers:\n  vm: {platform: linux/arm64}\n")
    dropins = tmp_path / "crimage.yaml.d"
    dropins.mkdir()
    (dropins / "10-socket.yaml").write_text(f"socket: {os.path.join(short_dir, 'second.sock')}\n")
    (dropins / "20-socket.json").write_text(json.dumps({"socket": os.path.join(short_dir, "third.sock"),
                                                        "runtimeHandlers": {"vm": {"containerdNamespace": "vm"}}}))
    (dropins / "README").write_text("not a drop-in: no .yaml, .yml or .json suffix\n")
    proc = subprocess.Popen([daemon_exe(), "--config", str(main)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        third = os.path.join(short_dir, "third.sock")
        deadline = time.monotonic() + READY_TIMEOUT
        while not os.path.exists(third) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(third) and not os.path.exists(os.path.join(short_dir, "second.sock"))
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=STOP_TIMEOUT)
    assert proc.returncode == 0, out

    (dropins / "30-bad.yaml").write_text("noSuchSetting: 1\n")
    r = subprocess.run([daemon_exe(), "--config", str(main)], capture_output=True, text=True, timeout=READY_TIMEOUT)
    assert r.returncode != 0 and "30-bad.yaml" in r.stderr and "noSuchSetting" in r.stderr, r.stderr
