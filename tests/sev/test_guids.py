import uuid

import pytest

from agent.sev.guids import (
    GUID_ALIASES,
    LUKS_KEY_GUID,
    SECRET_TABLE_HEADER_GUID,
    guid_bytes,
    guid_from_bytes,
    resolve_guid,
)


def test_well_known_guids_have_their_published_values():
    assert str(SECRET_TABLE_HEADER_GUID) == "1e74f542-71dd-4d66-963e-ef4287ff173b"
    assert str(LUKS_KEY_GUID) == "736869e5-84f0-4973-92ec-06879ce3da0b"


def test_wire_form_is_mixed_endian_like_sevctl_and_grub():
    # GRUB's efisecret test script writes the header GUID as these bytes
    assert guid_bytes(SECRET_TABLE_HEADER_GUID) == bytes.fromhex("42f5741edd71664d963eef4287ff173b")
    assert guid_bytes(LUKS_KEY_GUID) == bytes.fromhex("e5696873f084734992ec06879ce3da0b")


def test_guid_bytes_round_trip():
    g = uuid.UUID("23058844-597b-42fb-8259-a0f5d9d495af")
    assert guid_from_bytes(guid_bytes(g)) == g


def test_luks_key_alias_resolves():
    assert GUID_ALIASES["luks-key"] == LUKS_KEY_GUID
    assert resolve_guid("luks-key") == LUKS_KEY_GUID


@pytest.mark.parametrize(
    "text",
    [
        "736869e5-84f0-4973-92ec-06879ce3da0b",
        "736869E5-84F0-4973-92EC-06879CE3DA0B",
        "{736869e5-84f0-4973-92ec-06879ce3da0b}",
    ],
)
def test_canonical_guid_text_resolves(text):
    assert resolve_guid(text) == LUKS_KEY_GUID


@pytest.mark.parametrize(
    "text", ["luks", "736869e584f0497392ec06879ce3da0b", "736869e5-84f0-4973-92ec-06879ce3da0g", ""]
)
def test_unknown_alias_is_a_one_line_value_error(text):
    with pytest.raises(ValueError) as err:
        resolve_guid(text)
    assert str(err.value).startswith("unknown GUID alias")
    assert "\n" not in str(err.value)


def test_guid_from_wrong_length_is_refused():
    with pytest.raises(ValueError):
        guid_from_bytes(b"\x00" * 15)


def test_libvirt_secret_syntax_is_written_as_libvirt_takes_it():
    # virt-qemu-sev-validate --inject-secret ALIAS-OR-GUID:PATH (it splits on ':')
    import agent.sev.guids as guids

    text = open(guids.__file__).read()
    assert "luks-key:PATH" in text and "luks-key=PATH" not in text
