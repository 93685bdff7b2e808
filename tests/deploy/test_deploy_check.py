"""``make deploy-check`` (deploy/check.py) and the run launcher configurations (issue 21).

The shipped compose file passes; each rule is shown to fail on a copy broken in one place.
The Docker and Kubernetes run launchers are built from the shipped configuration by Dagster's
own config machinery with no Docker engine and no cluster.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.deploy
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

_spec = importlib.util.spec_from_file_location("deploy_check", DEPLOY / "check.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)  # type: ignore[union-attr]


def _raw() -> dict:
    return yaml.load((DEPLOY / "production" / "docker-compose.yml").read_text(), Loader=check.UniqueKeyLoader)  # noqa: S506


def _errors_for(tmp_path: Path, compose: dict) -> list[str]:
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(compose, sort_keys=False))
    return check.check_compose(path, use_docker=False)


def test_make_deploy_check_passes_on_the_shipped_files() -> None:
    done = subprocess.run([sys.executable, str(DEPLOY / "check.py")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "deploy-check: OK" in done.stdout
    makefile = (REPO / "Makefile").read_text()
    assert "deploy-check: install\n\t$(BIN)/python deploy/check.py" in makefile


def test_the_compose_file_has_the_four_services_and_separate_haven_volumes() -> None:
    compose, errors = check.load_compose(DEPLOY / "production" / "docker-compose.yml")
    assert errors == []
    assert {"postgres", "code", "daemon", "webserver", "haven-init"} <= compose["services"].keys()
    code = compose["services"]["code"]
    assert code["command"][:3] == ["dagster", "code-server", "start"]
    targets = {v["source"]: v["target"] for v in code["volumes"]}
    assert targets == {"haven_home": "/haven/home", "haven_keys": "/haven/home/keys"}
    for name in ("daemon", "webserver", "postgres"):
        assert not {"haven_home", "haven_keys"} & {v["source"] for v in compose["services"][name].get("volumes", [])}


def test_a_required_secret_variable_is_reported_when_unset() -> None:
    _, errors = check.load_compose(DEPLOY / "production" / "docker-compose.yml", env={})
    assert any("DAGSTER_PG_PASSWORD_FILE" in e and "required" in e for e in errors), errors


def _set(compose: dict, path: str, value) -> dict:
    compose = copy.deepcopy(compose)
    *parents, last = path.split(".")
    node = compose
    for key in parents:
        node = node[key]
    node[last] = value
    return compose


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("services.code.environment.DAGSTER_PG_PASSWORD", "hunter2-in-the-file", "secret given inline"),
        ("services.daemon.environment.DAGSTER_PG_URL", "postgresql://dagster:hunter2@postgres/dagster", "credential"),
        ("services.code.environment.SAFEHAVEN_KEY_FILE", "/haven/keys/k", "must point under /run/secrets/"),
        ("secrets.dagster_pg_password", {"content": "hunter2"}, "inline content"),
        ("services.postgres.ports", ["5432:5432"], "must not publish a port"),
        ("services.webserver.ports", ["3000:3000"], "must be bound to 127.0.0.1"),
        ("services.code.user", "0:0", "non-root"),
        ("services.daemon.user", "1000:1000", "must run as the haven user"),
        ("services.haven-init.network_mode", "bridge", "network_mode none"),
        ("services.haven-init.command", ["chown 10001:10001 /haven/home /haven/home/keys"], "chmod 0700 /haven/home"),
        ("services.code.restrat", "always", "schema: services/code"),
        ("services.code.depends_on", {"postgres": {"condition": "service_healthy"}}, "haven-init"),
        ("volumes", {"dagster_pg": {}, "haven_home": {}}, "volumes.haven_keys: not declared"),
        ("services.code.env_file", [".env"], "env_file"),
    ],
)
def test_each_rule_fails_a_broken_copy(tmp_path: Path, path: str, value, expected: str) -> None:
    errors = _errors_for(tmp_path, _set(_raw(), path, value))
    assert any(expected in e for e in errors), errors


def test_the_key_ring_may_not_be_mounted_by_the_webserver(tmp_path: Path) -> None:
    compose = _raw()
    compose["services"]["webserver"]["volumes"] = [{"type": "volume", "source": "haven_keys", "target": "/keys"}]
    errors = _errors_for(tmp_path, compose)
    assert any("services.webserver: mounts haven_keys" in e for e in errors), errors


def test_a_bind_mount_of_host_data_is_refused(tmp_path: Path) -> None:
    compose = _raw()
    compose["services"]["code"]["volumes"].append("/srv/nhs-extracts:/haven/home/incoming")
    errors = _errors_for(tmp_path, compose)
    assert any("bind mount" in e for e in errors), errors


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "docker-compose.yml"
    text = (DEPLOY / "production" / "docker-compose.yml").read_text()
    once = "    restart: unless-stopped\n"
    path.write_text(text.replace(once, once + "    restart: always\n", 1))
    errors = check.check_compose(path, use_docker=False)
    assert any("duplicate key 'restart'" in e for e in errors), errors


# -- instances and run launchers ------------------------------------------------------------


def _instance(directory: Path) -> dict:
    return yaml.safe_load((directory / "dagster.yaml").read_text())


def test_every_instance_file_is_valid_for_dagster() -> None:
    for directory in check.INSTANCES:
        assert check.check_instance(directory) == [], directory
    assert check.check_helm_values() == []


def test_the_docker_instance_differs_from_production_only_in_its_run_launcher() -> None:
    production = _instance(DEPLOY / "production")
    docker = _instance(DEPLOY / "docker")
    assert docker.pop("run_launcher")["class"] == "DockerRunLauncher"
    assert docker == production
    assert production["compute_logs"]["class"] == "NoOpComputeLogManager"
    assert production["run_monitoring"]["enabled"] is True
    assert production["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert {"key": "safehaven/store", "limit": 1} in production["concurrency"]["runs"]["tag_concurrency_limits"]
    assert set(production["storage"]) == {"postgres"}


def test_the_docker_run_launcher_loads_without_a_docker_engine() -> None:
    from dagster._serdes.config_class import ConfigurableClassData
    from dagster_docker import DockerRunLauncher

    entry = _instance(DEPLOY / "docker")["run_launcher"]
    launcher = ConfigurableClassData(entry["module"], entry["class"], yaml.safe_dump(entry["config"])).rehydrate()
    assert isinstance(launcher, DockerRunLauncher)
    assert launcher.networks == ["safehaven_backend"]
    assert launcher.container_kwargs["user"] == "10001:10001"
    assert launcher.container_kwargs["volumes"]["safehaven_haven_keys"]["bind"] == "/haven/home/keys"


def test_a_misconfigured_launcher_is_caught(tmp_path: Path) -> None:
    broken = _instance(DEPLOY / "docker")
    broken["run_launcher"]["config"]["netwrok"] = broken["run_launcher"]["config"].pop("network")
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(broken))
    errors = check.check_instance(tmp_path)
    assert any("run_launcher" in e and "netwrok" in e for e in errors), errors


def test_the_k8s_run_launcher_from_the_helm_values_loads_without_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster._serdes.config_class import ConfigurableClassData
    from dagster_k8s import K8sRunLauncher

    values = yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())
    instance = check.render_helm_instance(values)
    entry = instance["run_launcher"]
    # What the chart's pods have in their environment; a kubeconfig naming an unreachable API
    # server stands in for the in-cluster one (nothing is contacted when the launcher is built).
    for name, value in {
        "DAGSTER_HOME": "/opt/dagster/dagster_home",
        "DAGSTER_K8S_INSTANCE_CONFIG_MAP": "dagster-instance",
        "DAGSTER_K8S_PG_PASSWORD_SECRET": "safehaven-postgresql",
        "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP": "dagster-pipeline-env",
    }.items():
        monkeypatch.setenv(name, value)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "none", "user": {"token": "not-a-secret"}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "current-context": "none",
            }
        )
    )
    config = {**entry["config"], "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    launcher = ConfigurableClassData(entry["module"], entry["class"], yaml.safe_dump(config)).rehydrate()
    assert isinstance(launcher, K8sRunLauncher)
    assert launcher.job_namespace == "safehaven"
    assert {v["persistentVolumeClaim"]["claimName"] for v in launcher.volumes} == {"safehaven-home", "safehaven-keys"}
    assert launcher.run_k8s_config["pod_spec_config"]["nodeSelector"] == {"safehaven.nhs.uk/store-writer": "true"}
    assert "SAFEHAVEN_HOME=/haven/home" in launcher.env_vars


def test_the_helm_values_keep_the_production_limits_and_hold_no_password() -> None:
    values = yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())
    rendered = check.render_helm_instance(values)
    production = _instance(DEPLOY / "production")
    for section in ("concurrency", "run_monitoring", "compute_logs", "telemetry"):
        assert rendered[section] == production[section], section
    assert rendered["run_coordinator"]["config"] == production["run_coordinator"]["config"]
    assert "postgresqlPassword" not in values["postgresql"]
    bad = copy.deepcopy(values)
    bad["postgresql"]["postgresqlPassword"] = "hunter2"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"values-{os.getpid()}.yaml"
    try:
        path.write_text(yaml.safe_dump(bad))
        assert any("postgresqlPassword" in e for e in check.check_helm_values(path))
    finally:
        path.unlink(missing_ok=True)
