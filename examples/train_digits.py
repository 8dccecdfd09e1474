"""A small CNN on scikit-learn's bundled 8x8 digits, checkpointed by trainguard.

Runs on CPU in seconds and unchanged on a GPU. Run it twice with the same --run-dir and
the second run resumes exactly where the first one's last committed checkpoint left off:
model, optimizer, scheduler, RNG streams and the position in the shuffled data.

    python examples/train_digits.py --run-dir runs/digits --steps 300 --stop-after 120
    python examples/train_digits.py --run-dir runs/digits --steps 300   # resumes at 120
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from trainguard import CheckpointManager, RNGState, keep_best, keep_last

BATCH = 64


def load_data(device: torch.device):
    digits = load_digits()  # ships inside scikit-learn: no download
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    split = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = split[:1500], split[1500:]
    return x[train].to(device), y[train].to(device), x[val].to(device), y[val].to(device)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.1), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def batch_indices(step: int, n: int, seed: int = 0) -> torch.Tensor:
    """The data position is a pure function of the step: resuming at step k sees the same
    batches an uninterrupted run would (one fixed shuffle per epoch)."""
    per_epoch = n // BATCH
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[i * BATCH:(i + 1) * BATCH]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/digits")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this step's checkpoint (simulates a preemption)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  [trainguard] %(message)s")

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x_train, y_train, x_val, y_val = load_data(device)
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler,
             "rng": RNGState(), "step": 0}

    ckpt = CheckpointManager(args.run_dir, keep=keep_last(3) | keep_best(1, "val_loss"))
    if ckpt.latest_valid() is not None:
        ckpt.restore(state)  # always resume when something is there
        print(f"resumed at step {state['step']}")
    else:
        print("fresh start")

    last_time, last_step = time.monotonic(), state["step"]
    for step in range(state["step"] + 1, args.steps + 1):
        idx = batch_indices(step - 1, len(x_train)).to(device)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        state["step"] = step
        if step % args.save_every == 0 or step == args.steps or step == args.stop_after:
            val_loss, val_acc = evaluate(model, x_val, y_val)
            now = time.monotonic()
            rate = (step - last_step) / (now - last_time)
            last_time, last_step = now, step
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}  val_loss {val_loss:.4f}"
                  f"  val_acc {val_acc:.3f}  {rate:.0f} steps/s")
            reason = "final" if step == args.steps else "periodic"
            ckpt.save(step, state, metrics={"val_loss": val_loss, "val_acc": val_acc},
                      reason=reason)
        if step == args.stop_after:
            print(f"stopping after step {step} (simulated preemption)")
            break
    ckpt.close()


if __name__ == "__main__":
    main()
