"""The built-in autoscaler's Prometheus source (`autoscaling.metricsSource: prometheus`): the queries, the
vectors → Samples mapping, and a real Prometheus scraping the runtime's real exporter, queried by the operator."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from dsv4.operator import api, scrape
from dsv4.runtime.cache.manager import CacheManager
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.config import tiny
from dsv4.runtime.server.metrics import EngineMetrics, cache_info_labels

from dsv4 import metrics_catalog as mc


def vec(metric: dict[str, str], value: float, t: float = 100.0) -> dict:
    return {"metric": metric, "value": [t, str(value)]}


def test_queries_select_the_endpoint_and_group_by_pod() -> None:
    q = scrape.prometheus_queries("team-a", "chat")
    for text in q.values():
        assert 'namespace="team-a"' in text and f'{mc.ENDPOINT_LABEL}="chat"' in text and "by (pod" in text
    assert "timestamp(" in q["time"] and "pool" in q["occupancy"]


def test_vectors_to_samples_ready_pods_only_and_missing_signals_hold() -> None:
    results = {
        "occupancy": [vec({"pod": "a", "pool": "csa"}, 0.7), vec({"pod": "a", "pool": "swa"}, 0.2),
                      vec({"pod": "b", "pool": "csa"}, 0.1), vec({"pod": "gone", "pool": "csa"}, 0.9)],
        "queue": [vec({"pod": "a"}, 3), vec({"pod": "gone"}, 9)],  # b has no queue series: no sample for b
        "time": [vec({"pod": "a"}, 1234.5), vec({"pod": "b"}, 1234.0), vec({"pod": "gone"}, 1000.0)],
    }
    (s,) = scrape.samples_from_prometheus(results, ["a", "b"])
    assert (s.pod, s.time, s.queue, s.pools) == ("a", 1234.5, 3.0, {"csa": 0.7, "swa": 0.2})
    assert scrape.samples_from_prometheus({}, ["a"]) == []


def test_metrics_source_is_part_of_the_api() -> None:
    spec = api.parse_spec({"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                           "autoscaling": {"enabled": True, "metricsSource": "prometheus",
                                           "prometheusAddress": "http://prom:9090"}})
    assert spec.autoscaling.metrics_source == "prometheus"
    with pytest.raises(ValueError, match="metricsSource"):
        api.parse_spec({"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                        "autoscaling": {"metricsSource": "statsd"}})


def test_an_unreachable_prometheus_is_a_scrape_error() -> None:
    with pytest.raises(scrape.ScrapeError, match="Prometheus"):
        scrape.fetch_prometheus("http://127.0.0.1:9", "ns", "chat", ["a"], timeout=0.5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not shutil.which("prometheus"), reason="the prometheus binary (Debian package) is not installed")
def test_real_prometheus_scraping_the_real_exporter(tmp_path: Path) -> None:
    spec = CacheSpec.from_model(tiny())
    mgr = CacheManager(spec, dict.fromkeys(spec.block_pools, 40))
    ids = list(range(300))
    mgr.start("r", ids)
    assert mgr.allocate("r", 300)
    mgr.commit("r", ids, 300)
    em = EngineMetrics("tiny", cache_info_labels(spec, mgr.num_blocks, "full", True))
    em.on_idle(1, 4, mgr.stats())
    text = em.render()[0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *a: object) -> None:
            pass

    exporter = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    port = _free_port()
    cfg = {"global": {"scrape_interval": "1s"},
           "scrape_configs": [{"job_name": "dsv4", "static_configs": [{
               "targets": [f"127.0.0.1:{exporter.server_address[1]}"],
               "labels": {"namespace": "team-a", "pod": "chat-0", mc.ENDPOINT_LABEL: "chat"}}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prom.log").open("wb"))
    try:
        deadline, samples = time.time() + 60, []
        while time.time() < deadline and not samples:
            time.sleep(0.5)
            try:
                samples = scrape.fetch_prometheus(f"http://127.0.0.1:{port}", "team-a", "chat", ["chat-0", "other"])
            except scrape.ScrapeError:
                samples = []
        assert samples, (tmp_path / "prom.log").read_text()[-2000:]
        (s,) = samples
        assert s.pod == "chat-0" and s.queue == 4.0 and abs(s.time - time.time()) < 30
        assert s.pools == {p: pytest.approx(ps.occupancy) for p, ps in mgr.stats().pools.items()}
        assert scrape.fetch_prometheus(f"http://127.0.0.1:{port}", "team-b", "chat", ["chat-0"]) == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        exporter.shutdown()
