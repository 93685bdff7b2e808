"""``make deploy-check``: validate the production deployment without a Docker engine or a cluster.

1. The compose file: YAML (no duplicate keys), compose interpolation, the shipped schema
   (``deploy/compose.schema.json``, a subset of the Compose Specification), then the haven's
   own rules (below). When ``docker compose`` is present it is also asked (``config --quiet``).
2. The Dagster instance files (``deploy/production``, ``deploy/docker``) and the instance that
   Dagster's Helm chart would render from ``deploy/k8s/values.yaml``: each is validated by
   Dagster itself, and each run launcher, coordinator and compute log manager against its
   class's own config schema, with no cluster or Docker engine needed.

The haven's rules for the compose file:

* services ``postgres``, ``haven-init``, ``code``, ``daemon`` and ``webserver`` exist;
* no secret inline: an environment variable or build argument whose name says it is a
  secret (PASSWORD, SECRET, TOKEN, KEY, CREDENTIAL) must be a ``*_FILE`` path under
  ``/run/secrets/``; no value anywhere carries a password in a URL or a PEM block; top-level
  secrets come from a file or the environment, never ``content``;
* the haven home and the key ring are two named volumes; only ``code`` (where runs execute)
  and ``haven-init`` mount them, the key ring at ``<SAFEHAVEN_HOME>/keys``; no service
  bind-mounts a host path;
* ``haven-init`` runs as root with no network and gives both volumes to the user that
  ``code`` runs as, mode 0700; ``code``, ``daemon`` and ``webserver`` run as that non-root user;
  ``code`` waits for ``haven-init`` to complete and for PostgreSQL to be healthy;
* PostgreSQL publishes no port and keeps its data in a named volume; the webserver is
  published on the loopback only (Dagster's webserver has no log-in).

Usage: ``python deploy/check.py [--compose FILE] [--instance DIR ...] [--no-docker]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
COMPOSE = DEPLOY / "production" / "docker-compose.yml"
SCHEMA = DEPLOY / "compose.schema.json"
INSTANCES = [DEPLOY / "production", DEPLOY / "docker"]
HELM_VALUES = DEPLOY / "k8s" / "values.yaml"
REQUIRED_SERVICES = {"postgres", "haven-init", "code", "daemon", "webserver"}
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|(^|_)KEY($|_)|CREDENTIAL", re.IGNORECASE)
SECRET_VALUE = re.compile(r"://[^/\s:@]+:[^/\s@$]+@|-----BEGIN [A-Z ]*PRIVATE KEY-----|ENCRYPTION_KEY\s*'")
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (YAML keeps the last)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node, deep=deep))


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def interpolate(value: Any, env: dict[str, str], errors: list[str], where: str = "") -> Any:
    """Compose variable interpolation (``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR:?err}``, ``$$``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, errors, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, errors, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        current = env.get(name)
        if op in (":-", "-"):
            return current if current or (op == "-" and current is not None) else arg
        if op in (":?", "?") and not current:
            errors.append(f"{where}: ${{{name}}} is required: {arg}")
            return ""
        return current or ""

    if "$" in value and "${" in value and not INTERPOLATION.search(value):
        errors.append(f"{where}: malformed interpolation in {value!r}")
    return INTERPOLATION.sub(sub, value)


def load_compose(path: Path, env: dict[str, str] | None = None) -> tuple[dict, list[str]]:
    """The compose file as Compose reads it (anchors merged, variables interpolated)."""
    errors: list[str] = []
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        return {}, [f"{path}: not valid YAML: {exc}"]
    if not isinstance(raw, dict):
        return {}, [f"{path}: not a mapping"]
    return interpolate(raw, placeholder_env(raw) if env is None else env, errors), errors


def placeholder_env(raw: dict) -> dict[str, str]:
    """Values for the required ``${VAR:?}`` variables, so that a check needs no real secret."""
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", json.dumps(raw)))
    return {**os.environ, **{n: f"/placeholder/{n.lower()}" for n in names if n not in os.environ}}


def validate_schema(compose: dict) -> list[str]:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"schema: {'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(compose), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _volumes(service: dict) -> Iterator[dict]:
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            kind = "bind" if source.startswith(("/", ".", "~")) else "volume"
            yield {"type": kind, "source": source, "target": target}
        else:
            yield volume


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


def _secret_items(name: str, env: dict[str, str], where: str) -> list[str]:
    errors = []
    for key, value in env.items():
        if SECRET_NAME.search(key):
            if not key.endswith("_FILE"):
                errors.append(f"{where}: {key} is a secret given inline; give {key}_FILE=/run/secrets/...")
            elif not value.startswith("/run/secrets/"):
                errors.append(f"{where}: {key} must point under /run/secrets/, not {value!r}")
    return errors


