"""contrib/: the Prometheus rules pass `promtool check rules` and their own
`promtool test rules` cases (Debian's `prometheus` package), and every metric
the Grafana dashboard and the rules name exists in /metrics of a running
daemon (twistd, with workers, the IRC and RCStream bridges), and the other
way round: every exported metric is on the dashboard."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import treq
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from .support import async_test, free_port, open_stream, wait_for
from .test_daemon import DaemonTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(REPO, "contrib", "prometheus", "eventstreams.rules.yml")
RULE_TESTS = os.path.join(REPO, "tests", "data", "prometheus", "eventstreams.rules.test.yml")
DASHBOARD = os.path.join(REPO, "contrib", "grafana", "eventstreams.json")
# Series Prometheus makes itself, not the daemon.
SYNTHETIC = {"up"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is missing: apt-get install --no-install-recommends prometheus"
        if os.environ.get("CI") == "true":
            raise AssertionError(message)
        raise unittest.SkipTest(message)
    return found


def dashboard_exprs() -> list[str]:
    with open(DASHBOARD, encoding="utf-8") as f:
        board = json.load(f)
    exprs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    exprs.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(board)
    return exprs


def rules_text() -> str:
    with open(RULES, encoding="utf-8") as f:
        return f.read()


def rule_exprs() -> list[str]:
    # The rules file is YAML; promtool checks its shape. The expressions are
    # the `expr:` values (folded `>-` blocks run to the next key).
    exprs, current = [], None
    for line in rules_text().splitlines():
        match = re.match(r"\s*expr:\s*(.*)$", line)
        if match:
            current = [match.group(1)]
            exprs.append(current)
        elif current is not None and re.match(r"\s*[a-z_]+:", line):
            current = None
        elif current is not None:
            current.append(line.strip())
    return [" ".join(e).lstrip(">-").strip() for e in exprs]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\beventstreams_[a-z_]+\b", expr)) | ({"up"} if re.search(r"\bup\{", expr) else set())


class PromTool(unittest.TestCase):
    def test_check_rules(self):
        result = subprocess.run([promtool(), "check", "rules", RULES], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS: 7 rules found", result.stdout)

    def test_rules_fire_on_synthetic_series(self):
        result = subprocess.run([promtool(), "test", "rules", os.path.basename(RULE_TESTS)], capture_output=True,
                                text=True, timeout=60, cwd=os.path.dirname(RULE_TESTS))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)

    def test_dashboard_is_grafana_json_with_the_panels_the_issue_names(self):
        with open(DASHBOARD, encoding="utf-8") as f:
            board = json.load(f)
        self.assertEqual(board["uid"], "eventstreams")
        titles = " | ".join(p["title"] for p in board["panels"]).lower()
        for words in ("clients per stream", "events delivered", "bytes sent", "ring", "catch-up", "rejected",
                      "intake", "irc", "rcstream", "worker", "delivery delay"):
            self.assertIn(words, titles)
        ids = [p["id"] for p in board["panels"]]
        self.assertEqual(len(ids), len(set(ids)))


class MetricNames(DaemonTestCase):
    """Names in contrib/ against /metrics of a real daemon."""

    def test_every_name_is_found_by_the_parsers(self):
        self.assertEqual(len(rule_exprs()), 7)
        self.assertIn("up", metric_names(rule_exprs()[0]))
        self.assertEqual(metric_names("label_values(eventstreams_hubs, instance) / eventstreams_x_total{a=\"b\"}"),
                         {"eventstreams_hubs", "eventstreams_x_total"})
        self.assertGreater(len(dashboard_exprs()), 20)

    @async_test
    async def test_every_metric_of_the_dashboard_and_rules_is_exported(self):
        api, intake, metrics, irc, rcstream = (free_port() for _ in range(5))
        config, overrides = self.good_config(eventstreams=api, intake=intake, metrics=metrics)
        child = self.spawn("-c", config, *overrides, "--set", "eventstreams.workers=2",
                           "--set", f"irc.listen=tcp:{irc}:interface=127.0.0.1",
                           "--set", f"rcstream.listen=tcp:{rcstream}:interface=127.0.0.1",
                           "--set", "rcstream.stream=recentchange")
        for port in (api, metrics, irc, rcstream):
            await self.wait_listening(child, port)
        client = await open_stream(api, "/v2/stream/recentchange")
        self.addCleanup(lambda: client.transport.loseConnection())
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"http://127.0.0.1:{api}/v2/stream/nosuchstream", pool=pool)
        await response.content()
        self.assertEqual(response.code, 400)

        async def reported() -> str:  # the worker reports once a second
            response = await treq.get(f"http://127.0.0.1:{metrics}/metrics", pool=pool)
            text = await response.text()
            return text if re.search(r"^eventstreams_worker_processes 1\b", text, re.M) else ""

        text = await wait_for(reported, "a worker's report in /metrics", 30, 0.2)
        exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
        client.transport.loseConnection()

        used = {name for expr in dashboard_exprs() + rule_exprs() for name in metric_names(expr)}
        missing = sorted(used - exported - SYNTHETIC)
        self.assertEqual(missing, [], f"named in contrib/ but not in /metrics:\n{text}")
        on_dashboard = {name for expr in dashboard_exprs() for name in metric_names(expr)}
        families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in on_dashboard}
        self.assertEqual(sorted(n for n in exported if n not in on_dashboard and n not in families), [],
                         "exported but on no dashboard panel")
        self.assertIn("eventstreams_delivery_delay_seconds_bucket", used)
        child.transport.signalProcess("TERM")
        await self.finish(child)

