// A same-origin page runs a plain `new EventSource(path)`; the browser's own
// reconnects (with Last-Event-ID) are what is tested.
//
//   node eventsource.mjs --base http://127.0.0.1:PORT --path /v2/stream/x --timeout 90
//
// stdout, one JSON object a line: {"opened": n} at every open; then, once a
// line {"expect": N} arrives on stdin and N messages have been seen (plus a
// quiet second to catch duplicates), {"result": {...}} and exit 0.
import { createInterface } from 'node:readline';
import { args, deadline, emit, launch, sleep } from './chromium.mjs';

const opt = args();
const { context, close } = await launch();
const timer = deadline(Number(opt.timeout || 90), close);
let expect = null;
createInterface({ input: process.stdin }).on('line', (line) => {
  const msg = JSON.parse(line);
  if ('expect' in msg) expect = msg.expect;
});

try {
  const page = context.pages()[0] || await context.newPage();
  const console_errors = [];
  page.on('console', (m) => { if (m.type() === 'error') console_errors.push(m.text()); });
  page.on('pageerror', (e) => console_errors.push(String(e)));
  // The Last-Event-ID header of every stream request, as sent on the wire
  // (DevTools' extra-info event: Playwright's request.headers() omits it).
  const requests = [];
  const cdp = await context.newCDPSession(page);
  cdp.on('Network.requestWillBeSentExtraInfo', (e) => {
    const headers = Object.fromEntries(Object.entries(e.headers).map(([k, v]) => [k.toLowerCase(), v]));
    if (headers.accept === 'text/event-stream') {  // only EventSource asks for that
      requests.push({ last_event_id: headers['last-event-id'] ?? null });
    }
  });
  await cdp.send('Network.enable');
  let opened = 0;
  await page.exposeFunction('reportOpen', (n) => { opened = n; emit({ opened: n }); });

  // /_info is JSON: no icon of its own, so chromium asks for /favicon.ico (a 404 here).
  await page.route('**/favicon.ico', (route) => route.fulfill({ status: 204 }));
  await page.goto(opt.base + '/_info');
  await page.evaluate((path) => {
    window.seen = [];
    window.errors = 0;
    let opens = 0;
    const source = new EventSource(path);
    window.source = source;
    source.onopen = () => { opens += 1; window.reportOpen(opens); };
    source.onerror = () => { window.errors += 1; };
    source.onmessage = (e) => {
      const meta = JSON.parse(e.data).meta;
      window.seen.push({ topic: meta.topic, partition: meta.partition, offset: meta.offset,
                         last_event_id: e.lastEventId });
    };
  }, opt.path);

  // The test's last event is a sentinel: once `expect` events are here, a
  // duplicate would have taken the place of one of them (no wait for more).
  while (expect === null || (await page.evaluate(() => window.seen.length)) < expect) await sleep(100);
  const page_state = await page.evaluate(() => {
    window.source.close();
    return { seen: window.seen, errors: window.errors };
  });
  emit({ result: { opened, requests, console_errors, ...page_state } });
} catch (e) {
  process.stderr.write(String(e.stack || e) + '\n');
  process.exitCode = 1;
} finally {
  clearTimeout(timer);
  await close();
}
process.exit();
