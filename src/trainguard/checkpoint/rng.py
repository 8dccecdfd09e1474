"""Random number generator state as a checkpointable object."""

from __future__ import annotations

import random

import numpy as np
import torch


class RNGState:
    """The global RNG streams of python, numpy, torch (CPU) and every CUDA device.

    Put one in the state you save (``{"rng": RNGState(), ...}``): after a restore, each
    stream continues exactly where it was at the save, so dropout masks and shuffles of a
    resumed run match an uninterrupted one.
    """

    def state_dict(self) -> dict:
        """Capture the current state of every global generator."""
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Set every generator present in ``state`` (missing CUDA devices are skipped)."""
        random.setstate(_as_tuple(state["python"]))
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"].cpu())
        cuda_states = state.get("cuda") or []
        if cuda_states and torch.cuda.is_available():
            for i, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state.cpu(), i)


def _as_tuple(value: object) -> object:
    """random.setstate needs tuples all the way down."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
