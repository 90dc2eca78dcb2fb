"""``python -m service.adapterserver.train BASE SPEC OUT``: train one bottleneck or prefix-tuning adapter
with the ``adapters`` library, in the adapter server's environment.

The caller (``service.quality.members.train_library_adapter``, in the gateway's environment) prepares
everything that is not the library's: ``SPEC`` (``torch.save``) holds the adapter's name, type and
config, the seed, the peak learning rate, the training batches (the suite's examples under the chat
template, the same as the PEFT members get) and the learning-rate multiplier of each step. Here:
``add_adapter``, ``train_adapter`` (the base frozen), AdamW, ``save_adapter``. Prints the mean loss
of the last 20 steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    import adapters
    import torch
    from adapters import BnConfig, PrefixTuningConfig
    from transformers import AutoModelForCausalLM

    from service.adapterserver.patches import ATTENTION, load_config, patch_llama_cache

    base, spec_path, out = argv
    spec: dict[str, Any] = torch.load(spec_path, weights_only=True)
    torch.set_num_threads(int(spec.get("threads", 2)))
    patch_llama_cache()
    model: Any = AutoModelForCausalLM.from_pretrained(base, config=load_config(base), attn_implementation=ATTENTION)
    adapters.init(model)
    torch.manual_seed(int(spec["seed"]))
    config = BnConfig(**spec["config"]) if spec["kind"] == "bottleneck" else PrefixTuningConfig(**spec["config"])
    name = str(spec["name"])
    model.add_adapter(name, config=config)
    model.train_adapter(name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(spec["lr"]), betas=(0.9, 0.98), weight_decay=0.0)
    recent: list[float] = []
    for batch, scale in zip(spec["batches"], spec["lr_scale"], strict=True):
        for group in opt.param_groups:
            group["lr"] = float(spec["lr"]) * float(scale)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = [*recent[-19:], float(loss.detach())]
    model.eval()
    Path(out).mkdir(parents=True, exist_ok=True)  # save_adapter makes only the last folder
    model.save_adapter(out, name)
    print(json.dumps({"loss": sum(recent) / max(1, len(recent)), "trainable": sum(p.numel() for p in params)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
