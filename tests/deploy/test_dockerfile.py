"""deploy/Dockerfile (the gateway, without torch), deploy/Dockerfile.models (the model tier, and a gateway
with its models in process) and deploy/Dockerfile.adapters (the adapter server), read statically (no
Docker engine here): slim, non-root, torch by build argument where there is torch and nowhere else,
only files that exist and that the build context lets through."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"
IMAGES = pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.models", "Dockerfile.adapters"])
WITH_TORCH = pytest.mark.parametrize("dockerfile", ["Dockerfile.models", "Dockerfile.adapters"])


def _instructions(name: str = "Dockerfile") -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in (DEPLOY / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1]) for line in lines]


def _final_stage(name: str = "Dockerfile") -> list[tuple[str, str]]:
    ins = _instructions(name)
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


@IMAGES
def test_slim_and_non_root(dockerfile: str) -> None:
    final = _final_stage(dockerfile)
    assert final[0][1].startswith("python:") and "-slim" in final[0][1], final[0]
    users = [arg for op, arg in final if op == "USER"]
    assert users, "the final stage runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric, non-root uid (runAsNonRoot checks it)"


@WITH_TORCH
def test_torch_is_a_build_argument(dockerfile: str) -> None:
    ins = _instructions(dockerfile)
    args = {arg.split("=")[0] for op, arg in ins if op == "ARG"}
    assert {"TORCH", "TORCH_VERSION"} <= args
    install = next(arg for op, arg in ins if op == "RUN" and "torch==" in arg)
    assert "cuda)" in install and "cpu)" in install


@IMAGES
def test_copied_files_exist_and_pass_the_dockerignore(dockerfile: str) -> None:
    ignore = (DEPLOY / f"{dockerfile}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the build context should be an allow-list (the repo holds a multi-GB .venv)"
    for op, arg in _instructions(dockerfile):
        if op != "COPY" or arg.startswith("--from"):
            continue
        *sources, _dest = shlex.split(arg)
        for src in sources:
            assert (ROOT / src).exists(), src
            assert src.rstrip("/") in allowed, f"{src} is excluded by Dockerfile.dockerignore"


def test_the_gateway_image_has_no_torch() -> None:
    """No torch, no models extra, no model cache: what runs models is the models image."""
    ins = _instructions()
    assert not [arg for op, arg in ins if op == "ARG" and arg.startswith("TORCH")]
    installs = [arg for op, arg in ins if op == "RUN" and "pip install" in arg]
    assert installs and not [arg for arg in installs if "torch" in arg or "models" in arg or "transformers" in arg]
    extras = next(arg for op, arg in ins if op == "ARG" and arg.startswith("EXTRAS="))
    assert extras == 'EXTRAS=""'
    assert not [arg for op, arg in _final_stage() if op == "ENV" and "HF_HOME" in arg]


def test_the_models_image_installs_the_models_extra() -> None:
    ins = _instructions("Dockerfile.models")
    assert next(arg for op, arg in ins if op == "ARG" and arg.startswith("EXTRAS=")) == 'EXTRAS="models"'
    assert any(op == "RUN" and 'pip install ".[${EXTRAS}]"' in arg for op, arg in ins)


@pytest.mark.parametrize(
    ("dockerfile", "command", "port"), [("Dockerfile", "serve", 8000), ("Dockerfile.models", "serve-models", 8001)]
)
def test_serves_the_mounted_config(dockerfile: str, command: str, port: int) -> None:
    final = _final_stage(dockerfile)
    cmd = json.loads(next(arg for op, arg in final if op == "CMD"))
    assert cmd[0] == command
    assert cmd[cmd.index("--config") + 1].startswith("/etc/ensemble-gateway/")
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and int(cmd[cmd.index("--port") + 1]) == port
    assert str(port) in next(arg for op, arg in final if op == "EXPOSE").split()
    healthcheck = next(arg for op, arg in final if op == "HEALTHCHECK")
    assert f"127.0.0.1:{port}/health" in healthcheck


def test_compose_runs_the_models_image_as_its_gateway(compose: dict[str, Any]) -> None:
    """One machine: the gateway keeps its models in process, so compose builds the models image and
    overrides its command with `serve` on the mounted ensemble.yaml."""
    gateway = compose["services"]["gateway"]
    assert gateway["build"]["dockerfile"] == "deploy/Dockerfile.models"
    assert gateway["command"][0] == "serve"
    assert gateway["command"][gateway["command"].index("--config") + 1] == "/etc/ensemble-gateway/ensemble.yaml"
