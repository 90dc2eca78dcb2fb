"""schemathesis over the gateway's own OpenAPI schema, against a real `ensemble-gateway serve`
(members on the stub server): valid and invalid generated requests to `/generate` and
`/v1/chat/completions` never get a 5xx, and every error is in the OpenAI shape."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.load import Result, full_scale, gateway_process, record, stub_config, stub_server

pytestmark = pytest.mark.integration

OPERATIONS = [("/generate", "POST"), ("/v1/chat/completions", "POST")]


def _check(resp: Any, seen: Counter[int]) -> None:
    seen[resp.status_code] += 1
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], resp.text[:500]


def test_generated_requests_get_no_5xx_and_openai_errors(tmp_path: Path) -> None:
    per_case = 1500 if full_scale() else 520  # per operation and mode: 4 x 520 = 2,080 cases
    seen: Counter[int] = Counter()
    with stub_server(delay_ms=0) as stub:
        cfg = stub_config(stub, ["ok", "ok", "flaky"], deadline_s=5)
        cfg["ensembles"]["fast"] = cfg["ensembles"]["main"]
        with gateway_process(cfg, tmp_path) as gw:
            openapi = httpx.get(gw.url + "/openapi.json").json()
            schema = schemathesis.openapi.from_dict(openapi)
            for path, method in OPERATIONS:
                op = schema[path][method]
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                    @settings(
                        max_examples=per_case,
                        deadline=None,
                        database=None,
                        derandomize=True,
                        suppress_health_check=list(HealthCheck),
                    )
                    @given(case=op.as_strategy(generation_mode=mode))
                    def run(case: Any) -> None:
                        _check(case.call(base_url=gw.url, timeout=10), seen)

                    run()
    total = sum(seen.values())
    assert total >= 2000, seen
    assert seen[200] > 0 and sum(v for k, v in seen.items() if 400 <= k < 500) > 0, seen
    res = Result(sent=total, answered=seen[200], errors=Counter({k: v for k, v in seen.items() if k != 200}))
    record(
        "schemathesis",
        "generated valid and invalid bodies for /generate and /v1/chat/completions",
        f"{total} cases, sequential",
        res,
        "pytest tests/integration/test_schema_fuzz.py",
        note="no 5xx; every error in the OpenAI shape",
    )
