"""Small helpers of tests/packaging/run, which is bash.

    helpers.py registry DIR       start Debian's docker-registry on 127.0.0.1 (storage under DIR) and push the
                                  `layers` fixture image with skopeo, with the integration tests' own code; write
                                  DIR/registry.json {"pid", "host", "ref", "digest_ref", "id", "chain_id"} and
                                  exit, leaving the registry running (the caller stops it with SIGTERM to pid)
    helpers.py closed-port        print a port of 127.0.0.1 nothing listens on (bound, then released)
    helpers.py notify SOCKET SECS bind SOCKET as a sd_notify socket and exit 0 when READY=1 arrives, 1 after SECS
    helpers.py json EXPR          evaluate the Python expression EXPR with `d` = the JSON document on stdin, print it
"""

import json
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))


def registry(workdir):
    import conftest  # noqa: E402 -- needs the path above
    import fixtures  # noqa: E402

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    reg = conftest.Registry(workdir).start()
    try:
        pushed = fixtures.push_one(os.path.join(workdir, "images"), reg.host, "layers", "layers", "v1", None)
    except BaseException:
        reg.stop()
        raise
    info = {"pid": reg.proc.pid, "host": reg.host, "ref": pushed.ref(), "digest_ref": pushed.digest_ref(),
            "id": pushed.id_for(), "chain_id": pushed.image.chain_id}
    with open(os.path.join(workdir, "registry.json"), "w") as f:
        json.dump(info, f)


def closed_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def notify(path, timeout):
    """What systemd does for Type=notify: wait for READY=1 on the socket named by NOTIFY_SOCKET."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(float(timeout))
    try:
        while True:
            msg = s.recv(4096).decode("utf-8", "replace")
            print(msg.replace("\n", " "), flush=True)
            if "READY=1" in msg.split("\n"):
                return 0
    except socket.timeout:
        print(f"no READY=1 within {timeout} s", file=sys.stderr)
        return 1
    finally:
        s.close()


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "registry":
        registry(*args)
    elif cmd == "closed-port":
        closed_port()
    elif cmd == "notify":
        return notify(*args)
    elif cmd == "json":
        d = json.load(sys.stdin)  # noqa: F841 -- used by the expression
        print(eval(args[0]))  # noqa: S307 -- expressions written in tests/packaging/run
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
