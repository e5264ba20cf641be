"""Registry credentials the way kubelet finds them, against docker-registry with HTTP Basic and with token auth:
a request's AuthConfig, the node's docker config.json, a directory of image pull Secrets, `crimage pull --secret`,
an exec credential-provider plugin and a docker credential helper; candidates are tried in order until one works,
every failure is reported when none does, and no password or token ever reaches crimaged's log or the CLI's
output (the daemons here run at logLevel debug)."""

import json
import os
import subprocess
import time

import grpc
import pytest

import cred_helpers as ch
from conftest import build_dir

USER = "alice"
PASSWORD = "Alice:pw-b7Q1x-colon"  # a ':' inside: `auth` must split on the first one
WRONG = "Wrong-pw-Z3mq8"
WRONG2 = "Wrong-pw-R5tv2"
SECRETS = [PASSWORD, WRONG, WRONG2, ch.b64(f"{USER}:{PASSWORD}"), ch.b64(f"{USER}:{WRONG}"),
           ch.b64(f"{USER}:{WRONG2}"), ch.b64(f"mallory:{WRONG}")]
# Every JWT (the token server's bearer tokens) starts with the base64 of '{"'.
JWT_PREFIX = "eyJ"


@pytest.fixture(scope="module", params=["htpasswd", "token"])
def auth_reg(request, registry, images, tmp_path_factory):
    """A registry requiring credentials, serving the same storage as the session registry."""
    reg = ch.AuthRegistry(str(tmp_path_factory.mktemp(f"reg-{request.param}")),
                          os.path.join(registry.workdir, "storage"), request.param, USER, PASSWORD).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def basic_reg(registry, images, tmp_path_factory):
    reg = ch.AuthRegistry(str(tmp_path_factory.mktemp("reg-basic")), os.path.join(registry.workdir, "storage"),
                          "htpasswd", USER, PASSWORD).start()
    yield reg
    reg.stop()


def no_secrets(*texts):
    for text in texts:
        for s in SECRETS:
            assert s not in text, f"a secret appears in:\n{text}"
        assert JWT_PREFIX not in text, f"a token appears in:\n{text}"


def daemon_log(d):
    with open(d.log, errors="replace") as f:
        return f.read()


def start(daemon_factory, reg, tmp_path, **config):
    """crimaged for reg, without node credentials unless config says otherwise."""
    base = {
        "registries": {reg.host: {"insecure": True}},
        "dockerConfigPaths": [str(tmp_path / "absent" / "config.json")],
        "kubeletRootDir": str(tmp_path / "kubelet"),
    }
    base.update(config)
    return daemon_factory(base)


def token_mark(reg):
    """Where the token server's request log ends now."""
    try:
        return os.path.getsize(reg.token_requests)
    except OSError:
        return 0


def pull_ok(d, reg, ref, image_id, auth=None):
    """Pulls and checks the image; with token auth (whose server also serves anonymous requests) also that the
    token was asked for with a credential: the pull did not succeed anonymously."""
    mark = token_mark(reg)
    assert d.client.pull(ref, auth=auth) == image_id
    assert d.client.image(ref).id == image_id
    if reg.mode == "token":
        with open(reg.token_requests) as f:
            f.seek(mark)
            entries = [json.loads(line) for line in f if line.strip()]
        assert any(e["auth"] == "Basic" or (e["method"] == "POST" and e.get("username") == USER) for e in entries), \
            entries


def target(reg, images):
    p = images["layers"]
    return f"{reg.host}/{p.repo}:{p.tags[0]}", p.id_for()


