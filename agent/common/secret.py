"""Secret bytes that cannot leak by accident.

Every value that is key material or a secret payload travels through the
agent as a :class:`Secret`.  Its ``repr`` and ``str`` never show the bytes,
the event log records it as ``{"redacted": N}``, and the log redaction
filter learns its raw, hex and base64 forms so that a copy that slipped into
a third-party log line (qemu.qmp logs every message at DEBUG) is scrubbed.

The bytes live in a ``bytearray`` so that :meth:`wipe` can zero them once
they are no longer needed.  :meth:`view` lends them to a call that takes a
buffer (``os.write``, ctypes) without an immutable copy; :meth:`reveal`
makes a ``bytes`` copy, which Python frees without zeroing, for the calls
that need ``bytes``.  Where those copies remain is listed in the README
("Secrets are held in bytearrays ...").
"""

from __future__ import annotations

import base64
import contextlib
import re
import threading
import weakref
from collections.abc import Iterator
from typing import Any

__all__ = ["Secret", "SecretForms", "live_secret_forms", "live_secret_scrubber"]

# Every live Secret, so the log filter can scrub its forms, and the index of
# those forms that the filter scrubs with (:class:`SecretForms`).  Under
# ``keyagent host`` a hundred VMs hold their keys in one process and every
# log line is scrubbed, so the index is built once, at the first scrub, and
# then kept: a Secret made adds its forms, one wiped removes them, and one
# collected without ``wipe()`` has its forms removed at the next scrub (each
# O(1), whatever the number of live secrets).
#
# A collected Secret is noticed by its weak reference's callback, which may
# run wherever the garbage collector runs: on any thread, while
# ``_INDEX_LOCK`` is held by the same thread, at interpreter shutdown.  So
# the callback only appends the reference to ``_PENDING`` (``list.append``:
# no lock, no global looked up), and whoever takes the lock next drains it,
# as ``weakref.WeakSet`` does with its own pending removals.
_INDEX: SecretForms | None = None
_PENDING: list[_Tracked] = []
# Secrets are made and wiped on worker threads too (reference reads): one
# change of the index (and of the set of live secrets) at a time
_INDEX_LOCK = threading.Lock()
#: the characters of the hex, upper-hex and base64 forms: every occurrence of
#: one of those forms lies inside a run of these
_TOKEN_CHARS = "[0-9A-Za-z+/=]"
MIN_SECRET_LEN = 4


class Secret:
    """Opaque secret bytes.  ``reveal()`` is the one way to read them."""

    __slots__ = ("_buf", "_forms", "__weakref__")

    def __init__(self, value: bytes | bytearray | memoryview | str) -> None:
        if isinstance(value, str):
            value = value.encode()
        self._buf = bytearray(value)
        self._forms: _Forms | None = None
        ref = _Tracked(self)
        with _INDEX_LOCK:
            if _PENDING:
                _drain()
            _LIVE.refs[ref.key] = ref
            if _INDEX is not None:
                ref.forms = _forms_of(self)
                _INDEX.add(ref.forms)

    @classmethod
    def placeholder(cls, length: int) -> Secret:
        """``length`` zero bytes standing in for a redacted secret (replay).

        Not tracked for log scrubbing: zeros are no secret, and a replay makes
        hundreds of thousands of these.
        """
        obj = cls.__new__(cls)
        obj._buf = bytearray(length)
        obj._forms = None
        return obj

    @classmethod
    def from_b64(cls, text: str) -> Secret:
        """Decode strict base64 (raises ``ValueError`` without echoing it)."""
        try:
            return cls(base64.b64decode(text, validate=True))
        except (ValueError, TypeError):
            raise ValueError("invalid base64") from None

    def reveal(self) -> bytes:
        """An immutable copy: it cannot be wiped.  Prefer :meth:`view` where a buffer does."""
        return bytes(self._buf)

    @contextlib.contextmanager
    def view(self) -> Iterator[memoryview]:
        """A read-only view of the bytes for the length of a ``with`` block (no copy)."""
        view = memoryview(self._buf).toreadonly()
        try:
            yield view
        finally:
            view.release()

    def b64(self) -> str:
        return base64.b64encode(self._buf).decode()

    def hex(self) -> str:
        return self._buf.hex()

    def wipe(self) -> None:
        for i in range(len(self._buf)):
            self._buf[i] = 0
        self._buf = bytearray()
        self._forms = None
        with _INDEX_LOCK:
            if _PENDING:
                _drain()
            ref = _LIVE.refs.get(id(self))
            if ref is not None and ref() is self:
                # dropping the reference drops its callback: no pending removal later
                del _LIVE.refs[ref.key]
                if _INDEX is not None:
                    _INDEX.remove(ref.forms)
                ref.forms = None

    def __len__(self) -> int:
        return len(self._buf)

    def __bool__(self) -> bool:
        return bool(self._buf)

    def __eq__(self, other: object) -> bool:
        # Constant time, so a Secret can be compared safely in tests and flows.
        import hmac

        if isinstance(other, Secret):
            return hmac.compare_digest(self._buf, other._buf)
        return NotImplemented

    def __hash__(self) -> int:  # pragma: no cover - identity hash
        return id(self)

    def __repr__(self) -> str:
        return f"Secret(<redacted {len(self._buf)} bytes>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # refuse pickling: it would copy the bytes out
        raise TypeError("Secret cannot be pickled")

    def to_log(self) -> dict[str, int]:
        """How the event log and structured logs record this value."""
        return {"redacted": len(self._buf)}


