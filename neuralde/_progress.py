"""A text progress meter driven from compiled code by `jax.debug.callback`.

The loop reports the fraction of ``[t0, t1]`` done; the meter redraws at most
ten times a second (and at the end) so that it costs little even when called
every step. Under `jax.vmap` the callback runs once per batch element, and the
meter shows the latest report.
"""
from __future__ import annotations

import sys
import time

_WIDTH = 30
_state = {"last_draw": 0.0, "open": False, "last_frac": -1.0}


def _draw(frac: float) -> None:
    filled = int(round(_WIDTH * frac))
    bar = "#" * filled + "-" * (_WIDTH - filled)
    sys.stderr.write(f"\rneuralde.solve [{bar}] {100.0 * frac:5.1f}%")
    sys.stderr.flush()


def update(frac) -> None:
    frac = float(min(max(float(frac), 0.0), 1.0))
    now = time.monotonic()
    if not _state["open"]:
        _state.update(open=True, last_draw=0.0)
    if now - _state["last_draw"] >= 0.1 or frac in (0.0, 1.0):
        _draw(frac)
        _state["last_draw"] = now
    _state["last_frac"] = frac


def finish(frac) -> None:
    _draw(float(min(max(float(frac), 0.0), 1.0)))
    sys.stderr.write("\n")
    sys.stderr.flush()
    _state.update(open=False, last_draw=0.0, last_frac=-1.0)
