"""deploy/Dockerfile, read statically (no Docker engine here): slim, non-root, torch by build
argument, only files that exist and that the build context lets through."""

from __future__ import annotations

import json
import shlex
from typing import Any

from tests.deploy.conftest import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1]) for line in lines]


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


def test_slim_and_non_root() -> None:
    final = _final_stage()
    assert final[0][1].startswith("python:") and "-slim" in final[0][1], final[0]
    users = [arg for op, arg in final if op == "USER"]
    assert users, "the final stage runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric, non-root uid (runAsNonRoot checks it)"


def test_torch_is_a_build_argument() -> None:
    ins = _instructions()
    args = {arg.split("=")[0] for op, arg in ins if op == "ARG"}
    assert {"TORCH", "TORCH_VERSION"} <= args
    install = next(arg for op, arg in ins if op == "RUN" and "torch==" in arg)
    assert "cuda)" in install and "cpu)" in install


def test_copied_files_exist_and_pass_the_dockerignore() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the build context should be an allow-list (the repo holds a multi-GB .venv)"
    for op, arg in _instructions():
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