class _Tracked(weakref.ref[Secret]):
    """A weak reference to a live Secret that remembers what of it the index
    holds: its forms outlive it, so that a collected Secret's forms can
    leave the index after it is gone."""

    __slots__ = ("key", "forms")
    key: int
    #: the forms the index took for this secret (None: none, or no index yet)
    forms: _Forms | None

    def __new__(cls, secret: Secret) -> _Tracked:
        # the callback is the bound append itself: nothing to look up at shutdown
        self = super().__new__(cls, secret, _PENDING.append)
        self.key = id(secret)
        self.forms = None
        return self


class _LiveSecrets:
    """The live Secrets: ``id(secret) -> its weak reference``.

    A collected Secret's entry stays until ``_PENDING`` is drained (and a new
    Secret may take its id meanwhile: the drain removes an entry only if it
    is still the collected one's).  Iterating yields the Secrets alive now.
    Changed only with ``_INDEX_LOCK`` held.
    """

    __slots__ = ("refs",)

    def __init__(self) -> None:
        self.refs: dict[int, _Tracked] = {}

    def __iter__(self) -> Iterator[Secret]:
        for ref in list(self.refs.values()):
            secret = ref()
            if secret is not None:
                yield secret


_LIVE = _LiveSecrets()


def _drain() -> None:
    """Take the collected Secrets out of the live set and their forms out of
    the index (``_INDEX_LOCK`` held)."""
    refs = _LIVE.refs
    while _PENDING:
        ref = _PENDING.pop()
        if refs.get(ref.key) is ref:
            del refs[ref.key]
        if _INDEX is not None:
            _INDEX.remove(ref.forms)
        ref.forms = None


def live_secret_forms(min_len: int = MIN_SECRET_LEN) -> list[str]:
    """Text forms (raw, hex, base64) of every live secret, longest first.

    Very short secrets are skipped: a 4-byte value would match random text
    and the forms add nothing.  Computed afresh at each call: the log filter
    uses :func:`live_secret_scrubber`, which is kept up to date instead.
    """
    forms: set[str] = set()
    for s in list(_LIVE):
        raw = bytes(s._buf)
        if len(raw) < min_len:
            continue
        forms.add(raw.hex())
        forms.add(raw.hex().upper())
        forms.add(base64.b64encode(raw).decode())
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            pass
        else:
            if text.strip():
                forms.add(text)
    return sorted(forms, key=len, reverse=True)


