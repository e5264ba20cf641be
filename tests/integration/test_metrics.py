"""Prometheus metrics on the optional HTTP listener (metricsAddress), scraped with curl after real pulls: started,
succeeded and failed (by reason) pulls, bytes, the duration histogram, queue and in-flight gauges, back-offs and
the store gauges. Off by default."""

import re
import shutil
import subprocess

import grpc
import pytest

from conftest import free_port

pytestmark = pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")

LINE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


def scrape(url):
    r = subprocess.run(["curl", "-sS", "-i", "--max-time", "30", url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.replace("\r\n", "\n").partition("\n\n")
    return head, body


def parse(body):
    out = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        assert m, f"not a sample line: {line!r}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_metrics_after_pulls(daemon_factory, registry, images):
    port = free_port()
    d = daemon_factory({"metricsAddress": f"127.0.0.1:{port}", "pullBackoff": {"initial": "60s", "max": "120s"}})
    url = f"http://127.0.0.1:{port}/metrics"
    head, body = scrape(url)
    assert head.startswith("HTTP/1.1 200")
    assert "text/plain; version=0.0.4" in head
    m = parse(body)
    assert m["crimage_pulls_started_total"] == 0
    assert m["crimage_images"] == 0
    assert m["crimage_pull_queue_length"] == 0 and m["crimage_pulls_in_flight"] == 0
    assert "# TYPE crimage_pull_duration_seconds histogram" in body

    p = images["layers"]
    assert d.client.pull(p.ref()) == p.id_for()
    bad = f"{registry.host}/layers:no-such-tag"
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(bad)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        d.client.pull(bad)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # back-off

    m = parse(scrape(url)[1])
    assert m["crimage_pulls_started_total"] == 2
    assert m["crimage_pulls_succeeded_total"] == 1
    assert m['crimage_pulls_failed_total{reason="NOT_FOUND"}'] == 1
    assert m["crimage_pull_backoffs_total"] == 1
    assert m["crimage_pull_bytes_total"] >= sum(layer.size for layer in p.image.layers)
    assert m["crimage_pull_duration_seconds_count"] == 2
    assert m['crimage_pull_duration_seconds_bucket{le="+Inf"}'] == 2
    buckets = [v for k, v in m.items() if k.startswith("crimage_pull_duration_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert m["crimage_images"] == 1
    assert m["crimage_store_bytes"] > 0
    assert m["crimage_pull_queue_length"] == 0 and m["crimage_pulls_in_flight"] == 0

    # a second pull of the same image downloads nothing new
    before = m["crimage_pull_bytes_total"]
    d.client.pull(p.ref())
    m = parse(scrape(url)[1])
    assert m["crimage_pull_bytes_total"] == before
    assert m["crimage_pulls_succeeded_total"] == 2

    head, _ = scrape(f"http://127.0.0.1:{port}/other")
    assert head.startswith("HTTP/1.1 404")


def test_metrics_off_by_default(daemon):
    assert "serving metrics" not in open(daemon.log).read()


def test_bad_metrics_address_refused(daemon_factory):
    with pytest.raises(RuntimeError) as e:
        daemon_factory({"metricsAddress": "not-an-address"})
    assert "metricsAddress" in str(e.value)
