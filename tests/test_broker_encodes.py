"""The broker's prebuilt per-task headers are byte for byte what ``encode`` builds."""

import os

import pytest

from zray import _protocol as P


@pytest.mark.timeout(10)
def test_an_inline_obj_header_is_the_encoded_message():
    for kind in (P.VALUE, P.ERROR):
        oid = os.urandom(P.OBJECT_ID_LEN)
        header = P.encode_obj(oid, kind)
        assert header == P.encode(P.Obj(oid, kind))
        assert P.decode(header) == P.Obj(oid, kind, None, None)
        assert P.decode_from_broker(header) == P.Obj(oid, kind, None, None)


@pytest.mark.timeout(10)
def test_an_obj_header_outside_the_prebuilt_shapes_is_still_encoded():
    """An id of another length or another kind falls back to the plain encode (the
    prefix assumes a 16-byte id); the message is the same."""
    for oid, kind in [(b"short", P.VALUE), (os.urandom(P.OBJECT_ID_LEN), 7)]:
        assert P.encode_obj(oid, kind) == P.encode(P.Obj(oid, kind))


@pytest.mark.timeout(10)
def test_an_exec_without_deps_or_gpus_is_the_encoded_message():
    d = os.urandom(P.ID_LEN)
    spec = P.TaskSpec(d + b"\1\0\0\0", P.TASK, os.urandom(16), "f", 1, {"CPU": P.UNIT}, [],
                      [], {"max_retries": 3}, b"", d, d, b"job", b"")
    raw = P.submit_spec_bytes(P.encode(P.Submit(spec)))
    for fn_included in (True, False):
        for n_args in (0, 1, 2, 200, 70000):
            header = P.encode_exec_plain(raw, fn_included, n_args)
            assert header == P.encode(P.Exec(spec, fn_included, n_args, [], []))
            assert P.decode(header) == P.Exec(spec, fn_included, n_args, [], [])
            # (a second call reads the cached tail: the same bytes)
            assert P.encode_exec_plain(raw, fn_included, n_args) == header


@pytest.mark.timeout(10)
def test_a_submit_decodes_to_its_message_and_bad_specs_are_still_refused():
    d = os.urandom(P.ID_LEN)
    spec = P.TaskSpec(d + b"\1\0\0\0", P.TASK, os.urandom(16), "f", 1, {"CPU": P.UNIT},
                      [[0, os.urandom(P.OBJECT_ID_LEN)]], [], {}, b"", d, d, b"job", b"")
    m = P.decode(P.encode(P.Submit(spec)))
    assert m == P.Submit(spec) and type(m) is P.Submit and type(m.spec) is P.TaskSpec
    bad = [spec._replace(task_id=b"short"), spec._replace(num_returns=P.MAX_RETURNS + 1),
           spec._replace(deps=[[0, b"not an oid"]]), spec._replace(resources={"CPU": -1}),
           spec._replace(nested=[b"x"]), spec._replace(owner="str")]
    for s in bad:
        with pytest.raises(P.ProtocolError):
            P.decode(P.encode(P.Submit(s)))
    import msgpack
    for header in ([P.Msg.SUBMIT], [P.Msg.SUBMIT, list(spec), 1], [P.Msg.SUBMIT, list(spec)[:-1]]):
        with pytest.raises(P.ProtocolError):
            P.decode(msgpack.packb(header))
