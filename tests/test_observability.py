"""Monitoring: every daemon's /metrics passes `promtool check metrics`, the alert rules and
their unit tests pass promtool, and the Grafana dashboard is sound.

The four daemons are the lab's (conftest `lab`: two sites, a real IdP), scraped on their
loopback metrics ports inside each router's namespace after real traffic crossed the tunnel
and each idpd ran a sync. Grafana is not available on this host (`apt-cache policy grafana`:
no candidate in the configured Debian sources), so the dashboard is not loaded into a
Grafana: instead its model is checked (unique panel ids, grid positions, data source
references to the template variable, an expression in every target), every panel expression
is parsed by promtool inside a temporary rules file, and every vpnr_* metric the dashboard,
the alert rules or their unit tests name must be one a daemon really exported in the
scrapes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ns_exec, ns_ping
from vpnr.core.client import socket_target
from vpnr.lab.lab import Lab
from vpnr.lab.topology import DAEMONS, METRICS_PORTS
from vpnr.tunneld.keys import StaticKeys, b64
from vpnr.tunneld.peers import make_peer
from vpnr.tunneld.router import Address, TunnelCollector, TunnelRouter
from vpnr.v1 import idp_pb2, idp_pb2_grpc

pytestmark = [pytest.mark.root, pytest.mark.lab]

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "vpnr-alerts.yml"
ALERT_TESTS = PROMETHEUS / "vpnr-alerts.test.yml"
SCRAPE_CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "vpnr.json"
DOC = REPO / "docs" / "observability.md"
PROMTOOL = "/usr/bin/promtool"
METRIC_NAME = re.compile(r"\bvpnr_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")
# Grafana's variables, replaced by what a query would carry, so promtool can parse it.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "$instance": ".*"}

Scrapes = dict[tuple[str, str], str]


def promtool(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool (bounded in time)."""
    return subprocess.run([PROMTOOL, *argv], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


def scrape(ns: str, port: int) -> str:
    """GET /metrics on the namespace's loopback."""
    done = ns_exec(ns, "curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/metrics")
    assert done.returncode == 0, done.stderr
    return done.stdout


def sync_now(lab: Lab, letter: str) -> idp_pb2.SyncResult:
    """One full sync of a site's idpd against the lab IdP."""
    path = lab.spec.run_dir / lab.spec.site(letter).instance / "idpd.sock"
    with grpc.insecure_channel(socket_target(path)) as channel:
        result = idp_pb2_grpc.IdpServiceStub(channel).SyncNow(idp_pb2.SyncNowRequest(),
                                                                timeout=30)
    assert isinstance(result, idp_pb2.SyncResult)
    return result


@pytest.fixture(scope="module")
def scrapes(lab: Lab) -> Scrapes:
    """Every daemon of both sites scraped after traffic through the tunnel and a sync."""
    a, b = lab.spec.sites
    deadline = time.monotonic() + 20
    while not ns_ping(a.host_ns(1), b.host_v4(1), 2):  # engineers: allowed by the lab policy
        assert time.monotonic() < deadline, "no echo reply across the tunnel within 20 s"
    assert ns_ping(b.host_ns(1), a.host_v4(1), 2)
    for site in (a, b):
        assert sync_now(lab, site.letter).outcome in (idp_pb2.SYNC_OUTCOME_APPLIED,
                                                       idp_pb2.SYNC_OUTCOME_UNCHANGED)
    return {(site.letter, daemon): scrape(site.router_ns, METRICS_PORTS[daemon])
            for site in (a, b) for daemon in DAEMONS}


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> (labels, value) of one scrape."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The one sample of ``name`` with ``labels`` (exactly one must exist)."""
    found = [v for lbl, v in samples(text).get(name, []) if labels.items() <= lbl.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def exported_names(scraped: Scrapes) -> set[str]:
    """Every sample name any daemon exported, and its family name."""
    names: set[str] = set()
    for text in scraped.values():
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            names.update(s.name for s in family.samples)
    return names


def is_exported(name: str, exported: set[str]) -> bool:
    """``name`` or its base name (without a histogram/counter suffix) was exported."""
    if name in exported:
        return True
    return any(name.endswith(suffix) and name[:-len(suffix)] in exported
               for suffix in SUFFIXES)


def dashboard() -> dict[str, Any]:
    """The dashboard model."""
    model = json.loads(DASHBOARD.read_text())
    assert isinstance(model, dict)
    return model


def dashboard_exprs() -> list[tuple[int, str, str]]:
    """(panel id, refId, expr) of every target."""
    return [(p["id"], t["refId"], t["expr"]) for p in dashboard()["panels"]
            for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of vpnr-alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


# -- metrics ------------------------------------------------------------------------------

@pytest.mark.parametrize("daemon", DAEMONS)
def test_metrics_pass_promtool_lint(scrapes: Scrapes, daemon: str) -> None:
    """Both sites' scrape of the daemon are non-empty, pass the linter without a single
    problem, and count the traffic and syncs the fixture caused."""
    for letter in ("a", "b"):
        text = scrapes[(letter, daemon)]
        assert value(text, "vpnr_build_info", daemon=daemon) == 1.0
        checked = promtool("check", "metrics", stdin=text)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.strip() == "" and checked.stderr.strip() == "", \
            checked.stdout + checked.stderr
    a, b = scrapes[("a", daemon)], scrapes[("b", daemon)]
    if daemon == "policyd":
        redirected = sum(v for lbl, v in samples(a)["vpnr_xdp_packets_total"]
                         if lbl["verdict"] == "VERDICT_REDIRECT" and lbl["interface"] == "lan0")
        assert redirected >= 2  # the echo requests towards site B went to the tunnel
        assert value(a, "vpnr_policy_version") >= 1
        assert {lbl["interface"] for lbl, _ in samples(a)["vpnr_xdp_packets_total"]} \
            .isdisjoint({str(i) for i in range(1, 100)})  # names, not interface indexes
    elif daemon == "tunneld":
        for text in (a, b):
            assert value(text, "vpnr_tunnel_handshakes_completed_total") >= 1
            assert value(text, "vpnr_tunnel_peers", state="established") == 1
            assert value(text, "vpnr_tunnel_peer_received_packets_total") >= 2
    elif daemon == "auditd":
        assert value(a, "vpnr_audit_sink_healthy", sink="sqlite") == 1
        assert value(a, "vpnr_audit_stored_records") >= 1
        assert {lbl["percentile"] for lbl, _ in
                samples(a)["vpnr_audit_kernel_to_store_seconds"]} == {"50", "99"}
    else:
        for text in (a, b):
            good = (value(text, "vpnr_idp_syncs_total", result="applied")
                    + value(text, "vpnr_idp_syncs_total", result="unchanged"))
            assert good >= 1
            assert value(text, "vpnr_idp_stale") == 0
            assert value(text, "vpnr_idp_sync_duration_seconds_count") >= 1
            assert value(text, "vpnr_idp_sync_duration_seconds_bucket", le="+Inf") == \
                value(text, "vpnr_idp_sync_duration_seconds_count")


class Unanswered:
    """tunneld's outputs towards a peer that never answers: datagrams are sent nowhere."""

    def __init__(self) -> None:
        self.sent = 0

    def send_datagram(self, datagram: bytes, endpoint: Address) -> bool:
        self.sent += 1
        return True

    def deliver(self, inner: bytes) -> None:
        raise AssertionError("nothing can arrive from a silent peer")

    def send_icmp(self, packet: bytes, ipv6: bool) -> None:
        raise AssertionError("no LAN packet is sent in this test")

    def sessions_changed(self, live: dict[int, int]) -> None:
        pass

    def audit(self, action: str, success: bool, detail: dict[str, object]) -> None:
        pass


def test_tunnel_metrics_count_a_handshake_given_up(tmp_path: Path) -> None:
    """A peer that never answers: after REKEY_ATTEMPT_TIME of retries, tunneld's metrics
    show the handshake given up and the peer unreachable (what VpnrTunnelHandshakesGivingUp
    and VpnrTunnelPeerUnreachable watch), and the exposition still lints clean.

    In process, on the real router core and crypto (as tests/test_tunnel_router.py): the
    silence is real, but the router's clock is moved instead of waiting the 90 s of retries,
    which no config setting shortens."""
    now = [1000.0]
    outputs = Unanswered()
    router = TunnelRouter(keys=StaticKeys.load_or_create(tmp_path / "a.key"), outputs=outputs,
                          clock=lambda: now[0])
    peer_key = StaticKeys.load_or_create(tmp_path / "b.key").public
    router.add_peer(make_peer("b", b64(peer_key), "192.0.2.2:51820", ["10.2.0.0/24"]))
    registry = CollectorRegistry()
    registry.register(TunnelCollector(router, lambda: {"udp_tx": outputs.sent}))
    router.initiate(router.peers["b"])
    text = generate_latest(registry).decode()
    assert value(text, "vpnr_tunnel_handshakes_given_up_total") == 0
    assert value(text, "vpnr_tunnel_peers", state="handshaking") == 1
    for _ in range(200):  # 200 simulated seconds, one tick each
        now[0] += 1.0
        router.tick()
    text = generate_latest(registry).decode()
    assert value(text, "vpnr_tunnel_handshakes_given_up_total") == 1
    assert value(text, "vpnr_tunnel_peers", state="unreachable") == 1
    assert value(text, "vpnr_tunnel_peer_established", peer="b") == 0
    assert value(text, "vpnr_tunnel_peer_last_handshake_timestamp_seconds", peer="b") == 0
    assert value(text, "vpnr_tunnel_datapath_events_total", counter="udp_tx") >= 5  # retries
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), \
        checked.stdout + checked.stderr


# -- alert rules --------------------------------------------------------------------------

def test_alert_rules_and_scrape_config_pass_promtool() -> None:
    """The rules pass `promtool check rules`; the sample config (which loads them) passes
    `promtool check config` and scrapes each daemon in its own job."""
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    config = promtool("check", "config", str(SCRAPE_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr
    jobs = {job["job_name"] for job in yaml.safe_load(SCRAPE_CONFIG.read_text())
            ["scrape_configs"]}
    assert jobs == {f"vpnr-{d}" for d in DAEMONS}
    alerts = {rule["alert"] for rule in alert_rules()}
    for needed in ("VpnrDaemonDown", "VpnrDaemonMetricsAbsent", "VpnrIdpStale",
                   "VpnrIdpStalenessHigh", "VpnrAuditKernelReserveFailed",
                   "VpnrAuditRecordsLost", "VpnrMapFillHigh", "VpnrMapFillCritical",
                   "VpnrTunnelHandshakesGivingUp", "VpnrTunnelHandshakesRefused"):
        assert needed in alerts
    absent = [r["expr"] for r in alert_rules() if r["alert"] == "VpnrDaemonMetricsAbsent"]
    assert sorted(absent) == sorted(f'absent(up{{job="vpnr-{d}"}})' for d in DAEMONS)


def test_alert_unit_tests_pass_and_cover_every_alert() -> None:
    """`promtool test rules` passes, and every alert has a case where it fires and one
    where it does not."""
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert fires == alerts
    assert silent == alerts


def test_alert_unit_tests_fail_on_a_wrong_threshold(tmp_path: Path) -> None:
    """The unit tests can fail: with the 80% map alert moved to 95% they do."""
    rules = ALERTS.read_text()
    assert rules.count("vpnr_map_fill_ratio > 0.8\n") == 1
    (tmp_path / ALERTS.name).write_text(rules.replace("vpnr_map_fill_ratio > 0.8\n",
                                                      "vpnr_map_fill_ratio > 0.95\n"))
    (tmp_path / ALERT_TESTS.name).write_text(ALERT_TESTS.read_text())
    tested = promtool("test", "rules", str(tmp_path / ALERT_TESTS.name))
    assert tested.returncode != 0
    assert "VpnrMapFillHigh" in tested.stdout + tested.stderr


# -- dashboard ----------------------------------------------------------------------------

def test_dashboard_model() -> None:
    """Unique ids, panels on the 24-column grid without overlaps, every query panel on the
    datasource variable with an expression per target, the variables and the rows."""
    model = dashboard()
    assert 39 <= model["schemaVersion"] < 45
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    panels = model["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h")), p["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and \
            grid["x"] + grid["w"] <= 24, p["title"]
        covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                   for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not covered & cells, f"panel {p['title']!r} overlaps another"
        cells |= covered
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for target in p["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", p["title"]
            assert target["expr"].strip(), p["title"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Overview", "Verdicts", "Latency", "Tunnels", "Audit", "IdP", "Maps"]
    titles = {p["title"] for p in panels}
    assert {"Daemons up", "Policy version", "Verdict rate"} <= titles


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel expression, with Grafana's variables filled in, parses in promtool."""
    rules = []
    for panel_id, ref, query in dashboard_exprs():
        expr = query
        for variable, replacement in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, replacement)
        assert "$" not in expr, expr
        rules.append({"record": f"vpnr_dashboard:panel{panel_id}_{ref}", "expr": expr})
    assert len(rules) >= 30
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout
    # The check can fail: a broken expression is refused.
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": "vpnr_dashboard:broken", "expr": "sum by (verdict (rate(x[5m]))"}]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0


def test_referenced_metrics_are_exported(scrapes: Scrapes) -> None:
    """Every vpnr_* name in the dashboard, the alert rules and their unit tests is one the
    daemons exported in the scrapes."""
    exported = exported_names(scrapes)
    sources = {"dashboard": " ".join(e for _, _, e in dashboard_exprs()),
               "alerts": " ".join(r["expr"] for r in alert_rules()),
               "alert tests": ALERT_TESTS.read_text()}
    for source, text in sources.items():
        names = set(METRIC_NAME.findall(text))
        assert names, source
        unknown = sorted(n for n in names if not is_exported(n, exported))
        assert not unknown, f"{source} names metrics no daemon exports: {unknown}"
    assert not is_exported("vpnr_no_such_metric_total", exported)


def test_docs_list_every_exported_metric_and_alert(scrapes: Scrapes) -> None:
    """docs/observability.md names every metric family the daemons exported and every
    alert."""
    doc = DOC.read_text()
    families = {family.name for text in scrapes.values()
                for family in text_string_to_metric_families(text)
                if family.name.startswith("vpnr_")}
    assert len(families) >= 30
    missing = sorted(f for f in families
                     if f"`{f}`" not in doc and f"`{f}_total`" not in doc
                     and f"`{f}_info`" not in doc)
    assert not missing, f"docs/observability.md lacks {missing}"
    for alert in {rule["alert"] for rule in alert_rules()}:
        assert alert in doc, alert
