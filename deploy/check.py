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
from collections.abc import Callable, Iterator
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


def _services(compose: dict) -> dict[str, dict]:
    """The compose file's services by name (none when it has none)."""
    return compose.get("services") or {}


def _haven_home(compose: dict) -> str:
    """``SAFEHAVEN_HOME`` as the ``code`` service sets it ("" when unset)."""
    return _environment(_services(compose).get("code", {})).get("SAFEHAVEN_HOME", "")


def _haven_user(compose: dict) -> str:
    """The ``user`` the ``code`` service runs as ("" when unset)."""
    return str(_services(compose).get("code", {}).get("user", ""))


def _mounts(services: dict[str, dict]) -> dict[str, dict[str, str]]:
    """Each service's volume mounts, source to target (services with no volume left out)."""
    mounts: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        for volume in _volumes(service):
            mounts.setdefault(name, {})[volume.get("source", "")] = volume.get("target", "")
    return mounts


def _build_args(service: dict) -> dict[str, str] | None:
    """A service's build arguments as a mapping (None when it has none)."""
    build = service.get("build")
    if not (isinstance(build, dict) and build.get("args")):
        return None
    args = build["args"]
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in args) if isinstance(args, list) else args
    return {k: str(v) for k, v in args.items()}


def _init_script(init: dict) -> str:
    """The ``haven-init`` command as one shell string."""
    command = init.get("command")
    return " ".join(command or []) if isinstance(command, list) else str(command)


def _secret_mode(secret: Any) -> int | None:
    """A service secret's file mode as an integer (None when it sets none)."""
    mode = secret.get("mode") if isinstance(secret, dict) else None
    if isinstance(mode, str):
        mode = int(mode.removeprefix("0o"), 8)
    return mode


def _rule_required_services(compose: dict) -> list[str]:
    """Services ``postgres``, ``haven-init``, ``code``, ``daemon`` and ``webserver`` exist."""
    missing = REQUIRED_SERVICES - _services(compose).keys()
    return [f"services missing: {', '.join(sorted(missing))}"] if missing else []


def _rule_no_inline_credential(compose: dict) -> list[str]:
    """No value anywhere carries a password in a URL or a PEM block."""
    return [
        f"{where}: holds a credential inline"
        for where, value in _strings(compose, "compose")
        if SECRET_VALUE.search(value)
    ]


def _rule_service_secrets_from_files(compose: dict) -> list[str]:
    """Secret-named environment variables and build arguments are ``*_FILE`` paths; no ``env_file``."""
    errors: list[str] = []
    for name, service in _services(compose).items():
        errors += _secret_items(name, _environment(service), f"services.{name}.environment")
        args = _build_args(service)
        if args is not None:
            errors += _secret_items(name, args, f"services.{name}.build.args")
        if service.get("env_file"):
            errors.append(f"services.{name}: env_file can carry secrets past this check; use secrets")
    return errors


def _rule_top_level_secrets(compose: dict) -> list[str]:
    """Top-level secrets come from a file or the environment, never ``content``."""
    errors: list[str] = []
    for name, secret in (compose.get("secrets") or {}).items():
        if "content" in secret:
            errors.append(f"secrets.{name}: inline content; use file or environment")
        if not ({"file", "environment", "external"} & secret.keys()):
            errors.append(f"secrets.{name}: must come from a file or the environment")
    return errors


def _rule_volumes_declared(compose: dict) -> list[str]:
    """The haven home, the key ring and PostgreSQL's data are declared named volumes."""
    declared = set((compose.get("volumes") or {}).keys())
    return [f"volumes.{v}: not declared" for v in ("haven_home", "haven_keys", "dagster_pg") if v not in declared]


def _rule_haven_home_set(compose: dict) -> list[str]:
    """The ``code`` service sets ``SAFEHAVEN_HOME``."""
    return [] if _haven_home(compose) else ["services.code: SAFEHAVEN_HOME is not set"]


def _rule_no_bind_mounts(compose: dict) -> list[str]:
    """No service bind-mounts a host path."""
    return [
        f"services.{name}: bind mount of {volume.get('source')!r}; use named volumes"
        for name, service in _services(compose).items()
        for volume in _volumes(service)
        if volume.get("type") == "bind"
    ]


def _rule_haven_volumes_only_where_runs_execute(compose: dict) -> list[str]:
    """Only ``code`` and ``haven-init`` mount the haven home or the key ring."""
    services = _services(compose)
    mounts = _mounts(services)
    return [
        f"services.{name}: mounts {volume}; only code and haven-init may"
        for name in services
        if name not in ("code", "haven-init")
        for volume in ("haven_home", "haven_keys")
        if volume in mounts.get(name, {})
    ]