def check_rules(compose: dict) -> list[str]:
    """The haven's deployment rules (see the module docstring)."""
    errors: list[str] = []
    services: dict[str, dict] = compose.get("services") or {}
    missing = REQUIRED_SERVICES - services.keys()
    if missing:
        errors.append(f"services missing: {', '.join(sorted(missing))}")

    # -- no secret inline
    for where, value in _strings(compose, "compose"):
        if SECRET_VALUE.search(value):
            errors.append(f"{where}: holds a credential inline")
    for name, service in services.items():
        errors += _secret_items(name, _environment(service), f"services.{name}.environment")
        build = service.get("build")
        if isinstance(build, dict) and build.get("args"):
            args = build["args"]
            args = dict(a.split("=", 1) if "=" in a else (a, "") for a in args) if isinstance(args, list) else args
            errors += _secret_items(name, {k: str(v) for k, v in args.items()}, f"services.{name}.build.args")
        if service.get("env_file"):
            errors.append(f"services.{name}: env_file can carry secrets past this check; use secrets")
    for name, secret in (compose.get("secrets") or {}).items():
        if "content" in secret:
            errors.append(f"secrets.{name}: inline content; use file or environment")
        if not ({"file", "environment", "external"} & secret.keys()):
            errors.append(f"secrets.{name}: must come from a file or the environment")

    # -- volumes: the haven home and the key ring, separate, mounted only where runs execute
    declared = set((compose.get("volumes") or {}).keys())
    for volume in ("haven_home", "haven_keys", "dagster_pg"):
        if volume not in declared:
            errors.append(f"volumes.{volume}: not declared")
    code = services.get("code", {})
    init = services.get("haven-init", {})
    home = _environment(code).get("SAFEHAVEN_HOME", "")
    if not home:
        errors.append("services.code: SAFEHAVEN_HOME is not set")
    mounts: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        for volume in _volumes(service):
            if volume.get("type") == "bind":
                errors.append(f"services.{name}: bind mount of {volume.get('source')!r}; use named volumes")
            mounts.setdefault(name, {})[volume.get("source", "")] = volume.get("target", "")
    for name in services:
        if name not in ("code", "haven-init"):
            for volume in ("haven_home", "haven_keys"):
                if volume in mounts.get(name, {}):
                    errors.append(f"services.{name}: mounts {volume}; only code and haven-init may")
    for name in ("code", "haven-init"):
        got = mounts.get(name, {})
        if home and got.get("haven_home") != home:
            errors.append(f"services.{name}: haven_home must be mounted at SAFEHAVEN_HOME ({home})")
        if home and got.get("haven_keys") != f"{home}/keys":
            errors.append(f"services.{name}: haven_keys must be mounted at {home}/keys")
    if mounts.get("postgres", {}).get("dagster_pg") != "/var/lib/postgresql/data":
        errors.append("services.postgres: its data must be the dagster_pg volume at /var/lib/postgresql/data")

    # -- owners and modes
    uid = str(code.get("user", ""))
    if not re.fullmatch(r"[1-9]\d*:[0-9]+", uid) or uid.startswith("0:"):
        errors.append(f"services.code: user must be a numeric non-root uid:gid, not {uid!r}")
    for name in ("daemon", "webserver"):
        if str(services.get(name, {}).get("user", "")) != uid:
            errors.append(f"services.{name}: must run as the haven user {uid!r}")
    if str(init.get("user", "")) not in ("0", "0:0", "root"):
        errors.append("services.haven-init: must run as root to set the volumes' owner")
    if init.get("network_mode") != "none":
        errors.append("services.haven-init: must run with network_mode none")
    script = " ".join(init.get("command") or []) if isinstance(init.get("command"), list) else str(init.get("command"))
    if home:
        for path in (home, f"{home}/keys"):
            if not re.search(rf"chown (-R )?{re.escape(uid)} [^&;]*{re.escape(path)}(\s|$)", script):
                errors.append(f"services.haven-init: does not chown {path} to {uid}")
            if not re.search(rf"chmod (0?700|u=rwx,go=) [^&;]*{re.escape(path)}(\s|$)", script):
                errors.append(f"services.haven-init: does not chmod 0700 {path}")
    depends = code.get("depends_on") or {}
    if not isinstance(depends, dict) or depends.get("haven-init", {}).get("condition") != (
        "service_completed_successfully"
    ):
        errors.append("services.code: must depend on haven-init (service_completed_successfully)")
    if not isinstance(depends, dict) or depends.get("postgres", {}).get("condition") != "service_healthy":
        errors.append("services.code: must depend on postgres (service_healthy)")
    for name, service in services.items():
        for secret in service.get("secrets") or []:
            mode = secret.get("mode") if isinstance(secret, dict) else None
            if isinstance(mode, str):
                mode = int(mode.removeprefix("0o"), 8)
            if mode is not None and mode & 0o077:
                where = f"services.{name}.secrets.{secret['source']}"
                errors.append(f"{where}: mode must give no access to group or others")

    # -- ports
    if services.get("postgres", {}).get("ports"):
        errors.append("services.postgres: must not publish a port")
    for name, service in services.items():
        for port in service.get("ports") or []:
            if not str(port).startswith("127.0.0.1:"):
                errors.append(f"services.{name}: port {port!r} must be bound to 127.0.0.1")
    return errors


