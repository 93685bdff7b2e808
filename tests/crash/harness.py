"""Test harness edge: run the ``safehaven`` command and ``kill -9`` it at a chosen point.

``python -m tests.crash.harness TARGET NTH WHEN -- <safehaven arguments>`` wraps ``TARGET``
(``module:attr`` or ``module:Class.attr``) so that its ``NTH`` call sends SIGKILL to this very
process, ``before`` or ``after`` the call, or ``inside`` it (a context manager: once it has
been entered, e.g. a store connection that holds the file lock and the step's pool slot).
``WHEN=trace`` kills nothing and prints each call's number to stderr (to choose points).

Only tests run this module: no code of the haven reads it, so the kill is a real SIGKILL of a
real ``safehaven run`` with nothing stubbed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(original: Callable[..., Any], nth: int, when: str) -> Callable[..., Any]:
    calls = 0

    if when == "inside":

        @contextlib.contextmanager
        def inside(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            with original(*args, **kwargs) as value:
                if calls == nth:
                    _die()
                yield value

        return inside

    @functools.wraps(original)
    def around(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if when == "trace":
            print(f"crash-harness: call {calls}", file=sys.stderr, flush=True)
        if calls == nth and when == "before":
            _die()
        result = original(*args, **kwargs)
        if calls == nth and when == "after":
            _die()
        return result

    return around


def arm(target: str, nth: int, when: str) -> None:
    """Replace ``target`` by a wrapper that kills this process at its ``nth`` call."""
    module_name, _, attr = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, name, _wrap(getattr(owner, name), nth, when))


def main(argv: list[str]) -> None:
    target, nth, when, sep, *rest = argv
    assert sep == "--" and when in ("before", "after", "inside", "trace"), argv
    arm(target, int(nth), when)
    from safehaven.cli.main import main as safehaven

    safehaven(rest, prog_name="safehaven")


if __name__ == "__main__":
    main(sys.argv[1:])
