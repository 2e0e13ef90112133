"""The secrets flow: master key handed over once, then secret objects."""

from agent.common.secret import Secret
from agent.core.actions import ControlReply, KeyringAdd, KeyringDrop, RemoveKeyDir, SendQmp, WriteKeyDir
from agent.core.events import (
    ControlRequest,
    KeyDirReady,
    KeyProvided,
    KeyringFailed,
    KeyringReady,
    QmpDisconnected,
    QmpError,
    QmpReply,
    Start,
)
from agent.core.secret_objects import SecretsFlow, SecretsParams, State


def ready(mode="keyring"):
    f = SecretsFlow(SecretsParams(vm="vm1", mode=mode))
    f.handle(Start())
    out = f.handle(KeyProvided("master", Secret(b"m" * 32)))
    if mode == "keyring":
        assert isinstance(out[0], KeyringAdd) and out[0].description == "keyagent:vm1:master"
        (add,) = f.handle(KeyringReady("master", 42))
        assert add.args == {"qom-type": "secret_keyring", "id": "keyagent-master", "serial": 42}
    else:
        assert isinstance(out[0], WriteKeyDir)
        (add,) = f.handle(KeyDirReady("master", "/run/vm/key-master-1"))
        assert add.args["file"] == "/run/vm/key-master-1/master.key"
    out = f.handle(QmpReply(add.tag, {}))
    assert out[0] == (KeyringDrop("master") if mode == "keyring" else RemoveKeyDir("master"))
    assert f.state is State.READY
    return f


def add_request(req="ctl-1", sid="s0"):
    return ControlRequest(req, "add", {"id": sid, "iv": "AAAAAAAAAAAAAAAAAAAAAA==", "data": Secret(b"c" * 32)})


def test_secret_object_is_added_with_keyid_iv_and_base64():
    f = ready()
    (send,) = f.handle(add_request())
    assert send.command == "object-add"
    assert send.args["keyid"] == "keyagent-master" and send.args["format"] == "base64"
    assert isinstance(send.args["data"], Secret)
    out = f.handle(QmpReply(send.tag, {}))
    assert ControlReply("ctl-1", 200, {"id": "s0", "status": "added"}) in out


def test_file_mode_removes_the_key_file_after_object_add():
    ready("file")


def test_requests_before_the_master_key_wait_for_it():
    f = SecretsFlow(SecretsParams(vm="vm1"))
    f.handle(Start())
    assert f.handle(add_request()) == []
    f.handle(KeyProvided("master", Secret(b"m" * 32)))
    (add,) = f.handle(KeyringReady("master", 7))
    out = f.handle(QmpReply(add.tag, {}))
    assert any(isinstance(a, SendQmp) and a.args.get("id") == "s0" for a in out)


def test_duplicate_id_is_refused_without_asking_qemu():
    f = ready()
    (send,) = f.handle(add_request())
    f.handle(QmpReply(send.tag, {}))
    (reply,) = f.handle(add_request("ctl-2"))
    assert reply.status == 409


def test_master_key_refused_by_qemu_breaks_every_add_but_drops_the_key():
    f = SecretsFlow(SecretsParams(vm="vm1"))
    f.handle(Start())
    f.handle(KeyProvided("master", Secret(b"m" * 32)))
    (add,) = f.handle(KeyringReady("master", 7))
    out = f.handle(QmpError(add.tag, "GenericError", "keyring not readable"))
    assert KeyringDrop("master") in out
    (reply,) = f.handle(add_request())
    assert reply.status == 503


def test_keyring_failure_is_reported_to_waiting_requests():
    f = SecretsFlow(SecretsParams(vm="vm1"))
    f.handle(Start())
    f.handle(add_request())
    f.handle(KeyProvided("master", Secret(b"m" * 32)))
    out = f.handle(KeyringFailed("master", "Operation not permitted"))
    assert any(isinstance(a, ControlReply) and a.status == 503 for a in out)


def test_remove_of_an_unknown_id_is_404():
    f = ready()
    (reply,) = f.handle(ControlRequest("ctl-3", "remove", {"id": "nope"}))
    assert reply.status == 404


def test_qemu_gone_while_the_master_key_is_out_drops_it():
    f = SecretsFlow(SecretsParams(vm="vm1"))
    f.handle(Start())
    f.handle(KeyProvided("master", Secret(b"m" * 32)))
    out = f.handle(QmpDisconnected(""))
    assert KeyringDrop("master") in out and out[-1].code == 0
