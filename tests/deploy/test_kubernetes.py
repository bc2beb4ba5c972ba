"""The Kubernetes manifests (kustomize base and the cpu/gpu overlays) validate against the bundled
Kubernetes schemas (kubernetes-validate, offline, strict) and agree with the settings and the CLI."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    parse_command,
    readme_secrets,
    render_kustomization,
    settings_from_env,
    unknown_settings,
)

from streamrec.settings import registry_root

K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
RENDERED = {name: render_kustomization(path) for name, path in KUSTOMIZATIONS.items()}
K8S_VERSION = "1.30.0"  # oldest release these manifests promise to work on
SECRETS = readme_secrets()  # what the operator creates before applying, as the README shows


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def workloads(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob")]


def container_env(
    resources: list[dict[str, Any]], container: dict[str, Any], secrets: dict[str, dict[str, str]] = SECRETS
) -> dict[str, str]:
    """What the container's process sees once `secrets` exist: envFrom sources first, then `env` (which
    wins). A missing Secret or key leaves its variables out when the reference is optional; otherwise
    the pod would not start, and this raises MissingSecret."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= find(resources, "ConfigMap", source["configMapRef"]["name"])["data"]
        if "secretRef" in source:
            ref = source["secretRef"]
            if ref["name"] not in secrets and not ref.get("optional"):
                raise MissingSecret(ref["name"])
            env |= secrets.get(ref["name"], {})
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif ref is not None:
            if ref["key"] in secrets.get(ref["name"], {}):
                env[entry["name"]] = secrets[ref["name"]][ref["key"]]
            elif not ref.get("optional"):
                raise MissingSecret(f"{ref['name']}/{ref['key']}")
    return env


class MissingSecret(LookupError):
    """A Secret (or key) a container needs does not exist: kubelet will not start the pod."""


def every_file() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", every_file(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_file_is_used_by_a_kustomization(path: Path) -> None:
    referenced = set()
    for directory in KUSTOMIZATIONS.values():
        kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
        referenced |= {(directory / r).resolve() for r in kust.get("resources", [])}
        referenced |= {(directory / p["path"]).resolve() for p in kust.get("patches", [])}
    assert path.resolve() in referenced


@pytest.mark.parametrize("variant", RENDERED)
def test_resources_validate_against_kubernetes_schemas(variant: str) -> None:
    for resource in RENDERED[variant]:
        # strict: an unknown or misspelt field fails instead of being silently ignored.
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", RENDERED)
def test_containers_run_real_commands_with_real_settings(variant: str) -> None:
    resources = RENDERED[variant]
    for workload in workloads(resources):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            parse_command(container["args"])
            env = container_env(resources, container)
            assert unknown_settings(env) == [], workload["metadata"]["name"]
            settings_from_env(env)


@pytest.mark.parametrize("variant", RENDERED)
def test_no_secret_ships_with_the_manifests(variant: str) -> None:
    # A shipped Secret would be a default key or password that works until someone replaces it.
    assert [r["metadata"]["name"] for r in RENDERED[variant] if r["kind"] == "Secret"] == []


