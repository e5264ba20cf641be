"""Bad input gets a clear error and never takes the daemon down: malformed references, missing fields, unknown
methods, garbage payloads, oversized messages, registries that answer garbage or not at all."""

import http.server
import json
import os
import random
import socket
import threading

import grpc
import pytest

import fixtures
from conftest import SERVICE, QuietHTTPServer, free_port

OK_ERRORS_FOR_GARBAGE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)


def rpc_error(fn, *args, **kw):
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


# ---------------------------------------------------------------------------------------------------------------
# References and request fields


@pytest.mark.parametrize("ref", [
    "127.0.0.1:5000/UpperCase/image:v1",
    "127.0.0.1:5000/image:" + "t" * 129,
    "127.0.0.1:5000/image@sha256:abc",
    "127.0.0.1:5000/image@md5:" + "0" * 32,
    "127.0.0.1:5000//image:v1",
    "127.0.0.1:5000/image:bad tag",
    ":v1",
    "image:",
    "image@",
    "-image",
])
def test_pull_invalid_reference(daemon, ref):
    err = rpc_error(daemon.client.pull, ref)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    details = err.details()
    assert details
    if len(ref) < 100:
        assert ref in details, details
    assert daemon.alive()


@pytest.mark.parametrize("method,request_cls", [
    ("PullImage", "PullImageRequest"),
    ("ImageStatus", "ImageStatusRequest"),
    ("RemoveImage", "RemoveImageRequest"),
])
def test_missing_image_spec(daemon, cri, method, request_cls):
    req = getattr(cri, request_cls)()
    err = rpc_error(daemon.client.call, method, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "image" in err.details().lower()
    req = getattr(cri, request_cls)(image=cri.ImageSpec(image=""))
    err = rpc_error(daemon.client.call, method, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert daemon.alive()


@pytest.mark.parametrize("path", [
    f"/{SERVICE}/Nope",
    f"/{SERVICE}/listimages",
    "/runtime.v1.RuntimeService/Version",
    "/runtime.v1alpha2.ImageService/ListImages",
    "/nothing",
])
def test_unknown_method(daemon, path):
    err = rpc_error(daemon.client.raw, path, b"")
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err
    assert daemon.alive()


def test_nul_in_string_fields_is_invalid_argument(daemon, cri, images):
    """protobuf-c unpacks strings as C strings: "<name>\\0junk" acted on <name> (a remove really removed it) and a
    handler of "\\0" was the default handler. Every string field with a NUL is refused, naming the field."""
    p = images["layers"]
    name = p.ref()
    daemon.client.pull(name)
    c = daemon.client
    cases = [
        ("ImageStatus", cri.ImageStatusRequest(image=cri.ImageSpec(image=name + "\0junk")), "image.image"),
        ("RemoveImage", cri.RemoveImageRequest(image=cri.ImageSpec(image=name + "\0junk")), "image.image"),
        ("PullImage", cri.PullImageRequest(image=cri.ImageSpec(image=name + "\0junk")), "image.image"),
        ("ImageStatus", cri.ImageStatusRequest(image=cri.ImageSpec(image=name, runtime_handler="\0")),
         "image.runtime_handler"),
        ("RemoveImage", cri.RemoveImageRequest(image=cri.ImageSpec(image=name, runtime_handler="\0x")),
         "image.runtime_handler"),
        ("ImageStatus", cri.ImageStatusRequest(image=cri.ImageSpec(image=name, annotations={"a\0": "b"})),
         "image.annotations.key"),
        ("ListImages", cri.ListImagesRequest(filter=cri.ImageFilter(image=cri.ImageSpec(image=name + "\0"))),
         "filter.image.image"),
        ("PullImage", cri.PullImageRequest(image=cri.ImageSpec(image=name),
                                           auth=cri.AuthConfig(username="u", password="pass\0s3cr3t")),
         "auth.password"),
        ("PullImage", cri.PullImageRequest(image=cri.ImageSpec(image=name),
                                           sandbox_config=cri.PodSandboxConfig(
                                               annotations={"io.containerd.cri.runtime-handler": "\0"})),
         "sandbox_config.annotations.value"),
    ]
    for method, req, field in cases:
        err = rpc_error(c.call, method, req)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, field, err)
        assert f"field {field} contains a NUL byte" in err.details(), (method, err.details())
        assert "s3cr3t" not in err.details()
    # nothing was acted on: the image is still there, for the default handler
    assert c.image(name).id == p.id_for()
    assert [i.id for i in c.list()] == [p.id_for()]
    assert daemon.alive()


def test_non_utf8_string_fields_are_invalid_argument(daemon, cri):
    """Strings must be UTF-8 (protobuf-c takes any bytes): raw requests with a bad byte in a field."""
    spec = cri.ImageSpec(image="busybox", runtime_handler="kata").SerializeToString()
    for field, bad in (("image.image", spec.replace(b"busybox", b"busy\xffox")),
                       ("image.runtime_handler", spec.replace(b"kata", b"k\xc3ta")),
                       ("image.runtime_handler", spec.replace(b"kata", b"\xed\xa0\x80a"))):
        req = b"\x0a" + bytes([len(bad)]) + bad  # ImageStatusRequest.image
        for method in ("ImageStatus", "RemoveImage", "PullImage"):
            err = rpc_error(daemon.client.raw, f"/{SERVICE}/{method}", req)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err)
            assert f"field {field} is not valid UTF-8" in err.details(), err.details()
    assert daemon.alive()


