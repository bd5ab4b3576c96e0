"""The direct transport's protocol against a real worker: named ops, plain msgpack, a batched stream each way.

Messages read from a comm hold tuples where they were sent with lists (distributed reads msgpack
arrays as tuples), so the expected messages below are written with tuples.
"""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest
from distributed import Scheduler, Worker
from distributed.comm import connect
from distributed.utils_test import async_poll_for

from daskinfer.connectors.direct.endpoint import endpoint_for
from daskinfer.connectors.direct.link import on_wire, open_stream, post, read_messages
from daskinfer.connectors.direct.protocol import CONNECT_OP, TO_CLIENT, Moved, Queued, Results, Send, client_of
from daskinfer.exceptions import CodecError
from daskinfer.wire.codec import SplitMessage
from daskinfer.wire.frames import decode_requests, encode_request_frame
from daskinfer.wire.result_frames import decode_results, encode_result_frame


def test_messages_are_plain_msgpack_with_named_ops():
    for message in (Send("in", 1, 7, [b"frame"]), Queued([7, 8]), Moved([9]), Results([b"result"], [7])):
        msg = msgpack.unpackb(msgpack.packb(message.to_msg()))  # no pickle, no ext types: plain msgpack
        assert msg["op"] == message.op and msg["op"].startswith("daskinfer-")
        kind = {Send.op: Send, **TO_CLIENT}[msg.pop("op")]
        assert kind(**msg) == message


def test_client_of_reads_only_direct_reply_targets():
    assert client_of("direct:abc") == "abc"
    assert client_of("daskinfer-replies-abc") is None


async def _open(worker, client_id: str):
    comm = await connect(worker.address)
    await comm.write({"op": CONNECT_OP, "client": client_id, "reply": False})
    return open_stream(comm), aiter(read_messages(comm))


async def _queues_answers_and_moves(a: Worker) -> None:
    endpoint = endpoint_for(a)
    queue = endpoint.open_queue("in", 0, max_messages=2, max_bytes=1_000)
    stream, messages = await _open(a, "c1")
    try:
        post(stream, Send("in", 0, 1, [b"r1"]))
        assert await anext(messages) == Queued((1,))
        post(stream, Send("in", 5, 2, [b"r2"]))  # no such partition here
        assert await anext(messages) == Moved((2,))
        post(stream, Send("in", 0, 3, [b"r3", b"r4"]))  # does not fit: parked, acknowledged once queued
        await async_poll_for(lambda: queue.parked, timeout=5)
        (taken,) = queue.take(1)
        assert (taken.client, taken.seq, taken.payloads) == ("c1", 1, (b"r1",))
        assert await anext(messages) == Queued((3,))
        assert endpoint.deliver("c1", [b"answer"], [1])
        assert await anext(messages) == Results((b"answer",), (1,))
        endpoint.close_queue(queue)  # the partition leaves: what it did not take goes back
        assert await anext(messages) == Moved((3,))
        assert not stream.recent_message_log  # request and result frames are not kept after they are written
    finally:
        stream.abort()
    assert not endpoint.deliver("nobody", [b"lost"], [1])
    assert endpoint.undeliverable == 1


def test_worker_queues_answers_and_moves_sends():
    async def main() -> None:
        async with Scheduler(port=0, dashboard_address=":0") as s, Worker(s.address, nthreads=1) as a:
            await _queues_answers_and_moves(a)

    asyncio.run(main())


async def _split_frames_cross_the_comm(a: Worker) -> None:
    endpoint = endpoint_for(a)
    queue = endpoint.open_queue("in", 0, max_messages=10, max_bytes=10_000_000)
    stream, messages = await _open(a, "c2")
    block = np.random.default_rng(1).standard_normal((4096, 16)).astype(np.float32)
    try:
        request = encode_request_frame(["r1"], {"x": block}, rows=np.array([4096]), batched=True, split=True)
        post(stream, Send("in", 0, 1, [request]))
        assert await anext(messages) == Queued((1,))
        # a split message a broken client made is queued like any bytes (its requests get an error
        # result where the partition decodes it): the comm goes on
        post(stream, Send("in", 0, 2, [SplitMessage(request.head, ())]))
        assert await anext(messages) == Queued((2,))
        good, broken = queue.take(10)
        (payload,) = good.payloads
        assert type(payload) is SplitMessage and payload.buffers  # read as frames, not joined into bytes
        cols = decode_requests(payload)
        assert cols.ids == ["r1"]
        np.testing.assert_array_equal(cols.inputs["x"], block)
        with pytest.raises(CodecError, match="names buffer 0, but the message has 0 buffers"):
            decode_requests(broken.payloads[0])
        out = {"probabilities": block[:, :2].copy()}
        answer = encode_result_frame(["r1"], out, rows=np.array([4096]), batched=True, split=True)
        assert endpoint.deliver("c2", [answer], [1, 2])
        results = await anext(messages)
        assert results.seqs == (1, 2)
        (res,) = decode_results(results.data[0]).results()
        np.testing.assert_array_equal(res.value(), out["probabilities"])
    finally:
        stream.abort()
        endpoint.close_queue(queue)


def test_split_frames_cross_a_real_comm_with_their_arrays():
    async def main() -> None:
        async with Scheduler(port=0, dashboard_address=":0") as s, Worker(s.address, nthreads=1) as a:
            await _split_frames_cross_the_comm(a)

    asyncio.run(main())


def test_a_split_frame_without_buffers_travels_as_its_bytes():
    """Single rows make frames whose arrays are all small: nothing travels beside them, so the frame is
    sent as plain bytes (no frames of its own for distributed to write and read)."""
    rows = np.ones((4, 16), np.float32)
    split = encode_request_frame(["a", "b", "c", "d"], {"x": rows}, split=True)
    assert split.buffers == ()
    (payload,) = [on_wire(p) for p in Send("in", 0, 1, [split]).data]
    assert type(payload) is bytes and decode_requests(payload).ids == ["a", "b", "c", "d"]
