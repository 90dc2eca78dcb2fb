"""A gateway whose ranker and fuser are on the model tier loads no model code: started in a fresh
interpreter (its lifespan run: members built, pipeline ready), neither torch nor transformers is
imported. What a gateway image without torch needs (issue 28)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from service.config import parse_config
    from service.serving.app import create_app

    config = parse_config('''
    members:
      - {name: a, endpoint: "http://127.0.0.1:9/v1", model: m}
      - {name: b, endpoint: "http://127.0.0.1:9/v1", model: m}
    rankers: {pairrm: {endpoint: "http://127.0.0.1:9"}}
    fusers: {genfuser: {endpoint: "http://127.0.0.1:9"}}
    ensembles: {main: {members: [a, b], ranker: pairrm, fuser: genfuser}}
    resilience: {health_checks: {interval_s: 0}}
    ''')

    async def main():
        app = create_app(config)
        async with app.router.lifespan_context(app):
            assert app.state.runtime.pipeline is not None
            print("loaded:", sorted(m for m in ("torch", "transformers", "llm_blender") if m in sys.modules))

    asyncio.run(main())
    """
)


def test_a_gateway_on_the_model_tier_imports_no_torch() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "loaded: []", done.stdout