def garbage_payloads():
    rnd = random.Random(7)
    return [
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint that never ends
        b"\x0a\x05ab",  # a length-delimited field shorter than it says
        b"\x0a\xff\xff\xff\xff\x0f",  # a length of 4 GiB
        b"\x0a\x03\x0a\x01",  # a nested message that is itself truncated
        b"\x07",  # field 0, an invalid wire type
        b"\x0a\x02\x0a\xc0",  # an invalid UTF-8 image string in a nested message
    ] + [rnd.randbytes(n) for n in (1, 7, 64, 1000, 100000)]


@pytest.mark.parametrize("method", ["PullImage", "ImageStatus", "RemoveImage", "ListImages"])
def test_garbage_payload(daemon, method):
    for i, payload in enumerate(garbage_payloads()):
        try:
            daemon.client.raw(f"/{SERVICE}/{method}", payload)
        except grpc.RpcError as e:
            assert e.code() in OK_ERRORS_FOR_GARBAGE, (i, e)
        else:
            # random bytes can decode as a message made only of unknown fields; then the request is simply empty,
            # which only ListImages accepts
            assert method == "ListImages", (i, payload[:32])
        assert daemon.alive(), i


def test_large_message_accepted(daemon, cri):
    # kubelet sends messages up to 16 MiB: an ImageStatus request of 12 MiB must be served
    spec = cri.ImageSpec(image="127.0.0.1:1/none:latest", annotations={"big": "x" * (12 << 20)})
    resp = daemon.client.call("ImageStatus", cri.ImageStatusRequest(image=spec))
    assert not resp.HasField("image")


def test_oversized_message_rejected(daemon, cri):
    spec = cri.ImageSpec(image="127.0.0.1:1/none:latest", annotations={"big": "x" * (40 << 20)})
    err = rpc_error(daemon.client.call, "ImageStatus", cri.ImageStatusRequest(image=spec))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert daemon.alive()


def test_many_bad_requests_in_parallel(daemon):
    """Bad requests from many clients at once; the daemon answers each and stays up."""
    errors = []

    def worker(seed):
        rnd = random.Random(seed)
        c = daemon.new_client(timeout=60)
        try:
            for _ in range(20):
                try:
                    c.raw(f"/{SERVICE}/PullImage", rnd.randbytes(rnd.randrange(1, 300)))
                except grpc.RpcError as e:
                    if e.code() not in OK_ERRORS_FOR_GARBAGE:
                        errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert daemon.alive()


def test_raw_socket_garbage(daemon):
    """Bytes that are not HTTP/2 at all on the socket, then a connection closed mid-preface."""
    for data in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n", bytes(range(256)) * 4):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(daemon.socket)
            s.sendall(data)
            try:
                s.recv(4096)
            except (socket.timeout, ConnectionResetError):
                pass
    assert daemon.alive()


