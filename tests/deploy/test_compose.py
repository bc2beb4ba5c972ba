"""docker-compose.yml and deploy/Dockerfile stay true without a Docker engine: every streamrec
service runs a command the CLI accepts, every STREAMREC_* variable is a setting, the wiring
(health, dependencies, profiles, volumes, GPU reservation) is what the README describes."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    OPERATOR_ENV,
    REPO,
    MissingVariable,
    compose_config,
    container_environment,
    interpolate,
    parse_command,
    settings_from_env,
    unknown_settings,
)
from packaging.requirements import Requirement

from streamrec.settings import registry_root

COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
STREAMREC = sorted(n for n, s in SERVICES.items() if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile")
WORKERS = sorted(n for n in STREAMREC if SERVICES[n]["command"][0] == "worker")


def env_of(service: dict[str, Any], shell: dict[str, str] = OPERATOR_ENV) -> dict[str, str]:
    """The container's environment with `shell` (the shell and .env: by default what the README asks for)."""
    return container_environment(service, shell)


def test_streamrec_services_found() -> None:
    assert {"topics", "ingest", "infer", "infer-gpu", "trainer", "simulator"} <= set(STREAMREC)
    assert {"ingest", "infer", "infer-gpu", "trainer"} <= set(WORKERS)


@pytest.mark.parametrize("name", STREAMREC)
def test_command_is_a_real_streamrec_command(name: str) -> None:
    command = SERVICES[name]["command"]
    assert isinstance(command, list), "use the exec form: a list, no shell"
    parse_command([interpolate(str(arg)) for arg in command])


@pytest.mark.parametrize("name", STREAMREC)
def test_environment_is_real_settings(name: str) -> None:
    env = env_of(SERVICES[name])
    assert unknown_settings(env) == []
    settings = settings_from_env(env)
    assert settings.kafka.bootstrap_list == ["kafka:9092"]
    assert settings.data_dir.as_posix() == "/data"


def test_topics_partitions_and_replication_are_configurable() -> None:
    raw = SERVICES["topics"]["environment"]
    for var in ("STREAMREC_TOPICS__PARTITIONS", "STREAMREC_TOPICS__REPLICATION_FACTOR"):
        assert re.fullmatch(r"\$\{\w+:-\d+\}", str(raw[var])), f"{var} should be ${{VAR:-default}}"
    ctx = parse_command([interpolate(a) for a in SERVICES["topics"]["command"]])
    assert ctx.info_name == "create"
    # Workers share the topics service's view of the topics.
    for name in WORKERS:
        assert (
            env_of(SERVICES[name])["STREAMREC_TOPICS__PARTITIONS"]
            == env_of(SERVICES["topics"])["STREAMREC_TOPICS__PARTITIONS"]
        )


def test_kafka_is_kraft_with_a_healthcheck() -> None:
    kafka = SERVICES["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "ZOOKEEPER" not in " ".join(env).upper()
    assert "INTERNAL://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert kafka["healthcheck"]["test"]
    assert SERVICES["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert SERVICES["topics"].get("restart") == "no"


@pytest.mark.parametrize("name", WORKERS)
def test_workers_wait_for_topics_and_report_health(name: str) -> None:
    service = SERVICES[name]
    assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    # The one-shot created the topics; a worker must not create them with other settings.
    assert "--no-create" in service["command"]
    port = settings_from_env(env_of(service)).web_port
    assert f"127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"])
    assert any(str(p).endswith(f":{port}") for p in service.get("ports", []))


def test_profiles() -> None:
    profiles = {name: tuple(s.get("profiles", ())) for name, s in SERVICES.items()}
    for name in ("kafka", "topics", "ingest", "infer", "trainer"):
        assert profiles[name] == (), f"{name} runs by default"
    assert profiles["infer-gpu"] == ("gpu",)
    assert profiles["simulator"] == ("demo",)
    assert profiles["prometheus"] == profiles["grafana"] == ("monitoring",)


def test_inference_runs_on_cpu_by_default_and_gpu_under_its_profile() -> None:
    cpu, gpu = SERVICES["infer"], SERVICES["infer-gpu"]
    assert settings_from_env(env_of(cpu)).model.device == "cpu"
    assert "deploy" not in cpu
    assert settings_from_env(env_of(gpu)).model.device == "cuda"
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["command"] == cpu["command"]


