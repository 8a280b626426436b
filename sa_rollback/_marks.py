"""The ``sa_rollback`` marker, read strictly, and what it asks of a test's scope."""

from __future__ import annotations

import inspect
from typing import Optional

import pytest

from ._run import settings_key
from ._settings import switch
from .errors import ConfigurationError


def _marker_args(
    enabled: bool = True, real_commits: bool = False, *, reset_sequences: Optional[bool] = None
) -> tuple[bool, bool]:
    """The signature of ``@pytest.mark.sa_rollback``: one keyword per argument.

    :func:`read_marker` binds the marker to it and checks every argument
    (a switch: a bool, or on/off/true/false/1/0), so a new argument is one
    more keyword here. ``reset_sequences`` is read by :func:`resets_sequences`.
    """
    return enabled, real_commits


def read_marker(marker: pytest.Mark) -> tuple[bool, bool]:
    """The marker's arguments, strictly: ``"off"`` or a typo must not leave rollback on silently."""
    __tracebackhide__ = True
    shown = ", ".join([repr(a) for a in marker.args] + [f"{k}={v!r}" for k, v in marker.kwargs.items()])
    signature = inspect.signature(_marker_args)
    valid = ", ".join(f"{name}={param.default!r}" for name, param in signature.parameters.items())
    try:
        bound = signature.bind(*marker.args, **marker.kwargs)
    except TypeError as exc:
        raise ConfigurationError(f"@pytest.mark.sa_rollback({shown}): {exc}. Its arguments are: {valid}.") from None
    switches: dict[str, bool] = {}
    for name, value in bound.arguments.items():
        if isinstance(value, bool):
            switches[name] = value
        elif isinstance(value, str) and switch(value) is not None:
            switches[name] = bool(switch(value))
        else:
            raise ConfigurationError(
                f"@pytest.mark.sa_rollback({shown}): {name} is {value!r}; it takes True or False "
                "(or one of 'on', 'off', 'true', 'false', '1', '0')."
            )
    return _marker_args(**switches)


def resets_sequences(item: pytest.Item, marker: Optional[pytest.Mark]) -> bool:
    """The marker's ``reset_sequences``, else the setting."""
    value = marker.kwargs.get("reset_sequences") if marker is not None else None
    if value is None:
        return bool(item.config.stash[settings_key].reset_sequences)
    return bool(switch(value)) if isinstance(value, str) else bool(value)  # _read_marker checked it
