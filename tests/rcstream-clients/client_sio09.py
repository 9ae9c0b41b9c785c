"""The 2016 RCStream example (socketIO-client 0.5.x), made testable: prints
each change as a JSON line and exits after COUNT changes or SECONDS.

    python client_sio09.py PORT TRANSPORT PATTERN-JSON COUNT SECONDS
"""
import json
import sys
import time

import socketIO_client

port, transport, pattern, count, seconds = (
    int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
seen = []


class WikiNamespace(socketIO_client.BaseNamespace):
    def on_change(self, change):
        print(json.dumps({"change": change}), flush=True)
        seen.append(change)

    def on_error(self, *args):
        print(json.dumps({"error": list(args)}), flush=True)

    def on_connect(self):
        print(json.dumps({"connected": True}), flush=True)
        self.emit('subscribe', pattern, lambda *args: print(json.dumps({"ack": list(args)}), flush=True))


socketIO = socketIO_client.SocketIO('127.0.0.1', port, transports=[transport])
socketIO.define(WikiNamespace, '/rc')
deadline = time.time() + seconds
while len(seen) < count and time.time() < deadline:
    socketIO.wait(2)
print(json.dumps({"transport": socketIO._transport_name}), flush=True)
socketIO.disconnect()
sys.exit(0 if len(seen) >= count else 1)