def _rule_haven_volume_targets(compose: dict) -> list[str]:
    """``code`` and ``haven-init`` mount the home at ``SAFEHAVEN_HOME`` and the key ring at ``<home>/keys``."""
    home = _haven_home(compose)
    if not home:
        return []
    mounts = _mounts(_services(compose))
    errors: list[str] = []
    for name in ("code", "haven-init"):
        got = mounts.get(name, {})
        if got.get("haven_home") != home:
            errors.append(f"services.{name}: haven_home must be mounted at SAFEHAVEN_HOME ({home})")
        if got.get("haven_keys") != f"{home}/keys":
            errors.append(f"services.{name}: haven_keys must be mounted at {home}/keys")
    return errors


def _rule_postgres_data_volume(compose: dict) -> list[str]:
    """PostgreSQL keeps its data in the ``dagster_pg`` named volume."""
    if _mounts(_services(compose)).get("postgres", {}).get("dagster_pg") == "/var/lib/postgresql/data":
        return []
    return ["services.postgres: its data must be the dagster_pg volume at /var/lib/postgresql/data"]


def _rule_code_user_non_root(compose: dict) -> list[str]:
    """``code`` runs as a numeric non-root ``uid:gid``."""
    uid = _haven_user(compose)
    if not re.fullmatch(r"[1-9]\d*:[0-9]+", uid) or uid.startswith("0:"):
        return [f"services.code: user must be a numeric non-root uid:gid, not {uid!r}"]
    return []


def _rule_daemon_and_webserver_user(compose: dict) -> list[str]:
    """``daemon`` and ``webserver`` run as the same user as ``code``."""
    uid, services = _haven_user(compose), _services(compose)
    return [
        f"services.{name}: must run as the haven user {uid!r}"
        for name in ("daemon", "webserver")
        if str(services.get(name, {}).get("user", "")) != uid
    ]


def _rule_init_root_without_network(compose: dict) -> list[str]:
    """``haven-init`` runs as root with no network."""
    init = _services(compose).get("haven-init", {})
    errors: list[str] = []
    if str(init.get("user", "")) not in ("0", "0:0", "root"):
        errors.append("services.haven-init: must run as root to set the volumes' owner")
    if init.get("network_mode") != "none":
        errors.append("services.haven-init: must run with network_mode none")
    return errors


def _rule_init_owns_volumes(compose: dict) -> list[str]:
    """``haven-init`` gives both volumes to the haven user, mode 0700."""
    home, uid = _haven_home(compose), _haven_user(compose)
    if not home:
        return []
    script = _init_script(_services(compose).get("haven-init", {}))
    errors: list[str] = []
    for path in (home, f"{home}/keys"):
        if not re.search(rf"chown (-R )?{re.escape(uid)} [^&;]*{re.escape(path)}(\s|$)", script):
            errors.append(f"services.haven-init: does not chown {path} to {uid}")
        if not re.search(rf"chmod (0?700|u=rwx,go=) [^&;]*{re.escape(path)}(\s|$)", script):
            errors.append(f"services.haven-init: does not chmod 0700 {path}")
    return errors


def _rule_code_dependencies(compose: dict) -> list[str]:
    """``code`` waits for ``haven-init`` to complete and for PostgreSQL to be healthy."""
    depends = _services(compose).get("code", {}).get("depends_on") or {}
    wanted = (("haven-init", "service_completed_successfully"), ("postgres", "service_healthy"))
    return [
        f"services.code: must depend on {service} ({condition})"
        for service, condition in wanted
        if not isinstance(depends, dict) or depends.get(service, {}).get("condition") != condition
    ]


def _rule_secret_modes_private(compose: dict) -> list[str]:
    """A service's secret file gives no access to group or others."""
    errors: list[str] = []
    for name, service in _services(compose).items():
        for secret in service.get("secrets") or []:
            mode = _secret_mode(secret)
            if mode is not None and mode & 0o077:
                errors.append(
                    f"services.{name}.secrets.{secret['source']}: mode must give no access to group or others"
                )
    return errors


def _rule_postgres_unpublished(compose: dict) -> list[str]:
    """PostgreSQL publishes no port."""
    return ["services.postgres: must not publish a port"] if _services(compose).get("postgres", {}).get("ports") else []


def _rule_ports_on_loopback(compose: dict) -> list[str]:
    """Every published port is bound to the loopback (Dagster's webserver has no log-in)."""
    return [
        f"services.{name}: port {port!r} must be bound to 127.0.0.1"
        for name, service in _services(compose).items()
        for port in service.get("ports") or []
        if not str(port).startswith("127.0.0.1:")
    ]


RULES: tuple[Callable[[dict], list[str]], ...] = (
    _rule_required_services,
    # -- no secret inline
    _rule_no_inline_credential,
    _rule_service_secrets_from_files,
    _rule_top_level_secrets,
    # -- volumes: the haven home and the key ring, separate, mounted only where runs execute
    _rule_volumes_declared,
    _rule_haven_home_set,
    _rule_no_bind_mounts,
    _rule_haven_volumes_only_where_runs_execute,
    _rule_haven_volume_targets,
    _rule_postgres_data_volume,
    # -- owners and modes
    _rule_code_user_non_root,
    _rule_daemon_and_webserver_user,
    _rule_init_root_without_network,
    _rule_init_owns_volumes,
    _rule_code_dependencies,
    _rule_secret_modes_private,
    # -- ports
    _rule_postgres_unpublished,
    _rule_ports_on_loopback,
)


