#!/usr/bin/env python3
"""Streaming text generation from Kiln over Server-Sent Events, with `requests`.

    python examples/clients/stream.py --url http://127.0.0.1:8080 --token T \\
        --model demo/smollm2-135m --prompt "Write a haiku" [--max-tokens N] [--temperature 0] [--json]

prints tokens to stdout as they arrive; with --json stdout is instead one JSON line at the end:
{"text": ..., "events": n, "finish_reason": ..., "tokens_used": ..., "usage": ...}. Any error
(HTTP status, the error event, a broken stream) goes to stderr and exits with 1.

The lines are read as bytes and each whole line is decoded as UTF-8 on its own. Decoding the
chunks as they arrive (`iter_lines(decode_unicode=True)`, or `chunk.decode()`) goes wrong when a
multi-byte character (é, 日, 🙂) is cut by a chunk boundary; a whole line always holds whole
characters. `--naive` is accepted for parity with stream.js and changes nothing here.
"""

import argparse
import json
import sys

import requests

STREAM_PATH = "/v1/inference/text-generation/stream"


class KilnError(Exception):
    """An HTTP error before the stream, or the error event inside it."""


def stream(url, token, body, on_token=lambda token: None, timeout=(10, 300)):
    """POSTs a streaming request; calls on_token for each piece; returns the summary dict at the
    event marked `finished`. Raises KilnError on any error."""
    response = requests.post(
        url.rstrip("/") + STREAM_PATH,
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
        stream=True,
        timeout=timeout,  # (connect, longest wait between two bytes)
    )
    with response:
        if response.status_code >= 400:
            try:
                answer = response.json()
                error = answer.get("error", {})
                request_id = answer.get("request_id")
            except ValueError:
                error, request_id = {"message": response.text[:500]}, None
            raise KilnError(
                f"HTTP {response.status_code}: {error.get('code', 'error')}: "
                f"{error.get('message', '')}" + (f" (request {request_id})" if request_id else "")
            )
        result = {"text": "", "events": 0, "finish_reason": None, "tokens_used": None, "usage": None}
        data_lines = []
        # chunk_size=None: hand over each piece as it arrives instead of waiting for 512 bytes.
        for raw in response.iter_lines(chunk_size=None):
            line = raw.decode("utf-8")  # a whole line: no character is cut
            if line.startswith(":"):
                continue  # keep-alive comment
            if line:
                field, _, value = line.partition(":")
                if field == "data":
                    data_lines.append(value[1:] if value.startswith(" ") else value)
                continue
            if not data_lines:
                continue
            # A blank line ends the event.
            data = json.loads("\n".join(data_lines))
            data_lines = []
            result["events"] += 1
            if data.get("error"):
                error = data["error"]
                raise KilnError(
                    f"{error.get('code', 'error')}: {error.get('message', '')}"
                    + (f" (request {data['request_id']})" if data.get("request_id") else "")
                )
            if isinstance(data.get("token"), str):
                result["text"] += data["token"]
                on_token(data["token"])
            if data.get("finished"):
                for key in ("finish_reason", "tokens_used", "usage"):
                    result[key] = data.get(key)
                return result
        raise KilnError("the stream ended before its final event")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--token", default="")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--naive", action="store_true", help="no effect (see stream.js)")
    parser.add_argument("--json", action="store_true", help="one JSON line at the end")
    args = parser.parse_args()

    body = {"model": args.model, "prompt": args.prompt}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature

    def print_token(token):
        sys.stdout.write(token)
        sys.stdout.flush()

    try:
        result = stream(args.url, args.token, body, (lambda t: None) if args.json else print_token)
    except (KilnError, requests.RequestException, ValueError) as e:
        if not args.json:
            print()
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
