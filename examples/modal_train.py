"""A training script that runs the same way locally and on Modal.

Locally:   trainguard run examples/modal_train.py
On Modal:  trainguard run examples/modal_train.py --backend modal --gpu H100 --timeout 12h \
               --retries 5 --retry-delay 30 --volume my-runs --pip 'torch>=2.4' --detach
Plan only: trainguard run examples/modal_train.py --backend modal --volume my-runs --dry-run

``Run()`` reads ``TRAINGUARD_RUN_DIR`` (set by ``trainguard run``; on Modal it is a directory
on the volume, committed after every checkpoint), resumes from the newest committed
checkpoint, and saves + commits on SIGINT (Modal's preemption signal).
"""

import torch
from torch import nn

from trainguard import Run


def main(steps: int = 2000) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    with Run(save_every_steps=200, save_every_seconds=600) as run:
        run.track(model=model, optimizer=optimizer)
        for _step in run.steps(steps):
            x = torch.randn(128, 64, device=device)
            loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss=loss)


if __name__ == "__main__":
    main()
