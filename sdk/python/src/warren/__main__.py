"""``python -m warren`` (also installed as ``warren-py``).

  python -m warren serve MODULE [MODULE...] [--queue Q] [--prefetch N] [--default-method M] [--declare X]
      imports the modules (their ``@warren.expose`` functions become methods) and serves the queue (default
      ``$WARREN_QUEUE``) until SIGTERM / SIGINT: the entry point of a responder container.
  python -m warren call QUEUE METHOD [PARAMS_JSON] [--timeout SECONDS]
      prints the result as JSON; exit codes as the ``warren`` CLI's (1 error reply, 3 timeout, 4 no such service,
      5 rejected, 6 connection, 7 malformed reply).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import List, Optional

from . import errors
from .client import Client
from .responder import serve


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m warren", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker-uri", default=None, help="default: $WARREN_BROKER_URI")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="serve the @warren.expose functions of modules")
    serve_parser.add_argument("modules", nargs="+", help="modules to import (from the current directory too)")
    serve_parser.add_argument("--queue", default=None, help="default: $WARREN_QUEUE")
    serve_parser.add_argument("--prefetch", type=int, default=None, help="default: $WARREN_PREFETCH, else 32")
    serve_parser.add_argument("--default-method", default=None, help="default: $WARREN_DEFAULT_METHOD")
    serve_parser.add_argument("--declare", choices=("true", "false", "auto"), default=None,
                              help="default: $WARREN_DECLARE, else auto")
    serve_parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    serve_parser.add_argument("--health-addr", default=None, help="default: $WARREN_METRICS_ADDR (off if unset)")
    serve_parser.add_argument("--log-level", default=os.environ.get("WARREN_LOG_LEVEL", "INFO"))

    call_parser = commands.add_parser("call", help="call a method and print the result")
    call_parser.add_argument("queue")
    call_parser.add_argument("method", help="'-' calls the default method")
    call_parser.add_argument("params", nargs="?", default="[]", help="JSON: array = positional, object = named")
    call_parser.add_argument("--timeout", type=float, default=5.0, help="seconds")

    args = parser.parse_args(argv)
    if args.command == "serve":
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        sys.path.insert(0, os.getcwd())
        for module in args.modules:
            importlib.import_module(module)
        declare = {"true": True, "false": False, "auto": "auto", None: None}[args.declare]
        serve(args.queue, broker_uri=args.broker_uri, prefetch=args.prefetch, default_method=args.default_method,
              declare=declare, queue_type=args.queue_type, health_addr=args.health_addr)
        return 0

    try:
        params = json.loads(args.params)
    except ValueError as error:
        print(f"error: PARAMS is not JSON: {error}", file=sys.stderr)
        return 2
    client = Client(args.broker_uri, timeout=args.timeout)
    try:
        result = client.request(args.queue, None if args.method == "-" else args.method, params)
    except errors.RemoteError as error:
        print(f"error: {error.code}: {error.message}" + (f" {json.dumps(error.details)}" if error.details is not None
                                                        else ""), file=sys.stderr)
        return 1
    except errors.WarrenError as error:
        print(f"error: {error}", file=sys.stderr)
        return {errors.Timeout: 3, errors.NoSuchService: 4, errors.Rejected: 5, errors.ConnectionLost: 6,
                errors.MalformedReply: 7}.get(type(error), 1)
    finally:
        client.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
