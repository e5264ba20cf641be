"""PullImage with the credentials kubelet passes (AuthConfig), against a registry that requires HTTP basic auth."""

import base64

import grpc
import pytest

import fixtures
from conftest import Registry

USERS = {"alice": "s3cret", "bob": "pa:ss:word"}  # bob's password contains ':' (split `auth` on the first one)


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    reg = Registry(str(tmp_path_factory.mktemp("auth-registry")), users=USERS).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def private(auth_registry, tmp_path_factory):
    return fixtures.push_one(str(tmp_path_factory.mktemp("auth-images")), auth_registry.host, "shared",
                             "private/shared", "v1", "alice:s3cret")


@pytest.fixture
def adaemon(daemon_factory, auth_registry):
    return daemon_factory({"registries": {auth_registry.host: {"insecure": True}}})


def pull_error(d, ref, auth=None):
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(ref, auth=auth)
    return e.value


def test_username_password(adaemon, cri, private):
    auth = cri.AuthConfig(username="alice", password="s3cret")
    assert adaemon.client.pull(private.ref(), auth=auth) == private.id_for()
    assert adaemon.client.image(private.ref()).id == private.id_for()


def test_auth_field_password_with_colons(adaemon, cri, private):
    auth = cri.AuthConfig(auth=base64.b64encode(b"bob:pa:ss:word").decode())
    assert adaemon.client.pull(private.ref(), auth=auth) == private.id_for()


def test_server_address_matching(adaemon, cri, private, auth_registry):
    auth = cri.AuthConfig(username="alice", password="s3cret", server_address=auth_registry.host)
    assert adaemon.client.pull(private.ref(), auth=auth) == private.id_for()


@pytest.mark.parametrize("auth", [
    None,
    {"username": "alice", "password": "wrong"},
    {"username": "mallory", "password": "s3cret"},
])
def test_refused_credentials(adaemon, cri, private, auth):
    err = pull_error(adaemon, private.ref(), cri.AuthConfig(**auth) if auth else None)
    assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), err
    assert private.registry_host in err.details()
    assert "s3cret" not in err.details() and "wrong" not in err.details()
    assert adaemon.client.image(private.ref()) is None
    assert adaemon.alive()


def test_credentials_for_another_server_are_not_sent(adaemon, cri, private):
    # kubelet names the registry the credentials are for; they must never go to another host
    auth = cri.AuthConfig(username="alice", password="s3cret", server_address="registry.example.invalid")
    err = pull_error(adaemon, private.ref(), auth)
    assert err.code() != grpc.StatusCode.OK
    assert adaemon.client.image(private.ref()) is None


def test_public_registry_ignores_unneeded_credentials(daemon, cri, images):
    auth = cri.AuthConfig(username="alice", password="s3cret")
    p = images["layers"]
    assert daemon.client.pull(p.ref(), auth=auth) == p.id_for()