def test_configmap_and_secrets_hold_only_settings() -> None:
    resources = RENDERED["base"]
    config = find(resources, "ConfigMap", "streamrec-config")["data"]
    kafka = SECRETS["streamrec-kafka-credentials"]
    assert unknown_settings(config) == [] and unknown_settings(kafka) == []
    assert all(k.startswith("STREAMREC_") for k in config | kafka)
    # The README's Secret carries all SASL needs: switching the ConfigMap to SASL_SSL yields valid settings.
    sasl = settings_from_env(config | kafka | {"STREAMREC_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"})
    assert sasl.kafka.sasl_password is not None
    for secret in ("SASL_PASSWORD", "ADAPTER_KEY", "WEB_TOKEN"):
        assert not any(secret in k for k in config), f"{secret} belongs in a Secret"
    # Every key a pod reads from streamrec-secrets is one the README creates, with a random value.
    refs = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for w in workloads(resources)
        for c in w["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {("streamrec-secrets", "adapter-key"), ("streamrec-secrets", "web-token")}
    assert all(SECRETS[name][key] == "$(openssl rand -hex 32)" for name, key in refs)


def secret_needs(resources: list[dict[str, Any]], container: dict[str, Any]) -> bool:
    """Whether the container would not start without the README's Secrets."""
    try:
        container_env(resources, container, secrets={})
    except MissingSecret:
        return True
    return False


@pytest.mark.parametrize("variant", RENDERED)
def test_trainer_and_inference_share_the_adapter_key_and_need_it(variant: str) -> None:
    resources = RENDERED[variant]
    (_, trainer_container), infer = trainer(resources), infer_container(resources)
    keys = [settings_from_env(container_env(resources, c)).adapter_key for c in (trainer_container, infer)]
    assert keys[0] is not None and keys[1] is not None
    assert keys[0].get_secret_value() == keys[1].get_secret_value(), "one key signs and verifies"
    assert secret_needs(resources, trainer_container) and secret_needs(resources, infer)
    # Ingest neither signs nor verifies: it starts without the Secret, and never sees the key.
    ingest_container = ingest(resources)["spec"]["template"]["spec"]["containers"][0]
    assert not secret_needs(resources, ingest_container)
    assert settings_from_env(container_env(resources, ingest_container)).adapter_key is None


def test_ingest_takes_the_optional_web_token() -> None:
    resources = RENDERED["base"]
    container = ingest(resources)["spec"]["template"]["spec"]["containers"][0]
    assert settings_from_env(container_env(resources, container)).web_token is not None
    assert settings_from_env(container_env(resources, container, secrets={})).web_token is None


@pytest.mark.parametrize("variant", RENDERED)
def test_workers_listen_on_the_pod_network(variant: str) -> None:
    # Probes and Prometheus reach a pod on its IP: a loopback bind would fail every probe.
    resources = RENDERED[variant]
    for workload in workloads(resources):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert settings_from_env(container_env(resources, container)).web_host == "0.0.0.0"


def test_ingest_pods_forward_to_each_others_dns_names() -> None:
    resources = RENDERED["base"]
    sts = ingest(resources)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = container["env"]
    names = [e["name"] for e in env]
    pod_name = env[names.index("POD_NAME")]
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # $(POD_NAME) expands only from a variable listed before it.
    assert names.index("POD_NAME") < names.index("NODE_CANONICAL_URL")
    port = settings_from_env(container_env(resources, container)).web_port
    url = env[names.index("NODE_CANONICAL_URL")]["value"]
    assert url == f"http://$(POD_NAME).{sts['spec']['serviceName']}:{port}"


@pytest.mark.parametrize("variant", RENDERED)
def test_probes_use_the_web_port_and_healthz(variant: str) -> None:
    resources = RENDERED[variant]
    for workload in workloads(resources):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            port = settings_from_env(container_env(resources, container)).web_port
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["web"] == port
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                http = container[probe]["httpGet"]
                assert (http["path"], http["port"]) == ("/healthz", "web"), f"{probe} of {container['name']}"


def ingest(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return find(resources, "StatefulSet", "streamrec-ingest")


def test_ingest_is_a_statefulset_with_a_state_volume_per_pod() -> None:
    resources = RENDERED["base"]
    sts = ingest(resources)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["worker", "ingest"]
    settings = settings_from_env(container_env(resources, container))
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert any(mounts.get(c) == str(settings.data_dir) for c in claims), "RocksDB must live on the claim"
    # More ingest workers than partitions sit idle.
    assert sts["spec"]["replicas"] <= settings.topics.partitions
    headless = find(resources, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"


def test_selectors_match_pods() -> None:
    resources = RENDERED["base"]
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(resources)}
    for workload in workloads(resources):
        labels = pods[workload["metadata"]["name"]]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        for resource in (r for r in resources if r["kind"] == kind):
            spec = resource["spec"]
            selector = spec["selector"]["matchLabels"] if kind == "PodDisruptionBudget" else spec["selector"]
            assert any(selector.items() <= p.items() for p in pods.values()), resource["metadata"]["name"]
    pdbs = [r for r in resources if r["kind"] == "PodDisruptionBudget"]
    budgets = {tuple(r["spec"]["selector"]["matchLabels"].items()) for r in pdbs}
    assert len(budgets) == 3, "one PodDisruptionBudget for ingest, one for inference, one for the trainer"


def test_pods_run_as_non_root() -> None:
    for workload in workloads(RENDERED["base"]):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def infer_container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(resources, "Deployment", "streamrec-infer")
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["infer"]
    return containers[0]


def trainer(resources: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    sts = find(resources, "StatefulSet", "streamrec-trainer")
    containers: list[dict[str, Any]] = sts["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["trainer"]
    return sts, containers[0]


def claim_at(pod: dict[str, Any], container: dict[str, Any], path: PurePosixPath) -> tuple[str, bool, PurePosixPath]:
    """(claim name, read-only, path inside the claim) of the volume holding `path` in the container."""
    mounts = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume mount of {container['name']}"
    mount = max(mounts, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    return claim, bool(mount.get("readOnly")), path.relative_to(mount["mountPath"])


def test_trainer_is_one_pod_with_its_own_state_volume() -> None:
    resources = RENDERED["base"]
    sts, container = trainer(resources)
    assert parse_command(container["args"]).info_name == "train"
    # Exactly one: the examples live in its local store and only the group leader trains.
    assert sts["spec"]["replicas"] == 1
    settings = settings_from_env(container_env(resources, container))
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert any(mounts.get(c) == str(settings.data_dir) for c in claims), "the feedback store must live on the claim"
    assert find(resources, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_inference_reads_the_trainers_registry_at_the_same_path() -> None:
    resources = RENDERED["base"]
    sts, container = trainer(resources)
    settings = settings_from_env(container_env(resources, container))
    registry = PurePosixPath(registry_root(settings).as_posix())
    claim, read_only, inside = claim_at(sts["spec"]["template"]["spec"], container, registry)
    assert not read_only, "the trainer writes the registry"
    infer = find(resources, "Deployment", "streamrec-infer")
    infer_settings = settings_from_env(container_env(resources, infer_container(resources)))
    # Announcements carry the trainer's absolute path: the same path must hold the same bytes.
    assert PurePosixPath(registry_root(infer_settings).as_posix()) == registry
    infer_claim, _, infer_inside = claim_at(infer["spec"]["template"]["spec"], infer_container(resources), registry)
    assert (infer_claim, infer_inside) == (claim, inside)
    # Pods on several nodes share it only on ReadWriteMany storage.
    assert find(resources, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert infer_settings.model.base == settings.model.base, "an adapter only fits the base it was trained on"


def test_overlays() -> None:
    cpu, gpu = RENDERED["cpu"], RENDERED["gpu"]
    cpu_infer, gpu_infer = infer_container(cpu), infer_container(gpu)
    assert settings_from_env(container_env(cpu, cpu_infer)).model.device == "cpu"
    assert "nvidia.com/gpu" not in cpu_infer["resources"].get("limits", {})
    assert settings_from_env(container_env(gpu, gpu_infer)).model.device == "cuda"
    assert gpu_infer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_infer["image"].endswith("-cuda")
    # The patch adds to the container, it does not replace it.
    assert gpu_infer["args"] == infer_container(RENDERED["base"])["args"]
    assert gpu_infer["envFrom"] == infer_container(RENDERED["base"])["envFrom"]
    # Ingest does not change with the inference hardware.
    assert ingest(cpu) == ingest(gpu) == ingest(RENDERED["base"])
    # The trainer follows the overlay's hardware; its command, settings source and volumes stay.
    (_, cpu_trainer), (_, gpu_trainer), (_, base_trainer) = trainer(cpu), trainer(gpu), trainer(RENDERED["base"])
    assert settings_from_env(container_env(cpu, cpu_trainer)).model.device == "cpu"
    assert "nvidia.com/gpu" not in cpu_trainer["resources"].get("limits", {})
    assert settings_from_env(container_env(gpu, gpu_trainer)).model.device == "cuda"
    assert gpu_trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_trainer["image"].endswith("-cuda")
    for patched in (cpu_trainer, gpu_trainer):
        for key in ("args", "envFrom", "volumeMounts"):
            assert patched[key] == base_trainer[key]


def test_image_name_matches_the_kustomize_images_entry() -> None:
    kust = yaml.safe_load((KUSTOMIZATIONS["base"] / "kustomization.yaml").read_text())
    names = {i["name"] for i in kust["images"]}
    for workload in workloads(RENDERED["base"]):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert container["image"] in names
