#!/usr/bin/python3
"""A registry front for the pull tests that misbehaves in the ways real deployments do.

usage: fault-proxy.py PORTFILE UPSTREAM LOG

Listens on 127.0.0.1 (a free port, written to PORTFILE) and forwards GETs to UPSTREAM ("http://127.0.0.1:5000"):
  - /v2/... needs HTTP Basic auth for $FAULT_USER:$FAULT_PASS (401 with a Basic challenge otherwise);
  - the first request for each manifest path is answered 503 with Retry-After: 0;
  - blob requests are redirected (307) to http://localhost:<port>/redirected/..., i.e. another host name, where
    the blob is served without auth; LOG gets one JSON line per request there saying whether an Authorization
    header came along (it must not).
  - /trickle/<path> serves UPSTREAM<path> without auth, its body in 256-byte pieces every half second (512 B/s).
"""
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request

from testserver import QuietHandler, serve

FORWARD_REQ = ("Accept", "Range")
FORWARD_RESP = ("Content-Type", "Content-Length", "Content-Range", "Docker-Content-Digest")


def main():
    portfile, upstream, log = sys.argv[1:4]
    want = "Basic " + base64.b64encode(("%s:%s" % (os.environ["FAULT_USER"], os.environ["FAULT_PASS"])).encode()).decode()
    failed_once = set()

    class Handler(QuietHandler):
        def record(self, kind):
            with open(log, "a") as f:
                f.write(json.dumps({"kind": kind, "path": self.path,
                                    "auth": "Authorization" in self.headers}) + "\n")

        def proxy(self, path):
            req = urllib.request.Request(upstream + path)
            for h in FORWARD_REQ:
                if h in self.headers:
                    req.add_header(h, self.headers[h])
            try:
                resp = urllib.request.urlopen(req)
            except urllib.error.HTTPError as e:
                resp = e
            body = resp.read()
            self.send_response(resp.status if hasattr(resp, "status") else resp.code)
            for h in FORWARD_RESP:
                v = resp.headers.get(h)
                if v is not None and h != "Content-Length":
                    self.send_header(h, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def trickle(self, path):
            try:
                resp = urllib.request.urlopen(upstream + path)
            except urllib.error.HTTPError as e:
                resp = e
            body = resp.read()
            self.send_response(resp.status if hasattr(resp, "status") else resp.code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for i in range(0, len(body), 256):
                    self.wfile.write(body[i:i + 256])
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                self.close_connection = True

        def do_GET(self):
            if self.path.startswith("/trickle/"):
                self.record("trickle")
                return self.trickle(self.path[len("/trickle"):])
            if self.path.startswith("/redirected/"):
                self.record("redirected")
                return self.proxy(self.path[len("/redirected"):])
            if self.headers.get("Authorization") != want:
                self.record("challenge")
                return self.send_body(401, [("WWW-Authenticate", 'Basic realm="fault proxy, test"')])
            if "/manifests/" in self.path and self.path not in failed_once:
                failed_once.add(self.path)
                self.record("503")
                body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "try again"}]}).encode()
                return self.send_body(503, [("Retry-After", "0"), ("Content-Type", "application/json")], body)
            if "/blobs/" in self.path:
                self.record("redirect")
                port = self.server.server_address[1]
                return self.send_body(307, [("Location", "http://localhost:%d/redirected%s" % (port, self.path))])
            self.record("proxy")
            return self.proxy(self.path)

    serve(Handler, portfile)


if __name__ == "__main__":
    main()
