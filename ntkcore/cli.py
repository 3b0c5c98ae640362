"""The ``ntkcore`` command line (also ``python -m ntkcore``)."""

from __future__ import annotations

import argparse
import sys

from . import __version__

# float32 kernels of the demo agree to ~1e-6 across frameworks; 1e-4 flags a real disagreement
DEMO_TOLERANCE = 1e-4


def _demo(args: argparse.Namespace) -> int:
    from . import demo
    from .registry import installed_backends

    available = installed_backends()
    backends = args.backends.split(",") if args.backends else available
    missing = [b for b in backends if b not in available]
    if missing or not backends:
        print(f"ntkcore demo: backend(s) {missing or backends} not installed; installed: {available}", file=sys.stderr)
        return 2
    widths = tuple(int(w) for w in args.widths.split(","))
    rows, largest = demo.run(backends, widths=widths, n=args.n, repeats=args.repeats)
    print(demo.format_table(rows, largest, widths, args.n))
    if largest > DEMO_TOLERANCE:
        print(f"FAILED: kernels disagree by {largest:.2e} > {DEMO_TOLERANCE:g}", file=sys.stderr)
        return 1
    print(f"OK: all kernels agree within {DEMO_TOLERANCE:g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ntkcore`` command."""
    parser = argparse.ArgumentParser(prog="ntkcore", description="Empirical Neural Tangent Kernels, fast.")
    parser.add_argument("--version", action="version", version=f"ntkcore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="one MLP in every installed framework, every implementation: times and cross-check"
    )
    demo.add_argument("--backends", help="comma-separated subset of jax,torch,tensorflow (default: all installed)")
    demo.add_argument("--widths", default="32,256,256,10", help="layer widths, input first (default: %(default)s)")
    demo.add_argument("--n", type=int, default=16, help="number of inputs (default: %(default)s)")
    demo.add_argument("--repeats", type=int, default=3, help="timed calls after the first (default: %(default)s)")
    demo.set_defaults(handler=_demo)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
