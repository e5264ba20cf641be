"""The `crimage` command line against a running crimaged: pull, images, inspect, rm, fsinfo; exit codes 0/1/2."""

import json
import os
import subprocess

from conftest import build_dir


def crimage(d, *args, timeout=120):
    exe = os.path.join(build_dir(), "plugin", "crimage")
    return subprocess.run([exe, "--socket", d.socket, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def ok_json(d, *args):
    r = crimage(d, "--output", "json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cli_sequence(daemon, images):
    p = images["layers"]
    fs = ok_json(daemon, "fsinfo")
    assert fs["status"]["imageFilesystems"][0]["fsId"]["mountpoint"]

    assert ok_json(daemon, "pull", p.ref())["imageRef"] == p.id_for()
    listed = ok_json(daemon, "images")["images"]
    assert [i["id"] for i in listed] == [p.id_for()]
    assert listed[0]["repoTags"] == [p.ref()]
    assert listed[0]["repoDigests"] == [p.digest_ref()]

    table = crimage(daemon, "images")
    assert table.returncode == 0
    assert p.name in table.stdout and p.tags[0] in table.stdout

    quiet = crimage(daemon, "images", "-q", "--no-trunc")
    assert quiet.returncode == 0
    assert quiet.stdout.split() == [p.id_for()]

    info = ok_json(daemon, "inspect", p.ref())
    assert info["status"]["id"] == p.id_for()
    assert info["info"]["imageSpec"] == p.image.config
    assert info["info"]["chainID"] == p.image.chain_id

    r = crimage(daemon, "rm", p.ref())
    assert r.returncode == 0, r.stderr
    assert ok_json(daemon, "images").get("images", []) == []


def test_cli_handler(daemon_factory, images):
    d = daemon_factory({"runtimeHandlers": {"armh": {"platform": "linux/arm64"}}})
    p = images["multi"]
    assert ok_json(d, "pull", "--runtime-handler", "armh", p.ref())["imageRef"] == p.id_for("linux/arm64")
    assert ok_json(d, "images", "--runtime-handler", "armh")["images"][0]["id"] == p.id_for("linux/arm64")
    assert ok_json(d, "images", "--runtime-handler", "other").get("images", []) == []


def test_cli_errors(daemon):
    r = crimage(daemon, "inspect", "127.0.0.1:1/nope:v1")
    assert r.returncode == 1
    assert "nope" in r.stderr
    r = crimage(daemon, "pull", "127.0.0.1:1/Bad/Ref:v1")
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr or "invalid" in r.stderr.lower()
    r = crimage(daemon, "no-such-verb")
    assert r.returncode == 2
    r = crimage(daemon, "pull")  # missing IMAGE
    assert r.returncode == 2


def test_cli_no_daemon(tmp_path):
    exe = os.path.join(build_dir(), "plugin", "crimage")
    r = subprocess.run([exe, "--socket", str(tmp_path / "absent.sock"), "--timeout", "5s", "fsinfo"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip()


def test_cli_user_fields(daemon, images):
    for repo, uid, username in (("user1002", "1002", ""), ("userwww", None, "www-data")):
        p = images[repo]
        ok_json(daemon, "pull", p.ref())
        st = ok_json(daemon, "inspect", p.ref())["status"]
        if uid is None:
            assert st["uid"] is None
        else:
            assert str(st["uid"]["value"]) == uid
        assert st["username"] == username
