"""Compiled loops of the sound-level meter (numba; imported only where levels are measured).

The frequency weighting is a recursion over every sample, which numpy cannot vectorise and
``scipy.signal.lfilter`` runs at about 7 ns a sample and pass, writing each weighted signal out.
:func:`weigh` runs the C weighting and the section that turns C into A in one pass, each section
in direct form I, and sums the squares of A, C and Z per block and of A per time-weighting step as
it goes: nothing the size of the signal is written unless asked for. Its output equals
``scipy.signal.sosfilt`` of the same sections to rounding (tested).
"""

from __future__ import annotations

import numba
import numpy as np


def _compiled(function):
    """``function`` compiled on first call, cached beside this module (or in the user's cache
    folder when the package is read-only: numba's locators); compiled per process where neither
    is writable, rather than failing."""
    options = {"nogil": True, "fastmath": {"contract"}}
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(**options)(function)


@_compiled
def weigh(x, sections, bounds, step, first, n_steps, signals):  # pragma: no cover - compiled
    """The C and A weighting of ``x`` and the sums of squares a meter needs.

    Args:
        x: float64 ``[n]`` samples.
        sections: float64 ``[3, 6]``: the two C sections, then the C-to-A section
            (``[b0 b1 b2 1 a1 a2]`` each).
        bounds: int64 ``[n_blocks + 1]``: blocks ``[bounds[i], bounds[i + 1])`` of ``x`` whose
            squares are summed (increasing; samples before ``bounds[0]`` only settle the filters).
        step: Samples per time-weighting step.
        first: Index of the first step's first sample.
        n_steps: Steps to sum (``first + n_steps * step <= len(x)``).
        signals: float64 ``[2, n]`` to receive the C and A signals, or ``[0, 0]`` for none.

    Returns:
        ``(sums, steps)``: float64 ``[n_blocks, 3]`` sums of squares of A, C and Z per block, and
        float64 ``[n_steps]`` sums of squares of A per step.
    """
    n_blocks = bounds.shape[0] - 1
    sums = np.zeros((n_blocks, 3))
    steps = np.zeros(n_steps)
    keep = signals.shape[0] == 2
    end = x.shape[0]
    if not keep:
        end = max(bounds[n_blocks], first + n_steps * step)
    p0, p1, p2, p4, p5 = sections[0, 0], sections[0, 1], sections[0, 2], sections[0, 4], sections[0, 5]
    q0, q1, q2, q4, q5 = sections[1, 0], sections[1, 1], sections[1, 2], sections[1, 4], sections[1, 5]
    r0, r1, r2, r4, r5 = sections[2, 0], sections[2, 1], sections[2, 2], sections[2, 4], sections[2, 5]
    x1 = x2 = u1 = u2 = c1 = c2 = a1 = a2 = 0.0
    block = 0
    while block < n_blocks and bounds[block + 1] <= bounds[block]:
        block += 1  # empty blocks sum nothing
    step_index = 0
    i = 0
    # runs of samples that share one block and one step, each summed in registers
    while i < end:
        stop = end
        in_block = False
        if n_blocks > 0 and i < bounds[0]:
            stop = min(stop, bounds[0])
        elif block < n_blocks:
            in_block = True
            stop = min(stop, bounds[block + 1])
        in_step = False
        if i < first:
            stop = min(stop, first)
        elif step_index < n_steps:
            in_step = True
            stop = min(stop, first + (step_index + 1) * step)
        sa = sc = sx = 0.0
        for j in range(i, stop):
            x0 = x[j]
            u0 = (p0 * x0 + p1 * x1 + p2 * x2 - p5 * u2) - p4 * u1
            c0 = (q0 * u0 + q1 * u1 + q2 * u2 - q5 * c2) - q4 * c1
            a0 = (r0 * c0 + r1 * c1 + r2 * c2 - r5 * a2) - r4 * a1
            if keep:
                signals[0, j] = c0
                signals[1, j] = a0
            sa += a0 * a0
            sc += c0 * c0
            sx += x0 * x0
            x2 = x1
            x1 = x0
            u2 = u1
            u1 = u0
            c2 = c1
            c1 = c0
            a2 = a1
            a1 = a0
        if in_block:
            sums[block, 0] += sa
            sums[block, 1] += sc
            sums[block, 2] += sx
            if stop == bounds[block + 1]:
                block += 1
                while block < n_blocks and bounds[block + 1] <= bounds[block]:
                    block += 1
        if in_step:
            steps[step_index] += sa
            if stop == first + (step_index + 1) * step:
                step_index += 1
        i = stop
    return sums, steps


@_compiled
def exponential(values, alpha, initial):  # pragma: no cover - compiled
    """``y[i] = alpha * values[i] + (1 - alpha) * y[i - 1]`` with ``y[-1] = initial`` (float64)."""
    out = np.empty(values.shape[0])
    y = initial
    keep = 1.0 - alpha
    for i in range(values.shape[0]):
        y = alpha * values[i] + keep * y
        out[i] = y
    return out
