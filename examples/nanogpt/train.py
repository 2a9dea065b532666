"""A minimal character-level GPT, trained on a small text file, resumable exactly with runstate.

The training loop has the parts of a real GPT script that make resuming hard: dropout,
gradient accumulation, a warmup + cosine learning-rate schedule set by hand from the
iteration number, gradient clipping, a prefetched next batch drawn from the global torch
RNG, and periodic evaluation on random batches. It is wired to runstate as the README's
"Where to save in the loop" says:

* the save is the last thing in an iteration, after the optimizer step and the evaluation;
* the prefetched batch and the best validation loss (in-flight data, a plain value) are in
  the state, copied in before each save and read back after the restore;
* SIGTERM (a preemption notice) makes the next save write at once, and the script then exits
  with ``mgr.exit_code`` so that ``runstate run`` restarts it.

Train, and let the supervisor restart it after a crash or a preemption::

    runstate run -- python examples/nanogpt/train.py --out-dir runs/nanogpt

Killed at any moment (``kill -9`` included) and restarted, it ends with bit-identical
parameters to a run that was never interrupted (tests/test_nanogpt.py checks this with
SIGKILLs at random moments). ``--resume-like-most-scripts`` is the test's negative control: it
restores what most training scripts save (weights, optimizer, iteration number; no RNG, no
prefetched batch), and the run ends elsewhere.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn
from torch.nn import functional as F

import runstate

TEXT = Path(__file__).resolve().parent / "input.txt"


@dataclass(frozen=True)
class Config:
    """Model and training hyperparameters (tiny: it trains in seconds on one CPU core)."""

    block_size: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    dropout: float = 0.1
    batch_size: int = 8
    grad_accum: int = 2
    max_iters: int = 60
    warmup_iters: int = 10
    learning_rate: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 10
    eval_iters: int = 4
    save_interval: int = 5
    seed: int = 1337


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        out: torch.Tensor = self.resid_dropout(self.c_proj(y))
        return out


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2 (stored once)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1))
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out-dir", required=True, help="checkpoints go to OUT_DIR/ckpt, final parameters to OUT_DIR")
    parser.add_argument("--max-iters", type=int, default=Config.max_iters)
    parser.add_argument("--resume-like-most-scripts", action="store_true", help="negative control: see the docstring")
    args = parser.parse_args(argv)
    cfg = Config(max_iters=args.max_iters)
    torch.set_num_threads(1)  # same kernels, same results, in every process
    torch.manual_seed(cfg.seed)

    text = TEXT.read_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(ch) for ch in text], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = splits[split]
        ix = torch.randint(len(d) - cfg.block_size, (cfg.batch_size,))  # the global torch RNG
        x = torch.stack([d[i : i + cfg.block_size] for i in ix.tolist()])
        y = torch.stack([d[i + 1 : i + 1 + cfg.block_size] for i in ix.tolist()])
        return x, y

    def get_lr(it: int) -> float:  # linear warmup, then cosine decay to min_lr
        if it < cfg.warmup_iters:
            return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
        ratio = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)

    model = GPT(cfg, len(chars))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
    )

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:  # random batches: it runs before the save
        model.eval()
        out = {}
        for split in splits:
            out[split] = sum(model(*get_batch(split)).item() for _ in range(cfg.eval_iters)) / cfg.eval_iters
        model.train()
        return out

    X, Y = get_batch("train")  # the first batch; later ones are prefetched during the step
    state = {"model": model, "optimizer": optimizer, "rng": runstate.RNG(), "batch": (X, Y), "best_val_loss": 1e9}
    # The negative control restores only the model, the optimizer and the iteration number.
    restorable = {"model": model, "optimizer": optimizer} if args.resume_like_most_scripts else state
    with runstate.CheckpointManager(
        os.path.join(args.out_dir, "ckpt"),
        keep_last=2,
        save_every_steps=cfg.save_interval,
        save_on_signals=(signal.SIGTERM,),
    ) as mgr:
        iter_num = mgr.restore(restorable, strict=not args.resume_like_most_scripts) or 0
        (X, Y), best_val_loss = state["batch"], state["best_val_loss"]  # plain values: read back
        print(f"start at iter {iter_num} pid {os.getpid()}", flush=True)
        while iter_num < cfg.max_iters:
            lr = get_lr(iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(cfg.grad_accum):
                loss = model(X, Y) / cfg.grad_accum
                X, Y = get_batch("train")  # prefetch the next batch
                loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            if iter_num % cfg.eval_interval == 0:
                losses = estimate_loss()
                best_val_loss = min(best_val_loss, losses["val"])
                print(f"iter {iter_num}: train {losses['train']:.4f}, val {losses['val']:.4f}", flush=True)
            state.update(batch=(X, Y), best_val_loss=best_val_loss)  # in-flight data and plain values
            mgr.save(iter_num, state, metrics={"loss": loss.item() * cfg.grad_accum})  # after the evaluation
            print(f"iter {iter_num} loss {loss.item() * cfg.grad_accum:.4f} pid {os.getpid()}", flush=True)
            if mgr.preempted:
                return mgr.exit_code  # saved; `runstate run` restarts us
    save_model(model, os.path.join(args.out_dir, "final.safetensors"))
    print(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
