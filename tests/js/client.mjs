// A WhatWG EventSource client (npm `eventsource`) for tests/test_clients.py.
//
//   node client.mjs URL COUNT [--timeout SECONDS] [--last-event-id ID]
//
// Prints each message as one JSON line {"id": lastEventId, "data": data} on
// stdout and exits 0 after COUNT messages. On stderr it logs one line per
// "open" and "error" event (the library reconnects by itself after an error).
// Exits 2 on timeout, 3 if the library gives up (readyState CLOSED).
import { EventSource } from "eventsource";

function usage() {
  process.stderr.write("usage: node client.mjs URL COUNT [--timeout SECONDS] [--last-event-id ID]\n");
  process.exit(64);
}

const args = process.argv.slice(2);
if (args.length < 2) usage();
const [url, countText, ...rest] = args;
const count = Number.parseInt(countText, 10);
let timeoutSeconds = 20;
let initialLastEventId = null;
for (let i = 0; i < rest.length; i += 2) {
  if (rest[i] === "--timeout") timeoutSeconds = Number.parseFloat(rest[i + 1]);
  else if (rest[i] === "--last-event-id") initialLastEventId = rest[i + 1];
  else usage();
}

// The only way to give EventSource a starting Last-Event-ID is its `fetch`
// option; once it has seen an id itself it sends its own, which wins.
function fetchWithLastEventId(input, init) {
  const headers = { ...init.headers };
  const hasOwn = Object.keys(headers).some((k) => k.toLowerCase() === "last-event-id");
  if (initialLastEventId !== null && !hasOwn) headers["Last-Event-ID"] = initialLastEventId;
  return fetch(input, { ...init, headers });
}

let received = 0;
const source = new EventSource(url, { fetch: fetchWithLastEventId });

function finish(code) {
  clearTimeout(timer);
  source.close();
  // Let stdout drain before exiting.
  process.stdout.write("", () => process.exit(code));
}

const timer = setTimeout(() => {
  process.stderr.write(`timeout after ${timeoutSeconds}s with ${received} of ${count} messages\n`);
  finish(2);
}, timeoutSeconds * 1000);

source.addEventListener("open", () => process.stderr.write("open\n"));
source.addEventListener("error", (e) => {
  process.stderr.write(`error ${JSON.stringify({ code: e.code ?? null, message: e.message ?? null })}\n`);
  if (source.readyState === EventSource.CLOSED) finish(3);
});
source.addEventListener("message", (e) => {
  process.stdout.write(JSON.stringify({ id: e.lastEventId, data: e.data }) + "\n");
  received += 1;
  if (received >= count) finish(0);
});
