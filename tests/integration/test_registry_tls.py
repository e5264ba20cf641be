"""The registry over HTTPS with a test CA made by openssl: trusted through <certsDir>/<host:port>/ca.crt, a clear
TLS error without it, and a registry that requires a client certificate (http.tls.clientcas)."""

import os
import shutil

import grpc
import pytest

from registry_helpers import Pki, RegistryProcess


@pytest.fixture
def pki(tmp_path):
    return Pki(str(tmp_path))


def tls_registry(registry, tmp_path, pki, client_cas=False):
    extra = f"  tls:\n    certificate: {pki.server_crt}\n    key: {pki.server_key}\n"
    if client_cas:
        extra += f"    clientcas:\n      - {pki.ca_crt}\n"
    return RegistryProcess(str(tmp_path / ("mtls" if client_cas else "tls")),
                           storage=os.path.join(registry.workdir, "storage"), http_extra=extra).start()


def certs_dir(tmp_path, host, files):
    d = tmp_path / "certs.d"
    (d / host).mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, d / host / name)
    return str(d)


def test_tls_with_ca(daemon_factory, registry, images, tmp_path, pki):
    reg = tls_registry(registry, tmp_path, pki)
    try:
        cd = certs_dir(tmp_path, reg.host, {"ca.crt": pki.ca_crt})
        d = daemon_factory({"certsDir": cd})
        ref = d.client.pull(f"{reg.host}/layers:v1")
        assert ref == images["layers"].image.id
        assert not d.corrupt_blobs()
    finally:
        reg.stop()


def test_tls_untrusted_ca(daemon_factory, registry, images, tmp_path, pki):
    reg = tls_registry(registry, tmp_path, pki)
    try:
        d = daemon_factory({"certsDir": str(tmp_path / "empty-certs.d")})
        with pytest.raises(grpc.RpcError) as e:
            d.client.pull(f"{reg.host}/layers:v1")
        msg = e.value.details()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, msg
        assert reg.host in msg and "TLS" in msg and "ca.crt" in msg, msg
        assert not d.blob_files()
    finally:
        reg.stop()


def test_tls_client_certificate(daemon_factory, registry, images, tmp_path, pki):
    reg = tls_registry(registry, tmp_path, pki, client_cas=True)
    try:
        # the CA alone: the registry refuses the handshake
        cd = certs_dir(tmp_path, reg.host, {"ca.crt": pki.ca_crt})
        d = daemon_factory({"certsDir": cd})
        with pytest.raises(grpc.RpcError) as e:
            d.client.pull(f"{reg.host}/layers:v1")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert reg.host in e.value.details()
        # with client.cert and client.key beside it the pull works
        certs_dir(tmp_path, reg.host, {"client.cert": pki.client_crt, "client.key": pki.client_key})
        d2 = daemon_factory({"certsDir": cd, "pullBackoff": {"initial": "1s", "max": "1s"}})
        ref = d2.client.pull(f"{reg.host}/layers:v1")
        assert ref == images["layers"].image.id
    finally:
        reg.stop()
