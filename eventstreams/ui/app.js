// The stream browser at /v2/ui: pick streams, a start and filters, and watch
// the events arrive. The stream is read with fetch() and parsed here, not by
// EventSource, because EventSource hides the bare `id:` blocks a filtered
// stream sends: they say how many events the filter skipped, which is what an
// empty filtered view must show. Reconnects resume with Last-Event-ID, as
// EventSource would. Plain JS, no build step; every node is built with
// textContent (no HTML from event data).
'use strict';

(() => {
  const MAX_ROWS = 200;          // rows kept in the DOM
  const SPARK_SECONDS = 60;      // width of the rate sparkline
  const COMMON = [
    { field: 'wiki', label: 'wiki', placeholder: 'enwiki,dewiki' },
    { field: 'type', label: 'type', placeholder: 'edit,new,log' },
    { field: 'bot', label: 'bot', choices: ['', 'true', 'false'] },
    { field: 'namespace', label: 'namespace', placeholder: '0,14' },
    { field: 'server_name', label: 'server_name', placeholder: '*.wikipedia.org' },
  ];

  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k in node && !k.startsWith('aria') && !k.startsWith('data')) node[k] = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  };

  const RETRY_MS = 2000;         // reconnect delay unless the server sends `retry:`
  let streams = [];              // from /v2/streams
  let source = null;             // the open stream: {abort()}, null when stopped
  let current = null;            // {url, selection} of the open view
  let paused = false;
  let autoPaused = false;        // paused because a row is open for reading
  let received = 0;
  let skipped = 0;               // events the filter skipped (from the ids)
  let positions = new Map();     // "topic/partition" → offset, of the last id
  let hidden = 0;                // received while paused
  let opens = 0;
  let lastId = '';
  let thisSecond = 0;
  const rates = [];
  let pending = [];              // rows waiting for the next frame
  let frame = 0;
  const rowData = new WeakMap(); // <details> → JSON text, rendered on first open

  // -- selection <-> form <-> URL ------------------------------------------

  // Keep ',', '*' and '!' readable in URLs; the server decodes either form.
  const enc = (s) => encodeURIComponent(s).replace(/%2C/gi, ',').replace(/%2A/gi, '*');

  function readForm() {
    const names = [...document.querySelectorAll('#streams input:checked')].map((i) => i.value);
    const filters = [];
    for (const row of document.querySelectorAll('.filter-row')) {
      const field = row.querySelector('.f-field').value.trim();
      const value = row.querySelector('.f-value').value.trim();
      const not = row.querySelector('.f-not').checked;
      if (field && value) filters.push([field + (not ? '!' : ''), value]);
    }
    return { streams: names, since: $('since').value.trim(), filters };
  }

  function query(sel) {
    const parts = [];
    if (sel.since) parts.push('since=' + enc(sel.since));
    for (const [key, value] of sel.filters) parts.push('filter.' + enc(key) + '=' + enc(value));
    return parts.length ? '?' + parts.join('&') : '';
  }

  const streamUrl = (sel) => '/v2/stream/' + sel.streams.map(enc).join(',') + query(sel);

  function toHash(sel) {
    const parts = ['stream=' + sel.streams.map(enc).join(',')];
    const q = query(sel);
    if (q) parts.push(q.slice(1));
    return '#' + parts.join('&');
  }

  function fromHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ''));
    const sel = { streams: [], since: '', filters: [] };
    for (const [key, value] of params) {
      if (key === 'stream') sel.streams = value.split(',').filter(Boolean);
      else if (key === 'since') sel.since = value;
      else if (key.startsWith('filter.')) sel.filters.push([key.slice(7), value]);
    }
    return sel;
  }

  function writeForm(sel) {
    const known = new Map();
    for (const s of streams) {
      known.set(s.name, s.name);
      for (const a of s.aliases || []) known.set(a, s.name);
    }
    const chosen = new Set(sel.streams.map((n) => known.get(n) || n));
    for (const box of document.querySelectorAll('#streams input')) box.checked = chosen.has(box.value);
    $('since').value = sel.since;
    for (const row of [...document.querySelectorAll('#custom-filters .filter-row')]) row.remove();
    for (const row of document.querySelectorAll('#common-filters .filter-row')) {
      row.querySelector('.f-value').value = '';
      row.querySelector('.f-not').checked = false;
    }
    for (const [key, value] of sel.filters) {
      const not = key.endsWith('!');
      const field = not ? key.slice(0, -1) : key;
      let row = document.querySelector(`#common-filters .filter-row[data-field="${CSS.escape(field)}"]`);
      if (row && row.querySelector('.f-value').value) row = null; // second value for the same field
      if (!row) row = addCustomFilter(field);
      row.querySelector('.f-value').value = value;
      row.querySelector('.f-not').checked = not;
    }
  }

  // -- building the form -----------------------------------------------------

  let rowCount = 0;

  function notBox(id) {
    return el('span', { class: 'not' },
      el('input', { type: 'checkbox', id, class: 'f-not' }),
      el('label', { htmlFor: id, text: 'not' }));
  }

  function commonFilter(spec) {
    const id = 'filter-' + spec.field;
    const value = spec.choices
      ? el('select', { id, class: 'f-value' },
          ...spec.choices.map((c) => el('option', { value: c, text: c || 'any' })))
      : el('input', { id, class: 'f-value', type: 'text', placeholder: spec.placeholder, autocomplete: 'off' });
    return el('div', { class: 'filter-row', 'data-field': spec.field },
      el('input', { type: 'hidden', class: 'f-field', value: spec.field }),
      el('label', { htmlFor: id, class: 'f-label', text: spec.label }),
      notBox(id + '-not'),
      value);
  }

  function addCustomFilter(field = '') {
    const n = ++rowCount;
    const row = el('div', { class: 'filter-row custom' },
      el('input', { type: 'text', class: 'f-field', value: field, placeholder: 'meta.domain',
                    autocomplete: 'off', 'aria-label': `Field ${n} (dotted path)` }),
      notBox('custom-not-' + n),
      el('input', { type: 'text', class: 'f-value', placeholder: 'value,other',
                    autocomplete: 'off', 'aria-label': `Values for field ${n}` }),
      el('button', { type: 'button', class: 'remove secondary', text: '×',
                     'aria-label': `Remove field filter ${n}` }));
    row.querySelector('.remove').addEventListener('click', () => {
      row.remove();
      $('add-filter').focus();
    });
    $('custom-filters').append(row);
    return row;
  }

  function listStreams(list) {
    streams = list;
    const ul = $('streams');
    ul.replaceChildren();
    for (const s of list) {
      const id = 'stream-' + s.name.replace(/[^A-Za-z0-9_-]/g, '_');
      const aliases = (s.aliases || []).length ? ` (${s.aliases.join(', ')})` : '';
      ul.append(el('li', {},
        el('input', { type: 'checkbox', id, value: s.name, name: 'stream' }),
        el('label', { htmlFor: id },
          el('span', { class: 'stream-name', text: s.name }),
          el('span', { class: 'hint', text: aliases }),
          el('span', { class: 'description', text: s.description || '' }))));
    }
    $('streams-loading').hidden = true;
  }

  // -- the connection --------------------------------------------------------

  function setStatus(state, text) {
    const status = $('status');
    status.dataset.state = state;
    status.textContent = text;
  }

  function showError(text) {
    const box = $('error');
    box.textContent = text;
    box.hidden = !text;
  }

  function shortId(id) {
    try {
      return JSON.parse(id).map((p) => `${p.topic}/${p.partition}@${p.offset}`).join(', ');
    } catch (e) {
      return id;
    }
  }

  function connect(sel) {
    disconnect(false);
    showError('');
    if (!sel.streams.length) {
      showError('Choose at least one stream.');
      return;
    }
    const url = streamUrl(sel);
    current = { url, sel };
    history.replaceState(null, '', toHash(sel));
    $('snippet').hidden = true;   // a copied command of the last selection
    $('copied').textContent = '';
    rates.length = 0;             // the rate of this selection only
    thisSecond = 0;
    clearRows();
    received = 0;
    skipped = 0;
    positions = new Map();
    opens = 0;
    lastId = '';
    setStatus('connecting', 'Connecting…');
    const ctrl = new AbortController();
    const es = { abort: () => ctrl.abort() };
    source = es;
    read(es, url, sel, ctrl.signal);
    setButtons();
    updateCounts();
  }

  // One stream until it is stopped: read, and after an end or a network
  // error wait and resume from the last id. A refusal (4xx/5xx) is shown.
  async function read(es, url, sel, signal) {
    let retry = RETRY_MS;
    while (source === es) {
      let response;
      try {
        const headers = { Accept: 'text/event-stream' };
        if (lastId) headers['Last-Event-ID'] = lastId;
        response = await fetch(url, { headers, signal, cache: 'no-store' });
      } catch (err) {
        if (source !== es) return;
        response = null;
      }
      if (response && !response.ok) {
        const body = await response.json().catch(() => ({}));
        if (source !== es) return;
        showError(`${response.status} ${body.title || response.statusText}` + (body.detail ? `: ${body.detail}` : ''));
        setStatus('closed', 'Closed');
        source = null;
        setButtons();
        return;
      }
      if (response) {
        opens += 1;
        setStatus('open', `Open: ${sel.streams.join(', ')}` + (opens > 1 ? ` (reconnected ${opens - 1}×)` : ''));
        try {
          retry = await parse(es, response.body.getReader(), retry);
        } catch (err) { /* cut off: reconnect below */ }
        if (source !== es) return;
      }
      setStatus('reconnecting', lastId ? `Reconnecting, resuming after ${shortId(lastId)}` : 'Reconnecting…');
      await new Promise((resolve) => setTimeout(resolve, retry));
    }
  }

  // The SSE fields of one response (the specification's parsing rules).
  async function parse(es, reader, retry) {
    const decoder = new TextDecoder();
    let buffer = '';
    let data = [];
    let type = '';
    let id = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done || source !== es) return retry;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r\n|\r(?!$)|\n/);  // a final \r may be half of \r\n
      buffer = lines.pop();
      for (const line of lines) {
        if (line === '') {
          dispatch(es, type, data, id);
          data = [];
          type = '';
          id = null;
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? '' : line.slice(colon + 1);
        if (text.startsWith(' ')) text = text.slice(1);
        if (field === 'data') data.push(text);
        else if (field === 'event') type = text;
        else if (field === 'id' && !text.includes('\0')) id = text;
        else if (field === 'retry' && /^\d+$/.test(text)) retry = Number(text);
      }
    }
  }

  function dispatch(es, type, data, id) {
    if (source !== es) return;
    const message = data.length > 0;
    if (id !== null) {
      lastId = id;
      countSkipped(id, message && (type === '' || type === 'message'));
    }
    if (!message) {          // a bare `id:` block: events were skipped
      updateCounts();
      return;
    }
    const text = data.join('\n');
    if (type === 'error') {   // the server's `event: error`
      let shown = text;
      try {
        const body = JSON.parse(text);
        shown = [body.title || body.type, body.detail].filter(Boolean).join(': ') || text;
      } catch (err) { /* keep the raw text */ }
      showError('Server error: ' + shown);
      return;
    }
    if (type !== '' && type !== 'message') return;
    received += 1;
    thisSecond += 1;
    if (paused) hidden += 1;
    else queueRow(text);
    updateCounts();
  }

  // An id lists every partition's position: how far they moved since the
  // last id, less the event this id came with, is what the filter skipped.
  function countSkipped(id, withEvent) {
    let entries;
    try {
      entries = JSON.parse(id);
    } catch (err) {
      return;
    }
    if (!Array.isArray(entries)) return;
    let moved = 0;
    let known = false;
    for (const p of entries) {
      if (!p || typeof p.offset !== 'number') continue;
      const key = `${p.topic}/${p.partition}`;
      if (positions.has(key)) {
        moved += Math.max(0, p.offset - positions.get(key));
        known = true;
      }
      positions.set(key, p.offset);
    }
    if (known) skipped += Math.max(0, moved - (withEvent ? 1 : 0));
  }

  function disconnect(announce = true) {
    const es = source;
    source = null;
    if (es) es.abort();
    if (announce) setStatus('idle', 'Stopped');
    setButtons();
    updateCounts();
  }

  function setButtons() {
    const live = source !== null;
    $('disconnect').disabled = !live;
    $('pause').disabled = !live;
    $('copy-curl').disabled = !current;
    $('copy-js').disabled = !current;
  }

  // -- rows --------------------------------------------------------------------

  const pick = (...values) => values.find((v) => v !== undefined && v !== null && v !== '');

  function eventTime(e) {
    const stamp = pick(e.meta && e.meta.dt, e.timestamp && e.timestamp * 1000, e.dt);
    const date = stamp === undefined ? null : new Date(stamp);
    return date && !isNaN(date) ? date.toISOString().slice(11, 19) : '';
  }

  function sizeChange(e) {
    if (!e.length || typeof e.length.new !== 'number') return null;
    return e.length.new - (e.length.old || 0);
  }

  function queueRow(data) {
    pending.push(data);
    if (pending.length > MAX_ROWS) pending = pending.slice(-MAX_ROWS);
    if (!frame) frame = requestAnimationFrame(flushRows);
  }

  function flushRows() {
    frame = 0;
    if (paused) {              // queued before the pause: not shown either
      hidden += pending.length;
      pending = [];
      updateCounts();
      return;
    }
    const list = $('events');
    const fragment = document.createDocumentFragment();
    for (const data of pending.reverse()) fragment.append(makeRow(data));
    pending = [];
    list.prepend(fragment);
    while (list.childElementCount > MAX_ROWS) list.lastElementChild.remove();
  }

  function makeRow(data) {
    let e;
    try {
      e = JSON.parse(data);
    } catch (err) {
      e = {};
    }
    const meta = e.meta || {};
    const change = sizeChange(e);
    const summary = el('summary', {},
      el('time', { class: 'c-time', text: eventTime(e) }),
      el('span', { class: 'c-wiki', text: pick(e.wiki, meta.domain, meta.stream, '') }),
      el('span', { class: 'c-type', text: pick(e.type, meta.stream, '') }),
      el('span', { class: 'c-title', text: pick(e.title, e.page_title, meta.uri, meta.id, '') }),
      el('span', { class: 'c-user', text: pick(e.user, e.performer && e.performer.user_text, '') }),
      el('span', {
        class: 'c-size' + (change > 0 ? ' plus' : change < 0 ? ' minus' : ''),
        text: change === null ? '' : (change > 0 ? '+' : '') + change,
      }));
    const details = el('details', {}, summary);
    rowData.set(details, data);
    details.addEventListener('toggle', () => {
      if (details.open && !details.querySelector('pre')) {
        let text = rowData.get(details);
        try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (err) { /* raw */ }
        details.append(el('pre', { class: 'json', text }));
      }
      if (!details.open) rowClosed();
    });
    // Pause in the click itself, before the row opens: no row may be
    // prepended between the opening and the pause.
    summary.addEventListener('click', () => { if (!details.open) rowOpening(); });
    return el('li', { 'data-topic': meta.topic || '', 'data-offset': String(pick(meta.offset, '')) }, details);
  }

  // A row open for reading stays where it is: new rows wait (paused) until
  // every open row is closed again, unless the user paused by hand.
  function rowOpening() {
    if (!paused) {
      setPaused(true);
      autoPaused = true;
      updateCounts();
    }
  }

  function rowClosed() {
    if (autoPaused && !document.querySelector('#events details[open]')) setPaused(false);
  }

  function setPaused(value) {
    paused = value;
    autoPaused = false;
    $('pause').textContent = paused ? 'Resume' : 'Pause';
    $('pause').setAttribute('aria-pressed', String(paused));
    if (!paused) hidden = 0;
    updateCounts();
  }

  function clearRows() {
    pending = [];
    $('events').replaceChildren();
    hidden = 0;
    updateCounts();
  }

  function updateCounts() {
    let text = received ? `${received} received` : '';
    if (received) text += `, at most ${MAX_ROWS} kept`;
    if (paused && hidden) text += ` · paused${autoPaused ? ' while a row is open' : ''}: ${hidden} not shown`;
    $('counts').textContent = text;
    const filtered = current && current.sel.filters.length > 0;
    $('skipped').textContent = filtered ? `${skipped.toLocaleString('en')} skipped by the filter` : '';
    $('skipped').classList.toggle('after', Boolean(text));
    const empty = $('empty');
    if (source && !received) {
      empty.hidden = false;
      empty.textContent = filtered
        ? (skipped ? `No event has matched the filter yet; ${skipped.toLocaleString('en')} others went by.`
                   : 'Waiting for an event that matches the filter…')
        : 'Waiting for the first event…';
    } else {
      empty.hidden = true;
    }
  }

  // -- rate --------------------------------------------------------------------

  function tickRate() {
    rates.push(thisSecond);
    thisSecond = 0;
    while (rates.length > SPARK_SECONDS) rates.shift();
    const recent = rates.slice(-5);
    $('rate').textContent = (recent.reduce((a, b) => a + b, 0) / recent.length).toFixed(1);
    drawSpark();
  }

  function drawSpark() {
    const canvas = $('spark');
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 120;
    const h = canvas.clientHeight || 24;
    if (canvas.width !== Math.round(w * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (!rates.length) return;
    const max = Math.max(1, ...rates);
    const step = w / (SPARK_SECONDS - 1);
    ctx.beginPath();
    rates.forEach((v, i) => {
      const x = w - (rates.length - 1 - i) * step;
      const y = h - 1 - (v / max) * (h - 3);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    const color = getComputedStyle(canvas).color;
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.stroke();
    ctx.lineTo(w, h);
    ctx.lineTo(w - (rates.length - 1) * step, h);
    ctx.closePath();
    ctx.globalAlpha = 0.2;
    ctx.fillStyle = color;
    ctx.fill();
    ctx.globalAlpha = 1;
  }

  // -- copy ----------------------------------------------------------------------

  const quote = (s) => `'${s.replace(/'/g, `'\\''`)}'`;

  async function copy(text) {
    const box = $('snippet');
    box.textContent = text;
    box.hidden = false;
    let done = false;
    try {
      await navigator.clipboard.writeText(text);
      done = true;
    } catch (err) {
      const range = document.createRange();
      range.selectNodeContents(box);
      const selection = getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      try { done = document.execCommand('copy'); } catch (err2) { done = false; }
    }
    $('copied').textContent = done ? 'Copied.' : 'Select the text below and copy it.';
  }

  function curlCommand() {
    return `curl -s -H 'Accept: text/event-stream' ${quote(location.origin + current.url)}`;
  }

  function eventSourceCode() {
    return [
      `const source = new EventSource(${JSON.stringify(location.origin + current.url)});`,
      `source.onmessage = (event) => {`,
      `  const change = JSON.parse(event.data);`,
      `  console.log(change);`,
      `};`,
      `source.onerror = (event) => console.warn('reconnecting', event);`,
    ].join('\n');
  }

  // -- start -----------------------------------------------------------------------

  function init() {
    for (const spec of COMMON) $('common-filters').append(commonFilter(spec));
    $('add-filter').addEventListener('click', () => addCustomFilter().querySelector('.f-field').focus());
    $('controls').addEventListener('submit', (e) => {
      e.preventDefault();
      connect(readForm());
    });
    $('disconnect').addEventListener('click', () => disconnect());
    $('pause').addEventListener('click', () => setPaused(!paused));
    $('clear').addEventListener('click', clearRows);
    $('copy-curl').addEventListener('click', () => current && copy(curlCommand()));
    $('copy-js').addEventListener('click', () => current && copy(eventSourceCode()));
    window.addEventListener('hashchange', () => {
      const sel = fromHash();
      writeForm(sel);
      if (sel.streams.length) connect(readForm());
    });
    setInterval(tickRate, 1000);
    setButtons();

    fetch('/v2/streams')
      .then((r) => {
        if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
        return r.json();
      })
      .then((list) => {
        listStreams(list);
        const sel = fromHash();
        if (!sel.streams.length && list.length) sel.streams = [list[0].name];  // something to see at once
        writeForm(sel);
        if (sel.streams.length) connect(readForm());
      })
      .catch((err) => {
        $('streams-loading').textContent = 'The stream list could not be loaded: ' + err.message;
      });
  }

  init();
})();
