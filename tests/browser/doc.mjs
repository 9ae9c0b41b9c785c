// Drives Swagger UI at /?doc: the operations it lists, the stream names it
// offers for {streams}, and "Try it out" + "Execute" on /v2/stream/{streams}.
//
//   node doc.mjs --base http://127.0.0.1:PORT --streams a,b [--screenshot out.png]
//
// Prints one line {"result": {...}} and exits 0; the caller asserts on it.
import { args, deadline, emit, launch } from './chromium.mjs';

const opt = args();
const { context, close } = await launch();
const timer = deadline(Number(opt.timeout || 60), close);
const result = { console_errors: [], failed_requests: [], requests: [] };

try {
  const page = context.pages()[0] || await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') result.console_errors.push(m.text()); });
  page.on('pageerror', (e) => result.console_errors.push(String(e)));
  page.on('request', (r) => result.requests.push(r.url()));
  page.on('requestfailed', (r) => {
    // Try it out cuts the never-ending stream response on purpose.
    if (!r.url().includes('/v2/stream/')) result.failed_requests.push(`${r.url()}: ${r.failure()?.errorText}`);
  });

  const response = await page.goto(opt.base + '/?doc');
  result.status = response.status();
  result.csp = response.headers()['content-security-policy'] || null;
  await page.waitForSelector('.opblock-summary-path', { timeout: 20000 });
  result.title = await page.textContent('.info .title');
  result.paths = await page.$$eval('.opblock-summary-path', (els) => els.map((e) => e.getAttribute('data-path')));

  // The {streams} operation: open it, Try it out, pick the streams, Execute.
  const op = page.locator('.opblock', { has: page.locator('.opblock-summary-path[data-path="/v2/stream/{streams}"]') });
  await op.locator('.opblock-summary').click();
  await op.locator('button.try-out__btn').click();
  const select = op.locator('tr[data-param-name="streams"] select');
  result.offered = await select.locator('option').allTextContents();
  await select.selectOption(opt.streams.split(','));
  await op.locator('button.execute').click();
  const live = op.locator('.live-responses-table tr.response');
  await live.locator('.response-col_status').waitFor({ timeout: 20000 });
  result.request_url = (await op.locator('.request-url pre').textContent()).trim();
  result.response_status = (await live.locator('.response-col_status').textContent()).trim();
  const [body, headers] = await live.locator('.response-col_description pre').allTextContents();
  result.response_body = body;
  result.response_headers = headers || '';
  if (opt.screenshot) await page.screenshot({ path: opt.screenshot, fullPage: false });
  emit({ result });
} finally {
  clearTimeout(timer);
  await close();
}
