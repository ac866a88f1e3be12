"""Function matching on Hugging Face transformers built from small configs (no downloads).

A ``LlamaForCausalLM`` (gated MLP ``down(act_fn(gate) * up)``, SiLU) and a ``GPT2LMHeadModel``
(``NewGELUActivation``), 2 layers of width 32, random weights with the MLP input projections
scaled by 8 so that the activations see inputs of standard deviation ~1 (at the initial ~0.1
every GELU/SiLU is almost linear and matching is trivial). Converted with
``convert_activations(init="match")`` (channel-wise, ``channel_dim=-1`` found by the converter),
calibrated on 4 batches of 4×16 random tokens; the error is the relative L2 error of the logits on
4 other batches.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/finetune/hf_match.py
"""

from __future__ import annotations

import copy

import torch
import transformers

import pwlu


def _tokens(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (4, 16), generator=g) for _ in range(n)]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if any(k in pname for k in ("gate_proj", "up_proj", "c_fc")) and p.dim() == 2:
                p.mul_(8.0)
    return model.eval()


def main() -> None:
    torch.set_num_threads(1)
    calibration, held_out = _tokens(4, 0), _tokens(4, 1)
    print("| model | activation | N | fit | rel. logit error (held-out tokens) |")
    print("|---|---|---|---|---|")
    for name in ("llama", "gpt2"):
        model = build(name)
        with torch.no_grad():
            ref = torch.cat([model(x).logits for x in held_out])
        for n in (8, 16, 32):
            for fit in ("lstsq", "interpolate"):
                conv = pwlu.convert_activations(copy.deepcopy(model), num_intervals=n, init="match",
                                                calibration=calibration, fit=fit)  # fmt: skip
                pw = pwlu.pwlu_modules(conv)
                with torch.no_grad():
                    out = torch.cat([conv(x).logits for x in held_out])
                err = ((out - ref).norm() / ref.norm()).item()
                print(f"| {name} | {pw[0][1].matched} ×{len(pw)} | {n} | {fit} | {err:.4f} |", flush=True)


if __name__ == "__main__":
    main()
