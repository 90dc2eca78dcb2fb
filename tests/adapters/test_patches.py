"""Each fix in service/adapterserver/patches.py, with a check that fails without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.adapterserver.patches import ATTENTION, load_config, load_tokenizer, patch_llama_cache

ROOT = Path(__file__).resolve().parents[2]


def test_rope_theta_from_rope_parameters(theta_base: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(theta_base).rope_theta == 10000.0  # 4.57 alone: silently the default
    fixed = load_config(theta_base)
    assert fixed.rope_theta == 500000.0
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2, 4, 8]])
    plain: Any = AutoModelForCausalLM.from_pretrained(theta_base)
    right: Any = AutoModelForCausalLM.from_pretrained(theta_base, config=fixed)
    plain.eval()
    right.eval()
    with torch.inference_mode():
        assert not torch.allclose(plain(ids).logits, right(ids).logits, atol=1e-4), "the base changes the answer"


def test_tokenizer_written_by_transformers_5(base_dir: Path) -> None:
    from transformers import AutoTokenizer

    with pytest.raises((ValueError, AttributeError, TypeError)):
        AutoTokenizer.from_pretrained(base_dir)
    tok = load_tokenizer(base_dir)
    enc = tok("Q: reverse abc")
    assert set(enc) == {"input_ids", "attention_mask"}
    ids = tok.apply_chat_template([{"role": "user", "content": "reverse abc"}], add_generation_prompt=True)
    assert tok.decode(ids).count("reverse abc") == 1


CACHE_PROBE = """
import sys, torch, adapters
from transformers import AutoModelForCausalLM
from service.adapterserver.patches import load_config, patch_llama_cache
base, adapter, patch = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if patch:
    patch_llama_cache()
model = AutoModelForCausalLM.from_pretrained(base, config=load_config(base), attn_implementation="eager").eval()
adapters.init(model)
model.load_adapter(adapter, load_as="a", set_active=True)
ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
with torch.inference_mode():
    out = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = model(out.sequences[:, :-1]).logits[0, ids.shape[1] - 1 :]
cached = torch.stack(out.logits)[:, 0]
print(float((cached - full).abs().max()))
"""


@pytest.mark.parametrize("patched", [True, False])
def test_llama_kv_cache_with_adapters(base_dir: Path, adapter_dirs: dict[str, Path], patched: bool) -> None:
    """Cached generate equals the full forward only with the keyword patch (a fresh process each way:
    the patch is process-wide)."""
    run = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE, str(base_dir), str(adapter_dirs["bottleneck"]), "1" if patched else "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    diff = float(run.stdout.strip().splitlines()[-1])
    if patched:
        assert diff < 1e-4
    else:
        assert diff > 1e-2, "without the patch the cache is ignored"


def _padded_equals_alone(base: Path, adapter: Path, attention: str) -> bool:
    import adapters
    import torch
    from transformers import AutoModelForCausalLM

    patch_llama_cache()
    model: Any = AutoModelForCausalLM.from_pretrained(base, config=load_config(base), attn_implementation=attention)
    model.eval()
    adapters.init(model)
    model.load_adapter(str(adapter), load_as="p", set_active=True)
    prompts = [[1, 5, 9, 14, 3, 7, 11, 2], [1, 6, 4]]
    pad = 0
    ids = torch.tensor([[pad] * (8 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (8 - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)[:, 8:]
        alone = [
            model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=pad)[0, len(p) :]
            for p in prompts
        ]
    eos = load_tokenizer(base).eos_token_id

    def upto_eos(row: Any) -> list[int]:
        ids: list[int] = row.tolist()
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    return [upto_eos(r) for r in batch] == [upto_eos(r) for r in alone]


def test_prefix_tuning_needs_eager_attention(base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    assert ATTENTION == "eager"
    assert _padded_equals_alone(base_dir, adapter_dirs["prefix"], "eager")
    assert not _padded_equals_alone(base_dir, adapter_dirs["prefix"], "sdpa"), "sdpa ignores the prefix when padded"
