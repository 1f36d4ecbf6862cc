"""`make demo` (`python -m dsv4.demo`): serve the built-in tiny model, send one chat request with the real
`openai` client, print the answer and the metrics URL, stop the server.

    python -m dsv4.demo [--model DIR] [--prompt TEXT] [--max-tokens N] [--keep]   (--down: nothing to stop)
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv4.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the built-in tiny model)")
    ap.add_argument("--prompt", default="Hello! What does a KV cache hold?")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="leave the server running until Ctrl+C")
    ap.add_argument("--down", action="store_true", help="stop a demo (the local demo leaves nothing running)")
    args = ap.parse_args(argv)
    if args.down:
        print("dsv4 demo: nothing to stop (the local demo stops its server when it ends)")
        return 0

    from dsv4.runtime.server.launch import start_server
    from openai import OpenAI

    t0 = time.monotonic()
    extra = ["--model", args.model] if args.model else []
    print("dsv4 demo: starting `dsv4 serve` on the built-in tiny model ...", flush=True)
    server = start_server(extra, timeout=300)
    try:
        print(f"dsv4 demo: server ready at {server.base_url} in {time.monotonic() - t0:.1f} s", flush=True)
        client = OpenAI(base_url=server.base_url + "/v1", api_key="not-needed")
        model = client.models.list().data[0].id
        print(f"dsv4 demo: model {model!r}; asking: {args.prompt!r}", flush=True)
        t1 = time.monotonic()
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens,
            temperature=0.0)
        answer = resp.choices[0].message.content
        u = resp.usage
        print(f"dsv4 demo: answer ({u.completion_tokens} tokens in {time.monotonic() - t1:.2f} s, "
              f"finish_reason={resp.choices[0].finish_reason}; the tiny model has random weights, so the text "
              f"is gibberish):")
        print(f"  {answer!r}")
        print(f"dsv4 demo: metrics at {server.base_url}/metrics")
        status, body = server.get("/metrics")
        lines = [ln for ln in body.decode().splitlines()
                 if ln.startswith(("vllm:generation_tokens_total", "vllm:kv_cache_usage_perc",
                                   "vllm:num_requests_running"))]
        for ln in lines:
            print(f"  {ln}")
        if args.keep:
            print("dsv4 demo: server left running; Ctrl+C to stop", flush=True)
            try:
                server.proc.wait()
            except KeyboardInterrupt:
                pass
    finally:
        code = server.stop()
        print(f"dsv4 demo: server stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
