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
    render_kustomization,
    settings_from_env,
    unknown_settings,
)

from streamrec.settings import registry_root

K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
RENDERED = {name: render_kustomization(path) for name, path in KUSTOMIZATIONS.items()}
K8S_VERSION = "1.30.0"  # oldest release these manifests promise to work on


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def workloads(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob")]


def container_env(resources: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """What the container's process sees: envFrom sources first, then `env` (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= find(resources, "ConfigMap", source["configMapRef"]["name"])["data"]
        if "secretRef" in source:
            secret = find(resources, "Secret", source["secretRef"]["name"])
            env |= secret.get("stringData", {})
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env


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


def test_configmap_and_secret_hold_only_settings() -> None:
    resources = RENDERED["base"]
    config = find(resources, "ConfigMap", "streamrec-config")["data"]
    secret = find(resources, "Secret", "streamrec-kafka-credentials")["stringData"]
    assert unknown_settings(config) == [] and unknown_settings(secret) == []
    assert all(k.startswith("STREAMREC_") for k in config | secret)
    # The Secret carries all SASL needs: switching the ConfigMap to SASL_SSL yields valid settings.
    sasl = settings_from_env(config | secret | {"STREAMREC_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"})
    assert sasl.kafka.sasl_password is not None
    assert "STREAMREC_KAFKA__SASL_PASSWORD" not in config


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
