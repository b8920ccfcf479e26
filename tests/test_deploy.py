"""deploy/: Kubernetes manifests rendered by kustomize and checked against the Kubernetes
schemas, Prometheus config and alert rules checked and unit-tested with promtool, and the
dashboard and alerts referring only to metrics the code defines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.32.0"
SERVICES = ("gateway", "ingest", "identity", "attribution", "export")


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `make test` installs it (see the Makefile's tools target)"
    return path


def render(folder: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(folder)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def overlay() -> list[dict[str, Any]]:
    return render(DEPLOY / "kubernetes" / "overlays" / "example")


@pytest.mark.parametrize("folder", ["base", "overlays/example"])
def test_every_manifest_is_valid_for_kubernetes(folder: str) -> None:
    docs = render(DEPLOY / "kubernetes" / folder)
    assert docs
    for doc in docs:
        # strict: unknown fields are errors too.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_each_service_is_deployed_hardened_and_probed(overlay: list[dict[str, Any]]) -> None:
    deployments = by_kind(overlay, "Deployment")
    services = by_kind(overlay, "Service")
    assert set(deployments) == set(SERVICES)
    assert set(SERVICES) <= set(services)
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"], name
        assert container["command"] == ["python", "-m", f"services.{name}"]
        assert (ROOT / "services" / name / "__main__.py").exists(), name
        assert "readinessProbe" in container and "livenessProbe" in container, name
        if name != "gateway":
            # gRPC services are probed with the standard grpc.health.v1 service.
            assert "grpc" in container["readinessProbe"], name
        assert container["image"].startswith("ghcr.io/touchpoint/touchpoint:"), name
    assert deployments["ingest"]["spec"]["replicas"] == 3  # the overlay's replica patch applied
    assert all(d["metadata"]["namespace"] == "touchpoint" for d in overlay if d["kind"] != "Namespace")


def test_autoscaling_budgets_and_migration_job(overlay: list[dict[str, Any]]) -> None:
    hpas = by_kind(overlay, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == {"gateway", "ingest"}
    pdbs = by_kind(overlay, "PodDisruptionBudget")
    assert {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for p in pdbs.values()} == set(
        SERVICES
    )
    (job,) = by_kind(overlay, "Job").values()
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd == ["python", "-m", "touchpoint.platform.migrate_all"]


def test_compose_runs_every_service_with_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name in (*SERVICES, "postgres", "migrate", "prometheus", "grafana"):
        assert name in services, name
    for name in SERVICES:
        assert services[name]["command"] == ["python", "-m", f"services.{name}"]


def promtool(*args: str) -> str:
    result = subprocess.run(
        [tool("promtool"), *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_prometheus_config_and_rules_check_and_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def defined_metrics() -> set[str]:
    """Every metric name the code defines (string literals touchpoint_...), plus the RPC
    metrics the platform defines per service."""
    names: set[str] = set()
    for path in [*ROOT.glob("services/**/*.py"), *ROOT.glob("libs/platform/**/*.py")]:
        names |= set(re.findall(r'"(touchpoint_[a-z0-9_]+)"', path.read_text()))
    for svc in SERVICES:
        names |= {f"touchpoint_{svc}_rpc_handled_total", f"touchpoint_{svc}_rpc_duration_seconds"}
    return names


def used_metrics(text: str) -> set[str]:
    out = set()
    for name in re.findall(r"\btouchpoint_[a-z0-9_]+", text):
        out.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return out


def test_dashboard_and_alerts_use_only_metrics_the_code_defines() -> None:
    known = defined_metrics()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "touchpoint.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    used = used_metrics(exprs) | used_metrics(rules)
    assert used, "no metric found in the dashboard or alerts"
    missing = used - known
    assert not missing, f"dashboard/alerts use metrics no code defines: {sorted(missing)}"
