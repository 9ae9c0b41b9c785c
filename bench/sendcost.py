"""What one `send()` costs on loopback, outside the server.

`python -m bench.sendcost [--sockets N]`: this process (pinned to core 0)
sends payloads of several sizes to N loopback sockets read by a child
process (core 1) and prints the sender's CPU time per `send()`. Compare
with the server's cost per `send()` under load (`perf stat -e
syscalls:sys_enter_sendto` on its pid): what exceeds this is not the data
copy but the work around it (the reader's wake-up, ACK processing).
"""
from __future__ import annotations

import argparse
import os
import select
import socket
import time


def reader(sockets: list[socket.socket]) -> None:
    os.sched_setaffinity(0, {1})
    poller = select.epoll()
    by_fd = {}
    for s in sockets:
        s.setblocking(False)
        poller.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = s
    while True:
        for fd, _ in poller.poll():
            try:
                if not by_fd[fd].recv(1 << 18):
                    os._exit(0)
            except BlockingIOError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sendcost", description=__doc__)
    parser.add_argument("--sockets", type=int, default=1000)
    args = parser.parse_args()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    clients, servers = [], []
    for _ in range(args.sockets):  # pairwise: the accept queue stays short
        clients.append(socket.create_connection(("127.0.0.1", port)))
        servers.append(listener.accept()[0])
    child = os.fork()
    if child == 0:
        for s in servers:
            s.close()
        reader(clients)
    for s in clients:
        s.close()
    os.sched_setaffinity(0, {0})
    for s in servers:
        s.setblocking(False)
    for size in (200, 1300, 2600, 6500, 13000, 26000):
        data = b"x" * size
        rounds = 200 if size < 10000 else 100
        started, short = time.process_time(), 0
        for _ in range(rounds):
            for s in servers:
                try:
                    if s.send(data) < size:
                        short += 1
                except BlockingIOError:
                    short += 1
            time.sleep(0.002)  # let the reader drain
        per_send = (time.process_time() - started) / (rounds * len(servers))
        print(f"{size:6d} bytes: {per_send * 1e6:5.2f} µs of sender CPU per send() (short writes: {short})")
    for s in servers:
        s.close()
    os.waitpid(child, 0)


if __name__ == "__main__":
    main()
