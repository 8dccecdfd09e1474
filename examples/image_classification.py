"""Image classification of handwritten digits with a small CNN.

One script in two forms: ``examples/plain/image_classification.py`` is plain PyTorch
and ``examples/image_classification.py`` its port to trainguard; ``diff -u`` them and
every changed line is the port. The port can be killed at any moment (Ctrl-C, SIGTERM,
kill -9) and rerun with the same command: it continues after its last commit, mid-epoch
included, and ends with the weights of an uninterrupted run, bit for bit (the random
augmentation in the data loader's worker processes included). At the end it loads the
epoch with the lowest test loss before saving the model.

The script has the shape of the classic MNIST example: a two-convolution network with
dropout, Adadelta with a StepLR schedule, a shuffled DataLoader with worker processes,
one ``train`` and one ``test`` pass per epoch. The data are scikit-learn's 8x8 digits
(bundled with it: no download), shifted by up to one pixel at random for training.

    python examples/image_classification.py --epochs 8 --save-model
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn, optim
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, Dataset

from trainguard.run import Run


class Digits(Dataset):
    """1500 training or 297 test images of scikit-learn's digits, 1x8x8 in [0, 1]."""

    def __init__(self, train: bool, augment: bool = False) -> None:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        keep = order[:1500] if train else order[1500:]
        self.images, self.labels = images[keep], torch.tensor(digits.target)[keep]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.augment:  # a random shift by up to one pixel in each direction
            dx, dy = torch.randint(0, 3, (2,)).tolist()
            image = F.pad(image, (1, 1, 1, 1))[:, dy:dy + 8, dx:dx + 8]
        return (image - 0.3) / 0.35, self.labels[i]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, padding=1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def train(args, model, device, train_loader, optimizer, epoch) -> None:
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)} "
                  f"({100.0 * batch_idx / len(train_loader):.0f}%)]\tLoss: {loss.item():.6f}",
                  flush=True)
            if args.dry_run:
                break


def test(model, device, test_loader) -> float:
    model.eval()
    test_loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += (output.argmax(dim=1) == target).sum().item()
    test_loss /= len(test_loader.dataset)
    print(f"\nTest set: Average loss: {test_loss:.4f}, Accuracy: {correct}/"
          f"{len(test_loader.dataset)} ({100.0 * correct / len(test_loader.dataset):.0f}%)\n",
          flush=True)
    return test_loss


def main() -> None:
    parser = argparse.ArgumentParser(description="Digits classification with a small CNN")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--test-batch-size", type=int, default=500, help="test batch size")
    parser.add_argument("--epochs", type=int, default=8, help="epochs to train")
    parser.add_argument("--lr", type=float, default=1.0, help="learning rate")
    parser.add_argument("--gamma", type=float, default=0.7, help="learning rate step gamma")
    parser.add_argument("--no-accel", action="store_true", help="train on the CPU")
    parser.add_argument("--dry-run", action="store_true", help="one batch per epoch")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--log-interval", type=int, default=5, help="batches between logs")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--save-dir", default=os.environ.get("TRAINGUARD_RUN_DIR",
                                                             "runs/digits_cnn"),
                        help="where the model goes")
    parser.add_argument("--save-model", action="store_true", help="save the trained model")
    args = parser.parse_args()

    use_accel = not args.no_accel and torch.cuda.is_available()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if use_accel else "cpu")
    train_kwargs = {"batch_size": args.batch_size, "shuffle": True, "num_workers": args.workers,
                    "pin_memory": use_accel}
    train_loader = DataLoader(Digits(train=True, augment=True), **train_kwargs)
    test_loader = DataLoader(Digits(train=False), batch_size=args.test_batch_size)

    model = Net().to(device)
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    with Run(args.save_dir, save_every_steps=10) as run:
        run.track(model=model, optimizer=optimizer, scheduler=scheduler, data=train_loader)
        for epoch in run.epochs(1, args.epochs + 1):
            train(args, model, device, run.batches(train_loader), optimizer, epoch)
            run.log(test_loss=test(model, device, test_loader))
            scheduler.step()
        run.restore_best("test_loss")

    if args.save_model:
        os.makedirs(args.save_dir, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(args.save_dir, "digits_cnn.pt"))


if __name__ == "__main__":
    main()
