"""The README runs: its curl and Python examples against the demo served as `make demo` serves it,
and its YAML snippets through `ensemble-gateway check-config`, so that it cannot drift from the code.

A YAML snippet is completed into a whole configuration the way a reader would use it: laid over
the demo's own config (config/demo.yaml), its top-level keys replacing the demo's; a snippet with
members but no ensembles gets one ensemble of all its members; the demo's servers go when the
snippet brings members of its own. Paths that only exist on the reader's machine are replaced by
the demo's trained checkpoints of the same role (a server's model by base A, a LoRA adapter by
lora-sort or lora-capital, a soft prompt by soft-reverse, a merge's models by the fine-tunes of base
A), so that check-config's adapter and recipe checks run for real.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.config.loading import expand_env, parse_tier_config
from tests.integration.conftest import ROOT, Gateway

pytestmark = pytest.mark.integration

README = (ROOT / "README.md").read_text()
DEMO_PORT = "8000"  # the README's examples talk to `make demo` on its default port


def fenced(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a Markdown text: (language, body), in order."""
    out: list[tuple[str, str]] = []
    lang: str | None = None
    body: list[str] = []
    indent = 0
    for line in text.splitlines():
        if line.lstrip().startswith("```"):  # a fence, perhaps indented inside a list item
            if lang is None:
                lang, body, indent = line.strip()[3:].strip(), [], len(line) - len(line.lstrip())
            else:
                out.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line[indent:] if line[:indent].isspace() else line)
    return out


def blocks(lang: str) -> list[str]:
    return [body for kind, body in fenced(README) if kind == lang]


def curl_commands() -> list[str]:
    """Every `curl` command in the README's code blocks (a command may continue over lines)."""
    return commands("", "curl ")


def commands(lang: str, prefix: str) -> list[str]:
    """The lines of ``lang`` blocks that start with ``prefix``, each joined over its continued lines."""
    out = []
    for block in blocks(lang):
        text = block.replace("\\\n", " ")
        out += [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]
    return out


def at(url: str, text: str) -> str:
    """The README's addresses of the demo (port 8000) pointed at the demo this test serves."""
    host = url.removeprefix("http://")
    return re.sub(rf"(localhost|127\.0\.0\.1):{DEMO_PORT}", host, text)


def test_the_readme_has_examples_of_each_kind() -> None:
    assert len(curl_commands()) >= 1 and len(blocks("python")) >= 2 and len(blocks("yaml")) >= 5


