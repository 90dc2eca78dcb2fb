"""deploy/Dockerfile (the gateway) and deploy/Dockerfile.adapters (the adapter server), read statically
(no Docker engine here): slim, non-root, torch by build argument, only files that exist and that the
build context lets through."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"
IMAGES = pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.adapters"])


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


@IMAGES
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


def test_serves_the_mounted_config(compose: dict[str, Any]) -> None:
    cmd = json.loads(next(arg for op, arg in _final_stage() if op == "CMD"))
    assert cmd[0] == "serve"
    config = cmd[cmd.index("--config") + 1]
    assert config == compose["services"]["gateway"]["command"][cmd.index("--config") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    healthcheck = next(arg for op, arg in _final_stage() if op == "HEALTHCHECK")
    assert "/health" in healthcheck
