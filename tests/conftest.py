"""Shared fixtures: small deterministic training states."""

from __future__ import annotations

import pytest
import torch


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                               torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))


def train_steps(model, optimizer, scheduler=None, steps: int = 3, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=gen)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.fixture
def trained():
    """A model, AdamW and a scheduler after a few real steps (optimizer state populated)."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    train_steps(model, optimizer, scheduler)
    return model, optimizer, scheduler
