"""A base model that cannot be loaded stops a worker at start, with a ModelError that names the fixes:
a hub id with the hub unreachable, and a model directory without weights. The hub here is a closed
local port (HF_ENDPOINT), so the test never reaches the network, whatever the machine can reach."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamrec.kafka.broker import free_port
from streamrec.settings import KafkaSettings, Settings, to_env

pytestmark = pytest.mark.model
pytest.importorskip("torch")

HUB_ID = "google/flan-t5-small"
FIXES = ("STREAMREC_MODEL__BASE to a local model directory", "Hugging Face cache", "HF_HUB_OFFLINE=1")


def unreachable_hub(tmp_path: Path) -> dict[str, str]:
    """The environment of a process whose Hugging Face hub does not answer and whose cache is empty."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMREC_", "HF_"))}
    return env | {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "HF_HUB_ETAG_TIMEOUT": "1",
        "HF_HUB_DOWNLOAD_TIMEOUT": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


LOAD = f"""
from streamrec.errors import ModelError
from streamrec.model.recommender import Recommender
try:
    Recommender.load({HUB_ID!r}, "cpu")
except ModelError as exc:
    print("MODELERROR", exc)
"""


def _finish(proc: subprocess.Popen[bytes], what: str) -> str:
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{what} did not stop on a base it cannot load")
    return " ".join(out.decode(errors="replace").split())  # rich may wrap the message


@pytest.mark.slow
def test_with_the_hub_unreachable_load_and_the_worker_fail_at_start_naming_the_fixes(tmp_path: Path) -> None:
    # No broker listens at this address either: a worker that got as far as joining its group
    # would hang there instead of exiting.
    settings = Settings(
        data_dir=tmp_path / "data",
        web_port=free_port(),
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
        model={"base": HUB_ID, "device": "cpu"},
    )
    # Child processes, side by side: huggingface_hub reads HF_* once, when it is first imported.
    env = unreachable_hub(tmp_path)
    run = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamrec", "worker", "infer", "--no-create"], env=env | to_env(settings), **run
    )
    load = subprocess.Popen([sys.executable, "-c", LOAD], env=env, **run)

    text = _finish(load, "Recommender.load")
    assert f"MODELERROR cannot load model '{HUB_ID}'" in text, text[-3000:]
    assert all(fix in text for fix in FIXES), text[-3000:]

    text = _finish(worker, "the inference worker")
    assert worker.returncode == 78, text[-3000:]  # EX_CONFIG: a restart alone will not help
    assert f"ModelError: cannot load model '{HUB_ID}'" in text, text[-3000:]
    assert all(fix in text for fix in FIXES), text[-3000:]
    assert "[^Worker]: Starting" not in text  # faust never started, let alone joined a group


@pytest.mark.parametrize("role", ["infer", "train"])
def test_a_worker_whose_base_directory_has_no_weights_fails_before_its_app_is_built(
    role: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agents.app
    from agents import create_app
    from streamrec.errors import ModelError

    built: list[str] = []
    monkeypatch.setattr(agents.app, "faust_app", lambda *args: built.append(role))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "t5"}')
    settings = Settings(data_dir=tmp_path / "data", model={"base": str(tmp_path / "model"), "device": "cpu"})
    with pytest.raises(ModelError, match=r"cannot load the model directory .* safetensors weights"):
        create_app(settings, role)
    assert built == []  # no faust app, so no consumer, no group
