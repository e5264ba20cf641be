"""Helpers of the scheduling, progress and metrics tests: a throttling HTTP proxy in front of the test registry that
counts the requests it forwards, and a client of crimaged's own crimage.v1.PullProgress service generated from
cri/crimage.proto."""

import http.client
import http.server
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time

import grpc

from conftest import REPO, RPC_TIMEOUT, QuietHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}


class SlowProxy:
    """Forwards every request to `upstream`. Blob bodies go out in `chunk`-byte pieces with `chunk_delay` seconds
    between them, after `blob_delay` seconds, so a pull lasts long enough for others to overlap with it. Every
    request is recorded as (method, path)."""

    def __init__(self, upstream, blob_delay=0.3, chunk=64 << 10, chunk_delay=0.05):
        self.upstream = upstream
        self.blob_delay = blob_delay
        self.chunk = chunk
        self.chunk_delay = chunk_delay
        self.lock = threading.Lock()
        self.requests = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def _forward(self, with_body):
                with proxy.lock:
                    proxy.requests.append((self.command, self.path))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
                    conn.request(self.command, self.path, headers=headers)
                    resp = conn.getresponse()
                    body = resp.read() if with_body else b""
                    status, resp_headers = resp.status, resp.getheaders()
                    length = len(body) if with_body else int(resp.getheader("Content-Length") or 0)
                finally:
                    conn.close()
                slow = with_body and "/blobs/" in self.path and status in (200, 206)
                if slow and proxy.blob_delay:
                    time.sleep(proxy.blob_delay)
                self.send_response(status)
                for k, v in resp_headers:
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if not with_body:
                    return
                try:
                    if not slow:
                        self.wfile.write(body)
                        return
                    for off in range(0, len(body), proxy.chunk):
                        self.wfile.write(body[off:off + proxy.chunk])
                        self.wfile.flush()
                        if off + proxy.chunk < len(body):
                            time.sleep(proxy.chunk_delay)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def do_GET(self):
                self._forward(True)

            def do_HEAD(self):
                self._forward(False)

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self):
        return f"127.0.0.1:{self.server.server_address[1]}"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(30)

    def snapshot(self):
        with self.lock:
            return list(self.requests)

    def reset(self):
        with self.lock:
            self.requests.clear()

    def blob_gets(self, since=None):
        """{digest: number of GETs} of blob downloads."""
        out = {}
        for method, path in (since if since is not None else self.snapshot()):
            if method == "GET" and "/blobs/" in path:
                digest = path.split("/blobs/", 1)[1].split("?", 1)[0]
                out[digest] = out.get(digest, 0) + 1
        return out


def generate_progress_module(outdir):
    """Compiles cri/crimage.proto to a Python message module and imports it."""
    proto_dir = os.path.join(REPO, "cri")
    attempts = [[sys.executable, "-m", "grpc_tools.protoc"]]
    if shutil.which("protoc"):
        attempts.append(["protoc"])
    errors = []
    for i, tool in enumerate(attempts):
        d = os.path.join(outdir, f"pgen{i}")
        os.makedirs(d, exist_ok=True)
        r = subprocess.run(tool + [f"-I{proto_dir}", f"--python_out={d}", os.path.join(proto_dir, "crimage.proto")],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            errors.append(f"{tool}: {r.stderr}")
            continue
        try:
            spec = importlib.util.spec_from_file_location("crimage_progress_pb2", os.path.join(d, "crimage_pb2.py"))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mod.WatchPullRequest(image="x").SerializeToString()
            return mod
        except Exception as e:  # noqa: BLE001 -- any failure to load means: try the next generator
            errors.append(f"{tool}: generated module does not load: {e!r}")
    raise RuntimeError("cannot generate a Python client from cri/crimage.proto:\n" + "\n".join(errors))


class ProgressClient:
    SERVICE = "crimage.v1.PullProgress"

    def __init__(self, pb, socket_path, timeout=RPC_TIMEOUT):
        self.pb = pb
        self.timeout = timeout
        self.channel = grpc.insecure_channel("unix:" + socket_path, options=[("grpc.enable_retries", 0)])

    def close(self):
        self.channel.close()

    def list(self, include_ended=False):
        stub = self.channel.unary_unary(f"/{self.SERVICE}/ListPulls",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=self.pb.ListPullsResponse.FromString)
        return list(stub(self.pb.ListPullsRequest(include_ended=include_ended), timeout=self.timeout).pulls)

    def watch(self, image, handler="", timeout=None):
        stub = self.channel.unary_stream(f"/{self.SERVICE}/WatchPull",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=self.pb.PullStatus.FromString)
        return stub(self.pb.WatchPullRequest(image=image, runtime_handler=handler), timeout=timeout or self.timeout)


def max_overlap(intervals):
    """The largest number of (start, end) intervals running at one instant; an interval ending at t does not
    overlap one starting at t."""
    points = []
    for s, e in intervals:
        points.append((s, 1))
        points.append((e, -1))
    points.sort(key=lambda p: (p[0], p[1]))  # ends before starts at the same instant
    cur = best = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best
