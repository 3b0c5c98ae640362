"""The ``ntkcore`` command line (also ``python -m ntkcore``).

Every error is one line on stderr, ``ntkcore: error: …``, with exit code 2 and the CLI's own
flag names (``--debug`` shows the traceback); ``explain`` exits 1 when nothing fits the memory
budget, ``demo`` and ``crosscheck`` when the frameworks disagree.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback
from typing import Any

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
        raise CommandError(f"--backends: {missing or backends} not installed; installed: {available}")
    widths = _integers(args.widths, "--widths")
    rows, largest, report = demo.run(backends, widths=widths, n=args.n, repeats=args.repeats)
    print(demo.format_table(rows, largest, widths, args.n))
    print()
    print(report)
    print()
    print(demo.NEXT_STEPS)
    if largest > DEMO_TOLERANCE or not report.ok:
        print(f"FAILED: kernels disagree by {largest:.2e} > {DEMO_TOLERANCE:g}", file=sys.stderr)
        return 1
    print(f"OK: all kernels agree within {DEMO_TOLERANCE:g}")
    return 0


class CommandError(Exception):
    """A mistake in the command line, reported as one line."""


def _load(reference: str, what: str) -> Any:
    """The object named ``module:attribute`` (dots allowed in the attribute)."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise CommandError(f"{what} must be given as module:attribute, got {reference!r}")
    if os.getcwd() not in sys.path:  # like python -m: modules in the working directory
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise CommandError(f"{what}: no module named {error.name!r} (from {reference!r})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"{what}: {module_name!r} has no attribute {attribute!r} (from {reference!r})")
        obj = getattr(obj, part)
    return obj


def _input(path: str | None, shape: str | None, flag: str = "--x1") -> Any:
    import numpy as np

    if path is not None:
        try:
            return np.load(path)
        except (OSError, ValueError) as error:
            raise CommandError(f"{flag}: cannot read {path!r} as a .npy file ({error})") from None
    if shape is None:
        return None
    return np.random.default_rng(0).standard_normal(_integers(shape, "--shape")).astype(np.float32)


def _integers(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise CommandError(f"{flag} takes comma-separated integers, e.g. 8,3 or -1; got {text!r}") from None


def _output(text: str | None) -> Any:
    """``--output logits`` or a path ``--output hidden_states.0`` (integers index sequences)."""
    if not text:
        return None
    parts = tuple(int(p) if p.lstrip("-").isdigit() else p for p in text.split("."))
    return parts[0] if len(parts) == 1 else parts


def _axes(text: str | None, flag: str) -> tuple[int, ...]:
    return () if not text else _integers(text, flag)


def _kernel_options(args: argparse.Namespace) -> dict:
    """The options ``explain`` and ``compute`` share, as keyword arguments of the API."""
    return {
        "params": _load(args.params, "--params") if args.params else None,
        "implementation": args.implementation,
        "trace_axes": _axes(args.trace_axes, "--trace-axes"),
        "diagonal_axes": _axes(args.diagonal_axes, "--diagonal-axes"),
        "backend": args.backend,
        "memory_budget": args.memory_budget,
        "output": _output(args.output),
    }


def _explain(args: argparse.Namespace) -> int:
    from .api import explain

    options = _kernel_options(args)
    x1 = _input(args.x1, args.shape)
    if x1 is None:
        raise CommandError("give the inputs as --x1 FILE.npy or their shape as --shape N,D,...")
    x2 = _input(args.x2, None, "--x2")
    result = explain(_load(args.model, "the model"), x1, x2, **options)
    print(result)
    return 0 if result.choice is not None else 1


def _compute(args: argparse.Namespace) -> int:
    from .api import ntk

    options = _kernel_options(args)
    x1, x2 = _input(args.x1, None), _input(args.x2, None, "--x2")
    ntk(
        _load(args.model, "--model"),
        x1,
        x2,
        **options,
        batch_size=args.batch_size,
        executor=args.scheduler,
        progress=None if args.progress is None else args.progress == "on",
        out=args.out,
        overwrite=args.overwrite,
        verify=not args.no_verify,
    )
    print(f"ntkcore compute: kernel written to {args.out}")
    return 0


def _named(values: list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=module:attribute`` entries of a repeated flag, in order."""
    found = {}
    for value in values or ():
        name, sep, reference = value.partition("=")
        if not sep or not name or not reference:
            raise CommandError(f"{flag} takes NAME=module:attribute (e.g. torch=mymodels:net), got {value!r}")
        found[name] = reference
    return found


def _crosscheck(args: argparse.Namespace) -> int:
    from .crosscheck import crosscheck
    from .transfer import transfer

    references = _named(args.model, "--model")
    if not references:
        raise CommandError("give the models as --model NAME=module:attribute, once per framework")
    params = {name: _load(ref, f"--params {name}") for name, ref in _named(args.params, "--params").items()}
    unknown = sorted(set(params) - set(references))
    if unknown:
        raise CommandError(f"--params names {unknown}, which no --model names")
    models = {name: (_load(ref, f"--model {name}"), params.get(name)) for name, ref in references.items()}
    if args.transfer_from is not None:
        if args.transfer_from not in models:
            raise CommandError(f"--transfer-from {args.transfer_from!r} is none of the models {list(models)}")
        source, source_params = models[args.transfer_from]
        for name, (model, target_params) in models.items():
            if name != args.transfer_from:
                moved = transfer(source, model, source_params=source_params, target_params=target_params)
                models[name] = (model, moved if target_params is not None else None)
    x1 = _input(args.x1, args.shape)
    if x1 is None:
        raise CommandError("give the inputs as --x1 FILE.npy or their shape as --shape N,D,...")
    report = crosscheck(
        models,
        x1,
        _input(args.x2, None, "--x2"),
        implementation=args.implementation,
        rtol=args.rtol,
        trace_axes=_axes(args.trace_axes, "--trace-axes"),
        diagonal_axes=_axes(args.diagonal_axes, "--diagonal-axes"),
        output=_output(args.output),
    )
    print(report)
    return 0 if report.ok else 1


# the API's argument names as the CLI spells them, for messages raised by the API
_FLAGS = {
    "overwrite=True": "--overwrite",
    "batch_size=": "--batch-size",
    "memory_budget=": "--memory-budget",
    "trace_axes=": "--trace-axes",
    "diagonal_axes=": "--diagonal-axes",
    "implementation=": "--implementation ",
    "backend=": "--backend ",
    "out=": "--out ",
    "params=": "--params ",
    "output=": "--output ",
    "x1": "--x1",
    "x2": "--x2",
}


def _one_line(error: BaseException) -> str:
    """The error as one line, in the CLI's own terms."""
    text = " ".join(str(error).split()) or type(error).__name__
    for api, flag in _FLAGS.items():
        text = re.sub(rf"(?<![\w.\[-]){re.escape(api)}(?![\w\[])", flag, text)
    if not isinstance(error, (CommandError, ValueError, TypeError)):
        text = f"{type(error).__name__}: {text}"
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        print(f"ntkcore: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ntkcore`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(f"ntkcore: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ntkcore", description="Empirical Neural Tangent Kernels, fast.")
    parser.add_argument("--version", action="version", version=f"ntkcore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser(
        "demo", help="one MLP in every installed framework, every implementation: times and cross-check"
    )
    demo.add_argument("--backends", help="comma-separated subset of jax,torch,tensorflow (default: all installed)")
    demo.add_argument("--widths", default="32,256,256,10", help="layer widths, input first (default: %(default)s)")
    demo.add_argument("--n", type=int, default=16, help="number of inputs (default: %(default)s)")
    demo.add_argument("--repeats", type=int, default=3, help="timed calls after the first (default: %(default)s)")
    demo.set_defaults(handler=_demo)
    explain = commands.add_parser(
        "explain", help="predicted FLOPs, memory and time of each implementation, and auto's choice"
    )
    explain.add_argument("model", help="the model as module:attribute (a torch module, Keras model or JAX function)")
    explain.add_argument("--params", help="module:attribute of a JAX function's parameters")
    explain.add_argument("--x1", help=".npy file with the first batch")
    explain.add_argument("--shape", help="shape of a random float32 first batch instead, e.g. 32,784")
    explain.add_argument("--x2", help=".npy file with the second batch (default: x2 = x1)")
    explain.add_argument("--implementation", default="auto", help="default: %(default)s")
    explain.add_argument("--trace-axes", help="comma-separated output axes to trace, e.g. -1")
    explain.add_argument("--diagonal-axes", help="comma-separated output axes to keep the diagonal of, e.g. 0")
    explain.add_argument("--backend", help="jax, torch or tensorflow (default: inferred)")
    explain.add_argument("--memory-budget", help="bytes, or e.g. 4GB (default: half of the free memory)")
    explain.add_argument("--output", help="the model output's key or attribute (a path with dots: hidden_states.0)")
    explain.set_defaults(handler=_explain)
    compute = commands.add_parser(
        "compute", help="a kernel written to disk tile by tile (resumable: rerun the same command)"
    )
    compute.add_argument("--model", required=True, help="module:attribute of the model")
    compute.add_argument("--params", help="module:attribute of a JAX function's parameters")
    compute.add_argument("--x1", required=True, help=".npy file with the first batch")
    compute.add_argument("--x2", help=".npy file with the second batch (default: x2 = x1)")
    compute.add_argument("--out", required=True, help="kernel.zarr (zarr v3) or kernel.npy")
    compute.add_argument("--batch-size", type=int, help="examples per tile (default: from the memory budget)")
    compute.add_argument("--implementation", default="auto", help="default: %(default)s")
    compute.add_argument("--trace-axes", help="comma-separated output axes to trace, e.g. -1")
    compute.add_argument("--diagonal-axes", help="comma-separated output axes to keep the diagonal of")
    compute.add_argument("--backend", help="jax, torch or tensorflow (default: inferred)")
    compute.add_argument("--memory-budget", help="bytes, or e.g. 4GB (default: half of the free memory)")
    compute.add_argument("--output", help="the model output's key or attribute (a path with dots: hidden_states.0)")
    compute.add_argument("--scheduler", help="address of a Dask scheduler: tiles run on its workers")
    compute.add_argument("--progress", choices=["on", "off"], help="progress bar (default: on a terminal)")
    compute.add_argument("--overwrite", action="store_true", help="replace an --out holding another kernel")
    compute.add_argument(
        "--no-verify", action="store_true", help="trust an existing --out's finished tiles (skip their checksums)"
    )
    compute.set_defaults(handler=_compute)
    _add_crosscheck(commands)
    return parser


def _add_crosscheck(commands: Any) -> None:
    check = commands.add_parser(
        "crosscheck", help="one architecture in several frameworks: outputs and kernels compared (exit 1: they differ)"
    )
    check.add_argument("--model", action="append", help="NAME=module:attribute, once per model (e.g. torch=m:net)")
    check.add_argument("--params", action="append", help="NAME=module:attribute of a JAX model's parameters")
    check.add_argument("--transfer-from", help="copy this model's weights into the others first (ntkcore.transfer)")
    check.add_argument("--x1", help=".npy file with the inputs")
    check.add_argument("--shape", help="shape of random float32 inputs instead, e.g. 8,3,32,32")
    check.add_argument("--x2", help=".npy file with a second batch (default: x2 = x1)")
    check.add_argument("--implementation", default="auto", help="an implementation, auto or all (default: %(default)s)")
    check.add_argument("--rtol", type=float, help="largest relative difference accepted (default: 1e-4 float32, 1e-9)")
    check.add_argument("--trace-axes", help="comma-separated output axes to trace, e.g. -1")
    check.add_argument("--diagonal-axes", help="comma-separated output axes to keep the diagonal of")
    check.add_argument("--output", help="the model output's key or attribute (a path with dots: hidden_states.0)")
    check.set_defaults(handler=_crosscheck)


if __name__ == "__main__":
    sys.exit(main())
