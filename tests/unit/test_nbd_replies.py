"""NBD reply handling against scripted server bytes (the real server: integration tests).

The fake server's bytes are written into a socketpair before the client reads them, so
each test controls framing, order and errors exactly.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsnap.image import nbd
from qsnap.image.errors import NbdError

SIZE = 1 << 20


def _chunk(flags: int, ctype: int, cookie: int, payload: bytes) -> bytes:
    return (
        struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, flags, ctype, cookie, len(payload))
        + payload
    )


def _client() -> tuple[nbd.NbdClient, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    client = nbd.NbdClient(ours, window=16)
    client.size = SIZE
    client.meta_context_id = 7
    return client, theirs


def _opt_reply(opt: int, rtype: int, data: bytes) -> bytes:
    return struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data


def test_handshake_parses_export_info_and_meta_context() -> None:
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.sendall(
        struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 3)
        + _opt_reply(nbd.Opt.STRUCTURED_REPLY, nbd.Rep.ACK, b"")
        + _opt_reply(nbd.Opt.SET_META_CONTEXT, nbd.Rep.META_CONTEXT, b"\0\0\0\x05base:allocation")
        + _opt_reply(nbd.Opt.SET_META_CONTEXT, nbd.Rep.ACK, b"")
        + _opt_reply(nbd.Opt.GO, nbd.Rep.INFO, struct.pack(">HQH", 0, 12345 * 512, 0x4D))
        + _opt_reply(nbd.Opt.GO, nbd.Rep.INFO, struct.pack(">HIII", 3, 1, 4096, 1 << 22))
        + _opt_reply(nbd.Opt.GO, nbd.Rep.ACK, b"")
    )
    client = nbd.NbdClient(ours)
    client._handshake("qsnap")
    assert (client.size, client.meta_context_id, client.max_payload) == (12345 * 512, 5, 1 << 22)
    assert client.flags & nbd.TransmissionFlag.SEND_WRITE_ZEROES
    assert not client.read_only
    sent = theirs.recv(4096)
    assert sent[:4] == b"\0\0\0\x03"  # FIXED_NEWSTYLE | NO_ZEROES echoed
    assert b"base:allocation" in sent


def test_refused_option_surfaces_server_text() -> None:
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.sendall(
        struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 1)
        + _opt_reply(nbd.Opt.STRUCTURED_REPLY, nbd.REP_ERR_BIT | 1, b"no structured replies here")
    )
    with pytest.raises(NbdError, match="STRUCTURED_REPLY refused: no structured replies here"):
        nbd.NbdClient(ours)._handshake("qsnap")


def test_error_chunk_message_and_errno() -> None:
    client, server = _client()
    cookie = client.submit_write(4096, b"x" * 512)
    msg = b"No space left on device while writing"
    server.sendall(_chunk(1, nbd.ChunkType.ERROR, cookie, struct.pack(">IH", 28, len(msg)) + msg))
    with pytest.raises(NbdError) as info:
        client.wait(cookie)
    assert str(info.value) == (
        "NBD WRITE at 0x1000+0x200: No space left on device: No space left on device while writing"
    )
    assert info.value.errno == errno.ENOSPC


def test_simple_error_reply_and_unknown_cookie() -> None:
    client, server = _client()
    cookie = client.submit_trim(0, 4096)
    server.sendall(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 1, cookie))
    with pytest.raises(NbdError, match=r"NBD TRIM at 0x0\+0x1000: Operation not permitted"):
        client.wait(cookie)
    server.sendall(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, 999))
    client.submit_flush()
    with pytest.raises(NbdError, match="unknown cookie 999"):
        client.drain()


def test_request_beyond_export_is_refused_locally() -> None:
    client, _server = _client()
    with pytest.raises(NbdError, match="beyond the export"):
        client.submit_read(SIZE - 512, 1024)


@settings(max_examples=50)
@given(st.data())
def test_read_chunks_in_any_order_reassemble(data: st.DataObject) -> None:
    """DATA and HOLE chunks, interleaved between two reads in any order."""
    client, server = _client()
    contents = {}
    plan = []
    for base in (0, 65536):
        length = data.draw(st.integers(1, 16)) * 512
        cuts = sorted(
            data.draw(st.sets(st.integers(1, length // 512 - 1) if length > 512 else st.nothing()))
        )
        bounds = [0, *(c * 512 for c in cuts), length]
        buf = bytearray(length)
        cookie = client.submit_read(base, length)
        for start, stop in itertools.pairwise(bounds):
            if data.draw(st.booleans()):
                piece = data.draw(st.binary(min_size=stop - start, max_size=stop - start))
                buf[start:stop] = piece
                plan.append(
                    (cookie, nbd.ChunkType.OFFSET_DATA, struct.pack(">Q", base + start) + piece)
                )
            else:
                plan.append(
                    (
                        cookie,
                        nbd.ChunkType.OFFSET_HOLE,
                        struct.pack(">QI", base + start, stop - start),
                    )
                )
        contents[cookie] = bytes(buf)
    order = data.draw(st.permutations(plan))
    last = {cookie: max(i for i, p in enumerate(order) if p[0] == cookie) for cookie in contents}
    server.sendall(
        b"".join(
            _chunk(1 if i == last[cookie] else 0, ctype, cookie, payload)
            for i, (cookie, ctype, payload) in enumerate(order)
        )
    )
    for cookie, want in reversed(contents.items()):
        assert bytes(client.wait_read(cookie)) == want


def test_block_status_extents_of_our_context_only() -> None:
    client, server = _client()
    cookie = client.submit_block_status(8192, 3 * 4096)
    server.sendall(
        _chunk(0, nbd.ChunkType.BLOCK_STATUS, cookie, struct.pack(">IIIII", 9, 4096, 0, 4096, 3))
        + _chunk(1, nbd.ChunkType.BLOCK_STATUS, cookie, struct.pack(">IIIII", 7, 4096, 0, 8192, 3))
    )
    assert client.wait(cookie).extents == [
        nbd.StatusExtent(8192, 4096, nbd.AllocFlag.NONE),
        nbd.StatusExtent(12288, 8192, nbd.AllocFlag.HOLE | nbd.AllocFlag.ZERO),
    ]


def test_server_closing_is_an_error_not_a_hang() -> None:
    client, server = _client()
    cookie = client.submit_read(0, 512)
    server.close()
    with pytest.raises(NbdError, match="closed the connection"):
        client.wait_read(cookie)
