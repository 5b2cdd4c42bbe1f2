#!/usr/bin/env node
// Streaming text generation from Kiln over Server-Sent Events, with Node 20's global fetch and no
// npm packages. Two readers of the same `text/event-stream` response:
//
// - naiveRead: the loop from the published docs, kept as it is there. It assumes every network
//   chunk holds whole lines and whole UTF-8 characters, which nothing guarantees:
//     1. an event split across two chunks: `chunk.split('\n')` hands JSON.parse the first half of a
//        `data:` line, which throws (`SyntaxError: Unterminated string in JSON ...`);
//     2. a multi-byte character (é, 日, 🙂) split across two chunks: `decoder.decode(value)`
//        without `{stream: true}` turns each half into U+FFFD (so even with whole lines the text
//        comes out as "caf\uFFFD\uFFFD").
//   It also ignores the error event (printing `undefined`) and waits for the connection to close
//   instead of stopping at `finished`.
// - readStream: the fixed reader. It decodes with `{stream: true}` (the decoder keeps an
//   incomplete character for the next chunk) and flushes it at the end, keeps the unfinished last
//   line for the next chunk, ignores `:` keep-alive comments, throws on the error event and returns
//   at the event marked `finished`.
//
// CLI:
//   node examples/clients/stream.js --url http://127.0.0.1:8080 --token T --model demo/smollm2-135m \
//     --prompt "Write a haiku" [--max-tokens N] [--temperature 0] [--naive] [--json]
// prints tokens to stdout as they arrive; with --json stdout is instead one JSON line at the end:
// {"text": ..., "events": n, "finish_reason": ..., "tokens_used": ..., "usage": ...}.
// Any error (HTTP status, error event, broken stream) is printed to stderr and exits with 1.

'use strict';

const STREAM_PATH = '/v1/inference/text-generation/stream';

/** An error answer from Kiln: an HTTP error before the stream, or the error event inside it. */
class KilnError extends Error {
  constructor(message, { status = null, code = null, requestId = null } = {}) {
    super(message);
    this.name = 'KilnError';
    this.status = status;
    this.code = code;
    this.requestId = requestId;
  }
}

/**
 * POSTs a streaming request and returns the response once its headers are in; an HTTP error
 * status throws a KilnError with Kiln's `{"error": {"code", "message"}, "request_id"}`.
 */
async function startStream({ url, token, body, signal }) {
  const response = await fetch(url.replace(/\/+$/, '') + STREAM_PATH, {
    method: 'POST',
    headers: {
      Authorization: 'Bearer ' + token,
      'Content-Type': 'application/json',
      Accept: 'text/event-stream',
    },
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) {
    const text = await response.text();
    let error = {};
    let requestId = response.headers.get('x-request-id');
    try {
      const json = JSON.parse(text);
      error = json.error || {};
      requestId = json.request_id || requestId;
    } catch {
      error = { message: text.slice(0, 500) };
    }
    throw new KilnError(`HTTP ${response.status}: ${error.code || 'error'}: ${error.message || ''}`, {
      status: response.status,
      code: error.code,
      requestId,
    });
  }
  return response;
}

/** The docs' reader (see the top of this file for how it breaks); tokens go to onToken. */
async function naiveRead(response, onToken = () => {}) {
  const events = [];
  // ---- the docs' loop; only `console.log(data.token)` became `events.push; onToken` ----
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    const chunk = decoder.decode(value);
    const lines = chunk.split('\n');
    for (const line of lines) {
      if (line.startsWith('data: ')) { const data = JSON.parse(line.slice(6)); events.push(data); onToken(data.token); }
    }
  }
  // ---- end of the docs' loop ----
  const last = events[events.length - 1] || {};
  if (last.error) throw errorEvent(last);
  return {
    text: events.map((e) => (typeof e.token === 'string' ? e.token : '')).join(''),
    events: events.length,
    finish_reason: last.finish_reason ?? null,
    tokens_used: last.tokens_used ?? null,
    usage: last.usage ?? null,
  };
}

function errorEvent(data) {
  const { code = 'error', message = '' } = data.error || {};
  return new KilnError(`${code}: ${message}`, { code, requestId: data.request_id ?? null });
}

/**
 * Splits decoded text into SSE events: `push(text)` takes any piece of the stream (lines may be
 * cut anywhere) and returns the `data` of each event completed by it; `end()` returns the event
 * still pending when the stream closes. Lines end with \n, \r\n or \r; `:` lines are comments.
 */
