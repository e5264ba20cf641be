"""What the test servers of this folder (fault-proxy.py, token-server.py) share: a quiet request handler that sends
whole bodies, and serving on a free port of 127.0.0.1 that is published in a file."""
import http.server
import os


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_body(self, status, headers=(), body=b""):
        """Sends a complete response: status, headers, Content-Length and body."""
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(handler_class, portfile):
    """Serves handler_class forever on a free port of 127.0.0.1, written to portfile first. The file appears whole
    (renamed into place), so a reader never sees a partial number."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    os.rename(portfile + ".tmp", portfile)
    srv.serve_forever()
