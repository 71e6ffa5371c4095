"""The shipped Grafana dashboard queries only metrics the service defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

from deployments.common import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "observability" / "grafana-dashboard.json"


def defined_series() -> set[str]:
    source = Path(metrics.__file__).read_text()
    names = set()
    for kind, name in re.findall(r'(Counter|Histogram|Gauge)\(\s*"(minicpm_\w+)"', source):
        suffixes = {"Counter": ["_total"], "Histogram": ["_bucket", "_count", "_sum"], "Gauge": [""]}[kind]
        names |= {f"ray_{name}{suffix}" for suffix in suffixes}
    return names


def test_every_service_metric_in_the_dashboard_exists():
    queried = set(re.findall(r"ray_minicpm_\w+", DASHBOARD.read_text()))
    assert queried, "the dashboard queries the service's metrics"
    assert queried <= defined_series()


def test_dashboard_is_valid_json_with_titled_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    assert all(panel["title"] and panel["targets"] for panel in dashboard["panels"])
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_dashboard_query_is_valid_promql():
    """Grafana's variables replaced by values of their kind, each panel query must parse as PromQL (the parser
    also refuses type errors, such as rate() of an instant vector)."""
    import promql_parser

    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert queries
    for query in queries:
        concrete = query.replace("$__rate_interval", "5m").replace("$application", "minicpm")
        assert "$" not in concrete, f"an unhandled Grafana variable in {query}"
        promql_parser.parse(concrete)  # raises on a syntax or type error