def test_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(COMPOSE["volumes"])
    assert {"ingest-state", "models"} <= declared
    for name, service in SERVICES.items():
        for spec in service.get("volumes", []):
            source, _target = str(spec).split(":")[:2]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} is not in the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    assert "ingest-state:/data" in SERVICES["ingest"]["volumes"]
    assert "models:/models" in SERVICES["infer"]["volumes"]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount path -> volume name (or bind source)."""
    return {str(v).split(":")[1]: str(v).split(":")[0] for v in service.get("volumes", [])}


def volume_at(service: dict[str, Any], path: PurePosixPath) -> tuple[str, PurePosixPath]:
    """The volume holding `path` in the container (the deepest mount above it) and the path inside it."""
    candidates = [(PurePosixPath(m), v) for m, v in mounts(service).items() if path.is_relative_to(m)]
    assert candidates, f"{path} is on no volume: it would be lost with the container"
    mount, volume = max(candidates, key=lambda c: len(c[0].parts))
    return volume, path.relative_to(mount)


def test_trainer_runs_the_train_worker_once_with_its_own_state() -> None:
    trainer = SERVICES["trainer"]
    assert parse_command(trainer["command"]).info_name == "train"
    # One replica: the feedback examples live in its local store, and only the leader trains.
    assert trainer.get("deploy", {}).get("replicas", 1) == 1
    settings = settings_from_env(env_of(trainer))
    state, _ = volume_at(trainer, PurePosixPath(settings.data_dir.as_posix()))
    assert state == "trainer-state"
    others = [n for n in STREAMREC if n != "trainer"]
    assert all(f"{state}:" not in " ".join(map(str, SERVICES[n].get("volumes", []))) for n in others)


@pytest.mark.parametrize("name", ["infer", "infer-gpu"])
def test_inference_reads_the_trainers_registry_at_the_same_path(name: str) -> None:
    trainer, infer = settings_from_env(env_of(SERVICES["trainer"])), settings_from_env(env_of(SERVICES[name]))
    # Announcements carry the trainer's absolute path; the inference container must see the same bytes there.
    registry = PurePosixPath(registry_root(trainer).as_posix())
    assert registry_root(infer).as_posix() == str(registry)
    assert volume_at(SERVICES[name], registry) == volume_at(SERVICES["trainer"], registry)
    assert volume_at(SERVICES["trainer"], registry)[0] in COMPOSE["volumes"]
    # An adapter only fits the base model it was trained on.
    assert infer.model.base == trainer.model.base


# ---- the web port and the secrets ----

SIGNERS = ["trainer", "infer", "infer-gpu"]  # sign or verify adapter announcements


def test_compose_refuses_to_run_without_the_adapter_key() -> None:
    with pytest.raises(MissingVariable, match="STREAMREC_ADAPTER_KEY"):
        compose_config(COMPOSE, {})
    with pytest.raises(MissingVariable, match="STREAMREC_ADAPTER_KEY"):
        compose_config(COMPOSE, {"STREAMREC_ADAPTER_KEY": ""})  # an empty key is no key
    assert compose_config(COMPOSE, OPERATOR_ENV)["services"]


@pytest.mark.parametrize("name", SIGNERS)
def test_trainer_and_inference_share_the_adapter_key(name: str) -> None:
    raw = str(SERVICES[name]["environment"]["STREAMREC_ADAPTER_KEY"])
    assert re.fullmatch(r"\$\{STREAMREC_ADAPTER_KEY:\?[^}]+\}", raw), "required: no default a stack could run on"
    key = settings_from_env(env_of(SERVICES[name])).adapter_key
    assert key is not None and key.get_secret_value() == OPERATOR_ENV["STREAMREC_ADAPTER_KEY"]


def test_only_the_signers_get_the_adapter_key() -> None:
    for name in STREAMREC:
        has_key = settings_from_env(env_of(SERVICES[name])).adapter_key is not None
        assert has_key == (name in SIGNERS), name


@pytest.mark.parametrize("name", WORKERS)
def test_workers_listen_on_the_compose_network(name: str) -> None:
    # Prometheus scrapes them by service name: a loopback bind would hide them from it.
    assert settings_from_env(env_of(SERVICES[name])).web_host == "0.0.0.0"


def test_published_ports_listen_on_the_hosts_loopback_only() -> None:
    published = [(name, str(p)) for name, s in SERVICES.items() for p in s.get("ports", [])]
    assert published
    for name, port in published:
        assert port.startswith("127.0.0.1:") and port.count(":") == 2, f"{name} publishes {port} to every interface"


def test_the_web_token_is_optional_and_comes_from_the_shell() -> None:
    ingest = SERVICES["ingest"]
    assert settings_from_env(env_of(ingest)).web_token is None, "no token asked unless one is set"
    token = settings_from_env(env_of(ingest, OPERATOR_ENV | {"STREAMREC_WEB_TOKEN": "t0ken"})).web_token
    assert token is not None and token.get_secret_value() == "t0ken"


def test_dependencies_exist() -> None:
    for name, service in SERVICES.items():
        for dep in service.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on unknown {dep}"


# ---- Dockerfile ----


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_runtime_stage() -> None:
    instructions = dockerfile_instructions()
    last_from = max(n for n, (k, _) in enumerate(instructions) if k == "FROM")
    runtime = instructions[last_from:]
    users = [v for k, v in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    volumes = " ".join(v for k, v in runtime if k == "VOLUME")
    assert '"/data"' in volumes and '"/models"' in volumes
    assert ("ENTRYPOINT", '["streamrec"]') in runtime
    env = dict(re.findall(r"(STREAMREC_\w+)=(\S+)", " ".join(v for k, v in runtime if k == "ENV")))
    assert unknown_settings(env) == []
    assert settings_from_env(env).data_dir.as_posix() == "/data"


def test_dockerfile_pins_torch_within_the_project_range() -> None:
    instructions = dockerfile_instructions()
    args = dict(v.split("=", 1) for k, v in instructions if k == "ARG" and "=" in v)
    assert args["TORCH_VERSION"] == "2.13.0"
    project = (REPO / "pyproject.toml").read_text()
    torch_req = Requirement(re.search(r'"(torch[^"]*)"', project).group(1))  # type: ignore[union-attr]
    assert torch_req.specifier.contains(args["TORCH_VERSION"])
    # One stage per variant, selected by the build argument.
    stages = {v.split(" AS ")[-1] for k, v in instructions if k == "FROM" and " AS " in v}
    variants = {str(s["build"]["args"]["VARIANT"]) for n, s in SERVICES.items() if n in STREAMREC}
    assert {f"torch-{v}" for v in variants | {args["VARIANT"]}} <= stages


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for keyword, value in dockerfile_instructions():
        if keyword == "COPY" and not value.startswith("--from"):
            for source in value.split()[:-1]:
                assert (REPO / source).exists(), source
                assert f"!{source.rstrip('/')}" in {i.rstrip("/") for i in ignore}, f"{source} is dockerignored"
