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


def _fresh_state():
    from agent.common.secret import _LIVE, SecretForms, _forms_of

    return _state(SecretForms([_forms_of(s) for s in list(_LIVE)]))


def test_a_secret_collected_without_wipe_leaves_the_kept_scrubber_which_is_not_rebuilt():
    import os

    from agent.common.secret import live_secret_scrubber

    kept = Secret(os.urandom(32))
    index = live_secret_scrubber()
    dropped = Secret(os.urandom(32))
    form = dropped.hex()
    assert live_secret_scrubber().scrub(form, "R") == "R"
    del dropped  # collected, never wiped
    assert live_secret_scrubber() is index
    assert index.scrub(form, "R") == form
    assert index.scrub(kept.b64(), "R") == "R"
    assert _state(index) == _fresh_state()


def test_a_secret_collected_while_the_index_lock_is_held_leaves_at_the_next_scrub():
    import gc
    import os

    from agent.common.secret import _INDEX_LOCK, live_secret_scrubber

    live_secret_scrubber()
    plain = Secret(os.urandom(32))
    cycle: list[object] = [Secret(os.urandom(24))]
    cycle.append(cycle)  # only the cycle collector frees this one
    forms = [plain.hex(), cycle[0].b64()]  # type: ignore[attr-defined]
    with _INDEX_LOCK:  # as if the collector ran inside a change of the index
        del plain
        del cycle
        gc.collect()
    index = live_secret_scrubber()
    assert [index.scrub(f, "R") for f in forms] == forms
    assert _state(index) == _fresh_state()


def test_a_new_secret_that_takes_a_collected_ones_place_is_scrubbed():
    import os

    from agent.common.secret import live_secret_scrubber

    live_secret_scrubber()
    for _ in range(50):
        gone = Secret(os.urandom(32))
        old = gone.hex()
        del gone
        new = Secret(os.urandom(32))  # often at the same address (the same id)
        index = live_secret_scrubber()
        assert index.scrub(new.hex(), "R") == "R" and index.scrub(old, "R") == old
        new.wipe()
    assert _state(live_secret_scrubber()) == _fresh_state()


def test_secrets_made_wiped_and_collected_on_threads_leave_the_index_equal_to_a_fresh_one():
    import gc
    import random
    import threading

    from agent.common.secret import live_secret_scrubber

    live_secret_scrubber()
    kept: list[Secret] = []

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[Secret] = []
        for _ in range(400):
            step = rng.random()
            if step < 0.5 or not mine:
                mine.append(Secret(rng.randbytes(rng.choice([4, 16, 32]))))
            elif step < 0.75:
                mine.pop(rng.randrange(len(mine))).wipe()
            elif step < 0.95:
                mine.pop(rng.randrange(len(mine)))
            else:
                gc.collect()
        kept.extend(mine)

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        live_secret_scrubber().scrub("0123456789abcdef" * 4, "R")
    for t in threads:
        t.join()
    index = live_secret_scrubber()
    assert _state(index) == _fresh_state()
    assert all(index.scrub(s.hex(), "R") == "R" for s in kept)


def test_a_scrub_on_one_thread_finds_a_kept_form_while_another_changes_the_shortest_length():
    import sys
    import threading

    from agent.common.secret import SecretForms, _forms_of

    kept = Secret(bytes(range(32)))
    index = SecretForms([_forms_of(kept)])
    shorts = [_forms_of(Secret(bytes([n]) * 4 + bytes([n, n]) * k)) for n, k in ((7, 0), (9, 1), (11, 3))]
    done = threading.Event()

    def churn() -> None:
        for _ in range(3000):  # each add and remove changes the shortest length: heads rebuilt
            for forms in shorts:
                index.add(forms)
            for forms in shorts:
                index.remove(forms)
        done.set()

    text = f"key {kept.hex()} b64 {kept.b64()}"
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        thread = threading.Thread(target=churn)
        thread.start()
        misses = 0
        while not done.is_set():
            if index.scrub(text, "R") != "key R b64 R":
                misses += 1
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert misses == 0
