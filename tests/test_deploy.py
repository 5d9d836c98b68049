"""The deployment files agree with settings.py and with each other.

The Dockerfile, docker-compose.yml and the Kubernetes examples name
environment variables, ports and paths that the daemon reads in exactly one
place, settings.py. These tests read that module (its source for the names,
`load_settings` for what is required) and fail when a manifest drifts from
it: a misspelt variable, a missing credential, a literal secret, a probe on
the wrong path, a drain longer than the grace period. They also run
healthcheck.py against port-0 servers. Nothing here needs Docker.
"""

from __future__ import annotations

import http.server
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from settings import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"

_SETTINGS_NAME = re.compile(
    r"read\.(?:text|number|flag|choice|url)\(\s*\"([A-Z][A-Z0-9_]*)\""
)
_SECRET_NAME = re.compile(r"SECRET|API_KEY|SDK_KEY|TOKEN|PASSWORD")
_ENV_NAME = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")


def _settings_names() -> set[str]:
    """Every environment variable settings.py reads, from its source."""
    source = (ROOT / "settings.py").read_text()
    return set(_SETTINGS_NAME.findall(source))


SETTINGS_NAMES = _settings_names()
SECRET_NAMES = {name for name in SETTINGS_NAMES if _SECRET_NAME.search(name)}
_DEFAULTS = {f.name: f.default for f in fields(Settings)}
DEFAULT_HEALTH_PORT = _DEFAULTS["health_port"]
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = _DEFAULTS["shutdown_timeout_seconds"]


def _required_names() -> set[str]:
    """Variables named by the problems of an empty environment."""
    with pytest.raises(ConfigError) as caught:
        load_settings({})
    named = set()
    for problem in caught.value.problems:
        named.update(_ENV_NAME.findall(problem))
    return named & SETTINGS_NAMES


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def _one(kind: str) -> dict[str, Any]:
    found = [
        doc
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for doc in _documents(path)
        if doc.get("kind") == kind
    ]
    assert len(found) == 1, f"expected one {kind} in {KUBERNETES}, got {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    workload = _documents(KUBERNETES / "pod.yaml")[0]
    if workload["kind"] == "Pod":
        return workload["spec"]
    return workload["spec"]["template"]["spec"]


def _container(name: str) -> dict[str, Any]:
    by_name = {c["name"]: c for c in _pod_spec()["containers"]}
    assert name in by_name, f"no {name!r} container in pod.yaml"
    return by_name[name]


