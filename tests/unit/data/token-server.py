#!/usr/bin/python3
"""A token server (the distribution "token" auth spec) for the pull tests.

usage: token-server.py PORTFILE KEY CERT ISSUER SERVICE LOG

Listens on 127.0.0.1 (a free port, written to PORTFILE) and issues JWTs signed RS256 by KEY (via `openssl dgst`),
carrying CERT in their x5c header so a registry that trusts CERT accepts them. It grants the scopes asked for.

  GET  /token?service=..&scope=..   anonymous, or HTTP Basic with $TOKEN_USER:$TOKEN_PASS (other credentials: 401)
  POST /token                       OAuth2 form: grant_type=password (username/password must be $TOKEN_USER/
                                    $TOKEN_PASS) or grant_type=refresh_token (refresh_token must be $TOKEN_REFRESH),
                                    client_id required; answers {access_token, expires_in, issued_at}

Environment: $TOKEN_POST=404 makes POST answer 404 (a server without OAuth2, the client must fall back to GET);
$TOKEN_EXPIRES sets expires_in and the JWT lifetime in seconds (default 600).

Every request is appended to LOG as one JSON line: path, query (GET), auth (the Authorization scheme), method,
and for POST grant_type, client_id, service, scope, username. Secrets are never logged.
"""
import base64
import datetime
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse

from testserver import QuietHandler, serve


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main():
    portfile, key, cert, issuer, service, log = sys.argv[1:7]
    with open(cert) as f:
        pem = "".join(l for l in f.read().splitlines() if "-----" not in l)
    user, password = os.environ.get("TOKEN_USER"), os.environ.get("TOKEN_PASS")
    refresh = os.environ.get("TOKEN_REFRESH")
    post_mode = os.environ.get("TOKEN_POST", "oauth")
    expires = int(os.environ.get("TOKEN_EXPIRES", "600"))
    lock = threading.Lock()
    counter = [0]

    def record(entry):
        with lock, open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def make_token(scopes):
        access = []
        for scope in scopes:
            for one in scope.split(" "):
                parts = one.split(":")
                if len(parts) == 3:
                    access.append({"type": parts[0], "name": parts[1], "actions": parts[2].split(",")})
        now = int(time.time())
        with lock:
            counter[0] += 1
            n = counter[0]
        header = {"typ": "JWT", "alg": "RS256", "x5c": [pem]}
        claims = {"iss": issuer, "sub": "test", "aud": service, "exp": now + expires, "nbf": now - 10, "iat": now,
                  "jti": "%d-%d-%d" % (now, os.getpid(), n), "access": access}
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing_input.encode(),
                             capture_output=True, check=True).stdout
        return signing_input + "." + b64url(sig), now

    class Handler(QuietHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, obj=None):
            body = json.dumps(obj).encode() if obj is not None else b""
            self.send_body(status, [("Content-Type", "application/json")], body)

        def grant(self, scopes, key_name):
            token, now = make_token(scopes)
            issued = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.answer(200, {key_name: token, "expires_in": expires, "issued_at": issued})

        def do_GET(self):
            u = urllib.parse.urlsplit(self.path)
            q = urllib.parse.parse_qs(u.query)
            auth = self.headers.get("Authorization", "")
            record({"path": u.path, "query": u.query, "auth": auth.split(" ")[0], "method": "GET",
                    "scope": " ".join(q.get("scope", []))})
            if auth.startswith("Basic "):
                got = base64.b64decode(auth[6:]).decode("utf-8", "replace")
                if user is None or got != "%s:%s" % (user, password):
                    return self.answer(401, {"details": "bad credentials"})
            self.grant(q.get("scope", []), "token")

        def do_POST(self):
            n = int(self.headers.get("Content-Length", "0"))
            form = urllib.parse.parse_qs(self.rfile.read(n).decode(), keep_blank_values=True)
            one = lambda k: form.get(k, [""])[0]  # noqa: E731
            auth = self.headers.get("Authorization", "")
            record({"path": urllib.parse.urlsplit(self.path).path, "query": "", "auth": auth.split(" ")[0],
                    "method": "POST", "grant_type": one("grant_type"), "client_id": one("client_id"),
                    "service": one("service"), "scope": one("scope"), "username": one("username"),
                    "content_type": self.headers.get("Content-Type", "")})
            if post_mode == "404":
                return self.answer(404, {"details": "not found"})
            if not one("client_id"):
                return self.answer(400, {"error": "invalid_request"})
            if one("grant_type") == "password":
                if user is None or one("username") != user or one("password") != password:
                    return self.answer(401, {"error": "invalid_grant"})
            elif one("grant_type") == "refresh_token":
                if refresh is None or one("refresh_token") != refresh:
                    return self.answer(401, {"error": "invalid_grant"})
            else:
                return self.answer(400, {"error": "unsupported_grant_type"})
            self.grant(form.get("scope", []), "access_token")

    serve(Handler, portfile)


if __name__ == "__main__":
    main()
