"""``python -m edgellm.serve PKG...``: the server on a device, where there is no click (argparse, as edgellm.runtime's)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from edgellm.errors import EdgeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgellm.serve",
                                     description="Serve packages over HTTP: KServe v2 / Triton's protocol, and OpenAI's API for language models.")
    parser.add_argument("packages", nargs="+", metavar="PKG|NAME=PKG")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0: every interface (give an --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--api-key", default=os.environ.get("EDGELLM_API_KEY"), help="require 'Authorization: Bearer KEY' [env EDGELLM_API_KEY]")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads one call uses [default: all cores]")
    parser.add_argument("--trusted-key", dest="trusted_keys", action="append", default=[], metavar="KEY.pub",
                        help="refuse packages not signed by this key (repeat for several; adds to $EDGELLM_TRUSTED_KEYS)")
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="larger request bodies get 413")
    parser.add_argument("--json", action="store_true", help="the startup line as JSON: url, port, models")
    args = parser.parse_args(argv)

    def announce(info):
        print(json.dumps(info) if args.json else f"serving {', '.join(info['models'])} at {info['url']} (Ctrl-C stops)", flush=True)

    try:
        from edgellm.serve import serve

        serve(args.packages, host=args.host, port=args.port, api_key=args.api_key, threads=args.threads, trusted_keys=args.trusted_keys,
              max_body=int(args.max_body_mb * (1 << 20)), announce=announce)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # while loading (once serving, Ctrl-C stops the server cleanly)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
