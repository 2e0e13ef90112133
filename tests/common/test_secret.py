"""Secret bytes never show themselves."""

import pickle

import pytest

from agent.common.secret import Secret, live_secret_forms


def test_repr_and_str_hide_the_bytes():
    s = Secret(b"hunter2hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "14" in repr(s)


def test_wipe_zeroes_and_forgets():
    s = Secret(b"abcdefgh")
    assert "abcdefgh" in live_secret_forms()
    s.wipe()
    assert len(s) == 0
    assert "abcdefgh" not in live_secret_forms()


def test_pickling_is_refused():
    with pytest.raises(TypeError):
        pickle.dumps(Secret(b"abc"))


def test_equality_is_by_value():
    assert Secret(b"abc") == Secret(b"abc")
    assert Secret(b"abc") != Secret(b"abd")


def test_invalid_base64_does_not_echo_the_input():
    with pytest.raises(ValueError) as err:
        Secret.from_b64("c2VjcmV0!!")
    assert "c2VjcmV0" not in str(err.value)


def test_view_lends_the_bytes_read_only_for_one_block():
    s = Secret(b"abc")
    with s.view() as view:
        assert bytes(view) == b"abc"
        with pytest.raises(TypeError):
            view[0] = 0
    with pytest.raises(ValueError):
        bytes(view)  # released when the block ended
    s.wipe()
    assert len(s) == 0


def _state(forms):
    return (
        forms._count,
        forms._text_count,
        forms._by_len,
        forms._lengths,
        forms._min_token,
        forms._heads,
        sorted(forms._texts),
        [len(t) for t in forms._texts],
    )


def test_the_scrubber_kept_up_to_date_secret_by_secret_equals_one_built_afresh():
    import gc
    import random

    from agent.common.secret import _LIVE, SecretForms, _forms_of, live_secret_scrubber

    rng = random.Random(7)
    live: list[Secret] = []
    for _ in range(300):
        step = rng.random()
        if step < 0.5 or not live:
            value = rng.choice([rng.randbytes(rng.choice([3, 4, 6, 32])), b"pass phrase", b"deadbeef"])
            live.append(Secret(value))  # equal values share forms
        elif step < 0.8:
            live.pop(rng.randrange(len(live))).wipe()
        else:
            live.pop(rng.randrange(len(live)))  # collected, never wiped
            gc.collect()
        index = live_secret_scrubber()
        assert _state(index) == _state(SecretForms([_forms_of(s) for s in list(_LIVE)]))
        for s in live:
            if len(s) >= 4:
                assert index.scrub(f"<{s.hex()}|{s.b64()}|{s.hex().upper()}>", "R") == "<R|R|R>"
