// Drives the stream browser at /v2/ui: the stream list, the first stream
// opened by itself, choosing a stream, live rows, a filter, a row's JSON that
// stays in view, a filter that matches nothing (the skipped count); then
// screenshots.
//
//   node ui.mjs --base http://127.0.0.1:PORT --stream NAME --screenshot out.png [--screenshot-empty empty.png] [--width 1280]
//
// Prints one line {"result": {...}} and exits 0; the caller asserts on it.
import { args, deadline, emit, launch } from './chromium.mjs';

const opt = args();
const width = Number(opt.width || 1280);
const { context, close } = await launch({ viewport: { width, height: 900 } });
const timer = deadline(Number(opt.timeout || 60), close);
const result = { console_errors: [], failed_requests: [] };

try {
  const page = context.pages()[0] || await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') result.console_errors.push(m.text()); });
  page.on('pageerror', (e) => result.console_errors.push(String(e)));
  page.on('requestfailed', (r) => {
    // Leaving a stream (a new selection, the end of the test) aborts its request.
    if (!r.url().includes('/v2/stream/')) result.failed_requests.push(`${r.url()}: ${r.failure()?.errorText}`);
  });

  const response = await page.goto(opt.base + '/v2/ui');
  result.status = response.status();
  result.csp = response.headers()['content-security-policy'] || null;
  await page.waitForSelector('#streams input');
  result.streams = await page.$$eval('#streams li', (items) => items.map((li) => ({
    name: li.querySelector('input').value,
    description: li.querySelector('.description').textContent,
    label: li.querySelector('label').textContent,
  })));
  result.labelled = await page.$$eval('input:not([type=hidden]), select, button', (controls) =>
    controls.filter((c) => !(c.labels && c.labels.length) && !c.getAttribute('aria-label') && !c.textContent.trim())
      .map((c) => c.id || c.className));

  // Nothing chosen: the page opens the first stream by itself.
  await page.waitForFunction(() => document.querySelectorAll('#events li').length >= 5, null, { timeout: 20000 });
  result.auto = {
    hash: await page.evaluate(() => location.hash),
    checked: await page.$$eval('#streams input:checked', (boxes) => boxes.map((b) => b.value)),
    status: await page.textContent('#status'),
  };

  // Choose the stream with the keyboard: focus its checkbox, Space (off) and
  // Space (on again), then Enter in "since".
  await page.focus(`#streams input[value="${opt.stream}"]`);
  await page.keyboard.press('Space');
  await page.keyboard.press('Space');
  await page.focus('#since');
  await page.keyboard.press('Enter');
  await page.waitForFunction(() => document.querySelectorAll('#events li').length >= 5, null, { timeout: 20000 });
  result.rows = await page.$$eval('#events li', (rows) => rows.length);
  result.first_row = await page.$eval('#events li summary', (s) => s.textContent);
  result.status_open = await page.textContent('#status');
  result.hash = await page.evaluate(() => location.hash);

  // A filter: only dewiki, and not bots.
  await page.fill('#filter-wiki', 'dewiki');
  await page.selectOption('#filter-bot', 'true');
  await page.check('#filter-bot-not');
  await page.click('#connect');
  await page.waitForFunction(() => document.querySelectorAll('#events li').length >= 3, null, { timeout: 20000 });
  result.filtered_wikis = await page.$$eval('#events .c-wiki', (cells) => cells.map((c) => c.textContent));
  result.filtered_hash = await page.evaluate(() => location.hash);

  // Expand the newest row: its JSON appears, and the row stays where it is
  // (new rows wait) while events keep arriving, until it is closed again.
  await page.click('#events li summary');
  const json = JSON.parse(await page.textContent('#events li pre.json'));
  result.expanded = { wiki: json.wiki, bot: json.bot };
  const where = () => page.$eval('#events li details[open]', (d) => ({
    key: d.parentElement.dataset.topic + '/' + d.parentElement.dataset.offset,
    top: Math.round(d.getBoundingClientRect().top),
  }));
  const opened = await where();
  await page.waitForFunction(() => /paused while a row is open: [1-9]/.test(document.getElementById('counts').textContent),
    null, { timeout: 10000 });
  const later = await where();
  result.open_row = {
    stays: opened.key === later.key && opened.top === later.top,
    pressed: await page.getAttribute('#pause', 'aria-pressed'),
    counts: await page.textContent('#counts'),
  };
  await page.click('#events li details[open] summary');
  await page.waitForFunction(() => document.getElementById('pause').getAttribute('aria-pressed') === 'false',
    null, { timeout: 5000 }).catch(() => {});
  result.open_row.after_close = await page.getAttribute('#pause', 'aria-pressed');

  // Copy the curl command (shown in the snippet box too).
  await page.click('#copy-curl');
  await page.waitForFunction(() => !document.getElementById('snippet').hidden);
  result.curl = await page.textContent('#snippet');

  // Pause: rows stop changing while events keep arriving.
  await page.click('#pause');
  const before = await page.$eval('#events li', (li) => li.dataset.topic + '/' + li.dataset.offset);
  await page.waitForFunction(() => /not shown/.test(document.getElementById('counts').textContent), null, { timeout: 10000 });
  result.paused_same_top = before === await page.$eval('#events li', (li) => li.dataset.topic + '/' + li.dataset.offset);
  await page.click('#pause');
  // The rate is counted per second: wait for a tick that saw events.
  await page.waitForFunction(() => Number(document.getElementById('rate').textContent) > 0, null, { timeout: 10000 })
    .catch(() => {});
  result.rate = Number(await page.textContent('#rate'));
  result.status_text = await page.textContent('#status');

  if (opt.screenshot) {
    await page.screenshot({ path: opt.screenshot, fullPage: opt.full === 'true' });
    result.screenshot = opt.screenshot;
  }

  // A filter nothing matches: the view says how many events it skipped.
  await page.fill('#filter-wiki', 'nosuchwiki');
  await page.selectOption('#filter-bot', '');
  await page.uncheck('#filter-bot-not');
  await page.click('#connect');
  await page.waitForFunction(() => /^[1-9][\d,]* skipped by the filter$/.test(document.getElementById('skipped').textContent),
    null, { timeout: 10000 });
  await page.waitForTimeout(1500);  // one more id update
  result.nothing = {
    hash: await page.evaluate(() => location.hash),
    rows: await page.$$eval('#events li', (rows) => rows.length),
    skipped: await page.textContent('#skipped'),
    empty: await page.textContent('#empty'),
    empty_visible: await page.isVisible('#empty'),
    status: await page.textContent('#status'),
  };
  if (opt['screenshot-empty']) await page.screenshot({ path: opt['screenshot-empty'] });
  await page.click('#disconnect');
  result.status_stopped = await page.textContent('#status');

  // A shared link with a malformed filter: the hash drives the form, and the
  // refusal (400 invalid_filter) is shown. The browser logs the refused
  // EventSource itself: those console lines are kept apart.
  const errors_before = result.console_errors.length;
  await page.evaluate(() => { location.hash = 'stream=recentchange&filter.meta..domain=x'; });
  await page.waitForFunction(() => !document.getElementById('error').hidden, null, { timeout: 10000 });
  result.refused = {
    error: await page.textContent('#error'),
    state: await page.getAttribute('#status', 'data-state'),
    custom_field: await page.inputValue('#custom-filters .f-field'),
    checked: await page.$$eval('#streams input:checked', (boxes) => boxes.map((b) => b.value)),
    console_errors: result.console_errors.splice(errors_before),
  };
  emit({ result });
} catch (e) {
  process.stderr.write(String(e.stack || e) + '\n');
  process.stderr.write(JSON.stringify(result) + '\n');
  process.exitCode = 1;
} finally {
  clearTimeout(timer);
  await close();
}
process.exit();
