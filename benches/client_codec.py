"""How many 64-byte COMMAND frames per second the client codec encodes and decodes.

    python -m benches.client_codec [--frames 200000] [--runs 7]

Napkin math: the sequencer's budget at 500 k commands/s is 2 us per command for everything
(read, parse, stamp, publish, reply). The codec should take a small part of it: a struct unpack
(~100 ns), a bytes copy of the payload (~50 ns) and a frame object (~60 ns) per frame on the
decode side, a struct pack and two bytearray appends on the encode side.

Each run encodes `frames` commands as a pipelining client does (`send_command_into` one bytearray)
and decodes them as the server does (`receive_data` in READ_BYTES_MAX reads, `next_frames` until
empty); the same for REPLY frames the other way. The first run is a warm-up and is discarded; the
median and the best of the rest are printed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from sequencer.client.protocol import (
    FRAME_BYTES_MAX,
    READ_BYTES_MAX,
    Connection,
    Hello,
    Side,
    Welcome,
)

PAYLOAD_BYTES = 64


def open_pair() -> tuple[Connection, Connection]:
    client, server = Connection(Side.CLIENT), Connection(Side.SERVER)
    server.receive_data(client.send(Hello(client_id=1)))
    server.next_frame()
    client.receive_data(
        server.send(Welcome(session_id=1, node="n1", frame_bytes_max=FRAME_BYTES_MAX))
    )
    client.next_frame()
    return client, server


def decode_all(connection: Connection, data: bytearray) -> int:
    count = 0
    view = memoryview(data)
    for start in range(0, len(data), READ_BYTES_MAX):
        connection.receive_data(view[start : start + READ_BYTES_MAX])
        while frames := connection.next_frames():
            count += len(frames)
    view.release()
    return count


def one_run(frames: int) -> dict[str, float]:
    client, server = open_pair()
    payload = b"c" * PAYLOAD_BYTES
    started = time.perf_counter()
    commands = bytearray()
    send_command_into = client.send_command_into
    for request_id in range(1, frames + 1):
        send_command_into(commands, request_id, request_id - 1, 1, payload)
    encoded = time.perf_counter()
    assert decode_all(server, commands) == frames
    decoded = time.perf_counter()
    replies = bytearray()
    send_reply_into = server.send_reply_into
    for request_id in range(1, frames + 1):
        send_reply_into(replies, request_id, request_id, 0, 1, payload)
    replies_encoded = time.perf_counter()
    assert decode_all(client, replies) == frames
    replies_decoded = time.perf_counter()
    return {
        "command encode": frames / (encoded - started),
        "command decode": frames / (decoded - encoded),
        "command encode+decode": frames / (decoded - started),
        "reply encode": frames / (replies_encoded - decoded),
        "reply decode": frames / (replies_decoded - replies_encoded),
        "reply encode+decode": frames / (replies_decoded - decoded),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=7)
    arguments = parser.parse_args()
    results = [one_run(arguments.frames) for _ in range(arguments.runs)][1:]
    print(
        f"client codec, {PAYLOAD_BYTES}-byte payloads, {arguments.frames} frames x "
        f"{len(results)} runs (warm-up discarded); Python {platform.python_version()}, "
        f"{platform.machine()}"
    )
    for name in results[0]:
        rates = [result[name] for result in results]
        print(
            f"  {name:24s} median {statistics.median(rates) / 1e6:6.2f} M frames/s"
            f"   best {max(rates) / 1e6:6.2f} M frames/s"
        )


if __name__ == "__main__":
    main()
