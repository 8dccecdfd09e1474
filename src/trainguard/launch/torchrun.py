"""The torchrun backend: one attempt = ``python -m torch.distributed.run ... SCRIPT``.

The supervisor runs that command like any other attempt, so retries, the per-attempt
timeout, hang detection (rank 0's heartbeat in the run directory) and graceful stop
(SIGTERM, which torchrun forwards to every worker) hold unchanged. Inside an attempt,
torchrun's elastic agent restarts the workers up to ``max_restarts`` times; each restart
resumes from the newest commit (``trainguard.Run`` restores the same step on every rank).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENDPOINT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")
_NNODES = re.compile(r"^\d+(:\d+)?$")


@dataclass(frozen=True)
class TorchrunConfig:
    """How torchrun starts the workers of one attempt.

    Attributes:
        nproc_per_node: worker processes per node (usually one per GPU).
        nnodes: ``"M"`` or an elastic range ``"MIN:MAX"``.
        rdzv_endpoint: ``host:port`` of the rendezvous (required when nnodes is not 1).
        max_restarts: elastic restarts of the workers inside one attempt.

    Raises:
        ValueError: a value torchrun would refuse, naming it and the fix.
    """

    nproc_per_node: int
    nnodes: str = "1"
    rdzv_endpoint: str | None = None
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.nproc_per_node, int) or self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be an int >= 1, got {self.nproc_per_node!r}")
        object.__setattr__(self, "nnodes", str(self.nnodes))
        if not _NNODES.match(self.nnodes):
            raise ValueError(f"nnodes must be 'M' or 'MIN:MAX', got {self.nnodes!r}")
        if self.nnodes != "1" and not self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs a rendezvous endpoint that every "
                             f"node reaches: --rdzv-endpoint HOST:PORT")
        if self.rdzv_endpoint is not None and not _ENDPOINT.match(self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {self.max_restarts!r}")

    def args(self) -> list[str]:
        """torchrun's own arguments (before the script)."""
        out = ["--nproc-per-node", str(self.nproc_per_node),
               "--max-restarts", str(self.max_restarts)]
        if self.rdzv_endpoint is None:
            return ["--standalone", *out]  # one node: a local rendezvous on a free port
        return [*out, "--nnodes", self.nnodes, "--rdzv-backend", "c10d",
                "--rdzv-endpoint", self.rdzv_endpoint]


def torchrun_command(python: str, script: str, args: tuple[str, ...] | list[str],
                     config: TorchrunConfig) -> list[str]:
    """The command line of one torchrun attempt."""
    return [python, "-m", "torch.distributed.run", *config.args(), script, *args]
