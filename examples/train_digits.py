"""A small CNN on scikit-learn's bundled 8x8 digits, guarded by ``trainguard.run.Run``.

Runs on CPU in seconds and unchanged on a GPU. Run it twice with the same --run-dir and
the second run resumes exactly where the first one's last commit left off: model,
optimizer, scheduler, RNG streams and the position in the shuffled data.

    python examples/train_digits.py --run-dir runs/digits --steps 300 --preempt-at 120
    echo $?    # 75 (EXIT_RESUME): preempted, step 120 committed, "restart me"
    python examples/train_digits.py --run-dir runs/digits --steps 300   # resumes at 120

--preempt-at sends this process a real SIGTERM after that step, as Slurm or Kubernetes
would before a preemption: the Run finishes the step, commits it, and exits with 75.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from sklearn.datasets import load_digits
from torch import nn

from trainguard import keep_best, keep_last
from trainguard.run import ResumableLoader, Run


def load_data() -> tuple[torch.utils.data.TensorDataset, torch.Tensor, torch.Tensor]:
    digits = load_digits()  # ships inside scikit-learn: no download
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    split = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = split[:1500], split[1500:]
    return torch.utils.data.TensorDataset(x[train], y[train]), x[val], y[val]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.1), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=os.environ.get("TRAINGUARD_RUN_DIR", "runs/digits"),
                        help="default: $TRAINGUARD_RUN_DIR (set by `trainguard run`), "
                             "else runs/digits")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=25, help="also the eval interval")
    parser.add_argument("--preempt-at", type=int, default=None,
                        help="send this process SIGTERM after this step (a real preemption)")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_set, x_val, y_val = load_data()
    x_val, y_val = x_val.to(device), y_val.to(device)
    loader = ResumableLoader(train_set, batch_size=64, shuffle=True, seed=0, drop_last=True)
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    with Run(args.run_dir, save_every_steps=args.save_every, save_every_seconds=600,
             keep=keep_last(3) | keep_best(1, "val_loss", "min"),
             log_every_steps=args.save_every) as run:
        run.track(model=model, optimizer=optimizer, scheduler=scheduler, data=loader)
        for step, (x, y) in run.steps(args.steps, data=loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            run.log(loss=loss, lr=scheduler.get_last_lr()[0])
            if step % args.save_every == 0 or step == args.steps:
                with run.phase("validate"):
                    val_loss, val_acc = evaluate(model, x_val, y_val)
                run.log(val_loss=val_loss, val_acc=val_acc)  # lands in this step's checkpoint
            if step == args.preempt_at:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the Run at the step's end


if __name__ == "__main__":
    main()
