"""Where a Run is in its loop: between steps, inside one, or closed.

Not checkpointed (that is :mod:`trainguard.run.state`): this is the in-process
bookkeeping that ``run.steps()``, ``run.batches()``, ``run.log()`` and the save paths
share. Every change goes through a named transition, and a transition from the wrong
stage raises ``RuntimeError`` naming both stages::

    BETWEEN --begin(done + 1)--> IN_STEP --complete()--> BETWEEN   (done += 1)
                                 IN_STEP --abandon()---> BETWEEN   (done unchanged)
                                 IN_STEP --roll_back(s)-> BETWEEN  (done = s)
    BETWEEN --start_at(s)--> BETWEEN                               (a resume: done = s)
    any     --close()------> CLOSED                                (the Run has exited)

Invariant: ``current == done + 1`` while IN_STEP. A loop body left with ``break`` leaves
the cycle IN_STEP until the Run settles that step (``Run._settle_left_step``).
"""

from __future__ import annotations

import enum


class Stage(enum.Enum):
    """The stages of a :class:`StepCycle`."""

    BETWEEN = "between steps"
    IN_STEP = "inside a step"
    CLOSED = "closed"


class StepCycle:
    """The Run's step counter and what the running step has recorded so far.

    Attributes are read-only; the methods below are the only way to change them.
    """

    def __init__(self) -> None:
        self._stage = Stage.BETWEEN
        self._done = 0  # last completed step
        # The running step while IN_STEP; then the step last begun or placed at (after
        # abandon() it stays the abandoned step, whose values describe no checkpoint).
        self._current = 0
        self._values: dict[str, float] = {}  # logged since the step began (keep_best)
        self._nonfinite: float | None = None  # the step's non-finite metric value
        self._phase_ran = False  # a run.phase() ran in the step: log its metrics line
        self._samples = 0  # samples in the step's batch
        self._first_end_claimed = False

    # -- reads -------------------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        """The current stage."""
        return self._stage

    @property
    def in_step(self) -> bool:
        """Whether a step's body is running (or was left with ``break``, unsettled)."""
        return self._stage is Stage.IN_STEP

    @property
    def done(self) -> int:
        """The last completed (or restored) step."""
        return self._done

    @property
    def step(self) -> int:
        """The running step inside a step, else the last completed step."""
        return self._current if self._stage is Stage.IN_STEP else self._done

    @property
    def nonfinite(self) -> float | None:
        """The non-finite value of the watched metric logged in this step, if any."""
        return self._nonfinite

    @property
    def phase_ran(self) -> bool:
        """Whether a ``run.phase()`` ran during this step."""
        return self._phase_ran

    @property
    def samples(self) -> int:
        """Samples in the batch of the running (or last completed) step."""
        return self._samples

    def values_for(self, step: int) -> dict[str, float]:
        """The values logged during ``step``, the one running or just ended; else ``{}``.

        Only values logged in the very step describe its checkpoint (``keep_best``);
        between steps of an epoch loop the epoch-end values join the last step's.
        """
        return self._values if self._current == step else {}

    # -- transitions -------------------------------------------------------------------

    def start_at(self, step: int) -> None:
        """Place the cycle at ``step`` before any step runs (the step resumed from).

        Raises:
            RuntimeError: not between steps.
        """
        self._require(Stage.BETWEEN, "start at a resumed step")
        self._done = self._current = step

    def begin(self, step: int) -> None:
        """Start ``step``'s body; what the previous step recorded is cleared.

        Raises:
            RuntimeError: not between steps, or ``step`` is not the one after ``done``.
        """
        self._require(Stage.BETWEEN, f"begin step {step}")
        if step != self._done + 1:
            raise RuntimeError(f"cannot begin step {step}: the next step after step "
                               f"{self._done} is {self._done + 1}")
        self._stage, self._current = Stage.IN_STEP, step
        self._values, self._nonfinite, self._phase_ran, self._samples = {}, None, False, 0

    def count_samples(self, samples: int) -> None:
        """Record how many samples the running step's batch holds (for samples/s).

        Raises:
            RuntimeError: not inside a step.
        """
        self._require(Stage.IN_STEP, "count the samples of a step")
        self._samples = samples

    def record(self, values: dict[str, float]) -> None:
        """Add logged values to the running (or just ended) step's values."""
        self._values.update(values)

    def mark_nonfinite(self, value: float) -> None:
        """The watched metric came out non-finite: the running step is to roll back.

        Between steps (epoch-end work) there is no step to undo, and nothing is marked.
        """
        if self._stage is Stage.IN_STEP:
            self._nonfinite = value

    def note_phase(self) -> None:
        """A ``run.phase()`` ran in the running step (its metrics line is written).

        Between steps it concerns no step, and nothing is noted.
        """
        if self._stage is Stage.IN_STEP:
            self._phase_ran = True

    def complete(self) -> int:
        """The running step's body finished: count it as done.

        Returns:
            The completed step.

        Raises:
            RuntimeError: not inside a step.
        """
        self._require(Stage.IN_STEP, "complete a step")
        self._stage, self._done = Stage.BETWEEN, self._current
        return self._done

    def abandon(self) -> None:
        """Leave the running step without counting it (a non-finite step left with
        ``break``). Its values stay its own: they describe no checkpoint of ``done``.

        Raises:
            RuntimeError: not inside a step.
        """
        self._require(Stage.IN_STEP, "abandon a step")
        self._stage = Stage.BETWEEN

    def roll_back(self, step: int) -> None:
        """The running step rolled the state back to checkpoint ``step``.

        Raises:
            RuntimeError: not inside a step.
        """
        self._require(Stage.IN_STEP, f"roll back to step {step}")
        self._stage, self._done, self._current = Stage.BETWEEN, step, step

    def claim_first_end(self) -> bool:
        """True once: for the first step that ends through the loop in this process
        (after it the optimizer's moments exist, so the whole state can be sized)."""
        first, self._first_end_claimed = not self._first_end_claimed, True
        return first

    def close(self) -> None:
        """The Run has exited: no step can begin any more."""
        self._stage = Stage.CLOSED

    def _require(self, stage: Stage, what: str) -> None:
        if self._stage is not stage:
            raise RuntimeError(f"cannot {what}: the run is {self._stage.value} (step "
                               f"{self._current}), not {stage.value}")

    def __repr__(self) -> str:
        return f"StepCycle({self._stage.name}, done={self._done}, current={self._current})"
