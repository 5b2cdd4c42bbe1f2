#!/usr/bin/env python3
"""Call Kiln's inference API from Python, riding out rate limits and overload.

    python examples/clients/api_client.py --url http://127.0.0.1:8080 --token T \\
        --task embeddings --json '{"model": "demo/minilm", "inputs": ["hello"]}' \\
        [--max-retries 5] [--repeat N]

prints the JSON answer on one line (with --repeat, the same request is sent N times, one after
another, and each answer is printed). Retries are reported on stderr; a call that fails for good
prints `error: ...` on stderr and exits with 1.

`infer()` is the API docs' example (`requests.post` with a bearer token and a JSON body) plus
the retries the docs ask for, bounded by `max_retries`:

- 429 `rate_limited`: sleep what `Retry-After` says (Kiln sends whole seconds, rounded up: a
  client that waits that long is admitted), then try again.
- 503 `overloaded` (no model instance became free in time): sleep `Retry-After` when given, else
  back off exponentially with jitter (about 0.5 s, 1 s, 2 s, ... up to 30 s, each a random
  time between half and all of that, so clients refused together do not return together).
- Anything else fails at once with a `KilnError` naming the status, code, message and request
  id; so does a 429 `quota_exceeded` (the monthly compute quota: its Retry-After is the start of
  next month), a Retry-After longer than `max_wait`, and the last attempt.
"""

import argparse
import email.utils
import json
import os
import random
import sys
import time

import requests


class KilnError(Exception):
    """A call that failed for good."""

    def __init__(self, status, code, message, request_id=None, attempts=1):
        self.status, self.code, self.message = status, code, message
        self.request_id, self.attempts = request_id, attempts
        super().__init__(
            f"HTTP {status} {code}: {message}"
            + (f" (request {request_id})" if request_id else "")
            + (f", after {attempts} attempts" if attempts > 1 else "")
        )


def _error(response, attempts):
    try:
        body = response.json()
        error, request_id = body.get("error") or {}, body.get("request_id")
    except ValueError:  # not JSON: a proxy's error page, say
        error, request_id = {"message": response.text[:500]}, None
    return KilnError(
        response.status_code,
        error.get("code", "error"),
        error.get("message", ""),
        request_id or response.headers.get("X-Request-Id"),
        attempts,
    )


def retry_after(response):
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff(retry, base=0.5, cap=30.0):
    """The wait before retry number `retry` (0 for the first): exponential, with jitter."""
    ceiling = min(cap, base * 2**retry)
    return random.uniform(ceiling / 2, ceiling)


def infer(task, payload, url="http://127.0.0.1:8080", token="", max_retries=5, timeout=60,
          max_wait=120, log=None):
    """POSTs `payload` to /v1/inference/<task> and returns the parsed JSON answer, retrying 429
    and 503 at most `max_retries` times (see the module's docs). `log(message)`, if given, hears
    about each retry. Raises KilnError, or requests.RequestException when the server is not
    reached."""
    endpoint = f"{url.rstrip('/')}/v1/inference/{task}"
    attempts = 0
    while True:
        response = requests.post(
            endpoint,
            headers={"Authorization": f"Bearer {token}"},
            json=payload,
            timeout=timeout,  # the docs recommend 30-60 s
        )
        if response.ok:
            return response.json()
        attempts += 1
        error = _error(response, attempts)
        retryable = response.status_code in (429, 503) and error.code != "quota_exceeded"
        wait = retry_after(response)
        if wait is None:
            wait = backoff(attempts - 1)
        if not retryable or attempts > max_retries or wait > max_wait:
            raise error
        if log:
            log(f"{error}: retrying in {wait:.1f} s (retry {attempts} of {max_retries})")
        time.sleep(wait)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--token", default=os.environ.get("KILN_TOKEN", ""),
                        help="an inference token (default: $KILN_TOKEN)")
    parser.add_argument("--task", required=True, help="embeddings, text-classification, ...")
    parser.add_argument("--json", required=True, dest="payload", help="the request body")
    parser.add_argument("--max-retries", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1, help="send the request N times")
    args = parser.parse_args()
    if args.max_retries < 0 or args.repeat < 1:
        parser.error("--max-retries must be at least 0 and --repeat at least 1")
    try:
        payload = json.loads(args.payload)
    except ValueError as e:
        parser.error(f"--json is not valid JSON: {e}")

    for _ in range(args.repeat):
        try:
            answer = infer(args.task, payload, args.url, args.token, args.max_retries,
                           log=lambda message: print(message, file=sys.stderr, flush=True))
        except (KilnError, requests.RequestException) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
