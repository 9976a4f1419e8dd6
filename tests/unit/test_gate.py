"""What the worker lets in: the CurveZMQ allow-list, rejection logging, request checks."""

from __future__ import annotations

import logging

import pytest
import zmq

from worker_kernel.gate import AllowList, BadRequest, RejectionLog, number
from worker_kernel.protocol.curve import CLIENT, ensure_keypair, load_keypair
from worker_kernel.protocol.wire import Peek, peek


def test_allow_list_reads_changes_and_survives_broken_files(tmp_path):
    allowed = tmp_path / "authorized_keys"
    allowed.mkdir()
    public, secret = ensure_keypair(tmp_path / "a", CLIENT)
    key, _ = load_keypair(secret)
    check = AllowList(allowed)
    assert not check.callback("*", key)
    (allowed / "a.key").write_bytes(public.read_bytes())
    assert check.callback("*", key)
    (allowed / "typo.key").write_text("public-key\n")  # malformed: skipped, not fatal
    assert check.callback("*", key)
    other_public, other_secret = ensure_keypair(tmp_path / "b", CLIENT)
    (allowed / "a.key").write_bytes(other_public.read_bytes())  # rewritten in place
    assert not check.callback("*", key)  # the old key is revoked at once
    assert check.callback("*", load_keypair(other_secret)[0])


def test_rejections_are_logged_once_per_peer_per_quiet_period(caplog):
    log = RejectionLog(logging.getLogger("test"), quiet=60)
    with caplog.at_level(logging.WARNING):
        answers = [log.note("10.0.0.9", "bad signature") for _ in range(100)]
    assert len(caplog.records) == 1
    assert answers[0] and sum(answers) <= 21  # a burst is not answered forever


def test_a_flood_from_many_peers_is_one_truncated_line_a_second(caplog):
    log = RejectionLog(logging.getLogger("test"), quiet=60)
    with caplog.at_level(logging.WARNING):
        for i in range(1000):  # 1000 peers, each with a 3 MB reason, within a second
            log.note(f"10.0.{i // 256}.{i % 256}", "x" * 3_000_000)
    assert len(caplog.records) == 1
    assert len(caplog.records[0].getMessage()) < 600


def test_claimed_id_never_parses_hostile_headers():
    header = b'{"id":"' + b"a" * 32 + b'"}'
    assert peek([b"L2G", b"2", b"execute", header]).claimed_id == "a" * 32
    assert peek([b"L2G", b"2", b"execute", header]).kind == "execute"
    assert peek([b"", b"", b"", b"[" * 100_000]).claimed_id == ""
    assert peek([b"", b"", b"no such kind", header]).kind == ""
    assert peek([b""]) == peek([]) == peek([b"", b"", "not bytes"])
    frames = [zmq.Frame(f) for f in (b"L2G", b"2", b"result", header)]  # as received
    assert peek(frames) == peek([f.buffer for f in frames]) == Peek("result", "a" * 32)


@pytest.mark.parametrize("bad", ["soon", -1, True, float("nan"), float("inf")])
def test_numbers_in_requests_are_checked(bad):
    with pytest.raises(BadRequest):
        number({"timeout": bad}, "timeout")


def test_zmq_is_recent_enough_here():
    from worker_kernel.__main__ import check_libzmq
    from worker_kernel.protocol.errors import ConfigurationError

    check_libzmq(zmq.zmq_version_info())
    with pytest.raises(ConfigurationError, match=r"libzmq 4\.3\.2 is older than 4\.3\.3"):
        check_libzmq((4, 3, 2))
