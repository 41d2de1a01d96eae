"""Mints at a broker (or the load balancer before several) from many
threads at once, and says what came back: each status's count, every
JWT's jti, the slowest answer. Standard library only.

    python3 harness/mint_burst.py URL --session TOKEN --body JSON
        [--count N | --seconds S] [--workers W] [--key KEY] [--ca CA]
        [--timeout T]

--count sends N requests; --seconds keeps sending until S seconds have
passed. --key sends every request with that Idempotency-Key. A request
that gets no answer within --timeout (a hang) counts as status "hang";
one whose connection fails as "error". Prints one JSON object.
"""

import argparse
import http.client
import json
import ssl
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--session", required=True)
    parser.add_argument("--body", required=True)
    parser.add_argument("--count", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--key")
    parser.add_argument("--ca")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    target = urllib.parse.urlsplit(args.url)
    context = ssl.create_default_context(cafile=args.ca) if target.scheme == "https" else None
    headers = {
        "Authorization": "Bearer " + args.session,
        "Content-Type": "application/json",
    }
    if args.key:
        headers["Idempotency-Key"] = args.key
    body = args.body.encode()

    lock = threading.Lock()
    statuses, jtis, codes = {}, [], {}
    slowest = [0.0]
    deadline = time.monotonic() + args.seconds if args.seconds else None
    sent = [0]

    def take_turn():
        with lock:
            if deadline is not None:
                return time.monotonic() < deadline
            if sent[0] >= args.count:
                return False
            sent[0] += 1
            return True

    def connect():
        if context:
            return http.client.HTTPSConnection(
                target.hostname, target.port, context=context, timeout=args.timeout
            )
        return http.client.HTTPConnection(target.hostname, target.port, timeout=args.timeout)

    def worker():
        connection = None
        while take_turn():
            began = time.monotonic()
            status, answer = None, None
            try:
                connection = connection or connect()
                connection.request("POST", "/v1/mint-oidc-jwt", body=body, headers=headers)
                response = connection.getresponse()
                status, answer = response.status, response.read()
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
                    connection = None
            except TimeoutError:
                status = "hang"
            except (OSError, http.client.HTTPException):
                status = "error"
            if status in ("hang", "error") and connection is not None:
                connection.close()
                connection = None
            took = time.monotonic() - began
            with lock:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                slowest[0] = max(slowest[0], took)
                if status == 200:
                    jtis.append(json.loads(answer)["jti"])
                elif isinstance(status, int):
                    try:
                        code = json.loads(answer).get("error", "?")
                    except ValueError:
                        code = "not json"
                    key = "%s %s" % (status, code)
                    codes[key] = codes.get(key, 0) + 1

    with ThreadPoolExecutor(args.workers) as pool:
        for _ in range(args.workers):
            pool.submit(worker)
    print(json.dumps({"statuses": statuses, "codes": codes, "jtis": jtis, "slowest": round(slowest[0], 3)}))


if __name__ == "__main__":
    main()
