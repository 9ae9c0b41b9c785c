"""A python-socketio 5.x (or 4.x) client of `/rc`: prints each change as a
JSON line and exits after COUNT changes or SECONDS.

    python client_sio5.py URL TRANSPORTS PATTERN-JSON COUNT SECONDS
"""
import json
import sys
import threading

import socketio

url, transports, pattern, count, seconds = (
    sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
sio = socketio.Client(reconnection=False)
done = threading.Event()
seen = []
lock = threading.Lock()  # python-socketio runs each handler in a thread of its own


def out(value):
    with lock:
        print(json.dumps(value), flush=True)


@sio.on('connect', namespace='/rc')
def on_connect():
    out({"connected": True})
    sio.emit('subscribe', pattern, namespace='/rc', callback=lambda *args: out({"ack": list(args)}))


@sio.on('change', namespace='/rc')
def on_change(change):
    out({"change": change})
    with lock:
        seen.append(change)
        if len(seen) >= count:
            done.set()


@sio.on('error', namespace='/rc')
def on_error(*args):
    out({"error": list(args)})


try:
    sio.connect(url, namespaces=['/rc'], transports=transports.split(','), wait_timeout=10)
except TypeError:  # python-socketio 4.x has no wait_timeout
    sio.connect(url, namespaces=['/rc'], transports=transports.split(','))
ok = done.wait(seconds)
out({"transport": sio.transport()})
sio.disconnect()
sys.exit(0 if ok else 1)