class SseParser {
  constructor() {
    this.buffer = ''; // the unfinished last line
    this.data = []; // `data:` lines of the event being read
  }

  push(text) {
    this.buffer += text;
    // A trailing \r may be the first half of \r\n: it ends its line only with the next piece.
    const held = this.buffer.endsWith('\r') ? '\r' : '';
    const lines = this.buffer.slice(0, this.buffer.length - held.length).split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + held;
    return lines.flatMap((line) => this.line(line));
  }

  end() {
    const last = this.buffer.replace(/\r$/, '');
    this.buffer = '';
    return [...(last ? this.line(last) : []), ...this.line('')];
  }

  line(line) {
    if (line === '') {
      // A blank line ends the event.
      const data = this.data;
      this.data = [];
      return data.length ? [data.join('\n')] : [];
    }
    if (line.startsWith(':')) return []; // keep-alive comment
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    if (field === 'data') {
      const value = colon < 0 ? '' : line.slice(colon + 1);
      this.data.push(value.startsWith(' ') ? value.slice(1) : value);
    }
    return []; // `event:`, `id:`, `retry:` are not used by Kiln
  }
}

/**
 * The fixed reader. Calls onToken(token) for each piece as it arrives and resolves with
 * {text, events, finish_reason, tokens_used, usage} at the event marked `finished`; throws a
 * KilnError on the error event or when the stream ends before a finished event.
 */
async function readStream(response, onToken = () => {}) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder('utf-8');
  const parser = new SseParser();
  const result = { text: '', events: 0, finish_reason: null, tokens_used: null, usage: null };
  try {
    for (;;) {
      const { done, value } = await reader.read();
      // {stream: true} keeps a character cut by the chunk boundary for the next chunk; at the
      // end, decode() flushes it (as U+FFFD only if the stream really ended mid-character).
      const events = done
        ? [...parser.push(decoder.decode()), ...parser.end()]
        : parser.push(decoder.decode(value, { stream: true }));
      for (const raw of events) {
        const data = JSON.parse(raw);
        result.events += 1;
        if (data.error) throw errorEvent(data);
        if (typeof data.token === 'string') {
          result.text += data.token;
          onToken(data.token);
        }
        if (data.finished) {
          result.finish_reason = data.finish_reason ?? null;
          result.tokens_used = data.tokens_used ?? null;
          result.usage = data.usage ?? null;
          return result;
        }
      }
      if (done) throw new KilnError('the stream ended before its final event');
    }
  } finally {
    // Done with this response: close it (a no-op if the server already did).
    reader.cancel().catch(() => {});
  }
}

function parseArgs(argv) {
  const args = { url: 'http://127.0.0.1:8080', token: process.env.KILN_TOKEN || '', temperature: null };
  const flags = { '--naive': 'naive', '--json': 'json' };
  const values = {
    '--url': 'url',
    '--token': 'token',
    '--model': 'model',
    '--prompt': 'prompt',
    '--max-tokens': 'maxTokens',
    '--temperature': 'temperature',
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (flags[arg]) args[flags[arg]] = true;
    else if (values[arg] && i + 1 < argv.length) args[values[arg]] = argv[++i];
    else throw new Error(`unknown or incomplete argument: ${arg}`);
  }
  if (!args.model || args.prompt === undefined) throw new Error('--model and --prompt are required');
  return args;
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(
      `${e.message}\nusage: node stream.js --url URL --token T --model ID --prompt TEXT ` +
        '[--max-tokens N] [--temperature T] [--naive] [--json]\n',
    );
    process.exit(2);
  }
  const body = { model: args.model, prompt: args.prompt };
  if (args.maxTokens !== undefined) body.max_tokens = Number(args.maxTokens);
  if (args.temperature !== null) body.temperature = Number(args.temperature);
  const onToken = args.json ? () => {} : (token) => process.stdout.write(String(token));
  try {
    const response = await startStream({ url: args.url, token: args.token, body });
    const result = await (args.naive ? naiveRead : readStream)(response, onToken);
    process.stdout.write(args.json ? JSON.stringify(result) + '\n' : '\n');
  } catch (e) {
    if (!args.json) process.stdout.write('\n');
    process.stderr.write(`error: ${e.message}${e.requestId ? ` (request ${e.requestId})` : ''}\n`);
    process.exitCode = 1;
  }
}

module.exports = { KilnError, SseParser, startStream, naiveRead, readStream };

if (require.main === module) main();
