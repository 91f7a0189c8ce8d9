"""``get_log(encoding=..., errors=...)`` decodes a log as Ray's does: the node sends the
file's bytes and they are decoded with the caller's codec and error handler
(``errors="strict"``, the default, raises on bytes that are not of the encoding;
``encoding=None`` gives the bytes)."""

import pytest
from conftest import poll_until

import zray
from zray.util import state

BAD = b"bytes \xff\xfe that are not utf-8\n"


@zray.remote
class Writer:
    def write(self, data: bytes) -> int:
        import os
        import sys

        sys.stdout.flush()
        os.write(1, data)  # (straight to the process's stdout: its log file)
        return os.getpid()


@pytest.mark.timeout(90)
def test_get_log_decodes_with_the_callers_encoding_and_errors():
    if zray.is_initialized():
        zray.shutdown()
    zray.init(num_cpus=1)
    try:
        w = Writer.remote()
        zray.get(w.write.remote(b"a plain line\n" + BAD), timeout=60)
        actor = w._actor_id.hex()

        def raw():
            data = b"".join(state.get_log(actor_id=actor, encoding=None))
            return BAD in data and data

        assert isinstance(poll_until(raw, 30, interval=0.1, what="the bytes in the log"), bytes)
        with pytest.raises(UnicodeDecodeError):
            "".join(state.get_log(actor_id=actor))  # errors="strict", as in Ray
        replaced = "".join(state.get_log(actor_id=actor, errors="replace"))
        assert "bytes \ufffd\ufffd that are not utf-8" in replaced
        assert "bytes  that are not" in "".join(state.get_log(actor_id=actor, errors="ignore"))
        latin = "".join(state.get_log(actor_id=actor, encoding="latin-1", tail=1))
        assert latin == BAD.decode("latin-1")
        with pytest.raises(ValueError, match="errors 'bogus'"):
            state.get_log(actor_id=actor, errors="bogus")
        with pytest.raises(ValueError, match="encoding 'klingon'"):
            state.get_log(actor_id=actor, encoding="klingon")
    finally:
        zray.shutdown()
