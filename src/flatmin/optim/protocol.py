"""The step protocol as a small state machine that refuses misuse, naming the call that fixes it:

    begin_step()  →  perturb() × ascent_passes()  →  restore_and_step()

(with m-sharpness, ``next_split()`` between one sub-batch's final pass and the next one's ascent).
`StepState` only counts and checks; `PerturbedOptimizer` calls it at each transition.
"""

from __future__ import annotations


class StepState:
    """Where the current step stands: begun or not, ascent passes taken, gradient passes finished."""

    def __init__(self) -> None:
        self.begun = False  # a step is under way (begin_step .. restore_and_step)
        self.ascents = 0  # ascent passes taken in the current (sub-batch's) step
        self.passes = 0  # gradient passes finished in the step (ascents, sub-batches' final passes)

    def begin(self, name: str) -> None:
        """A step starts; refused while one is under way."""
        if self.begun:
            raise RuntimeError(f"{name}.begin_step(): a step is already under way; finish it "
                               "with restore_and_step() (or abandon it with restore())")
        self.begun, self.ascents, self.passes = True, 0, 0

    def can_ascend(self, name: str, allowed: int) -> None:
        """One more ascent pass; refused past the rule's ``allowed`` passes."""
        if self.ascents >= allowed:
            raise RuntimeError(
                f"{name}.perturb() called {self.ascents + 1} times in one step, but this "
                f"step makes {allowed} ascent pass(es); after the final backward call "
                "restore_and_step() (SAM: second_step())")

    def ascended(self) -> None:
        """An ascent pass was taken."""
        self.ascents += 1
        self.passes += 1

    def next_split(self, name: str, allowed: int) -> None:
        """A sub-batch finished (its ascent passes and final pass); the next one ascends from θ."""
        if not self.begun or self.ascents < allowed:
            raise RuntimeError(f"{name}.next_split() before this sub-batch's ascent and final "
                               "pass: call it between a final backward and the next sub-batch's ascent")
        self.ascents = 0
        self.passes += 1

    def can_finish(self, name: str, allowed: int) -> None:
        """The final call of a step; refused with no step under way or an ascent pass missing."""
        if not self.begun:
            raise RuntimeError(
                f"{name}.restore_and_step() with no step under way: call perturb() after the "
                "ascent backward (begin_step() for rules that perturb first), then the final backward")
        if self.ascents < allowed:
            raise RuntimeError(
                f"{name}.restore_and_step() after {self.ascents} of {allowed} "
                "ascent pass(es): call perturb() after each ascent backward first")

    def end(self) -> None:
        """No step under way any more."""
        self.begun, self.ascents, self.passes = False, 0, 0
