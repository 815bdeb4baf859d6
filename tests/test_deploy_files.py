"""The deployment files (compose, Dockerfile, Kubernetes manifests) speak the same settings,
ports and paths as the code, and pass the validators of their formats (offline)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import ValidationError, latest_version, validate

from eventpulse.config import load_config
from eventpulse.health import HealthServer, Heartbeat
from eventpulse.local.servers import free_port
from eventpulse.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
KNOWN_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_compose_worker_uses_only_real_settings() -> None:
    services = compose()["services"]
    assert {"kafka", "redis", "worker", "prometheus", "grafana"} <= set(services)
    env = services["worker"]["environment"]
    assert set(env) <= KNOWN_ENV, set(env) - KNOWN_ENV
    assert env["EVENTPULSE_BROKER_URL"].startswith("kafka://kafka:")
    assert services["worker"]["build"] == "."
    config_mount = services["worker"]["volumes"][0].split(":")[0]
    assert (ROOT / config_mount).is_file()
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [
        f"worker:{env['EVENTPULSE_METRICS_PORT']}"]


def test_compose_uses_the_health_endpoints_and_provisions_grafana() -> None:
    services = compose()["services"]
    worker = services["worker"]
    port = worker["environment"]["EVENTPULSE_METRICS_PORT"]
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(worker["healthcheck"]["test"])
    grace = float(worker["stop_grace_period"].rstrip("s"))
    assert grace > float(worker["environment"]["EVENTPULSE_STOP_TIMEOUT_S"])
    mounts = {m.split(":")[1]: ROOT / m.split(":")[0] for s in ("prometheus", "grafana")
              for m in services[s]["volumes"]}
    for path in mounts.values():
        assert path.exists(), path
    assert mounts["/etc/prometheus/rules.yml"].name == "rules.yml"
    provider = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "dashboards"
                               / "eventpulse.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    assert (mounts[dashboards] / "eventpulse.json").is_file()
    source = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "datasources"
                             / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_file_is_valid_for_docker_compose() -> None:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: run ./scripts/bootstrap.sh"
    done = subprocess.run([binary, "-f", "docker-compose.yml", "config", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_empty_optional_secrets_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTPULSE_SLACK_TOKEN", "")
    monkeypatch.setenv("EVENTPULSE_SLACK_WEBHOOK_URL", "")
    settings = load_settings()
    assert settings.slack_token is None and settings.slack_webhook_url is None


# --- Dockerfile ---------------------------------------------------------------------------

def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_builds_the_read_loop_in_a_builder_stage_and_runs_as_non_root() -> None:
    text = dockerfile()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.M)
    assert len(stages) == 2 and stages[0][1] == "builder", stages
    builder, runtime = re.split(r"^FROM .*$", text, flags=re.M)[1:]
    assert "gcc" in builder and "ringread.ACCELERATED" in builder
    assert "gcc" not in runtime and "COPY --from=builder" in runtime
    user = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    assert "HEALTHCHECK" in runtime and "/healthz" in runtime


def healthcheck_command() -> list[str]:
    match = re.search(r"^HEALTHCHECK .*?CMD (\[[^\n]*\])$", dockerfile(), re.M | re.S)
    assert match, "no HEALTHCHECK ... CMD [...]"
    command: list[str] = json.loads(match.group(1))
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


async def test_dockerfile_healthcheck_passes_on_a_live_loop_and_fails_without_one() -> None:
    heartbeat = Heartbeat(max_age_s=5)
    server = HealthServer(free_port(), live=[heartbeat.reason], ready=[], host="127.0.0.1")
    await server.start()
    env = {**os.environ, "EVENTPULSE_METRICS_PORT": str(server.port)}
    try:
        alive = await asyncio.to_thread(subprocess.run, healthcheck_command(), env=env,
                                        capture_output=True, timeout=30)
        assert alive.returncode == 0, alive.stderr
        heartbeat.beat -= 60  # the loop has not run the heartbeat for a minute: 503
        stale = await asyncio.to_thread(subprocess.run, healthcheck_command(), env=env,
                                        capture_output=True, timeout=30)
        assert stale.returncode != 0 and b"503" in stale.stderr
    finally:
        await server.stop()
    gone = await asyncio.to_thread(subprocess.run, healthcheck_command(), env=env,
                                   capture_output=True, timeout=30)
    assert gone.returncode != 0


# --- Kubernetes ---------------------------------------------------------------------------

def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the resource, from every manifest under deploy/kubernetes/."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found = {}
    for name in kustomization["resources"]:
        for resource in yaml.safe_load_all((K8S / name).read_text()):
            found[resource["kind"]] = resource
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted(
        [*kustomization["resources"], "kustomization.yaml"]), "a manifest not in kustomization"
    return found


@pytest.mark.parametrize("version", ["1.28.0", latest_version()])
def test_kubernetes_manifests_validate_against_the_bundled_schemas(version: str) -> None:
    resources = manifests()
    assert set(resources) == {"Deployment", "PodDisruptionBudget", "ConfigMap", "Secret"}
    for resource in resources.values():
        validate(resource, version, strict=True)
    # the validator is strict: a misspelt field is refused, not ignored
    typo = copy.deepcopy(resources["Deployment"])
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(ValidationError):
        validate(typo, version, strict=True)


def test_kubernetes_deployment_matches_the_worker() -> None:
    resources = manifests()
    deployment, pdb = resources["Deployment"], resources["PodDisruptionBudget"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] >= 2
    assert container["resources"]["requests"] and container["resources"]["limits"]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= KNOWN_ENV, set(env) - KNOWN_ENV
    port = int(env["EVENTPULSE_METRICS_PORT"]["value"])
    assert container["ports"][0] == {"name": "metrics", "containerPort": port, "protocol": "TCP"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    stop = float(env["EVENTPULSE_STOP_TIMEOUT_S"]["value"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > stop
    # the user the image runs as
    user = re.findall(r"^USER (\d+)", dockerfile(), re.M)[-1]
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert re.search(r"^WORKDIR (\S+)", dockerfile().split("COPY --from=builder")[1],
                     re.M)[1] in mounts  # type: ignore[index]  # Faust writes there
    # the PDB covers exactly the worker's pods
    labels = pod["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def test_kubernetes_secret_and_config_map_are_the_ones_the_deployment_reads(
        tmp_path: Path) -> None:
    resources = manifests()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    secret, config_map = resources["Secret"], resources["ConfigMap"]
    for e in container["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"], ref
    assert all("CHANGE-ME" in value for value in secret["stringData"].values())
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    config_path = next(e["value"] for e in container["env"] if e["name"] == "EVENTPULSE_CONFIG_PATH")
    key = os.path.relpath(config_path, mount["mountPath"])
    job = config_map["data"][key]
    # the copy is the bundled example, and the worker accepts it
    assert job == (ROOT / "eventpulse" / "examples" / "eventpulse.yaml").read_text()
    (tmp_path / key).write_text(job)
    assert load_config(tmp_path / key).features