def _listener_environment() -> dict[str, str]:
    """The listener's environment as Kubernetes would build it.

    ConfigMap values first, then `env` entries, which win; secretKeyRef
    values are taken from secret.example.yaml.
    """
    listener = _container("listener")
    configmap = _one("ConfigMap")
    secret = _one("Secret")
    environ: dict[str, str] = {}
    for source in listener.get("envFrom", []):
        assert source["configMapRef"]["name"] == configmap["metadata"]["name"]
        environ.update(configmap["data"])
    for entry in listener.get("env", []):
        if "value" in entry:
            environ[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            environ[entry["name"]] = secret["stringData"][ref["key"]]
    return environ


def _compose() -> dict[str, Any]:
    return _documents(ROOT / "docker-compose.yml")[0]


def _dockerfile() -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[str] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        instructions.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _instruction(instructions: list[str], keyword: str) -> list[str]:
    return [i for i in instructions if i.split(maxsplit=1)[0].upper() == keyword]


# -- settings.py as the source of truth ---------------------------------------


def test_settings_names_are_found() -> None:
    assert {"OPTIMIZELY_SDK_KEY", "HEALTH_PORT", "SHUTDOWN_TIMEOUT_SECONDS"} <= (
        SETTINGS_NAMES
    )
    assert len(SETTINGS_NAMES) > 30
    assert {"OPTIMIZELY_SDK_KEY", "GA_API_SECRET", "AMPLITUDE_API_KEY"} <= (
        SECRET_NAMES
    )


def test_required_names_include_the_sdk_key_and_destinations() -> None:
    required = _required_names()
    assert "OPTIMIZELY_SDK_KEY" in required
    assert {"GA_MEASUREMENT_ID", "GA_API_SECRET", "AMPLITUDE_API_KEY"} <= required


# -- Kubernetes ---------------------------------------------------------------


def test_manifests_parse_as_yaml() -> None:
    paths = sorted(KUBERNETES.glob("*.yaml"))
    assert {p.name for p in paths} >= {
        "pod.yaml",
        "configmap.yaml",
        "secret.example.yaml",
    }
    for path in paths:
        documents = _documents(path)
        assert documents, f"{path.name} is empty"
        for doc in documents:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path.name


def test_listener_environment_is_a_valid_configuration() -> None:
    environ = _listener_environment()

    settings = load_settings(environ)

    assert not settings.dry_run
    assert "OPTIMIZELY_SDK_KEY" in environ
    assert settings.destinations == ("ga4", "amplitude")
    assert settings.agent_base_url == "http://localhost:8080"
    assert settings.health_host == "0.0.0.0"


def test_listener_variables_are_all_read_by_settings() -> None:
    listener = _container("listener")
    names = {entry["name"] for entry in listener.get("env", [])}
    names |= set(_one("ConfigMap")["data"])
    unknown = names - SETTINGS_NAMES
    assert not unknown, f"settings.py reads no such variables: {sorted(unknown)}"


def test_required_listener_variables_are_provided() -> None:
    environ = _listener_environment()
    # DRY_RUN is the alternative to credentials, not something to provide.
    missing = _required_names() - {"DRY_RUN"} - environ.keys()
    assert not missing, f"pod.yaml does not provide {sorted(missing)}"


def test_secrets_come_from_secret_key_refs_only() -> None:
    listener = _container("listener")
    for entry in listener.get("env", []):
        if _SECRET_NAME.search(entry["name"]):
            assert "value" not in entry, f"{entry['name']} has a literal value"
            assert "secretKeyRef" in entry["valueFrom"], entry["name"]
    leaked = SECRET_NAMES & set(_one("ConfigMap")["data"])
    assert not leaked, f"secrets in the ConfigMap: {sorted(leaked)}"
    for entry in _container("agent").get("env", []):
        if entry["name"] == "OPTIMIZELY_SDKKEYS":
            assert "secretKeyRef" in entry["valueFrom"]


def test_example_secret_holds_only_placeholders() -> None:
    secret = _one("Secret")
    assert "data" not in secret, "use stringData with placeholders"
    for name, value in secret["stringData"].items():
        assert name in SECRET_NAMES
        assert value.startswith("REPLACE_"), f"{name} looks like a real value"
        assert "-" not in value


def test_agent_streams_notifications_without_a_write_timeout() -> None:
    agent = _container("agent")
    environ = {e["name"]: e.get("value") for e in agent["env"]}
    assert re.fullmatch(r"optimizely/agent:\d+\.\d+\.\d+", agent["image"])
    assert environ["OPTIMIZELY_API_ENABLENOTIFICATIONS"] == "true"
    assert environ["OPTIMIZELY_SERVER_WRITETIMEOUT"] == "0"
    assert "OPTIMIZELY_SDKKEYS" in environ
    probe = agent["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert _port_number(agent, probe["port"]) in (8080, 8088)


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    return named[port]


def test_probes_use_the_health_endpoint() -> None:
    listener = _container("listener")
    environ = _listener_environment()
    health_port = int(environ.get("HEALTH_PORT", DEFAULT_HEALTH_PORT))

    liveness = listener["livenessProbe"]["httpGet"]
    readiness = listener["readinessProbe"]["httpGet"]

    assert liveness["path"] == "/healthz"
    assert readiness["path"] == "/readyz"
    assert _port_number(listener, liveness["port"]) == health_port
    assert _port_number(listener, readiness["port"]) == health_port
    assert environ["HEALTH_HOST"] == "0.0.0.0"


def test_prometheus_scrapes_the_health_port() -> None:
    workload = _documents(KUBERNETES / "pod.yaml")[0]
    metadata = workload["metadata"]
    if workload["kind"] != "Pod":
        metadata = workload["spec"]["template"]["metadata"]
    annotations = metadata["annotations"]
    health_port = _listener_environment().get("HEALTH_PORT", DEFAULT_HEALTH_PORT)
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(health_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_drain_fits_in_the_grace_period() -> None:
    grace_seconds = _pod_spec()["terminationGracePeriodSeconds"]
    timeout_seconds = load_settings(_listener_environment()).shutdown_timeout_seconds
    # Leave room for the process to log its summary and exit.
    assert timeout_seconds + 5 <= grace_seconds


def test_listener_runs_locked_down_with_a_writable_volume() -> None:
    listener = _container("listener")
    context = listener["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]

    mounts = {m["mountPath"]: m["name"] for m in listener["volumeMounts"]}
    assert mounts.get("/var/lib/listener"), "no volume at /var/lib/listener"
    volumes = {v["name"] for v in _pod_spec()["volumes"]}
    assert mounts["/var/lib/listener"] in volumes

    settings = load_settings(_listener_environment())
    assert settings.dead_letter_path.startswith("/var/lib/listener/")
    assert settings.spool_path.startswith("/var/lib/listener/")


def test_listener_resources_are_bounded() -> None:
    resources = _container("listener")["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert {"cpu", "memory"} <= resources["limits"].keys()


# -- docker-compose.yml -------------------------------------------------------


def test_compose_runs_the_real_agent() -> None:
    agent = _compose()["services"]["agent"]
    assert re.fullmatch(r"optimizely/agent:\d+\.\d+\.\d+", agent["image"])
    environ = agent["environment"]
    assert environ["OPTIMIZELY_API_ENABLENOTIFICATIONS"] == "true"
    assert environ["OPTIMIZELY_SERVER_WRITETIMEOUT"] == "0"
    assert environ["OPTIMIZELY_SERVER_HOST"] == "0.0.0.0"
    assert environ["OPTIMIZELY_SERVER_ALLOWEDHOSTS"] in (".", "agent")
    assert any(str(p).endswith("8080:8080") for p in agent["ports"])


def test_compose_listener_reads_its_settings_from_dot_env() -> None:
    compose = _compose()
    listener = compose["services"]["listener"]
    env_files = listener["env_file"]
    env_files = [env_files] if isinstance(env_files, str) else env_files
    assert ".env" in env_files

    environ = listener["environment"]
    unknown = set(environ) - SETTINGS_NAMES
    assert not unknown, f"settings.py reads no such variables: {sorted(unknown)}"
    literal = {n for n in environ if _SECRET_NAME.search(n)}
    assert not literal, f"secrets belong in .env, not compose: {sorted(literal)}"

    # What compose sets must load once .env supplies the credentials.
    credentials = {"OPTIMIZELY_SDK_KEY": "key", "AMPLITUDE_API_KEY": "key"}
    settings = load_settings({**environ, **credentials})
    assert settings.agent_base_url == "http://agent:8080"


def test_compose_listener_keeps_state_and_drains() -> None:
    compose = _compose()
    listener = compose["services"]["listener"]
    assert listener["build"] in (".", {"context": "."})
    assert "agent" in listener["depends_on"]
    volume, _, target = listener["volumes"][0].partition(":")
    assert target == "/var/lib/listener"
    assert volume in compose["volumes"]
    grace = listener["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    assert any(str(p).endswith(f":{DEFAULT_HEALTH_PORT}") for p in listener["ports"])


# -- Dockerfile and .dockerignore ---------------------------------------------


def test_dockerfile_base_user_and_signals() -> None:
    instructions = _dockerfile()
    assert instructions[0] == "FROM python:3.13-slim"

    (user,) = _instruction(instructions, "USER")
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000

    assert _instruction(instructions, "STOPSIGNAL") == ["STOPSIGNAL SIGTERM"]
    exposed = {p for i in _instruction(instructions, "EXPOSE") for p in i.split()[1:]}
    assert str(DEFAULT_HEALTH_PORT) in exposed

    (healthcheck,) = _instruction(instructions, "HEALTHCHECK")
    assert "healthcheck.py" in healthcheck

    (entrypoint,) = _instruction(instructions, "ENTRYPOINT")
    assert entrypoint == 'ENTRYPOINT ["python", "main.py"]'


def test_dockerfile_bakes_in_no_secrets() -> None:
    instructions = _dockerfile()
    for line in _instruction(instructions, "ENV") + _instruction(instructions, "ARG"):
        assert not _SECRET_NAME.search(line), line


def test_dockerfile_environment_names_are_settings() -> None:
    names = set()
    for line in _instruction(_dockerfile(), "ENV"):
        names.update(re.findall(r"([A-Z][A-Z0-9_]*)=", line))
    daemon_names = {n for n in names if not n.startswith(("PYTHON", "PIP_"))}
    assert daemon_names <= SETTINGS_NAMES, sorted(daemon_names - SETTINGS_NAMES)
    assert {"HEALTH_HOST", "HEALTH_PORT", "DEAD_LETTER_PATH"} <= daemon_names


def test_dockerfile_installs_requirements_before_copying_code() -> None:
    instructions = _dockerfile()
    copy_requirements = instructions.index("COPY requirements.txt ./")
    install = next(
        n
        for n, i in enumerate(instructions)
        if i.startswith("RUN pip install") and "-r requirements.txt" in i
    )
    copy_code = instructions.index("COPY *.py ./")
    assert copy_requirements < install < copy_code


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = {
        line.strip().rstrip("/") for line in lines if line.strip()[:1] not in ("", "#")
    }
    assert {".venv", "tests", ".env", ".git", "*.jsonl", "deploy"} <= patterns
    assert not {"*.py", "healthcheck.py", "requirements.txt"} & patterns


# -- healthcheck.py -----------------------------------------------------------


def _health_server(status: int) -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status if self.path == "/healthz" else 404
            body = b'{"status":"ok"}' if code == 200 else b'{"status":"stuck"}'
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, name="test-health-server", daemon=True
    )
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def healthy_port() -> Iterator[int]:
    yield from _health_server(200)


@pytest.fixture
def unhealthy_port() -> Iterator[int]:
    yield from _health_server(503)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthcheck(port: int | str) -> subprocess.CompletedProcess[str]:
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.lower().endswith("_proxy")
    }
    environ["HEALTH_PORT"] = str(port)
    return subprocess.run(
        [sys.executable, "healthcheck.py"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=15,
    )


def test_healthcheck_passes_on_200(healthy_port: int) -> None:
    result = _healthcheck(healthy_port)
    assert result.returncode == 0, result.stderr
    assert "200" in result.stdout


def test_healthcheck_fails_on_503(unhealthy_port: int) -> None:
    result = _healthcheck(unhealthy_port)
    assert result.returncode == 1
    assert "503" in result.stderr


def test_healthcheck_fails_on_a_closed_port(closed_port: int) -> None:
    result = _healthcheck(closed_port)
    assert result.returncode == 1
    assert "did not answer" in result.stderr


def test_healthcheck_fails_when_the_endpoint_is_off() -> None:
    assert _healthcheck(0).returncode == 1
    assert _healthcheck("not-a-port").returncode == 1


def test_healthcheck_ignores_proxy_variables(healthy_port: int) -> None:
    environ = dict(os.environ)
    environ.update(
        HEALTH_PORT=str(healthy_port),
        HTTP_PROXY="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
    )
    environ.pop("NO_PROXY", None)
    environ.pop("no_proxy", None)
    result = subprocess.run(
        [sys.executable, "healthcheck.py"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert result.returncode == 0, result.stderr
