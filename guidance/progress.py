"""The one progress shape of the pack: every long loop reports a :class:`Step` to a :data:`Progress`.

A method, an evaluation pass, a training run or a dataset worker calls ``progress(Step(done, total, text,
detail))``: ``done`` of ``total`` units of its own work (sampling steps, optimisation iterations, images), a line of
text for the node, and ``detail`` for what a particular front end can draw (FSAP's live curve reads
``detail["history"]``, training's ``detail["loss"]``). Nodes turn Steps into ComfyUI's progress bar, the text under
the node and a Cancel check (``nodes/common.py`` ``StepProgress``); command lines print them. :func:`report` sends
one without a receiver; :func:`within` maps a part's Steps into the whole it is part of (face 2 of 3, photo 4 of 10).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping


@dataclass(frozen=True)
class Step:
    """``done`` of ``total`` units of work, a line of text and what else a receiver may draw."""
    done: int
    total: int
    text: str = ""
    detail: Mapping = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return min(max(self.done / self.total, 0.0), 1.0) if self.total > 0 else 0.0


Progress = Callable[[Step], None]


def report(progress: Progress | None, done: int, total: int, text: str = "", **detail) -> None:
    """``progress(Step(done, total, text, detail))`` when there is a receiver."""
    if progress is not None:
        progress(Step(int(done), int(total), text, detail))


def within(progress: Progress | None, part: int, parts: int, label: str = "") -> Progress | None:
    """The Progress of part ``part`` (0-based) of ``parts`` equal parts of a larger run: its Steps arrive at
    ``progress`` as a share of the whole (units: the part's total times ``parts``), the text prefixed with
    ``label`` ("face 2/3: ...")."""
    if progress is None:
        return None
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}: a part must lie in 0..parts-1")

    def inner(step: Step) -> None:
        total = max(step.total, 1)
        text = f"{label}: {step.text}" if label and step.text else (label or step.text)
        progress(Step(part * total + min(step.done, total), parts * total, text, step.detail))
    return inner