def check_rules(compose: dict) -> list[str]:
    """The haven's deployment rules (see the module docstring)."""
    return [error for rule in RULES for error in rule(compose)]


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


def _snake_keys(mapping: dict) -> dict:
    """``mapping`` with its camelCase keys in snake_case."""
    return {_snake(k): v for k, v in mapping.items()}


def _is_set(value: Any) -> bool:
    """The chart's ``{{- if .Values.x }}``: a truthy value."""
    return bool(value)


def _is_given(value: Any) -> bool:
    """A value present and not empty (``false`` and ``0`` count as given)."""
    return value not in (None, [], {})


def _same(value: Any) -> Any:
    """The value unchanged."""
    return value


def _image_reference(image: dict) -> str:
    """``repository:tag`` of a chart image entry."""
    return f"{image['repository']}:{image['tag']}"


def _names(entries: list[dict]) -> list[str]:
    """The ``name`` of each chart entry that has one."""
    return [c["name"] for c in entries if "name" in c]


# (chart key, launcher config key, when the chart sets it, how it is rendered), in the chart's order
HELM_LAUNCHER_OPTIONS: tuple[tuple[str, str, Callable[[Any], bool], Callable[[Any], Any]], ...] = (
    ("kubeconfigFile", "kubeconfig_file", _is_set, _same),
    ("image", "job_image", _is_set, _image_reference),
    ("envSecrets", "env_secrets", _is_set, _names),
    *(
        (key, _snake(key), _is_given, _same)
        for key in ("envVars", "volumeMounts", "volumes", "labels", "failPodOnRunFailure", "resources", "schedulerName")
    ),
    ("securityContext", "security_context", _is_set, _same),
    ("runK8sConfig", "run_k8s_config", _is_set, _snake_keys),
)


def _helm_run_launcher_config(values: dict) -> dict[str, Any]:
    """The K8sRunLauncher's config as the chart renders it from ``runLauncher``."""
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
        "env_config_maps": [{"env": "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP"}] + _names(k8s.get("envConfigMaps", [])),
    }
    for chart_key, config_key, is_set, render in HELM_LAUNCHER_OPTIONS:
        if is_set(k8s.get(chart_key)):
            config[config_key] = render(k8s[chart_key])
    return config


def _helm_storage(pg: dict) -> dict[str, Any]:
    """The PostgreSQL storage section the chart renders from ``postgresql``."""
    return {
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
    }


def _helm_run_coordinator(coordinator: dict) -> dict[str, Any] | None:
    """The QueuedRunCoordinator section from ``dagsterDaemon.runCoordinator`` (None when it is off)."""
    if not coordinator.get("enabled"):
        return None
    if coordinator["type"] != "QueuedRunCoordinator":
        raise ValueError("dagsterDaemon.runCoordinator.type must be QueuedRunCoordinator")
    queued = coordinator["config"].get("queuedRunCoordinator") or {}
    return {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator", "config": _snake_keys(queued)}


def _helm_concurrency(values: dict) -> dict[str, Any] | None:
    """The concurrency section (None when the chart's concurrency is off)."""
    concurrency = values.get("concurrency") or {}
    if not concurrency.get("enabled"):
        return None
    return {
        "pools": _snake_keys(concurrency.get("pools") or {}),
        "runs": _snake_keys(concurrency.get("runs") or {}),
    }


def _helm_compute_logs(values: dict) -> dict[str, Any] | None:
    """The compute log manager section (None unless the chart's is the NoOpComputeLogManager)."""
    if (values.get("computeLogManager") or {}).get("type") != "NoOpComputeLogManager":
        return None
    return {"module": "dagster.core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"}


def render_helm_instance(values: dict) -> dict:
    """The instance sections Dagster's Helm chart renders from ``values`` (the parts we set).

    Mirrors the chart's instance templates for the K8sRunLauncher, the QueuedRunCoordinator,
    run monitoring, concurrency, compute logs and PostgreSQL storage, so that Dagster can
    validate what the cluster would run without a cluster or Helm.
    """
    pg = values["postgresql"]
    launcher_config = _helm_run_launcher_config(values)
    daemon = values["dagsterDaemon"]
    coordinator = daemon["runCoordinator"]
    instance: dict[str, Any] = {
        "storage": _helm_storage(pg),
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher_config},
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        "run_monitoring": _snake_keys(daemon.get("runMonitoring") or {}),
        "telemetry": {"enabled": bool((values.get("telemetry") or {}).get("enabled", False))},
    }
    optional = {
        "run_coordinator": _helm_run_coordinator(coordinator),
        "concurrency": _helm_concurrency(values),
        "compute_logs": _helm_compute_logs(values),
    }
    instance.update({key: section for key, section in optional.items() if section is not None})
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
