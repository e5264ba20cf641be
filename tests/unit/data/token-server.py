#!/usr/bin/python3
"""A minimal token server (the distribution "token" auth spec) for the pull tests.

usage: token-server.py PORTFILE KEY CERT ISSUER SERVICE LOG

Listens on 127.0.0.1 (a free port, written to PORTFILE), answers GET /token?service=..&scope=.. with a JWT signed
RS256 by KEY (via `openssl dgst`), carrying CERT in its x5c header so a registry that trusts CERT accepts it. Every
request is appended to LOG as one JSON line (path, query, whether an Authorization header came and its scheme).
Grants what is asked for; a request with Basic credentials other than those in $TOKEN_USER/$TOKEN_PASS is refused.
"""
import base64
import http.server
import json
import os
import subprocess
import sys
import time
import urllib.parse


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main():
    portfile, key, cert, issuer, service, log = sys.argv[1:7]
    with open(cert) as f:
        pem = "".join(l for l in f.read().splitlines() if "-----" not in l)
    user, password = os.environ.get("TOKEN_USER"), os.environ.get("TOKEN_PASS")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            u = urllib.parse.urlsplit(self.path)
            q = urllib.parse.parse_qs(u.query)
            auth = self.headers.get("Authorization", "")
            with open(log, "a") as f:
                f.write(json.dumps({"path": u.path, "query": u.query, "auth": auth.split(" ")[0]}) + "\n")
            if auth.startswith("Basic "):
                got = base64.b64decode(auth[6:]).decode()
                if user is None or got != "%s:%s" % (user, password):
                    self.send_response(401)
                    self.end_headers()
                    return
            access = []
            for scope in q.get("scope", []):
                parts = scope.split(":")
                if len(parts) == 3:
                    access.append({"type": parts[0], "name": parts[1], "actions": parts[2].split(",")})
            now = int(time.time())
            header = {"typ": "JWT", "alg": "RS256", "x5c": [pem]}
            claims = {"iss": issuer, "sub": "test", "aud": service, "exp": now + 600, "nbf": now - 10, "iat": now,
                      "jti": "%d-%d" % (now, os.getpid()), "access": access}
            signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
            sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing_input.encode(),
                                 capture_output=True, check=True).stdout
            token = signing_input + "." + b64url(sig)
            body = json.dumps({"token": token, "expires_in": 600}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    os.rename(portfile + ".tmp", portfile)
    srv.serve_forever()


if __name__ == "__main__":
    main()
