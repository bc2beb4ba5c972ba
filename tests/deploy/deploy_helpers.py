"""Shared checks for the deployment files: compose interpolation, STREAMREC_* names against the
settings model, `streamrec` command lines against the real CLI, and a small kustomize renderer
(resources + strategic-merge patches) so manifests validate without kubectl or a Docker engine."""

from __future__ import annotations

import ast
import functools
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import typer
import yaml
from pydantic import BaseModel
from typer.exceptions import TyperException

from streamrec.cli import app
from streamrec.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PREFIX = "STREAMREC_"

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")

# What an operator sets before `docker compose up`, as the README says (values made up).
OPERATOR_ENV = {"STREAMREC_ADAPTER_KEY": "9f" * 32}


class MissingVariable(ValueError):
    """A `${VAR:?message}` or `${VAR?message}` whose variable is not set: compose refuses to run."""


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Compose's interpolation against `env` (default: nothing set): `${VAR}`, `${VAR-default}`,
    `${VAR:-default}`, `${VAR?message}` and `${VAR:?message}` (the `:` forms treat an empty value as
    unset; the `?` forms raise MissingVariable), `$$` for a literal `$`."""
    env = {} if env is None else env

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.group("name"), match.group("op") or "", match.group("arg") or ""
        found = env.get(name)
        unset = found is None or (op.startswith(":") and found == "")
        if unset and op.endswith("?"):
            raise MissingVariable(f"required variable {name} is missing a value: {arg}")
        if unset and op.endswith("-"):
            return arg
        return found or ""

    return _VAR.sub(substitute, value).replace("$$", "$")


def compose_config(compose: Any, env: Mapping[str, str] | None = None) -> Any:
    """The compose model with every string interpolated, as `docker compose config` prints it (compose
    interpolates every service, whatever its profile, so one missing required variable stops them all)."""
    if isinstance(compose, dict):
        return {k: compose_config(v, env) for k, v in compose.items()}
    if isinstance(compose, list):
        return [compose_config(v, env) for v in compose]
    return interpolate(compose, env) if isinstance(compose, str) else compose


def container_environment(service: dict[str, Any], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a service's container gets: a variable listed without a value passes the one
    from `env` (the shell or .env) through, and is left out when `env` has none."""
    env = {} if env is None else env
    listed = service.get("environment", {})
    assert isinstance(listed, dict), "write environment as a mapping"
    out: dict[str, str] = {}
    for name, value in listed.items():
        if value is None:
            if name in env:
                out[name] = env[name]
        else:
            out[name] = interpolate(str(value), env)
    return out


def setting_names(model: type[BaseModel] = Settings, prefix: str = PREFIX) -> set[str]:
    """Every environment variable the settings model reads, e.g. STREAMREC_KAFKA__BOOTSTRAP_SERVERS."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        var = prefix + name.upper()
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            names |= setting_names(nested, var + "__")
        else:
            names.add(var)
    return names


def unknown_settings(env: dict[str, str]) -> list[str]:
    """STREAMREC_* names that are no setting (Settings ignores extras, so a typo would be silent)."""
    known = setting_names()
    return sorted(k for k in env if k.upper().startswith(PREFIX) and k.upper() not in known)


def settings_from_env(env: dict[str, str]) -> Settings:
    """Settings exactly as a process with this environment (and no .env file) would read them."""
    with mock.patch.dict(os.environ, {k: v for k, v in env.items() if k.startswith(PREFIX)}, clear=True):
        return Settings(_env_file=None)


class CommandLineError(ValueError):
    """A `streamrec` argument list that the CLI would refuse."""


def parse_command(args: list[str]) -> typer.Context:
    """Parse a `streamrec` argument list with the real CLI without running it: unknown verbs,
    unknown options, missing required options and bad values raise CommandLineError."""
    command: Any = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="streamrec")
    rest = list(args)
    # typer vendors its own click: recognise a group by what it does, not by click's classes.
    while hasattr(command, "list_commands"):
        if not rest or rest[0].startswith("-"):
            raise CommandLineError(f"{args}: {ctx.command_path!r} needs a verb")
        name, *rest = rest
        sub = command.get_command(ctx, name)
        if sub is None:
            raise CommandLineError(f"{args}: no command {name!r} in {ctx.command_path!r}")
        command = sub
        ctx = typer.Context(command, info_name=name, parent=ctx)
    try:
        # make_context parses and converts every parameter, as a real invocation would.
        parsed: typer.Context = command.make_context(ctx.info_name, rest, parent=ctx.parent, resilient_parsing=False)
    except TyperException as exc:
        raise CommandLineError(f"{args}: {exc}") from exc
    return parsed


def readme_secrets() -> dict[str, dict[str, str]]:
    """The Secrets README.md tells an operator to create, from its `kubectl ... create secret generic
    NAME --from-literal=KEY=VALUE ...` commands: name -> key -> the literal as written (a placeholder
    such as `$(openssl rand -hex 32)`)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    secrets: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if "create secret generic" not in line or not line.lstrip().startswith("kubectl"):
            continue
        words = shlex.split(line, comments=True)
        name = words[words.index("generic") + 1]
        literals = [w.removeprefix("--from-literal=") for w in words if w.startswith("--from-literal=")]
        secrets[name] = dict(literal.split("=", 1) for literal in literals)
    return secrets


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _named(items: list[Any]) -> bool:
    return all(isinstance(i, dict) and "name" in i for i in items)


