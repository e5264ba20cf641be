"""Registry authentication end to end through crimaged: Debian's docker-registry with `auth: token` (a token server
issuing JWTs the registry trusts) and with htpasswd Basic auth, serving the session registry's images."""

import os

import grpc
import pytest

from registry_helpers import RegistryProcess, TokenServer, htpasswd

USER, PASSWORD = "alice", "p:ss w&rd=%"
REFRESH = "refresh-token-1"


@pytest.fixture
def token_registry(registry, images, tmp_path):
    started = []

    def start(**token_args):
        ts = TokenServer(str(tmp_path / f"t{len(started)}"), **token_args)
        started.append(ts)
        reg = RegistryProcess(str(tmp_path / f"r{len(started)}"), storage=os.path.join(registry.workdir, "storage"),
                              extra=ts.auth_yaml).start()
        started.append(reg)
        return reg, ts

    yield start
    for p in reversed(started):
        p.stop()


def daemon_for(daemon_factory, host):
    return daemon_factory({"registries": {host: {"insecure": True}}})


def test_token_post_password_grant(daemon_factory, token_registry, cri, images):
    reg, ts = token_registry(user=USER, password=PASSWORD)
    d = daemon_for(daemon_factory, reg.host)
    ref = d.client.pull(f"{reg.host}/layers:v1", auth=cri.AuthConfig(username=USER, password=PASSWORD))
    assert ref == images["layers"].image.id
    posts = [r for r in ts.requests() if r["method"] == "POST"]
    assert posts, ts.requests()
    assert {(r["grant_type"], r["client_id"], r["service"], r["scope"], r["username"]) for r in posts} == \
        {("password", "crimage", TokenServer.SERVICE, "repository:layers:pull", USER)}
    assert all(r["content_type"] == "application/x-www-form-urlencoded" for r in posts)
    assert not [r for r in ts.requests() if r["method"] == "GET"]
    assert not d.corrupt_blobs()


def test_token_scope_per_repository_and_anonymous_get(daemon_factory, token_registry, images):
    reg, ts = token_registry()
    d = daemon_for(daemon_factory, reg.host)
    d.client.pull(f"{reg.host}/layers:v1")
    d.client.pull(f"{reg.host}/shared:v1")
    gets = [r for r in ts.requests() if r["method"] == "GET"]
    assert {r["scope"] for r in gets} == {"repository:layers:pull", "repository:shared:pull"}
    assert all(r["auth"] == "" for r in gets)
    assert "scope=repository%3Alayers%3Apull" in gets[0]["query"] or \
        "scope=repository%3Alayers%3Apull" in gets[1]["query"]
    # one token per repository: the blobs reuse it (no request per blob)
    assert len(gets) == 2, gets
    assert not [r for r in ts.requests() if r["method"] == "POST"]


def test_token_get_fallback(daemon_factory, token_registry, cri, images):
    reg, ts = token_registry(user=USER, password=PASSWORD, post="404")
    d = daemon_for(daemon_factory, reg.host)
    d.client.pull(f"{reg.host}/layers:v1", auth=cri.AuthConfig(username=USER, password=PASSWORD))
    reqs = ts.requests()
    assert [r["method"] for r in reqs][:2] == ["POST", "GET"], reqs
    assert reqs[1]["auth"] == "Basic"


def test_token_identity_token_refresh_grant(daemon_factory, token_registry, cri, images):
    reg, ts = token_registry(refresh=REFRESH)
    d = daemon_for(daemon_factory, reg.host)
    d.client.pull(f"{reg.host}/layers:v1", auth=cri.AuthConfig(identity_token=REFRESH))
    reqs = ts.requests()
    assert reqs and all(r["method"] == "POST" and r["grant_type"] == "refresh_token" for r in reqs), reqs


def test_token_expiry_refetch(daemon_factory, token_registry, cri, images):
    reg, ts = token_registry(user=USER, password=PASSWORD, expires=2)
    d = daemon_for(daemon_factory, reg.host)
    auth = cri.AuthConfig(username=USER, password=PASSWORD)
    d.client.pull(f"{reg.host}/layers:v1", auth=auth)
    n = len(ts.requests())
    import time
    time.sleep(2.5)
    d.client.pull(f"{reg.host}/layers:latest", auth=auth)
    assert len(ts.requests()) > n


def test_token_wrong_password(daemon_factory, token_registry, cri, images):
    reg, ts = token_registry(user=USER, password=PASSWORD)
    d = daemon_for(daemon_factory, reg.host)
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(f"{reg.host}/layers:v1", auth=cri.AuthConfig(username=USER, password="wrong-secret"))
    msg = e.value.details()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, msg
    assert reg.host in msg and "HTTP 401" in msg and "credentials" in msg, msg
    assert "wrong-secret" not in msg
    assert not d.blob_files()


def test_basic_htpasswd(daemon_factory, registry, images, cri, tmp_path):
    hp = str(tmp_path / "htpasswd")
    htpasswd(hp, USER, PASSWORD)
    reg = RegistryProcess(str(tmp_path / "basic"), storage=os.path.join(registry.workdir, "storage"),
                          extra=f"auth:\n  htpasswd:\n    realm: crimage-basic\n    path: {hp}\n").start()
    try:
        d = daemon_for(daemon_factory, reg.host)
        with pytest.raises(grpc.RpcError) as e:
            d.client.pull(f"{reg.host}/layers:v1")
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
        assert reg.host in e.value.details()
        ref = d.client.pull(f"{reg.host}/layers:v1", auth=cri.AuthConfig(username=USER, password=PASSWORD))
        assert ref == images["layers"].image.id
    finally:
        reg.stop()
