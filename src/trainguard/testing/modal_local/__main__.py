"""``python -m trainguard.testing.modal_local``: a local Modal control plane to rehearse on.

    python -m trainguard.testing.modal_local [serve] [--dir DIR] [--port N]
        [--preempt-grace 30] [--heartbeat 15] [--secret NAME:KEY=VALUE ...]
    python -m trainguard.testing.modal_local preempt CALL_ID [--grace S] [--url URL]
    python -m trainguard.testing.modal_local state [--url URL]

``serve`` prints ``MODAL_SERVER_URL=...`` on its first line, then the token variables
and the control URL; export them and run trainguard or ``modal`` as usual. ``preempt``
and ``state`` talk to a running plane through its control URL (``$MODAL_LOCAL_CONTROL``,
printed by ``serve``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import urllib.error
import urllib.request


def _serve(args: argparse.Namespace) -> int:
    from trainguard.testing.modal_local import LocalModal

    plane = LocalModal(args.dir, heartbeat_interval=args.heartbeat,
                       preempt_grace=args.preempt_grace, port=args.port)

    async def main() -> None:
        await plane.serve()
        for spec in args.secret:
            name, _, pairs = spec.partition(":")
            env = dict(p.partition("=")[::2] for p in pairs.split(",") if p)
            plane.plane.add_secret(name, env)
        print(f"MODAL_SERVER_URL={plane.url}", flush=True)
        print(f"MODAL_TOKEN_ID={plane.token_id}", flush=True)
        print(f"MODAL_TOKEN_SECRET={plane.token_secret}", flush=True)
        print(f"MODAL_LOCAL_CONTROL={plane.plane.http_url}", flush=True)
        print(f"# state in {plane.root}; export the lines above, then run trainguard or "
              f"modal; Ctrl-C stops every container", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await plane.shutdown()

    asyncio.run(main())
    return 0


def _control(args: argparse.Namespace, path: str, method: str = "GET") -> int:
    base = args.url or os.environ.get("MODAL_LOCAL_CONTROL")
    if not base:
        print("error: no control URL: pass --url, or export MODAL_LOCAL_CONTROL as "
              "`serve` printed it", file=sys.stderr)
        return 2
    request = urllib.request.Request(base.rstrip("/") + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"error: {json.load(exc).get('error', exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach the local control plane at {base}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m trainguard.testing.modal_local",
                                     description="A local Modal control plane.")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the control plane (the default)")
    for p in (parser, serve):
        p.add_argument("--dir", default=None, help="state directory (default: a temporary one)")
        p.add_argument("--port", type=int, default=0, help="gRPC port (default: any free one)")
        p.add_argument("--preempt-grace", type=float, default=30.0,
                       help="seconds from SIGINT to SIGKILL on preemption (Modal: 30)")
        p.add_argument("--heartbeat", type=float, default=15.0,
                       help="containers' heartbeat period in seconds (Modal: 15)")
        p.add_argument("--secret", action="append", default=[], metavar="NAME:K=V[,K=V]",
                       help="a named secret (repeatable)")
    preempt = sub.add_parser("preempt", help="preempt the container running a call")
    preempt.add_argument("call_id")
    preempt.add_argument("--grace", type=float, default=None)
    preempt.add_argument("--url", default=None)
    state = sub.add_parser("state", help="print the plane's state as JSON")
    state.add_argument("--url", default=None)
    args = parser.parse_args(argv)
    if args.command == "preempt":
        grace = f"&grace={args.grace}" if args.grace is not None else ""
        return _control(args, f"/control/preempt?call={args.call_id}{grace}", "POST")
    if args.command == "state":
        return _control(args, "/control/state")
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
