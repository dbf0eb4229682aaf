"""The one progress convention: people read stderr, programs read stdout.

Human progress (one line per phase, `say`) and bars (`bar`, tqdm) go to stderr, so stdout holds
only a command's result: the run folder, the files written, or one JSON object under `--json`.
"""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    """One progress line on stderr, flushed at once (a long phase must show it has started)."""
    print(msg, file=sys.stderr, flush=True)


def quiet(_msg: str) -> None:
    """A `say` that says nothing: for non-main processes and library callers that want silence."""


def bar(total: int, initial: int = 0, desc: str = "", unit: str = "it"):
    """A tqdm bar on stderr (ncols follow the terminal; refreshed at most once a second)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)
