"""What one more token costs in an engine step, learnt from the steps that ran.

A step's forward takes about c0 + c1 * T seconds for T tokens: c0 is reading the weights once
(batch-independent), c1 the compute per token. On a GPU c1 is near zero and drafts are almost
free; on this kind of CPU a 16-token step costs about 4 times a 1-token one, and drafts pay only
when they are likely kept. The speculator asks `worth`: is a draft kept with probability p worth
feeding, i.e. does it raise the step's expected tokens per second?
"""

from __future__ import annotations

from collections import deque

PRIOR_RATIO = 0.2  # c1 / c0 before enough steps were seen (a CPU-like guess: cautious)
MIN_SAMPLES = 8


class StepCost:
    def __init__(self, window: int = 256) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens fed, seconds)

    def add(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.samples.append((tokens, seconds))

    def coefficients(self) -> tuple[float, float]:
        """(c0, c1) by least squares over recent steps; the prior ratio while they cannot tell."""
        n = len(self.samples)
        if n == 0:
            return 1.0, PRIOR_RATIO
        mt = sum(t for t, _ in self.samples) / n
        ms = sum(s for _, s in self.samples) / n
        var = sum((t - mt) ** 2 for t, _ in self.samples)
        if n >= MIN_SAMPLES and var > 0:
            c1 = sum((t - mt) * (s - ms) for t, s in self.samples) / var
            c0 = ms - c1 * mt
            if c0 > 0 and c1 >= 0:
                return c0, c1
        c0 = ms / (1 + PRIOR_RATIO * mt)
        return c0, PRIOR_RATIO * c0

    def threshold(self, tokens: int, outputs: int) -> float:
        """The least acceptance probability a draft needs in a step that feeds `tokens` tokens
        and yields `outputs` tokens without it: (N + p) / (S + c1) > N / S  <=>  p > c1 N / S."""
        c0, c1 = self.coefficients()
        return c1 * outputs / (c0 + c1 * tokens)
