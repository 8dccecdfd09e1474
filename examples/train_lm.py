"""A small character-level transformer language model, guarded by ``trainguard.run.Run``.

It trains on examples/data/declaration.txt (the US Declaration of Independence, 1776,
in the public domain) shipped in this repository: no download. About a minute on a CPU,
unchanged on a GPU (bf16 autocast there). Interrupt it any way you like (Ctrl-C, SIGTERM,
kill -9) and run the same command again: it resumes where its last commit left off.

    python examples/train_lm.py --run-dir runs/lm
    python examples/train_lm.py --run-dir runs/lm --steps 600 --preempt-at 200  # exits 75

It also shows the opt-in guards: a data check on the first batches, and
``run.accumulate``, which halves the micro-batch on CUDA out-of-memory while keeping the
effective batch (and so the training) the same.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
from pathlib import Path

import torch
from torch import nn

from trainguard import keep_best, keep_last
from trainguard.run import ResumableLoader, Run, expect_all

TEXT = Path(__file__).resolve().parent / "data" / "declaration.txt"


class Windows(torch.utils.data.Dataset):
    """Every ``context + 1``-character window of ``ids`` starting at a multiple of ``stride``:
    input is the first ``context`` characters, target the same shifted by one."""

    def __init__(self, ids: torch.Tensor, context: int, stride: int) -> None:
        self.ids, self.context = ids, context
        self.starts = range(0, len(ids) - context - 1, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.ids[self.starts[i]: self.starts[i] + self.context + 1]
        return chunk[:-1], chunk[1:]


class CharTransformer(nn.Module):
    """A decoder-only transformer: embeddings, causal self-attention blocks, tied head."""

    def __init__(self, vocab: int, context: int, dim: int = 96, heads: int = 4,
                 layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(context, dim))
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied input/output embeddings
        nn.init.normal_(self.embed.weight, std=0.02)  # small logits at the start (tied head)
        nn.init.normal_(self.position, std=0.02)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids) + self.position[:t]
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


@torch.no_grad()
def sample(model: nn.Module, prompt: torch.Tensor, length: int, context: int) -> torch.Tensor:
    """Greedy-free sampling with its own generator: it never touches the global RNG."""
    model.eval()
    generator = torch.Generator(device=prompt.device).manual_seed(0)
    ids = prompt
    for _ in range(length):
        logits = model(ids[:, -context:])[:, -1].float()
        next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
    model.train()
    return ids[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=os.environ.get("TRAINGUARD_RUN_DIR", "runs/lm"),
                        help="default: $TRAINGUARD_RUN_DIR (set by `trainguard run`), "
                             "else runs/lm")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--preempt-at", type=int, default=None,
                        help="send this process SIGTERM after this step (a real preemption)")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = TEXT.read_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(ids))
    train_set = Windows(ids[:split], args.context, stride=4)
    val_set = Windows(ids[split:], args.context, stride=args.context)
    loader = ResumableLoader(train_set, batch_size=args.batch, shuffle=True, seed=0,
                             drop_last=True, pin_memory=device.type == "cuda")
    model = CharTransformer(len(chars), args.context).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def loss_of(batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    @torch.no_grad()
    def validate(run: Run) -> float:
        model.eval()
        val = torch.utils.data.DataLoader(val_set, batch_size=64)
        total, count = 0.0, 0
        with run.phase("validate", total=len(val)) as phase:
            for batch in val:
                total += loss_of(batch).item() * len(batch[0])
                count += len(batch[0])
                phase.advance()
        model.train()
        return total / count

    vocab_check = expect_all(lambda batch: int(batch[0].max()) < len(chars), within=20,
                             name="token ids inside the vocabulary")
    with Run(args.run_dir, save_every_steps=args.eval_every, save_every_seconds=300,
             keep=keep_last(2) | keep_best(1, "val_loss", "min"), log_every_steps=25,
             data_checks=[vocab_check]) as run:
        run.track(model=model, optimizer=optimizer, scheduler=scheduler, data=loader)
        for step, batch in run.steps(args.steps, data=loader):
            optimizer.zero_grad(set_to_none=True)
            loss = run.accumulate(batch, loss_of)  # forward + backward, OOM-safe
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            run.log(loss=loss, lr=scheduler.get_last_lr()[0])
            if step % args.eval_every == 0 or step == args.steps:
                run.log(val_loss=validate(run))
            if step == args.preempt_at:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the Run at the step's end
        prompt = torch.tensor([[chars.index(c) for c in "We hold "]], device=device)
        print("".join(chars[i] for i in sample(model, prompt, 160, args.context)))


if __name__ == "__main__":
    main()
