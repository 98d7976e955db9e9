"""Host time of `apar bench step` (bench/step.py): what a step spends outside the model.

The issue's budget for per-step Python work (scheduling, block tables, attention metadata,
sampling, APAR rules, outputs) is 5 % of a step at 64 running branches. A step's host time is
its wall time minus the time in the model's forward: the decoder body and the output head
(`ModelRunner._hidden` and the head on the lean path, the HF forward on the plain one).
"""

from __future__ import annotations

import time
from typing import Any


class ForwardClock:
    """Seconds an engine spends in its model, accumulated while in a `with` block."""

    def __init__(self, engine: Any) -> None:
        runner = engine.runner
        self._targets = [(runner, "_hidden"), (runner.model, "forward")]
        head = runner.model.get_output_embeddings()
        if head is not None:
            self._targets.append((head, "forward"))
        self._depth = 0
        self.seconds = 0.0

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            self._depth += 1  # the plain forward calls the head itself: count the outer call once
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start

        return timed

    def __enter__(self) -> ForwardClock:
        for obj, name in self._targets:
            setattr(obj, name, self._wrap(getattr(obj, name)))  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        for obj, name in self._targets:
            delattr(obj, name)

    def take(self) -> float:
        """The seconds since the last take."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds
