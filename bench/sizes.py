"""``python -m bench.sizes``: what each image's Python environment weighs, installed here into fresh
venvs the way its Dockerfile installs it (docs/DEPLOY.md, "Images"). No Docker engine runs here,
so the figures are the venvs (``/opt/venv`` in each image), without the ~150 MB python:3.11-slim base.

- gateway: ``pip install .`` (deploy/Dockerfile: no torch, no transformers);
- models, CPU torch: ``torch==2.13.0`` (the CPU build on this machine) then ``.[models]``
  (deploy/Dockerfile.models with ``--build-arg TORCH=cpu``);
- models, CUDA torch: PyPI's default Linux build of torch with its NVIDIA libraries, then ``.[models]``
  (what deploy/Dockerfile.models's default ``TORCH=cuda`` brings; here torch 2.14.1, the CUDA build this
  machine's pip takes without a download, where the image pins 2.13.0 from the cu128 index).

Writes ``bench/results/sizes.json``: megabytes per venv and its ten largest packages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine

TRANSFORMERS_SPEC = "transformers>=5.16,<5.20"  # as deploy/Dockerfile.models
VARIANTS: dict[str, list[list[str]]] = {
    "gateway": [["."]],
    "models-cpu": [["torch==2.13.0"], [".[models]", TRANSFORMERS_SPEC]],
    "models-cuda": [["torch==2.14.1"], [".[models]", TRANSFORMERS_SPEC]],
}


def megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def packages(venv: Path) -> list[dict[str, Any]]:
    """The largest top-level folders of site-packages (a package and its data), in MB."""
    site = next((venv / "lib").glob("python3*/site-packages"))
    sizes = [(p.name, megabytes(p)) for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")]
    return [{"name": n, "mb": round(mb, 1)} for n, mb in sorted(sizes, key=lambda x: -x[1])[:10]]


def build(name: str, steps: list[list[str]], work: Path) -> dict[str, Any]:
    venv = work / name
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    for step in steps:
        subprocess.run([*pip, *step], check=True, cwd=ROOT)
    # llm-blender is imported through the package's shim (it needs a patch on transformers 5).
    checks = {
        "torch": "import torch",
        "transformers": "import transformers",
        "llm_blender": "from service.models.compat import import_llm_blender as i; i('llm_blender.pair_ranker.pairrm')",
    }
    has = {
        m: subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, cwd=venv).returncode == 0
        for m, code in checks.items()
    }
    return {
        "install": [" ".join(s) for s in steps],
        "mb": round(megabytes(venv), 1),
        "seconds": round(time.perf_counter() - start, 1),
        "imports": has,
        "largest": packages(venv),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sizes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="some variants only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sizes.json")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sizes-") as tmp:
        for name in args.only or VARIANTS:
            results[name] = build(name, VARIANTS[name], Path(tmp))
            print(f"{name}: {results[name]['mb']:.0f} MB ({results[name]['seconds']:.0f} s)", flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "venvs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
