"""A cheaper ``__init__`` for the frozen dataclasses a replay makes by the hundred thousand.

A frozen dataclass's generated ``__init__`` sets each field with
``object.__setattr__`` (its own ``__setattr__`` refuses): about 0.4 us for
three fields on the README's machine, twice what writing them into the
instance's ``__dict__`` costs.  ``keyagent replay --check`` builds every
action of every recorded flow again (580k on the bench's log), so it asks
for :func:`fast_init` on the events and actions before it starts.

The new ``__init__`` takes the same parameters, in the same order, with the
same defaults and default factories, and makes the same instance; the class
stays frozen (``__setattr__``, ``__delattr__``, ``__eq__``, ``__hash__``
are untouched).  A class it cannot copy that way exactly (slots,
``__post_init__``, keyword-only or ``init=False`` fields, ``InitVar``) is
left as it is.  Not done at import: the sidecar makes a few of these per
launch, and generating the functions would add to every start-up.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

#: marks a class whose __init__ was replaced (fast_init is idempotent)
_DONE = "__keyagent_fast_init__"


def fast_init(*classes: type) -> None:
    """Give each frozen dataclass of ``classes`` the cheaper ``__init__``."""
    for cls in classes:
        if cls.__dict__.get(_DONE):
            continue
        init = _make_init(cls)
        if init is not None:
            type.__setattr__(cls, "__init__", init)
        type.__setattr__(cls, _DONE, True)


def _make_init(cls: type) -> Any:
    params = getattr(cls, "__dataclass_params__", None)
    if (
        params is None
        or not params.frozen
        or "__slots__" in cls.__dict__
        or hasattr(cls, "__post_init__")
        or "__init__" not in cls.__dict__
    ):
        return None
    fields = dataclasses.fields(cls)
    if any(not f.init or f.kw_only is True for f in fields):
        return None
    wanted = inspect.signature(cls.__dict__["__init__"])
    names = [name for name in wanted.parameters if name != "self"]
    if names != [f.name for f in fields]:  # an InitVar, or anything else fields() does not show
        return None
    namespace: dict[str, Any] = {"MISSING": dataclasses.MISSING}
    args, body = [], []
    for f in fields:
        if f.default is not dataclasses.MISSING:
            namespace[f"default_{f.name}"] = f.default
            args.append(f"{f.name}=default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"factory_{f.name}"] = f.default_factory
            args.append(f"{f.name}=MISSING")
            body.append(f"    if {f.name} is MISSING:\n        {f.name} = factory_{f.name}()\n")
        else:
            args.append(f.name)
    body.append("    values = self.__dict__\n")
    body.extend(f"    values[{f.name!r}] = {f.name}\n" for f in fields)
    source = f"def __init__(self, {', '.join(args)}):\n{''.join(body)}"
    exec(source, namespace)  # the way dataclasses makes its own: fixed text around field names
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__signature__ = wanted
    return init