def strategic_merge(base: Any, patch: Any) -> Any:
    """The part of kustomize's strategic merge these manifests use: maps merge, lists of named maps
    (containers, env, volumes, ports) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        out = list(base)
        for item in patch:
            at = next((n for n, b in enumerate(out) if b["name"] == item["name"]), None)
            if at is None:
                out.append(item)
            else:
                out[at] = strategic_merge(out[at], item)
        return out
    return patch


SUPPORTED_KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches", "images"}


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """Resources of a kustomization with its patches applied (namespace, labels and images are
    left out: they do not change whether a resource is valid)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    extra = set(kust) - SUPPORTED_KUSTOMIZE_FIELDS
    assert not extra, f"{directory}: the test renderer does not handle {sorted(extra)}; extend deploy_helpers"
    resources: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory}/kustomization.yaml: missing resource {entry}"
        if target.is_dir():
            resources.extend(render_kustomization(target))
        else:
            resources.extend(load_yaml_documents(target))
    for patch_entry in kust.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{directory}: only `patches: - path: FILE` is supported"
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        key = (patch["kind"], patch["metadata"]["name"])
        matches = [n for n, r in enumerate(resources) if (r["kind"], r["metadata"]["name"]) == key]
        assert len(matches) == 1, f"{directory}: patch {patch_entry['path']} matches {len(matches)} resources"
        resources[matches[0]] = strategic_merge(resources[matches[0]], patch)
    return resources


def metric_samples() -> dict[str, set[str]]:
    """Sample names each metric in streamrec.metrics exports, by metric family name."""
    from prometheus_client.metrics import MetricWrapperBase

    import streamrec.metrics as metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = next(iter(value.describe()))
            out[family.name] = {family.name + s for s in suffixes[family.type]}
    return out


@functools.cache  # parses every module: once per test session
def info_keys() -> dict[str, frozenset[str]]:
    """Keys each Info metric is given where streamrec/ or agents/ set it (`MODEL_INFO.info({...})`):
    an Info declares no label names, the keys of the dict it is set to become its labels."""
    from prometheus_client import Info

    import streamrec.metrics as metrics

    infos = {name: value for name, value in vars(metrics).items() if isinstance(value, Info)}
    out: dict[str, set[str]] = {name: set() for name in infos}
    for path in sorted([*(REPO / "streamrec").rglob("*.py"), *(REPO / "agents").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "info"):
                continue
            target = node.func.value
            if isinstance(target, ast.Name) and target.id in infos and node.args and isinstance(node.args[0], ast.Dict):
                out[target.id] |= {
                    k.value for k in node.args[0].keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
                }
    return {next(iter(infos[name].describe())).name: frozenset(keys) for name, keys in out.items()}


def metric_labels() -> dict[str, set[str]]:
    """Label names of each exported sample name."""
    from prometheus_client.metrics import MetricWrapperBase

    import streamrec.metrics as metrics

    samples = metric_samples()
    keys = info_keys()
    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = next(iter(value.describe()))
            labels = set(value._labelnames) | keys.get(family.name, frozenset())
            for sample in samples[family.name]:
                out[sample] = labels | ({"le"} if sample.endswith("_bucket") else set())
    return out