def crimage(d, *args):
    exe = os.path.join(build_dir(), "plugin", "crimage")
    return subprocess.run([exe, "--socket", d.socket, *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def crimage_local(*args):
    exe = os.path.join(build_dir(), "plugin", "crimage")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


# ---- request AuthConfig ----

def test_request_username_password(daemon_factory, auth_reg, images, tmp_path, cri):
    d = start(daemon_factory, auth_reg, tmp_path)
    ref, image_id = target(auth_reg, images)
    pull_ok(d, auth_reg, ref, image_id, auth=cri.AuthConfig(username=USER, password=PASSWORD))
    no_secrets(daemon_log(d))


def test_request_auth_base64_with_colon(daemon_factory, auth_reg, images, tmp_path, cri):
    d = start(daemon_factory, auth_reg, tmp_path)
    ref, image_id = target(auth_reg, images)
    pull_ok(d, auth_reg, ref, image_id, auth=cri.AuthConfig(auth=ch.b64(f"{USER}:{PASSWORD}")))
    no_secrets(daemon_log(d))


def test_request_auth_only_that_one(daemon_factory, auth_reg, images, tmp_path, cri):
    """A request's AuthConfig is the only credential tried, even when the node has a working one."""
    cfg = ch.write_docker_config(str(tmp_path / "node" / "config.json"), [(auth_reg.host, USER, PASSWORD)])
    d = start(daemon_factory, auth_reg, tmp_path, dockerConfigPaths=[cfg])
    ref, _ = target(auth_reg, images)
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(ref, auth=cri.AuthConfig(username=USER, password=WRONG))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    no_secrets(daemon_log(d), e.value.details())


def test_anonymous_private_image_unauthenticated(daemon_factory, basic_reg, images, tmp_path):
    d = start(daemon_factory, basic_reg, tmp_path)
    ref, _ = target(basic_reg, images)
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(ref)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert d.client.image(ref) is None
    no_secrets(daemon_log(d), e.value.details())


# ---- node config.json ----

def test_node_config_first_fails_second_works(daemon_factory, auth_reg, images, tmp_path):
    """Two entries match; the more specific one (tried first) is wrong, the registry-wide one works."""
    ref, image_id = target(auth_reg, images)
    cfg = ch.write_docker_config(str(tmp_path / "node" / "config.json"),
                                 [(auth_reg.host, USER, PASSWORD), (f"{auth_reg.host}/layers", USER, WRONG)])
    d = start(daemon_factory, auth_reg, tmp_path, dockerConfigPaths=[cfg])
    pull_ok(d, auth_reg, ref, image_id)
    assert d.client.image(ref).id == image_id
    log = daemon_log(d)
    assert "trying credential 1/2" in log and "trying credential 2/2" in log
    assert f"config.json {cfg}" in log
    no_secrets(log)


def test_node_config_found_in_kubelet_root_dir(daemon_factory, auth_reg, images, tmp_path):
    """Without dockerConfigPaths, kubelet's search starts at kubeletRootDir."""
    ref, image_id = target(auth_reg, images)
    root = tmp_path / "kubelet-root"
    ch.write_docker_config(str(root / "config.json"), [(auth_reg.host, USER, PASSWORD)])
    d = start(daemon_factory, auth_reg, tmp_path, dockerConfigPaths=None, kubeletRootDir=str(root))
    pull_ok(d, auth_reg, ref, image_id)
    no_secrets(daemon_log(d))


# ---- Secret directory ----

def test_secret_dir(daemon_factory, auth_reg, images, tmp_path):
    ref, image_id = target(auth_reg, images)
    sdir = tmp_path / "secrets"
    ch.kubectl_secret(str(sdir / "regcred.yaml"), "regcred", auth_reg.host, USER, PASSWORD, namespace="team")
    d = start(daemon_factory, auth_reg, tmp_path, pullSecretsDir=str(sdir))
    pull_ok(d, auth_reg, ref, image_id)
    log = daemon_log(d)
    assert "secret team/regcred" in log
    no_secrets(log)


def test_secret_dir_reloaded_and_before_node_config(daemon_factory, basic_reg, images, tmp_path):
    """Secrets come before the node's config; a Secret added later is picked up without a restart."""
    ref, image_id = target(basic_reg, images)
    sdir = tmp_path / "secrets"
    sdir.mkdir()
    cfg = ch.write_docker_config(str(tmp_path / "node" / "config.json"), [(basic_reg.host, USER, WRONG)])
    d = start(daemon_factory, basic_reg, tmp_path, pullSecretsDir=str(sdir), dockerConfigPaths=[cfg],
              pullBackoff={"initial": "1s", "max": "1s"})
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(ref)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.kubectl_secret(str(sdir / "regcred.yaml"), "regcred", basic_reg.host, USER, PASSWORD)
    # The back-off of the failed pull may still hold it back for up to a second: retry through UNAVAILABLE.
    for _ in range(100):
        try:
            pull_ok(d, basic_reg, ref, image_id)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            time.sleep(0.2)
    else:
        pytest.fail("the pull stayed in back-off")
    log = daemon_log(d)
    assert "secret default/regcred" in log
    no_secrets(log, e.value.details())


# ---- all candidates fail ----

def test_all_fail_lists_every_source(daemon_factory, auth_reg, images, tmp_path):
    ref, _ = target(auth_reg, images)
    sdir = tmp_path / "secrets"
    ch.kubectl_secret(str(sdir / "bad.yaml"), "badcred", auth_reg.host, "mallory", WRONG)
    cfg = ch.write_docker_config(str(tmp_path / "node" / "config.json"),
                                 [(auth_reg.host, USER, WRONG), (f"{auth_reg.host}/layers", USER, WRONG2)])
    d = start(daemon_factory, auth_reg, tmp_path, dockerConfigPaths=[cfg], pullSecretsDir=str(sdir))
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(ref)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    msg = e.value.details()
    assert "3 tried" in msg
    assert "secret default/badcred" in msg
    assert f"[2] user alice (password) from config.json {cfg}" in msg
    assert f"[3] user alice (password) from config.json {cfg}" in msg
    # Secrets first, then the node's entries most specific first.
    assert msg.index("badcred") < msg.index("[2]") < msg.index("[3]")
    assert "user mallory" in msg and "user alice" in msg
    assert d.client.image(ref) is None
    no_secrets(daemon_log(d), msg)


# ---- credential-provider plugin ----

def test_provider_plugin(daemon_factory, auth_reg, images, tmp_path):
    ref, image_id = target(auth_reg, images)
    bindir = tmp_path / "providers"
    calls = tmp_path / "provider-calls"
    conf = ch.write_provider(str(bindir), str(tmp_path / "providers.json"), "crimage-test-provider",
                             [auth_reg.host], {auth_reg.host: (USER, PASSWORD)}, calls_file=str(calls))
    d = start(daemon_factory, auth_reg, tmp_path, credentialProviderConfig=conf, credentialProviderBinDir=str(bindir),
              credentialProviderTimeout="30s")
    pull_ok(d, auth_reg, ref, image_id)
    assert calls.read_text().split() == [f"{auth_reg.host}/layers"]
    no_secrets(daemon_log(d))


def test_provider_plugin_second_after_wrong_node_entry(daemon_factory, auth_reg, images, tmp_path):
    """The node keyring and the providers form one keyring: a wrong, more specific node entry is tried first."""
    ref, image_id = target(auth_reg, images)
    bindir = tmp_path / "providers"
    conf = ch.write_provider(str(bindir), str(tmp_path / "providers.json"), "crimage-test-provider",
                             [auth_reg.host], {auth_reg.host: (USER, PASSWORD)})
    cfg = ch.write_docker_config(str(tmp_path / "node" / "config.json"), [(f"{auth_reg.host}/layers", USER, WRONG)])
    d = start(daemon_factory, auth_reg, tmp_path, dockerConfigPaths=[cfg], credentialProviderConfig=conf,
              credentialProviderBinDir=str(bindir))
    pull_ok(d, auth_reg, ref, image_id)
    log = daemon_log(d)
    assert "trying credential 2/2" in log
    no_secrets(log)


def test_bad_provider_config_refused(daemon_factory, basic_reg, tmp_path):
    conf = tmp_path / "providers.json"
    conf.write_text(json.dumps({"apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig",
                                "providers": []}))
    with pytest.raises(RuntimeError) as e:
        start(daemon_factory, basic_reg, tmp_path, credentialProviderConfig=str(conf),
              credentialProviderBinDir=str(tmp_path))
    assert "provider" in str(e.value).lower()


# ---- docker credential helper ----

def test_credential_helper(daemon_factory, auth_reg, images, tmp_path, monkeypatch):
    ref, image_id = target(auth_reg, images)
    bindir = tmp_path / "helpers"
    calls = tmp_path / "helper-calls"
    ch.write_cred_helper(str(bindir), "crimagetest", auth_reg.host, USER, PASSWORD, calls_file=str(calls))
    cfg = ch.write_docker_config(str(tmp_path / "node" / "config.json"), cred_helpers={auth_reg.host: "crimagetest"})
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    d = start(daemon_factory, auth_reg, tmp_path, dockerConfigPaths=[cfg])
    pull_ok(d, auth_reg, ref, image_id)
    assert auth_reg.host in calls.read_text().split()
    log = daemon_log(d)
    assert "docker-credential-crimagetest" in log
    no_secrets(log)


# ---- the CLI ----

def test_cli_pull_secret_second_works(daemon_factory, auth_reg, images, tmp_path):
    """crimage pull --secret: one PullImage per candidate, the wrong (more specific) one first."""
    ref, image_id = target(auth_reg, images)
    bad = ch.kubectl_secret(str(tmp_path / "bad.yaml"), "bad", f"{auth_reg.host}/layers", USER, WRONG)
    good = ch.kubectl_secret(str(tmp_path / "good.yaml"), "good", auth_reg.host, USER, PASSWORD)
    d = start(daemon_factory, auth_reg, tmp_path)
    r = crimage(d, "--output", "json", "pull", "--secret", good, "--secret", bad, ref)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["imageRef"] == image_id
    assert "credential 1/2" in r.stderr and "secret default/bad" in r.stderr
    assert "UNAUTHENTICATED" in r.stderr
    no_secrets(r.stdout, r.stderr, daemon_log(d))


def test_cli_pull_secret_all_fail(daemon_factory, auth_reg, images, tmp_path):
    ref, _ = target(auth_reg, images)
    bad = ch.kubectl_secret(str(tmp_path / "bad.yaml"), "bad", auth_reg.host, USER, WRONG)
    bad2 = ch.kubectl_secret(str(tmp_path / "bad2.yaml"), "bad2", f"{auth_reg.host}/layers", "mallory", WRONG)
    d = start(daemon_factory, auth_reg, tmp_path)
    r = crimage(d, "pull", "--quiet", "--secret", bad, "--secret", bad2, ref)
    assert r.returncode == 1
    assert "secret default/bad " in r.stderr.replace(")", " ").replace(":", " ")
    assert "secret default/bad2" in r.stderr
    assert "every credential failed (2 tried)" in r.stderr
    no_secrets(r.stdout, r.stderr, daemon_log(d))


def test_cli_pull_secret_not_matching_goes_without(daemon_factory, basic_reg, images, tmp_path):
    """A Secret for another registry: one PullImage without credentials, so the daemon's own ones apply."""
    ref, image_id = target(basic_reg, images)
    other = ch.kubectl_secret(str(tmp_path / "other.yaml"), "other", "registry.example", USER, WRONG)
    cfg = ch.write_docker_config(str(tmp_path / "node" / "config.json"), [(basic_reg.host, USER, PASSWORD)])
    d = start(daemon_factory, basic_reg, tmp_path, dockerConfigPaths=[cfg])
    r = crimage(d, "pull", "--quiet", "--secret", other, ref)
    assert r.returncode == 0, r.stderr
    assert image_id in r.stdout
    no_secrets(r.stdout, r.stderr, daemon_log(d))


def test_cli_pull_secret_bad_file(daemon_factory, basic_reg, images, tmp_path):
    ref, _ = target(basic_reg, images)
    bad = tmp_path / "notasecret.yaml"
    bad.write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: opaque}\ntype: Opaque\ndata: {}\n")
    d = start(daemon_factory, basic_reg, tmp_path)
    r = crimage(d, "pull", "--quiet", "--secret", str(bad), ref)
    assert r.returncode == 1
    assert "opaque" in r.stderr
    r = crimage(d, "pull", "--secret", str(bad), "--creds", f"{USER}:x", ref)
    assert r.returncode == 2


def test_cli_auth_lists_candidates(basic_reg, tmp_path, monkeypatch):
    host = basic_reg.host
    secret = ch.kubectl_secret(str(tmp_path / "s.yaml"), "regcred", host, "sam", PASSWORD, namespace="ns1")
    cfg = ch.write_docker_config(str(tmp_path / "node" / "config.json"),
                                 [(host, USER, WRONG), (f"{host}/layers", "carol", WRONG2)],
                                 cred_helpers={host: "crimagetest"})
    helpers = tmp_path / "helpers"
    ch.write_cred_helper(str(helpers), "crimagetest", host, "erin", PASSWORD)
    monkeypatch.setenv("PATH", f"{helpers}:{os.environ['PATH']}")
    bindir = tmp_path / "providers"
    conf = ch.write_provider(str(bindir), str(tmp_path / "providers.json"), "crimage-test-provider", [host],
                             {host: ("dave", PASSWORD)})
    args = ["auth", f"{host}/layers:v1", "--secret", secret, "--docker-config", cfg, "--provider-config", conf,
            "--provider-bin-dir", str(bindir)]
    r = crimage_local("--output", "json", *args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["image"] == f"{host}/layers"
    got = [(c["source"], c["username"]) for c in out["credentials"]]
    assert got[0] == ("secret ns1/regcred", "sam")
    assert got[1] == (f"config.json {cfg}", "carol")
    # the node keyring and the provider's answer form one keyring: same key, both kept; the helper comes last
    assert len(got) == 5
    assert {u for _, u in got[2:4]} == {USER, "dave"}
    assert (f"config.json {cfg}", USER) in got[2:4]
    assert any(u == "dave" and "crimage-test-provider" in src for src, u in got[2:4])
    assert got[4] == ("credential helper docker-credential-crimagetest", "erin")
    assert all(c["secret"] == "password" for c in out["credentials"])
    table = crimage_local(*args)
    assert table.returncode == 0, table.stderr
    assert "secret ns1/regcred" in table.stdout and "carol" in table.stdout
    no_secrets(r.stdout, r.stderr, table.stdout, table.stderr)

    none = crimage_local("auth", "registry.example/x:v1", "--docker-config", cfg)
    assert none.returncode == 0
    assert "anonymous" in none.stdout
    assert crimage_local("auth").returncode == 2
    assert crimage_local("auth", "Bad/Ref").returncode == 1


def test_backoff_key_resolved_apart_from_request(daemon_factory, basic_reg, images, tmp_path, cri):
    """The resolved sequence has one back-off key; it holds back the next pull without AuthConfig but not a pull
    that brings its own credential."""
    ref, image_id = target(basic_reg, images)
    cfg = ch.write_docker_config(str(tmp_path / "node" / "config.json"), [(basic_reg.host, USER, WRONG)])
    d = start(daemon_factory, basic_reg, tmp_path, dockerConfigPaths=[cfg],
              pullBackoff={"initial": "300s", "max": "300s"})
    with pytest.raises(grpc.RpcError) as first:
        d.client.pull(ref)
    assert first.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as again:
        d.client.pull(ref)
    assert again.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Back-off" in again.value.details() and "every credential failed" in again.value.details()
    assert d.client.pull(ref, auth=cri.AuthConfig(username=USER, password=PASSWORD)) == image_id
    no_secrets(daemon_log(d), first.value.details(), again.value.details())


def test_failing_provider_skipped_stdout_never_logged(daemon_factory, auth_reg, images, tmp_path):
    """A provider that fails contributes nothing: its stderr is logged, its stdout (it may hold secrets) never; the
    node's credential is still used."""
    ref, image_id = target(auth_reg, images)
    bindir = tmp_path / "providers"
    conf = ch.write_failing_provider(str(bindir), str(tmp_path / "providers.json"), "broken-provider",
                                     [auth_reg.host], f'{{"password": "{WRONG}"}}', "the vault is sealed\n")
    cfg = ch.write_docker_config(str(tmp_path / "node" / "config.json"), [(auth_reg.host, USER, PASSWORD)])
    d = start(daemon_factory, auth_reg, tmp_path, dockerConfigPaths=[cfg], credentialProviderConfig=conf,
              credentialProviderBinDir=str(bindir))
    pull_ok(d, auth_reg, ref, image_id)
    log = daemon_log(d)
    assert "the vault is sealed" in log and "broken-provider" in log
    no_secrets(log)
