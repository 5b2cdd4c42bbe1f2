// The JavaScript readers of examples/clients/stream.js against adversarial chunking, without Kiln:
// a small HTTP server writes a Kiln-style text/event-stream in pieces cut mid-line and
// mid-UTF-8-character, pausing between pieces so that each arrives as its own chunk. The fixed
// reader must give back exactly the text; the docs' naive reader must not (it throws or garbles).
// Run with `node --test tests/clients/` (also run by `cargo test`, tests/tests/stream_clients.rs).
import assert from 'node:assert/strict';
import http from 'node:http';
import { createRequire } from 'node:module';
import { after, test } from 'node:test';

const require = createRequire(import.meta.url);
const { KilnError, SseParser, naiveRead, readStream, startStream } = require('../../examples/clients/stream.js');

const PAUSE_MS = 40; // between two pieces: long enough for the client to read each one alone
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const servers = [];
after(() => {
  for (const server of servers) {
    server.closeAllConnections();
    server.close();
  }
});

/** Serves every request with `status`, `headers` and the pieces of `chunks`, one write each. */
async function serve(chunks, { status = 200, holdOpen = false } = {}) {
  const seen = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (piece) => (body += piece));
    req.on('end', async () => {
      seen.push({ url: req.url, authorization: req.headers.authorization, body: JSON.parse(body) });
      res.socket.setNoDelay(true);
      res.writeHead(status, {
        'content-type': status === 200 ? 'text/event-stream' : 'application/json',
      });
      res.flushHeaders();
      for (const chunk of chunks) {
        await sleep(PAUSE_MS);
        res.write(chunk);
      }
      if (!holdOpen) res.end();
    });
  });
  servers.push(server);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, seen };
}

/** Kiln's events for these tokens (the last one `finished`), keep-alive comments between them. */
function sse(tokens) {
  const events = tokens.map((token, i) =>
    i < tokens.length - 1
      ? { token, finished: false }
      : {
          token,
          finished: true,
          finish_reason: 'length',
          tokens_used: 10 + tokens.length,
          usage: { input_tokens: 10, output_tokens: tokens.length },
        },
  );
  return Buffer.from(events.map((e) => `data: ${JSON.stringify(e)}\n\n: keep-alive\n\n`).join(''));
}

/** `bytes` cut at each offset. */
function cut(bytes, offsets) {
  const chunks = [];
  let start = 0;
  for (const offset of [...offsets, bytes.length]) {
    chunks.push(bytes.subarray(start, offset));
    start = offset;
  }
  return chunks;
}

/** Offsets in the middle of every `data:` line (all-ASCII tokens: no character is cut). */
function midLines(bytes) {
  const offsets = [];
  for (let i = bytes.indexOf('data: '); i >= 0; i = bytes.indexOf('data: ', i + 1)) {
    offsets.push(i + Math.floor((bytes.indexOf('\n', i) - i) / 2));
  }
  return offsets;
}

/** Offsets just after the first byte of every multi-byte UTF-8 character. */
function midCharacters(bytes) {
  const offsets = [];
  bytes.forEach((byte, i) => byte >= 0xc0 && offsets.push(i + 1));
  return offsets;
}

const request = (url) =>
  startStream({ url, token: 't0k', body: { model: 'demo/test', prompt: 'Hi', max_tokens: 8 } });

/** The naive reader's result, or the error it threw. */
async function naiveOutcome(url) {
  try {
    return { text: (await naiveRead(await request(url))).text };
  } catch (error) {
    return { error };
  }
}

const ASCII = ['Once', ' upon', ' a', ' time', '.'];
const UNICODE = ['Un', ' café', ' à', ' 日本', ' 🙂', '!'];
const text = (tokens) => tokens.join('');

test('control: with one whole event per chunk the naive reader works', async () => {
  // So the failures below come from the cuts, not from the server or the test.
  const bytes = sse(UNICODE);
  const starts = [];
  for (let i = bytes.indexOf('data: ', 1); i >= 0; i = bytes.indexOf('data: ', i + 1)) starts.push(i);
  const { url } = await serve(cut(bytes, starts));
  const outcome = await naiveOutcome(url);
  assert.equal(outcome.error, undefined);
  assert.equal(outcome.text, text(UNICODE));
});

