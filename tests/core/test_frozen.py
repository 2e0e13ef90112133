"""agent.core.frozen: the cheaper __init__ makes the same instances, and the class stays frozen."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import InitVar, dataclass, field
from typing import Any

import pytest

from agent.core.actions import ACTION_TYPES
from agent.core.events import EVENT_TYPES
from agent.core.frozen import fast_init


def make_classes() -> dict[str, type]:
    """Fresh classes each time: fast_init changes the class it is given."""

    @dataclass(frozen=True)
    class Plain:
        a: str
        b: int = 3
        c: dict[str, Any] = field(default_factory=dict)

    @dataclass(frozen=True)
    class Empty:
        pass

    @dataclass(frozen=True)
    class Post:
        a: int

        def __post_init__(self) -> None:
            object.__setattr__(self, "a", self.a + 1)

    @dataclass(frozen=True)
    class WithInitVar:
        a: int
        scale: InitVar[int] = 1

    @dataclass(frozen=True, kw_only=True)
    class KwOnly:
        a: int

    @dataclass(frozen=True, slots=True)
    class Slots:
        a: int

    @dataclass
    class NotFrozen:
        a: int

    return {c.__name__: c for c in (Plain, Empty, Post, WithInitVar, KwOnly, Slots, NotFrozen)}


def test_the_cheaper_init_takes_the_same_arguments_and_makes_the_same_instance():
    before = make_classes()["Plain"]
    after = make_classes()["Plain"]
    fast_init(after)
    assert after.__init__ is not before.__init__
    assert inspect.signature(after) == inspect.signature(before)
    for args, kwargs in [(("x",), {}), (("x", 5), {}), (("x",), {"c": {"k": 1}}), ((), {"a": "y", "b": 0})]:
        assert after(*args, **kwargs).__dict__ == before(*args, **kwargs).__dict__
    assert after("x").c is not after("x").c  # a fresh default each time
    with pytest.raises(TypeError):
        after()
    with pytest.raises(TypeError):
        after("x", 1, {}, 4)
    with pytest.raises(TypeError):
        after("x", d=1)


def test_the_class_stays_frozen_equal_and_hashable_as_before():
    cls = make_classes()["Plain"]
    fast_init(cls)
    one = cls("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.a = "y"  # type: ignore[misc]
    assert one == cls("x") and one != cls("y")
    assert dataclasses.replace(one, b=9) == cls("x", 9)
    fast_init(make_classes()["Empty"])


@pytest.mark.parametrize("name", ["Post", "WithInitVar", "KwOnly", "Slots", "NotFrozen"])
def test_a_class_it_cannot_copy_exactly_is_left_as_it_is(name):
    cls = make_classes()[name]
    init = cls.__init__
    fast_init(cls)
    assert cls.__init__ is init


def test_every_event_and_action_gets_it_with_its_signature():
    classes = [*EVENT_TYPES.values(), *ACTION_TYPES.values()]
    signatures = [inspect.signature(c) for c in classes]
    fast_init(*classes)
    fast_init(*classes)  # once is enough: the second does nothing
    assert [inspect.signature(c) for c in classes] == signatures
    for c in classes:  # the frozen dataclass's own sets fields through object.__setattr__
        assert c.__init__.__qualname__ == f"{c.__qualname__}.__init__"
        assert "__setattr__" not in c.__init__.__code__.co_names


def test_a_wrong_call_gets_the_same_error_text():
    """The codec puts it in its error (``replay --check`` of a hand-made log)."""
    before = make_classes()["Plain"]
    after = make_classes()["Plain"]
    fast_init(after)
    for args, kwargs in [((), {}), (("x", 1, {}, 4), {}), (("x",), {"d": 1}), (("x",), {"a": "y"})]:
        with pytest.raises(TypeError) as old:
            before(*args, **kwargs)
        with pytest.raises(TypeError) as new:
            after(*args, **kwargs)
        assert str(new.value) == str(old.value)