# ---------------------------------------------------------------------------------------------------------------
# Registries that answer garbage, or nothing


class JunkRegistry:
    """A 'registry' on 127.0.0.1 whose /v2/ looks fine but whose manifests and blobs are whatever a route says.

    routes: {path: (status, headers, body)}; anything else is a 404 with a registry-style error body.
    """

    def __init__(self):
        self.routes = {}
        self.hits = []
        junk = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def _serve(self, with_body):
                junk.hits.append(self.path)
                if self.path == "/v2/" or self.path == "/v2":
                    status, headers, body = 200, {"Content-Type": "application/json"}, b"{}"
                else:
                    status, headers, body = junk.routes.get(self.path, (
                        404, {"Content-Type": "application/json"},
                        b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}'))
                if callable(body):
                    body(self)
                    return
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    try:
                        self.wfile.write(body)
                    except (BrokenPipeError, ConnectionResetError):
                        pass

            def do_GET(self):
                self._serve(True)

            def do_HEAD(self):
                self._serve(False)

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self):
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(30)


def _truncated(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", fixtures.MT_OCI_MANIFEST)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b'{"schemaVersion": 2, "config": ')
    handler.wfile.flush()
    handler.close_connection = True


def junk_cases():
    oci = {"Content-Type": fixtures.MT_OCI_MANIFEST}
    wrong_shape = json.dumps({"schemaVersion": 2, "mediaType": fixtures.MT_OCI_MANIFEST, "config": "nope",
                              "layers": 5}).encode()
    bad_digest = json.dumps({"schemaVersion": 2, "mediaType": fixtures.MT_OCI_MANIFEST,
                             "config": {"mediaType": fixtures.MT_OCI_CONFIG, "digest": "sha256:xyz", "size": 2},
                             "layers": []}).encode()
    return {
        "random-bytes": (200, oci, random.Random(3).randbytes(4096)),
        "not-json": (200, oci, b"<html><body>hello</body></html>"),
        "wrong-shape": (200, oci, wrong_shape),
        "bad-digest-in-manifest": (200, oci, bad_digest),
        "deep-nesting": (200, oci, b"[" * 200000 + b"]" * 200000),
        "huge": (200, oci, b" " * (48 << 20) + b"{}"),
        "unknown-media-type": (200, {"Content-Type": "text/html"}, b"{}"),
        "server-error": (500, {"Content-Type": "text/plain"}, b"boom"),
        "truncated": (200, oci, _truncated),
        "schema1": (200, {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
                    b'{"schemaVersion": 1, "name": "x", "tag": "v1", "fsLayers": []}'),
    }


@pytest.fixture
def junk():
    j = JunkRegistry()
    yield j
    j.stop()


@pytest.mark.parametrize("case", sorted(junk_cases()))
def test_registry_answering_garbage(daemon_factory, junk, case):
    repo = f"junk/{case}"
    status, headers, body = junk_cases()[case]
    for ref in ("v1",):
        junk.routes[f"/v2/{repo}/manifests/{ref}"] = (status, headers, body)
    d = daemon_factory({"registries": {junk.host: {"insecure": True}}})
    image = f"{junk.host}/{repo}:v1"
    err = rpc_error(d.client.pull, image)
    assert err.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), err
    assert err.details() and junk.host in err.details(), err.details()
    assert any(h.startswith(f"/v2/{repo}/manifests/") for h in junk.hits)
    assert d.alive()
    assert d.client.list() == []
    assert d.corrupt_blobs() == []


def test_registry_serving_wrong_blob(daemon_factory, junk, images):
    """A valid manifest whose config blob does not match its digest: the pull fails and stores nothing."""
    img = images["shared"].image
    repo = "junk/wrong-blob"
    junk.routes[f"/v2/{repo}/manifests/v1"] = (200, {"Content-Type": fixtures.MT_OCI_MANIFEST}, img.manifest_bytes)
    junk.routes[f"/v2/{repo}/blobs/{img.config_digest}"] = (200, {"Content-Type": "application/octet-stream"},
                                                            img.config_bytes + b" ")
    for layer in img.layers:
        junk.routes[f"/v2/{repo}/blobs/{layer.digest}"] = (200, {"Content-Type": "application/octet-stream"},
                                                           layer.data[:-1] + bytes([layer.data[-1] ^ 1]))
    d = daemon_factory({"registries": {junk.host: {"insecure": True}}})
    err = rpc_error(d.client.pull, f"{junk.host}/{repo}:v1")
    assert err.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), err
    # the message names the blob that failed verification
    assert any(d.split(":", 1)[1] in err.details() for d in [img.config_digest] + [x.digest for x in img.layers]), \
        err.details()
    assert d.alive()
    assert d.client.list() == []
    # nothing that failed verification is in the store; what is there is intact
    assert not d.has_blob(img.config_digest)
    for layer in img.layers:
        assert not d.has_blob(layer.digest)
    assert d.corrupt_blobs() == []


