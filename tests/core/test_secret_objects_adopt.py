"""The secrets flow of a restarted agent: the predecessor's master key in QEMU is left alone."""

from agent.common.secret import Secret
from agent.core.actions import ControlReply, KeyringAdd, KeyringDrop, SendQmp, WriteKeyDir
from agent.core.events import ControlRequest, KeyProvided, KeyringReady, QmpDisconnected, QmpReply, Start
from agent.core.secret_objects import SecretsFlow, SecretsParams, State


def restarted(mode="keyring"):
    f = SecretsFlow(
        SecretsParams(
            vm="vm1", mode=mode, master_id="keyagent-master-2", lazy_master=True, in_qemu=("keyagent-master", "luks0")
        )
    )
    f.handle(Start())
    return f, f.handle(KeyProvided("master", Secret(b"m" * 32)))


def add_request(req="ctl-1", sid="s1"):
    return ControlRequest(req, "add", {"id": sid, "iv": "AAAAAAAAAAAAAAAAAAAAAA==", "data": Secret(b"c" * 32)})


def test_a_master_key_already_in_qemu_gets_no_object_add_and_no_key_copy():
    for mode in ("keyring", "file"):
        f, out = restarted(mode)
        assert f.state is State.IDLE
        assert not any(isinstance(a, (SendQmp, KeyringAdd, WriteKeyDir)) for a in out)


def test_the_first_secret_adds_our_own_master_under_a_fresh_id_then_the_secret():
    f, _ = restarted()
    out = f.handle(add_request())
    assert isinstance(out[0], KeyringAdd)
    (add,) = f.handle(KeyringReady("master", 7))
    assert add.args == {"qom-type": "secret_keyring", "id": "keyagent-master-2", "serial": 7}
    out = f.handle(QmpReply(add.tag, {}))
    assert out[0] == KeyringDrop("master")
    secret = next(a for a in out if isinstance(a, SendQmp))
    assert secret.args["keyid"] == "keyagent-master-2"
    assert f.handle(QmpReply(secret.tag, {}))[-1] == ControlReply("ctl-1", 200, {"id": "s1", "status": "added"})


def test_secrets_the_predecessor_added_can_be_removed_and_not_added_twice():
    f, _ = restarted()
    (remove,) = f.handle(ControlRequest("ctl-2", "remove", {"id": "luks0"}))
    assert remove.command == "object-del" and remove.args == {"id": "luks0"}
    f2, _ = restarted()
    f2.handle(add_request("ctl-3", "luks0"))  # waits for our master key
    (add,) = f2.handle(KeyringReady("master", 7))
    out = f2.handle(QmpReply(add.tag, {}))
    assert ControlReply("ctl-3", 409, {"error": "secret 'luks0' already exists"}) in out


def test_qemu_gone_before_any_secret_needs_our_master_drops_nothing():
    f, _ = restarted()
    out = f.handle(QmpDisconnected("gone"))
    assert not any(isinstance(a, KeyringDrop) for a in out) and f.finished is not None
