"""What a Run checkpoints: the tracked objects plus the Run's own entry.

The state saved at every commit is ``{**tracked, "trainguard": {"run": counters,
"micro_batch": ..., "rng": RNGState()}}``. Everything in it is restored *in place*, so
the training script keeps using the same objects after a resume or a rollback.
"""

from __future__ import annotations

from typing import Any

import torch

from trainguard.checkpoint import RNGState
from trainguard.checkpoint.tree import is_stateful

#: Key of the Run's own entry in the checkpointed state.
RUN_KEY = "trainguard"


class RunCounters:
    """The Run's own checkpointed counters.

    Attributes:
        step: completed steps.
        samples: samples trained on (for samples/s across attempts).
        rollbacks: non-finite rollbacks so far (bounded by ``max_rollbacks``).
        skip_steps: steps whose batch is skipped (their loss was non-finite).
    """

    def __init__(self) -> None:
        self.step = 0
        self.samples = 0
        self.rollbacks = 0
        self.skip_steps: list[int] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples, "rollbacks": self.rollbacks,
                "skip_steps": list(self.skip_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        self.samples = int(state.get("samples", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.skip_steps = [int(s) for s in state.get("skip_steps", [])]


def build_state(objects: dict[str, Any], own: dict[str, Any], capture_rng: bool) -> dict:
    """The dict a Run saves: ``objects`` plus its own entry (and the RNG streams).

    Raises:
        TypeError: no objects, or one that cannot be restored in place (a bare int...).
        ValueError: an object named like the Run's own entry.
    """
    if not objects:
        raise TypeError("run.track() needs the objects to checkpoint, e.g. "
                        "run.track(model=model, optimizer=optimizer)")
    for name, obj in objects.items():
        if name == RUN_KEY:
            raise ValueError(f"run.track({RUN_KEY}=...): that name is the Run's own; pick "
                             f"another")
        if not (is_stateful(obj) or isinstance(obj, (torch.Tensor, dict, list))):
            raise TypeError(
                f"run.track({name}=...): a {type(obj).__name__} cannot be restored in place; "
                f"track an object with state_dict()/load_state_dict(), a tensor, or a dict "
                f"(run.track(counters={{'{name}': ...}}), read back via run.state)")
    own = dict(own)
    if capture_rng:
        own["rng"] = RNGState()
    return {**objects, RUN_KEY: own}