def test_registry_unreachable(daemon_factory):
    port = free_port()  # nothing listens there
    host = f"127.0.0.1:{port}"
    d = daemon_factory({"registries": {host: {"insecure": True}}})
    err = rpc_error(d.client.pull, f"{host}/nothing:v1")
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert host in err.details()
    assert d.alive()


def test_registry_closing_connections(daemon_factory):
    """A listener that accepts and closes at once."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    host = f"127.0.0.1:{srv.getsockname()[1]}"
    stop = threading.Event()

    def loop():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.close()
            except socket.timeout:
                continue
            except OSError:
                return

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        d = daemon_factory({"registries": {host: {"insecure": True}}})
        err = rpc_error(d.client.pull, f"{host}/closing:v1")
        assert err.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), err
        assert host in err.details()
        assert d.alive()
    finally:
        stop.set()
        t.join(10)
        srv.close()


# ---------------------------------------------------------------------------------------------------------------
# One limit per kind of document; no host paths in errors


def serve_image(junk, repo, img, tag="v1"):
    """Routes for one fixtures.Image on the junk registry."""
    octet = {"Content-Type": "application/octet-stream"}
    junk.routes[f"/v2/{repo}/manifests/{tag}"] = (200, {"Content-Type": fixtures.MT_OCI_MANIFEST}, img.manifest_bytes)
    junk.routes[f"/v2/{repo}/blobs/{img.config_digest}"] = (200, octet, img.config_bytes)
    for layer in img.layers:
        junk.routes[f"/v2/{repo}/blobs/{layer.digest}"] = (200, octet, layer.data)


def test_status_verbose_reads_every_config_the_pull_accepts(daemon_factory, junk):
    # a config of 6 MiB: above the 4 MiB the status once read, below the 8 MiB the pull accepts
    layer = fixtures.Layer([("big/", None), ("big/file", b"x" * 100)])
    img = fixtures.Image("bigconfig", [layer], extra_env=("BIG=" + "y" * (6 << 20),))
    assert 4 << 20 < len(img.config_bytes) < 8 << 20
    serve_image(junk, "junk/bigconfig", img)
    d = daemon_factory({"registries": {junk.host: {"insecure": True}}})
    ref = f"{junk.host}/junk/bigconfig:v1"
    assert d.client.pull(ref) == img.config_digest
    resp = d.client.status(ref, verbose=True)
    assert resp.image.id == img.config_digest
    assert json.loads(resp.info["info"])["imageSpec"] == img.config


def test_errors_show_no_host_paths(daemon, images):
    p = images["layers"]
    daemon.client.pull(p.ref())
    # the config blob vanishes from under the daemon: the verbose status cannot read it
    os.unlink(os.path.join(daemon.root, "blobs", "sha256", p.id_for().split(":", 1)[1]))
    err = rpc_error(daemon.client.status, p.ref(), verbose=True)
    assert err.code() != grpc.StatusCode.OK
    details = err.details()
    assert p.id_for() in details, details
    root = os.path.realpath(daemon.root)
    assert root not in details and daemon.root not in details, details
    assert "<store>/blobs/sha256/" in details, details
    # the daemon's own log still has the whole path for the admin
    with open(daemon.log, encoding="utf-8", errors="replace") as f:
        assert root in f.read()
    assert daemon.alive()
