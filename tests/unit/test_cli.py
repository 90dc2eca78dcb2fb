import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cli import main
from tests.fakes import FAKE_CONFIG


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main` sets up logging on the stream of the moment (pytest's capture, closed after the test):
    put the root logger back, or later tests' log calls fail on a closed file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(FAKE_CONFIG)
    assert main(["check-config", str(path)]) == 0
    assert "3 members, 2 ensembles (default main)" in capsys.readouterr().out


def test_serve_refuses_a_bad_config_and_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(FAKE_CONFIG.replace("fuse_top_k: 2", "fuse_top_k: 0"))
    assert main(["serve", "--config", str(path), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "ensembles.main.fuse_top_k" in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from service.config import package_version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ensemble-gateway {package_version()}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("serve", "check-config", "make-tiny-models", "train", "suite", "eval", "train-ranker"):
        assert command in out


def test_startup_summary_names_ensembles_members_urls_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.serving.summary import startup_summary
    from tests.fakes import fake_config

    monkeypatch.delenv("GATEWAY_API_KEYS", raising=False)
    text = startup_summary(fake_config(), {"a": None, "b": "connect: refused"}, "http://127.0.0.1:8000", 2.5, "1.2.3")
    assert text.splitlines()[0] == "ensemble-gateway 1.2.3 ready in 2.5s"
    assert "ensemble main (default): ranker length, fuser join, fusion always, fuse_top_k 2" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("    ")}
    assert lines["a"].split()[1:3] == ["model", "endpoint"] and lines["a"].endswith(" up")
    assert "DOWN (connect: refused)" in lines["b"] and lines["c"].endswith(" unknown")
    for url in ("http://127.0.0.1:8000/v1", "/docs", "http://127.0.0.1:8000/metrics", "/generate"):
        assert url in text
    assert "API keys  not required: the API is open" in text
    monkeypatch.setenv("GATEWAY_API_KEYS", "k1,k2")
    assert "API keys  required (2 configured)" in startup_summary(fake_config(), {}, "http://h:1", 1.0, "1")
