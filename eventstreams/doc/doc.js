// Swagger UI over this server's own OpenAPI document (/?spec).
//
// A stream response never ends, so "Try it out" on /v2/stream/... reads it
// for a few seconds (or until some events or bytes have come) and then
// cuts it, and Swagger UI shows what came: the status, the headers and
// the first events.
'use strict';

const SAMPLE_SECONDS = 5;
const SAMPLE_EVENTS = 20;
const SAMPLE_BYTES = 256 * 1024;

async function sampleStream(url, init) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), SAMPLE_SECONDS * 1000);
  let response;
  try {
    response = await fetch(url, { ...init, signal: controller.signal });
  } catch (error) {
    clearTimeout(timer);
    throw error;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = '';
  try {
    // SSE events start with "data: ", NDJSON events with "{".
    while (text.length < SAMPLE_BYTES && (text.match(/^(data: |\{)/gm) || []).length < SAMPLE_EVENTS) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
  } catch (error) {
    if (error.name !== 'AbortError') throw error;
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
  return new Response(text, { status: response.status, statusText: response.statusText, headers: response.headers });
}

window.addEventListener('load', () => {
  window.ui = SwaggerUIBundle({
    url: '?spec',
    dom_id: '#swagger-ui',
    deepLinking: true,
    validatorUrl: null, // no request to a remote validator
    presets: [SwaggerUIBundle.presets.apis],
    layout: 'BaseLayout',
    requestInterceptor: (request) => {
      if (new URL(request.url, window.location.href).pathname.startsWith('/v2/stream/')) {
        request.userFetch = sampleStream;
      }
      return request;
    },
  });
});