def test_readme_curl_examples_answer(demo: Gateway) -> None:
    for command in curl_commands():
        done = subprocess.run(shlex.split(at(demo.url, command)), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr)
        body = json.loads(done.stdout)
        assert body.get("error") is None, (command, body)
        assert body.get("output") or body.get("choices"), (command, body)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_examples_run(demo: Gateway, index: int, tmp_path: Path) -> None:
    script = tmp_path / f"example{index}.py"
    script.write_text(at(demo.url, blocks("python")[index]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip(), "an example that prints nothing shows nothing"


def complete(snippet: dict[str, Any], trained: Path) -> dict[str, Any]:
    """A snippet as a whole configuration (see the module's docstring)."""
    demo = yaml.safe_load(expand_env((ROOT / "config" / "demo.yaml").read_text()))
    config = {**demo, **snippet}
    if "ensembles" in snippet and "default_ensemble" not in snippet:
        config.pop("default_ensemble", None)
    if "members" in snippet:
        if "servers" not in snippet:
            config.pop("servers", None)
        if "ensembles" not in snippet:
            config["ensembles"] = {"default": {"members": [m["name"] for m in snippet["members"]]}}
            config["default_ensemble"] = "default"
    for server in config.get("servers", []):
        if "model" in server and not Path(server["model"]).exists():
            server["model"] = str(trained / "base-a")
        recipe = server.get("merge")
        if isinstance(recipe, dict):  # a merge's base is base A, the models it merges the two fine-tunes
            if "base_model" in recipe and not Path(recipe["base_model"]).exists():
                recipe["base_model"] = str(trained / "base-a")
            for i, model in enumerate(recipe.get("models", [])):
                if not Path(model["model"]).exists():
                    model["model"] = str(trained / ("ft-sort", "ft-capital")[i % 2])
    for router in (config.get("routers") or {}).values():
        if router.get("checkpoint") and not Path(router["checkpoint"]).exists():
            router["checkpoint"] = str(trained / "router")
    loras = iter(["lora-sort", "lora-capital"] * 4)
    for member in config.get("members", []):
        if member.get("adapter") and not Path(member["adapter"]).exists():
            stand_in = {"soft_prompt": "soft-reverse", "bottleneck": "bn-sort", "prefix": "prefix-sort"}
            member["adapter"] = str(trained / (stand_in.get(member.get("kind", "")) or next(loras)))
        for part in (member.get("soup") or {}).get("adapters", []):
            if part.get("adapter") and not Path(part["adapter"]).exists():
                part["adapter"] = str(trained / next(loras))
    return config


@pytest.mark.parametrize("index", range(len(blocks("yaml"))))
def test_readme_yaml_snippets_pass_check_config(trained_models: Path, index: int, tmp_path: Path) -> None:
    snippet = yaml.safe_load(blocks("yaml")[index])
    assert isinstance(snippet, dict), blocks("yaml")[index]
    if blocks("yaml")[index].startswith("# tier.yaml"):  # the model tier's file, not a gateway's
        assert parse_tier_config(blocks("yaml")[index]).rankers
        return
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(complete(snippet, trained_models)))
    exe = Path(sys.executable).with_name("ensemble-gateway")
    env = {**os.environ, "TINY_MODELS": str(trained_models.parent)}
    for name, key in ((snippet.get("auth") or {}).get("keys") or {}).items():  # named keys read their variable
        if key.get("env"):
            env[key["env"]] = f"readme-example-key-{name}"
    done = subprocess.run([str(exe), "check-config", str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"README yaml block {index}:\n{blocks('yaml')[index]}\n{done.stderr}"
    assert done.stdout.startswith("ok: ")


def test_a_broken_snippet_fails_check_config(trained_models: Path, tmp_path: Path) -> None:
    """The check above can fail: a snippet whose ensemble names a member it does not define."""
    snippet = {
        "members": [{"name": "x", "endpoint": "http://h:1/v1", "model": "m"}],
        "ensembles": {"e": {"members": ["y"]}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(complete(snippet, trained_models)))
    exe = Path(sys.executable).with_name("ensemble-gateway")
    done = subprocess.run([str(exe), "check-config", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "y" in done.stderr


def learning_commands() -> list[str]:
    """The README's store commands (export, retrain-ranker, train-router), each joined over its continued lines."""
    return commands("sh", "ensemble-gateway ")


README_STORE = "sqlite:///.cache/ensemble-gateway/store.db"


def test_readme_learning_commands_run(learner: Gateway, tmp_path: Path) -> None:
    """The README's commands, on the learning gateway (its store, its config, its address): the
    demo's own ranker must stay what the other tests measure. With little feedback in its store the
    loop may decline to train; it must run and say so."""
    commands = learning_commands()
    assert [c.split()[1] for c in commands] == ["export", "retrain-ranker", "train-router"]
    store = f"sqlite:///{learner.config_path.parent / 'store.db'}"
    for prompt in ("Say one thing.", "Say another thing."):  # answers to learn a router from, whatever ran before
        assert httpx.post(f"{learner.url}/generate", json={"prompt": prompt}, timeout=120).status_code == 200
    for command in commands:
        line = command.replace(README_STORE, store).replace("config/demo.yaml", str(learner.config_path))
        line = (
            at(learner.url, line)
            .replace("feedback/", str(tmp_path / "feedback"))
            .replace("rankers/", str(tmp_path / "rankers"))
            .replace("routers/", str(tmp_path / "routers") + "/")
            .replace(".cache/tiny-models/trained/pairrm", learner.config.local_ranker("pairrm").checkpoint)
        )
        args = shlex.split(line)
        args[0] = str(Path(sys.executable).with_name("ensemble-gateway"))
        if args[1] == "retrain-ranker":
            args += ["--steps", "10", "--threads", "1", "--min-gain", "1.0"]  # quick; never swaps the shared ranker
        env = {**os.environ, "GATEWAY_ADMIN_KEY": "integration-admin-key"}
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert done.returncode == 0, (line, done.stderr[-2000:])
        report = json.loads(done.stdout)
        if args[1] == "export":
            assert (tmp_path / "feedback" / "records.jsonl").exists() and "pairs" in report
        elif args[1] == "train-router":
            assert report["members"] == ["b"] and report["examples"] >= 2
            assert (Path(report["out"]) / "router.json").exists()
        else:
            assert report["swapped"] is False and report["why"]
