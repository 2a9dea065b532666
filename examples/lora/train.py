"""LoRA fine-tuning with peft, checkpointed incrementally: each save writes only the adapters.

A tiny GPT-2 (built from a config, nothing downloaded) gets LoRA adapters from ``peft``; the
base stays frozen (``requires_grad=False``). ``CheckpointManager(incremental=True)`` then
writes the base once and, at every later save, only what changed: the adapters, AdamW's
moments, the RNG and the data generator. Killed at any moment (``kill -9`` included) and run
again, it resumes exactly: the losses and final weights are bit-identical to an
uninterrupted run (``tests/test_incremental_lora.py`` checks it).

    python examples/lora/train.py --out-dir /tmp/lora                    # incremental
    python examples/lora/train.py --out-dir /tmp/lora-full --full        # every save writes everything

Each save prints the bytes it wrote (``runstate.inspect(path).own_nbytes``).
"""

from __future__ import annotations

import argparse
import os
import signal

import peft
import torch
import transformers

import runstate


def build() -> torch.nn.Module:
    torch.manual_seed(0)  # the same base at every start: in a real job it comes from from_pretrained
    config = transformers.GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=512, n_positions=64)
    base = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)
    return peft.get_peft_model(base, lora)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out-dir", required=True, help="checkpoints go to OUT_DIR/ckpt")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3, help="save every N steps")
    parser.add_argument("--full", action="store_true", help="incremental=False: every save writes everything")
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL this process right after saving step N")
    args = parser.parse_args()

    model = build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.Generator().manual_seed(1234)  # the batches: part of the state, so a resume sees the same ones
    state = {"model": model, "optimizer": opt, "data": data, "rng": runstate.RNG()}
    ckpt = os.path.join(args.out_dir, "ckpt")
    with runstate.CheckpointManager(ckpt, keep_last=3, incremental=not args.full) as mgr:
        start = int(mgr.restore(state) or 0)
        for step in range(start, args.steps):
            tokens = torch.randint(0, 512, (4, 32), generator=data)
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            print(f"step {step + 1} loss {loss.item():.10f}", flush=True)
            if (step + 1) % args.every == 0 and mgr.save(step + 1, state):
                wrote = runstate.inspect(mgr.path(step + 1)).own_nbytes
                print(f"saved step {step + 1}: wrote {wrote / 1e6:.3f} MB", flush=True)
                if args.kill_at == step + 1:
                    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
