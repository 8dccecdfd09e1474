"""The torchrun backend: one attempt = ``python -m torch.distributed.run ... SCRIPT``.

The supervisor runs that command like any other attempt, so retries, the per-attempt
timeout, hang detection (rank 0's heartbeat in the run directory) and graceful stop
(SIGTERM, which torchrun forwards to every worker) hold unchanged. Inside an attempt,
torchrun's elastic agent restarts the workers up to ``max_restarts`` times; each restart
resumes from the newest commit (``trainguard.Run`` restores the same step on every rank).

torchrun exits 1 whenever a worker exits non-zero, so its own code cannot tell "every
worker saved and asked to be resumed" (each exited ``EXIT_RESUME``) from a crash. Every
worker therefore starts through an entry module (:data:`WORKER_ENTRY`, or Modal's) that
runs the script and records the script's exit code in ``$TRAINGUARD_EXIT_DIR``, one file
per local rank (:func:`exit_record`); whoever ran torchrun reads them back
(:func:`worker_codes`) and derives the node's outcome (:func:`node_exit_code`).

Several nodes meet either at a c10d rendezvous endpoint (``rdzv_endpoint``, elastic) or,
where a platform hands every node its rank and rank 0's address (Modal clusters), through
torchrun's static rendezvous (``node_rank`` + ``master_addr``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from trainguard.run import EXIT_RESUME

_ENDPOINT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")
_NNODES = re.compile(r"^\d+(:\d+)?$")

#: The module every local torchrun worker starts with (``launch/worker.py``).
WORKER_ENTRY = "trainguard.launch.worker"
#: The directory where the workers record their exit codes (set by whoever runs torchrun).
ENV_EXITS = "TRAINGUARD_EXIT_DIR"
_RECORD = "local-rank-"


@dataclass(frozen=True)
class TorchrunConfig:
    """How torchrun starts the workers of one attempt.

    Attributes:
        nproc_per_node: worker processes per node (usually one per GPU).
        nnodes: ``"M"`` or an elastic range ``"MIN:MAX"``.
        rdzv_endpoint: ``host:port`` of the rendezvous (required when nnodes is not 1).
        max_restarts: elastic restarts of the workers inside one attempt.
        node_rank: this node's rank, for the static rendezvous (with ``master_addr``).
        master_addr: rank 0's address, for the static rendezvous (IPv6 in brackets).
        master_port: the port rank 0 listens on, for the static rendezvous.

    Raises:
        ValueError: a value torchrun would refuse, naming it and the fix.
    """

    nproc_per_node: int
    nnodes: str = "1"
    rdzv_endpoint: str | None = None
    max_restarts: int = 0
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int = 29500

    def __post_init__(self) -> None:
        if not isinstance(self.nproc_per_node, int) or self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be an int >= 1, got {self.nproc_per_node!r}")
        object.__setattr__(self, "nnodes", str(self.nnodes))
        if not _NNODES.match(self.nnodes):
            raise ValueError(f"nnodes must be 'M' or 'MIN:MAX', got {self.nnodes!r}")
        if self.master_addr is not None:
            self._check_static()
        elif self.nnodes != "1" and not self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs a rendezvous endpoint that every "
                             f"node reaches: --rdzv-endpoint HOST:PORT")
        if self.rdzv_endpoint is not None and not _ENDPOINT.match(self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {self.max_restarts!r}")

    def _check_static(self) -> None:
        """The static rendezvous: a fixed node count, this node's rank, rank 0's address."""
        if self.rdzv_endpoint is not None:
            raise ValueError("use either rdzv_endpoint (c10d rendezvous) or master_addr "
                             "(static rendezvous), not both")
        if not self.nnodes.isdigit() or int(self.nnodes) < 1:
            raise ValueError(f"the static rendezvous needs a fixed node count, got "
                             f"nnodes={self.nnodes!r}")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < int(self.nnodes):
            raise ValueError(f"node_rank must be an int in 0..{int(self.nnodes) - 1}, got "
                             f"{self.node_rank!r}")
        if not self.master_addr or any(c.isspace() for c in self.master_addr):
            raise ValueError(f"master_addr must be rank 0's address, got {self.master_addr!r}")
        if not isinstance(self.master_port, int) or not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port must be a port number, got {self.master_port!r}")

    def args(self) -> list[str]:
        """torchrun's own arguments (before the script)."""
        out = ["--nproc-per-node", str(self.nproc_per_node),
               "--max-restarts", str(self.max_restarts)]
        if self.master_addr is not None:  # torchrun's default rendezvous backend is static
            return [*out, "--nnodes", self.nnodes, "--node-rank", str(self.node_rank),
                    "--master-addr", self.master_addr, "--master-port", str(self.master_port)]
        if self.rdzv_endpoint is None:
            return ["--standalone", *out]  # one node: a local rendezvous on a free port
        return [*out, "--nnodes", self.nnodes, "--rdzv-backend", "c10d",
                "--rdzv-endpoint", self.rdzv_endpoint]


