"""Helpers of the scheduling, progress and metrics tests: a throttling HTTP proxy in front of the test registry that
counts the requests it forwards, and a client of crimaged's own crimage.v1.PullProgress service generated from
cri/crimage.proto."""

import threading
import time

import grpc

from conftest import RPC_TIMEOUT, ForwardingHandler, ProxyServer, forward_upstream, generate_proto_module

class SlowProxy(ProxyServer):
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

        class Handler(ForwardingHandler):
            def _forward(self, with_body):
                with proxy.lock:
                    proxy.requests.append((self.command, self.path))
                status, resp_headers, body, length = forward_upstream(self, proxy.upstream, with_body)
                slow = with_body and "/blobs/" in self.path and status in (200, 206)
                if slow and proxy.blob_delay:
                    time.sleep(proxy.blob_delay)
                self.send_forwarded_head(status, resp_headers, length)
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

        super().__init__(Handler)

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
    return generate_proto_module(outdir, "crimage.proto", "crimage_progress_pb2",
                                 lambda mod: mod.WatchPullRequest(image="x").SerializeToString(), subdir="pgen")


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