def docker_compose_config(path: Path, env: dict[str, str]) -> list[str] | None:
    """``docker compose config --quiet`` when a compose CLI exists (None when it does not)."""
    if not shutil.which("docker"):
        return None
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    done = subprocess.run(
        ["docker", "compose", "-f", str(path), "config", "--quiet"], capture_output=True, text=True, env=env
    )
    return [] if done.returncode == 0 else [f"docker compose config: {done.stderr.strip()}"]


def check_compose(path: Path = COMPOSE, use_docker: bool = True) -> list[str]:
    compose, errors = load_compose(path)
    if errors:
        return errors
    errors = validate_schema(compose) + check_rules(compose)
    if use_docker:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        with tempfile.TemporaryDirectory() as tmp:
            env = placeholder_env(raw)
            for name, value in env.items():  # secret files compose may want to stat
                if value.startswith("/placeholder/"):
                    env[name] = str(Path(tmp) / name.lower())
                    Path(env[name]).write_text("placeholder\n")
            docker = docker_compose_config(path, env)
        if docker is None:
            print("deploy-check: `docker compose` not available; validated with deploy/compose.schema.json")
        else:
            errors += docker
    return errors


def _env_names(value: Any) -> set[str]:
    if isinstance(value, dict):
        if set(value) == {"env"} and isinstance(value["env"], str):
            return {value["env"]}
        return set().union(*(_env_names(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_env_names(v) for v in value)) if value else set()
    return set()


def check_instance(directory: Path) -> list[str]:
    """Validate ``directory/dagster.yaml`` with Dagster, and its configurable classes' config.

    Environment variables the file reads (``{env: NAME}``) get a placeholder when unset: the
    check is of the configuration's shape, not of a live deployment's secrets.
    """
    import importlib

    from dagster._config import process_config, resolve_to_config_type
    from dagster._core.instance.config import dagster_instance_config
    from dagster._serdes.config_class import ConfigurableClassData

    errors: list[str] = []
    try:
        config, _ = dagster_instance_config(str(directory))
    except Exception as exc:  # Dagster raises DagsterInvalidConfigError with the details
        return [f"{directory}/dagster.yaml: {exc}"]
    for section in ("run_launcher", "run_coordinator", "compute_logs", "scheduler"):
        if section not in config:
            continue
        entry = config[section]
        try:
            module = ConfigurableClassData(entry["module"], entry["class"], "{}").module_name  # dagster.core aliases
            klass = getattr(importlib.import_module(module), entry["class"])
        except (ImportError, AttributeError) as exc:
            pointer = f"{entry['module']}.{entry['class']}"
            errors.append(f"{directory}/dagster.yaml {section}: cannot import {pointer}: {exc}")
            continue
        settings = entry.get("config") or {}
        unset = {n: f"placeholder-{n.lower()}" for n in _env_names(settings) if n not in os.environ}
        os.environ.update(unset)
        try:
            result = process_config(resolve_to_config_type(klass.config_type()), settings)
        finally:
            for name in unset:
                del os.environ[name]
        if not result.success:
            errors += [f"{directory}/dagster.yaml {section}: {e.message}" for e in result.errors]
    return errors


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def render_helm_instance(values: dict) -> dict:
    """The instance sections Dagster's Helm chart renders from ``values`` (the parts we set).

    Mirrors the chart's instance templates for the K8sRunLauncher, the QueuedRunCoordinator,
    run monitoring, concurrency, compute logs and PostgreSQL storage, so that Dagster can
    validate what the cluster would run without a cluster or Helm.
    """
    pg = values["postgresql"]
    launcher = values["runLauncher"]
    if launcher["type"] != "K8sRunLauncher":
        raise ValueError(f"runLauncher.type is {launcher['type']!r}, expected K8sRunLauncher")
    k8s = launcher["config"]["k8sRunLauncher"]
    config: dict[str, Any] = {
        "load_incluster_config": k8s["loadInclusterConfig"],
        "job_namespace": k8s.get("jobNamespace") or "default",
        "image_pull_policy": k8s["imagePullPolicy"],
        "service_account_name": (values.get("global") or {}).get("serviceAccountName", "dagster"),
        "dagster_home": {"env": "DAGSTER_HOME"},
        "instance_config_map": {"env": "DAGSTER_K8S_INSTANCE_CONFIG_MAP"},
        "postgres_password_secret": {"env": "DAGSTER_K8S_PG_PASSWORD_SECRET"},
        "env_config_maps": [{"env": "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP"}]
        + [c["name"] for c in k8s.get("envConfigMaps", []) if "name" in c],
    }
    if k8s.get("kubeconfigFile"):
        config["kubeconfig_file"] = k8s["kubeconfigFile"]
    if k8s.get("image"):
        image = k8s["image"]
        config["job_image"] = f"{image['repository']}:{image['tag']}"
    if k8s.get("envSecrets"):
        config["env_secrets"] = [c["name"] for c in k8s["envSecrets"] if "name" in c]
    for key in ("envVars", "volumeMounts", "volumes", "labels", "failPodOnRunFailure", "resources", "schedulerName"):
        if k8s.get(key) not in (None, [], {}):
            config[_snake(key)] = k8s[key]
    if k8s.get("securityContext"):
        config["security_context"] = k8s["securityContext"]
    if k8s.get("runK8sConfig"):
        config["run_k8s_config"] = {_snake(k): v for k, v in k8s["runK8sConfig"].items()}
    daemon = values["dagsterDaemon"]
    coordinator = daemon["runCoordinator"]
    instance: dict[str, Any] = {
        "storage": {
            "postgres": {
                "postgres_db": {
                    "username": pg["postgresqlUsername"],
                    "password": {"env": "DAGSTER_PG_PASSWORD"},
                    "hostname": pg["postgresqlHost"],
                    "db_name": pg["postgresqlDatabase"],
                    "port": pg["service"]["port"],
                    "params": pg.get("postgresqlParams") or {},
                    **({"scheme": pg["postgresqlScheme"]} if pg.get("postgresqlScheme") else {}),
                }
            }
        },
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": config},
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        "run_monitoring": {_snake(k): v for k, v in (daemon.get("runMonitoring") or {}).items()},
        "telemetry": {"enabled": bool((values.get("telemetry") or {}).get("enabled", False))},
    }
    if coordinator.get("enabled"):
        if coordinator["type"] != "QueuedRunCoordinator":
            raise ValueError("dagsterDaemon.runCoordinator.type must be QueuedRunCoordinator")
        queued = coordinator["config"].get("queuedRunCoordinator") or {}
        instance["run_coordinator"] = {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {_snake(k): v for k, v in queued.items()},
        }
    concurrency = values.get("concurrency") or {}
    if concurrency.get("enabled"):
        instance["concurrency"] = {
            "pools": {_snake(k): v for k, v in (concurrency.get("pools") or {}).items()},
            "runs": {_snake(k): v for k, v in (concurrency.get("runs") or {}).items()},
        }
    logs = values.get("computeLogManager") or {}
    if logs.get("type") == "NoOpComputeLogManager":
        instance["compute_logs"] = {
            "module": "dagster.core.storage.noop_compute_log_manager",
            "class": "NoOpComputeLogManager",
        }
    return instance


def check_helm_values(path: Path = DEPLOY / "k8s" / "values.yaml") -> list[str]:
    """Render the Helm values' instance and validate it as ``check_instance`` does."""
    try:
        values = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        instance = render_helm_instance(values)
    except (yaml.YAMLError, KeyError, ValueError) as exc:
        return [f"{path}: {exc!r}"]
    errors = (
        [f"{path}: secrets must not be chart values: postgresql.postgresqlPassword"]
        if (values.get("postgresql", {}).get("postgresqlPassword"))
        else []
    )
    if values.get("generatePostgresqlPasswordSecret", True):
        errors.append(f"{path}: generatePostgresqlPasswordSecret must be false (the Secret is made out of band)")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dagster.yaml").write_text(yaml.safe_dump(instance, sort_keys=False))
        errors += [e.replace(f"{tmp}/dagster.yaml", f"{path} (rendered)") for e in check_instance(Path(tmp))]
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compose", type=Path, default=COMPOSE)
    parser.add_argument("--instance", type=Path, action="append", help="a directory holding a dagster.yaml")
    parser.add_argument("--no-docker", action="store_true", help="do not ask `docker compose` even if present")
    args = parser.parse_args(argv)
    errors = check_compose(args.compose, use_docker=not args.no_docker)
    for directory in args.instance or INSTANCES:
        errors += check_instance(directory)
    if not args.instance:
        errors += check_helm_values(HELM_VALUES)
    for error in errors:
        print(f"deploy-check: {error}", file=sys.stderr)
    if errors:
        print(f"deploy-check: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    checked = ", ".join(
        str(p.resolve().relative_to(DEPLOY.parent)) if p.resolve().is_relative_to(DEPLOY.parent) else str(p)
        for p in [args.compose, *(args.instance or [*INSTANCES, HELM_VALUES])]
    )
    print(f"deploy-check: OK ({checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