#: How long torchrun lets its workers shut down after passing on a signal before it
#: SIGKILLs them (torch >= 2.10 reads it; its own default, 30 s, would cut a save short).
ENV_SHUTDOWN_TIMEOUT = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
#: "1": each restart round's rank 0 hosts a fresh store. torchrun otherwise reuses one
#: store across the rounds of its elastic restarts, and the new round's workers read the
#: dead round's gloo addresses: "connectFullMesh ... Connection refused" or a hang
#: (pytorch/pytorch#135712; 0 of 3 restarts worked here without it, 3 of 3 with it).
ENV_FRESH_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def torchrun_env(grace: float) -> dict[str, str]:
    """Environment of a torchrun attempt: a graceful stop of ``grace`` seconds (torchrun
    does not SIGKILL a saving worker before the launcher's own grace runs out), and
    elastic restarts that re-form their process groups."""
    return {ENV_SHUTDOWN_TIMEOUT: str(max(30, int(grace))), ENV_FRESH_STORE: "1"}


def torchrun_command(python: str, script: str, args: tuple[str, ...] | list[str],
                     config: TorchrunConfig, *, entry: str = WORKER_ENTRY) -> list[str]:
    """The command line of one torchrun attempt: each worker runs
    ``python -m ENTRY SCRIPT ARGS``, which runs the script and records its exit code.

    Args:
        python: the interpreter.
        script: the workers' script.
        args: the workers' arguments.
        config: how torchrun starts the workers.
        entry: the workers' entry module (Modal's registers its volume first).
    """
    return [python, "-m", "torch.distributed.run", *config.args(), "--module", entry, script,
            *args]


def exit_record(exit_dir: str | os.PathLike, local_rank: int | str) -> Path:
    """The file in which the worker of ``local_rank`` records its exit code."""
    return Path(exit_dir, f"{_RECORD}{local_rank}")


def worker_codes(exit_dir: str | os.PathLike) -> dict[int, int]:
    """Local rank -> exit code, as this node's workers recorded them. A worker that was
    killed (or never started) has no record; an unreadable record counts as none."""
    codes = {}
    for path in Path(exit_dir).glob(f"{_RECORD}*"):
        try:
            codes[int(path.name.removeprefix(_RECORD))] = int(path.read_text())
        except ValueError:
            continue
    return dict(sorted(codes.items()))


def node_exit_code(torchrun_code: int, workers: dict[int, int], nproc_per_node: int) -> int:
    """This node's exit code: torchrun's, except that a node whose every worker exited
    ``EXIT_RESUME`` was preempted (torchrun reports 1 whenever a worker exits non-zero).

    A mixed outcome (some workers 75, one failed, finished or died without a record) is
    torchrun's code, a failure: the workers did not all commit and stop at the same step.
    """
    if torchrun_code != 0 and len(workers) == nproc_per_node and set(workers.values()) == {
            EXIT_RESUME}:
        return EXIT_RESUME
    return torchrun_code


def describe_workers(workers: dict[int, int], nproc_per_node: int | None = None) -> str:
    """``"workers by local rank: {0: 75, 1: 3}"``, naming the ranks that recorded nothing."""
    text = f"workers by local rank: {dict(sorted(workers.items()))}"
    missing = [r for r in range(nproc_per_node or 0) if r not in workers]
    if missing:
        text += f"; none recorded by {', '.join(map(str, missing))} (killed?)"
    return text
