from pathlib import Path

import pytest

from service.cli import main
from tests.fakes import FAKE_CONFIG


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(FAKE_CONFIG)
    assert main(["check-config", str(path)]) == 0
    assert "3 members, 2 ensembles (default main)" in capsys.readouterr().out


def test_serve_refuses_a_bad_config_and_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(FAKE_CONFIG.replace("top_k: 2", "top_k: 0"))
    assert main(["serve", "--config", str(path), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "ensembles.main.top_k" in err
