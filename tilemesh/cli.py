"""The `tilemesh` command: `serve` runs the room server, `setup` fetches and verifies the browser assets, `bench`
compares the planner's strategies on an emulated room."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aiohttp import web

from tilemesh.paths import default_static_dir, source_root
from tilemesh.server import netinfo, tls
from tilemesh.server.app import create_app
from tilemesh.server.context import ServerConfig

log = logging.getLogger("tilemesh")


def _parse_ice(values: list[str]) -> list[dict]:
    """`--ice-server stun:host:3478` or `turn:host:3478|user|pass` -> RTCIceServer dicts."""
    servers = []
    for value in values:
        url, *cred = value.split("|")
        entry: dict = {"urls": [url]}
        if cred:
            if len(cred) != 2:
                raise SystemExit(f"--ice-server {value!r}: expected URL or URL|username|credential")
            entry["username"], entry["credential"] = cred
        servers.append(entry)
    return servers


def cmd_serve(args: argparse.Namespace) -> int:
    static_dir = Path(args.static_dir)
    if not (static_dir / "vendor" / "pyodide" / "pyodide.js").exists():
        print(
            f"error: browser assets missing in {static_dir}; run `tilemesh setup` (or `make setup`) first",
            file=sys.stderr,
        )
        return 2
    host = netinfo.public_host(args.host)
    use_tls = args.https or (not args.http and not netinfo.is_loopback(args.host))
    ssl_ctx = None
    scheme = "http"
    if use_tls:
        scheme = "https"
        if args.cert and args.key:
            cert, key = Path(args.cert), Path(args.key)
        else:
            hosts = [host, "localhost", "127.0.0.1", *netinfo.lan_addresses()]
            cert, key, created = tls.ensure_certificate(Path(args.state_dir), hosts)
            print(f"{'created' if created else 'using'} self-signed certificate {cert}")
        print(f"certificate SHA-256 fingerprint: {tls.fingerprint(cert)}")
        ssl_ctx = tls.ssl_context(cert, key)
    public_url = f"{scheme}://{host}:{args.port}/"
    config = ServerConfig(
        host=args.host,
        port=args.port,
        static_dir=static_dir,
        public_url=public_url,
        ice_servers=_parse_ice(args.ice_server),
        edge_peer=args.edge,
        edge_transport=args.edge_transport,
        model=Path(args.model) if args.model else None,
        diagnostics=args.diagnostics,
    )
    from tilemesh.server.model import CardError, ModelError  # noqa: PLC0415

    try:
        app = create_app(config)
    except (ModelError, CardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tilemesh is running: open {public_url} on a laptop, then scan the QR code with phones", flush=True)
    others = [a for a in netinfo.lan_addresses() if a != host] if args.host in ("0.0.0.0", "::") else []
    if others:
        print(f"(also listening on {', '.join(others)}; if phones cannot reach {host}, use --host <address>)")
    if use_tls:
        print("(the certificate is self-signed: accept the browser's warning once per device)", flush=True)
    web.run_app(app, host=args.host, port=args.port, ssl_context=ssl_ctx, print=None, access_log=None)
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    from tilemesh.server import assets  # noqa: PLC0415  (setup pulls in onnx; serving does not need it)

    return assets.main(["--static-dir", args.static_dir])


def cmd_bench(args: argparse.Namespace) -> int:
    # The benchmark lives in the source checkout (bench/), outside the installed package: it drives Playwright,
    # namespaces and cgroups, which serving never needs.
    root = source_root()
    if root and (root / "bench" / "harness.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from bench import harness as bench  # noqa: PLC0415
    except ImportError as exc:
        print(f"error: `tilemesh bench` runs from a source checkout (make bench): {exc}", file=sys.stderr)
        return 2

    return bench.main(args.bench_args)


def cmd_models(args: argparse.Namespace) -> int:
    from tilemesh.models import zoo  # noqa: PLC0415  (setup-time code: onnx is imported only when building)

    return zoo.main(args.models_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilemesh", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the room server")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    serve.add_argument("--port", type=int, default=8443)
    serve.add_argument("--cert", help="PEM certificate (default: a self-signed one made on first run)")
    serve.add_argument("--key", help="PEM private key for --cert")
    tls_mode = serve.add_mutually_exclusive_group()
    tls_mode.add_argument("--http", action="store_true", help="plain http even off loopback (phones lose the camera)")
    tls_mode.add_argument("--https", action="store_true", help="https even on loopback (default: https off loopback)")
    serve.add_argument("--state-dir", default=str(Path.home() / ".tilemesh"), help="where the certificate is kept")
    serve.add_argument("--static-dir", default=str(default_static_dir()),
                       help="where `tilemesh setup` put the browser assets (default: %(default)s)")
    serve.add_argument("--ice-server", action="append", default=[], help="STUN/TURN URL[|user|credential]")
    serve.add_argument("--edge", action="store_true", help="the server joins each room as an aiortc edge peer")
    serve.add_argument("--edge-transport", choices=("relay", "webrtc"), default="relay",
                       help="how browsers reach the edge peer: over the WebSocket they already hold to this server "
                            "(default; cheapest for the server's CPU) or over WebRTC data channels (aiortc)")
    serve.add_argument("--model", metavar="FILE.onnx",
                       help="the CNN to serve, with its model card FILE.json beside it (labels, preprocessing; "
                            "see tilemesh.models.card); default: the demo model `tilemesh setup` built")
    serve.add_argument("--diagnostics", action="store_true",
                       help="serve the /diag/mesh test pages and routes (tests and link benchmarks only)")
    serve.set_defaults(func=cmd_serve)

    setup = sub.add_parser("setup", help="fetch, verify and unpack the browser and model assets")
    setup.add_argument("--static-dir", default=str(default_static_dir()),
                       help="where to put the browser assets (default: %(default)s; env TILEMESH_STATIC)")
    setup.set_defaults(func=cmd_setup)

    bench = sub.add_parser("bench", add_help=False,
                           help="compare every strategy on an emulated room (root; from a source checkout)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of python -m bench.harness")
    bench.set_defaults(func=cmd_bench)

    models = sub.add_parser("models", add_help=False,
                            help="list or build the pretrained zoo models (ONNX + card for serve --model)")
    models.add_argument("models_args", nargs=argparse.REMAINDER, help="list | build NAME|all [--out DIR] [--force]")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # Straight through: argparse's REMAINDER would refuse `tilemesh bench --help` and other leading options.
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    if argv[:1] == ["models"]:
        return cmd_models(argparse.Namespace(models_args=argv[1:]))
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