test('split lines: the fixed reader returns exactly the text', async () => {
  const chunks = cut(sse(ASCII), midLines(sse(ASCII)));
  const { url, seen } = await serve(chunks);
  const tokens = [];
  const result = await readStream(await request(url), (t) => tokens.push(t));
  assert.equal(result.text, text(ASCII));
  assert.deepEqual(tokens, ASCII);
  assert.equal(result.events, ASCII.length);
  assert.equal(result.finish_reason, 'length');
  assert.deepEqual(result.usage, { input_tokens: 10, output_tokens: ASCII.length });
  // What the client sent.
  assert.equal(seen[0].url, '/v1/inference/text-generation/stream');
  assert.equal(seen[0].authorization, 'Bearer t0k');
  assert.equal(seen[0].body.stream, true);
});

test('split lines: the naive reader fails', async () => {
  const { url } = await serve(cut(sse(ASCII), midLines(sse(ASCII))));
  const outcome = await naiveOutcome(url);
  // JSON.parse of half a `data:` line.
  assert.ok(outcome.error instanceof SyntaxError || outcome.text !== text(ASCII), String(outcome.error ?? outcome.text));
});

test('split characters: the fixed reader returns exactly the text', async () => {
  const bytes = sse(UNICODE);
  assert.equal(midCharacters(bytes).length, 5); // é à 日 本 🙂
  const { url } = await serve(cut(bytes, midCharacters(bytes)));
  const result = await readStream(await request(url));
  assert.equal(result.text, text(UNICODE));
  assert.equal(result.events, UNICODE.length);
});

test('split characters: the naive reader fails', async () => {
  const bytes = sse(UNICODE);
  const { url } = await serve(cut(bytes, midCharacters(bytes)));
  const outcome = await naiveOutcome(url);
  assert.ok(outcome.error || outcome.text !== text(UNICODE), outcome.text);
});

test('split characters: whole lines are not enough without decode(value, {stream: true})', async () => {
  // The fixed reader's line handling with the docs' decode: each half of a cut character becomes
  // U+FFFD, inside otherwise valid JSON, so the text comes out garbled with no error.
  const bytes = sse(UNICODE);
  const { url } = await serve(cut(bytes, midCharacters(bytes)));
  const reader = (await request(url)).body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  let garbled = '';
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    for (const data of parser.push(decoder.decode(value))) garbled += JSON.parse(data).token;
  }
  assert.notEqual(garbled, text(UNICODE));
  assert.ok(garbled.includes('\uFFFD'), garbled);
});

test('CRLF line ends and comments split anywhere: the fixed reader still returns the text', async () => {
  const bytes = Buffer.from(sse(UNICODE).toString('utf8').replaceAll('\n', '\r\n'));
  // Every fifth byte: cuts \r\n pairs, comments, `data:` prefixes and characters.
  const offsets = Array.from({ length: Math.floor(bytes.length / 5) }, (_, i) => (i + 1) * 5);
  const { url } = await serve(cut(bytes, offsets.filter((o) => o < bytes.length)));
  const result = await readStream(await request(url));
  assert.equal(result.text, text(UNICODE));
});

test('the fixed reader stops at the finished event while the connection stays open', { timeout: 5000 }, async () => {
  const { url } = await serve(cut(sse(ASCII), midLines(sse(ASCII))), { holdOpen: true });
  const result = await readStream(await request(url));
  assert.equal(result.text, text(ASCII));
});

test('the error event after some tokens throws its code and message', async () => {
  const bytes = Buffer.from(
    'data: {"token": "Once", "finished": false}\n\n' +
      'data: {"error": {"code": "plugin_failed", "message": "the plugin trapped"}, "request_id": "req_1", "finished": true}\n\n',
  );
  const { url } = await serve(cut(bytes, midLines(bytes)));
  const tokens = [];
  await assert.rejects(readStream(await request(url), (t) => tokens.push(t)), (e) => {
    assert.ok(e instanceof KilnError);
    assert.equal(e.code, 'plugin_failed');
    assert.equal(e.requestId, 'req_1');
    assert.match(e.message, /the plugin trapped/);
    return true;
  });
  assert.deepEqual(tokens, ['Once']);
});

test('a stream cut off before its finished event is an error, not a short answer', async () => {
  const bytes = Buffer.from('data: {"token": "Once", "finished": false}\n\n');
  const { url } = await serve([bytes]);
  await assert.rejects(readStream(await request(url)), /ended before its final event/);
});

test('an HTTP error before the stream throws Kiln\'s code and message', async () => {
  const body = { error: { code: 'model_not_found', message: 'Model not found' }, request_id: 'req_2' };
  const { url } = await serve([Buffer.from(JSON.stringify(body))], { status: 404 });
  await assert.rejects(request(url), (e) => {
    assert.equal(e.status, 404);
    assert.equal(e.code, 'model_not_found');
    assert.equal(e.requestId, 'req_2');
    return true;
  });
});
