"""The far end of the channel benchmark (``suite_channel``): reads frames from
the given channel and answers each ``Call`` message with a ``Done`` one, all
the answers to one frame in one frame (as a worker batches its completions);
``Shutdown`` or the end of the channel stops it.

``python -m hlasync.bench._channel_child KIND FD...`` with KIND ``pipe``
(read FD, write FD), ``socketpair`` (socket FD) or ``shared-memory ring``
(memfd, down eventfd, up eventfd)."""

from __future__ import annotations

import mmap
import os
import socket
import sys
from collections.abc import Callable

from ..supervisor.channel import Decoder, encode
from ..supervisor.messages import Call, Done, Shutdown, ToSupervisor, ToWorker


def main(argv: list[str]) -> None:
    kind, fds = argv[0], [int(a) for a in argv[1:]]
    receive: Callable[[], bytes]
    send: Callable[[bytes], None]
    if kind == "pipe":
        from .suite_channel import _write_all

        read_fd, write_fd = fds

        def receive() -> bytes:
            return os.read(read_fd, 1 << 20)

        def send(data: bytes) -> None:
            _write_all(write_fd, data)

    elif kind == "socketpair":
        sock = socket.socket(fileno=fds[0])
        receive, send = (lambda: sock.recv(1 << 20)), sock.sendall
    else:
        from .suite_channel import _DATA_AT, RING_BYTES, Ring

        memory, down_event, up_event = fds
        buffer = mmap.mmap(memory, 2 * (_DATA_AT + RING_BYTES))
        down, up = Ring(buffer, 0, down_event), Ring(buffer, _DATA_AT + RING_BYTES, up_event)
        send = up.write

        def receive() -> bytes:
            while True:  # a ring has no end: ``Shutdown`` stops the child
                data = down.read()
                if data:
                    return data

    decoder = Decoder[ToWorker]()
    while True:
        data = receive()
        if not data:
            return
        answers: list[ToSupervisor] = []
        for batch in decoder.feed(data):
            for message in batch:
                match message:
                    case Call(call_id=call_id):
                        answers.append(Done(call_id, 3, None, None, {}))
                    case Shutdown():
                        return
        if answers:
            send(encode(answers))


if __name__ == "__main__":
    main(sys.argv[1:])
