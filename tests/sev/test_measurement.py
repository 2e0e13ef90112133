import base64

import pytest

from agent.sev.measurement import compute_measure, measurement_blob, split_blob, verify_measurement

from . import vectors as v


@pytest.mark.parametrize(
    "digest,expected",
    [
        (v.SEVCTL_DIGEST_GIVEN, v.SEVCTL_BLOB_GIVEN),
        (v.SEVCTL_DIGEST_FIRMWARE, v.SEVCTL_BLOB_FIRMWARE),
        (v.SEVCTL_DIGEST_KERNEL, v.SEVCTL_BLOB_KERNEL),
    ],
    ids=["launch-digest", "firmware", "firmware+kernel"],
)
def test_blob_matches_sevctl_measurement_build(digest, expected):
    major, minor, build = v.SEVCTL_MEASURE_API
    blob = measurement_blob(
        v.SEVCTL_MEASURE_TIK, major, minor, build, v.SEVCTL_MEASURE_POLICY, digest, v.SEVCTL_MEASURE_NONCE
    )
    assert base64.b64encode(blob).decode() == expected


def test_sevctl_sev_es_measurement_verifies():
    blob = base64.b64decode(v.SEVCTL_BLOB_ES)
    major, minor, build = v.SEVCTL_ES_API
    assert verify_measurement(blob, v.SEVCTL_MEASURE_TIK, major, minor, build, v.SEVCTL_ES_POLICY, v.SEVCTL_DIGEST_ES)


def test_virtee_session_verify_vector():
    major, minor, build = v.VIRTEE_VERIFY_API
    measure = compute_measure(
        v.VIRTEE_VERIFY_TIK, major, minor, build, v.VIRTEE_VERIFY_POLICY, v.VIRTEE_VERIFY_DIGEST, v.VIRTEE_VERIFY_MNONCE
    )
    assert measure == v.VIRTEE_VERIFY_MEASURE
    blob = v.VIRTEE_VERIFY_MEASURE + v.VIRTEE_VERIFY_MNONCE
    assert verify_measurement(
        blob, v.VIRTEE_VERIFY_TIK, major, minor, build, v.VIRTEE_VERIFY_POLICY, v.VIRTEE_VERIFY_DIGEST
    )


def _es_args():
    major, minor, build = v.SEVCTL_ES_API
    return dict(
        tik=v.SEVCTL_MEASURE_TIK,
        api_major=major,
        api_minor=minor,
        build_id=build,
        policy=v.SEVCTL_ES_POLICY,
        digest=v.SEVCTL_DIGEST_ES,
    )


def test_wrong_tik_is_refused():
    args = _es_args() | {"tik": bytes(16)}
    assert not verify_measurement(base64.b64decode(v.SEVCTL_BLOB_ES), **args)


def test_wrong_policy_is_refused():
    args = _es_args() | {"policy": 0x01}
    assert not verify_measurement(base64.b64decode(v.SEVCTL_BLOB_ES), **args)


def test_wrong_digest_is_refused():
    args = _es_args() | {"digest": v.SEVCTL_DIGEST_FIRMWARE}
    assert not verify_measurement(base64.b64decode(v.SEVCTL_BLOB_ES), **args)


def test_wrong_platform_version_is_refused():
    args = _es_args() | {"build_id": 7}
    assert not verify_measurement(base64.b64decode(v.SEVCTL_BLOB_ES), **args)


def test_tampered_nonce_is_refused():
    blob = bytearray(base64.b64decode(v.SEVCTL_BLOB_ES))
    blob[-1] ^= 1
    assert not verify_measurement(bytes(blob), **_es_args())


def test_tampered_measure_is_refused():
    blob = bytearray(base64.b64decode(v.SEVCTL_BLOB_ES))
    blob[0] ^= 0x80
    assert not verify_measurement(bytes(blob), **_es_args())


def test_split_blob_returns_measure_and_nonce():
    blob = base64.b64decode(v.SEVCTL_BLOB_GIVEN)
    measure, nonce = split_blob(blob)
    assert len(measure) == 32 and nonce == v.SEVCTL_MEASURE_NONCE


@pytest.mark.parametrize("n", [0, 32, 47, 49])
def test_blob_of_wrong_length_is_refused(n):
    with pytest.raises(ValueError, match="48 bytes"):
        split_blob(bytes(n))
    with pytest.raises(ValueError):
        verify_measurement(bytes(n), **_es_args())


@pytest.mark.parametrize(
    "field,value",
    [
        ("api_major", 256),
        ("api_minor", -1),
        ("build_id", 300),
        ("policy", 1 << 32),
        ("digest", bytes(31)),
        ("mnonce", bytes(15)),
        ("tik", bytes(32)),
    ],
)
def test_out_of_range_inputs_are_refused(field, value):
    args = dict(tik=bytes(16), api_major=1, api_minor=2, build_id=3, policy=0, digest=bytes(32), mnonce=bytes(16))
    args[field] = value
    with pytest.raises(ValueError):
        compute_measure(**args)
