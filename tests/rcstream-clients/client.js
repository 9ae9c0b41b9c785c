// A Socket.IO client of the RCStream bridge tests, in the style of the 2016
// RCStream examples: connect to <url>/rc, subscribe, print each change as a
// JSON line ({"change": …}, {"error": …}, {"ack": …}), exit after <count>
// changes or on a timeout.
//   node client.js <0.9|1|2|4> <base url> <transport> <pattern-json> <count> [seconds]
'use strict';
const [version, base, transport, patternJson, countText, secondsText] = process.argv.slice(2);
const pattern = JSON.parse(patternJson);
const count = Number(countText);
const seconds = Number(secondsText || 20);
const out = (value) => process.stdout.write(JSON.stringify(value) + '\n');

let socket;
if (version === '0.9') {
  const io = require('socket.io-client-0.9');
  // 0.9 tries the server's transports in the server's order, restricted to
  // io.transports (the `transports` option is merged into it element-wise).
  io.transports = [transport];
  socket = io.connect(base + '/rc', { 'force new connection': true, reconnect: false });
} else {
  const io = require('socket.io-client-' + version);
  socket = io(base + '/rc', { transports: transport === 'upgrade' ? ['polling', 'websocket'] : [transport],
                              reconnection: false, forceNew: true });
}

let seen = 0;
const transportName = () => {
  try {
    return version === '0.9' ? socket.socket.transport.name : socket.io.engine.transport.name;
  } catch (e) { return null; }
};
let finished = false;
const finish = (code) => {
  if (finished) return;
  finished = true;
  out({ transport: transportName() });
  try { socket.disconnect(); } catch (e) { /* already gone */ }
  setTimeout(() => process.exit(code), 50);
};
socket.on('connect', () => {
  out({ connected: true });
  socket.emit('subscribe', pattern, (...args) => out({ ack: args }));
});
socket.on('change', (change) => {
  if (finished) return;
  out({ change });
  seen += 1;
  if (seen >= count) finish(0);
});
socket.on('error', (error) => out({ error: String(error) }));
socket.on('connect_error', (error) => out({ error: String(error) }));
setTimeout(() => { out({ timeout: true }); finish(1); }, seconds * 1000);