class SecretForms:
    """Every form of every live secret, laid out so that scrubbing a string
    costs the same whatever the number of live secrets.

    ``keyagent host`` holds every VM's keys in one process, and every string
    of every log line is scrubbed: trying each form with ``in`` made a line
    cost O(VMs).  The hex, upper-hex and base64 forms are made only of
    ``[0-9A-Za-z+/=]``, so an occurrence lies inside a run of those
    characters at least as long as the shortest form: one C-level regex
    finds the runs, and each run's windows of the few form lengths are
    looked up in a set per length (after a look-up of its first characters
    among the forms' beginnings).  A run is taken left to right, the
    longest form first at each place, so no form survives; the raw text
    forms (passphrases: any character) keep the ``in`` test, longest first,
    after the tokens, as before.
    """

    __slots__ = ("_run", "_count", "_text_count", "_by_len", "_lengths", "_min_token", "_heads", "_texts", "_scan")

    def __init__(self, forms: list[_Forms | None] | None = None) -> None:
        # how many live secrets have each form (two may share one): a form
        # leaves with the last of them
        self._count: dict[str, int] = {}
        self._text_count: dict[str, int] = {}
        self._by_len: dict[int, set[str]] = {}
        self._lengths: list[int] = []
        self._min_token = 0
        # how many token forms begin with each _min_token characters: one
        # look-up of a place's first characters rules most places out
        self._heads: dict[str, int] = {}
        self._run: re.Pattern[str] | None = None
        # what scrub() reads of the three above, published in one assignment:
        # a scrub on another thread never sees a new shortest length with
        # the old heads, or the heads half rebuilt (nothing would match)
        self._scan: tuple[re.Pattern[str] | None, int, dict[str, int]] = (None, 0, self._heads)
        self._texts: list[str] = []
        for one in forms or ():
            self.add(one)

    def add(self, forms: _Forms | None) -> None:
        """Take one more live secret's forms (see :func:`_forms_of`)."""
        if forms is None:
            return
        tokens, text = forms
        new_tokens = []
        for form in tokens:
            n = self._count.get(form, 0)
            self._count[form] = n + 1
            if n == 0:
                new_tokens.append(form)
        if new_tokens:
            for form in new_tokens:
                self._by_len.setdefault(len(form), set()).add(form)
            if min(self._by_len) != self._min_token:
                self._derive_tokens()
            else:
                self._lengths = sorted(self._by_len, reverse=True)
                for form in new_tokens:
                    head = form[: self._min_token]
                    self._heads[head] = self._heads.get(head, 0) + 1
        if text is not None:
            n = self._text_count.get(text, 0)
            self._text_count[text] = n + 1
            if n == 0:
                self._texts = sorted([*self._texts, text], key=len, reverse=True)

    def remove(self, forms: _Forms | None) -> None:
        """One live secret with these forms is gone."""
        if forms is None:
            return
        tokens, text = forms
        gone = []
        for form in tokens:
            n = self._count.get(form, 0)
            if n > 1:
                self._count[form] = n - 1
            elif n == 1:
                del self._count[form]
                gone.append(form)
        if gone:
            for form in gone:
                same = self._by_len[len(form)]
                same.discard(form)
                if not same:
                    del self._by_len[len(form)]
            if (min(self._by_len) if self._by_len else 0) != self._min_token:
                self._derive_tokens()
            else:
                self._lengths = sorted(self._by_len, reverse=True)
                for form in gone:
                    head = form[: self._min_token]
                    if self._heads.get(head, 0) > 1:
                        self._heads[head] -= 1
                    else:
                        self._heads.pop(head, None)
        if text is not None:
            n = self._text_count.get(text, 0)
            if n > 1:
                self._text_count[text] = n - 1
            elif n == 1:
                del self._text_count[text]
                self._texts = [t for t in self._texts if t != text]

    def _derive_tokens(self) -> None:
        """The lengths, run pattern and heads from scratch (the shortest
        form's length changed), built aside and then published at once."""
        min_token = min(self._by_len) if self._by_len else 0
        run = re.compile(f"{_TOKEN_CHARS}{{{min_token},}}") if self._by_len else None
        heads: dict[str, int] = {}
        for same in self._by_len.values():
            for form in same:
                head = form[:min_token]
                heads[head] = heads.get(head, 0) + 1
        self._lengths = sorted(self._by_len, reverse=True)
        self._scan = (run, min_token, heads)
        self._run, self._min_token, self._heads = run, min_token, heads

    def scrub(self, text: str, replacement: str) -> str:
        """``text`` with every form replaced by ``replacement``.

        Lock-free: the index may change on another thread meanwhile (a
        Secret made or wiped there); what is read is read once."""
        run, min_token, heads = self._scan
        if run is not None and len(text) >= min_token:
            lengths, by_len = self._lengths, self._by_len
            parts: list[str] = []
            last = 0
            for m in run.finditer(text):
                start, end = m.span()
                i = start
                while i + min_token <= end:
                    if text[i : i + min_token] not in heads:
                        i += 1
                        continue
                    for length in lengths:
                        if i + length <= end and text[i : i + length] in by_len.get(length, ()):
                            parts.append(text[last:i])
                            parts.append(replacement)
                            i += length
                            last = i
                            break
                    else:
                        i += 1
            if parts:
                parts.append(text[last:])
                text = "".join(parts)
        for form in self._texts:
            if form in text:
                text = text.replace(form, replacement)
        return text


def live_secret_scrubber() -> SecretForms:
    """The forms of every live secret as a :class:`SecretForms`: built at the
    first call, then kept up to date as Secrets are made, wiped and
    collected (see ``_INDEX``).  Do not change it."""
    global _INDEX
    index = _INDEX
    if index is not None and not _PENDING:
        return index
    with _INDEX_LOCK:
        _drain()
        if _INDEX is None:
            index = SecretForms()
            for ref in list(_LIVE.refs.values()):
                secret = ref()
                if secret is not None:  # (a dead one is pending: nothing of it is taken)
                    ref.forms = _forms_of(secret)
                    index.add(ref.forms)
            _INDEX = index
        return _INDEX


#: one secret's hex, upper-hex and base64 forms, and its text if it is text
_Forms = tuple[tuple[str, str, str], str | None]


def _forms_of(secret: Secret) -> _Forms | None:
    """The forms of ``secret`` (kept on it until it is wiped), or None for
    one too short to scrub."""
    forms = secret._forms
    if forms is None:
        raw = bytes(secret._buf)
        if len(raw) < MIN_SECRET_LEN:
            return None
        try:
            text: str | None = raw.decode()
        except UnicodeDecodeError:
            text = None
        if text is not None and not text.strip():
            text = None
        forms = secret._forms = ((raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()), text)
    return forms
