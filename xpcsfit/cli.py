"""The ``xpcsfit`` command: fit, ingest, simulate (and cmc).

Every :class:`~xpcsfit.XpcsfitError` ends as one line on stderr and a non-zero exit
code (2 input, 3 configuration); a traceback means a bug in xpcsfit.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from xpcsfit import cmc_cli as _cmc_cli
from xpcsfit.cli_args import add_selection
from xpcsfit.errors import XpcsfitError


def _fit_parser(sub):
    p = sub.add_parser("fit", help="fit the homodyne model to an HDF5 result file or store")
    add_selection(p)
    p.add_argument("--mode", help="static or laminar_flow (default laminar_flow)")
    p.add_argument("--gap", type=float, metavar="L_ANGSTROM", help="gap L, Å (default 2.0e6, with a warning)")
    p.add_argument("--config", help="YAML file of fit settings (bounds, initial values, solver)")
    p.add_argument("--tile", type=int, help="tile edge in frames (default 128)")
    p.add_argument("--out", help="result directory (default ./<input name>_fit)")
    p.add_argument("--scheduler", help="address of a running Dask scheduler (default: start a LocalCluster)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if a checkpoint of this very fit (.OUT.checkpoint.json beside --out, "
                        "left by a killed run) would let it continue")


def _run_fit(args) -> int:
    from xpcsfit.leastsq.driver import fit

    out = Path(args.out) if args.out else Path.cwd() / f"{Path(args.input).name.split('.')[0]}_fit"
    result = fit(args.input, q=args.q, q_index=args.q_index, phi=args.phi,
                 frames=tuple(args.frames) if args.frames else None, dt=args.dt, mode=args.mode,
                 gap=args.gap, config=args.config, out=out, scheduler=args.scheduler, tile=args.tile,
                 resume=args.resume)
    print(f"\n{'parameter':<20}{'value':>14}{'stderr':>12}  unit")
    from xpcsfit.parameters import UNITS

    for name, v, s in zip(result.names, result.values, result.stderr):
        print(f"{name:<20}{v:>14.6g}{s:>12.3g}  {UNITS[name]}")
    print(f"reduced chi2 {result.reduced_chi2:.4g}, {result.iterations} iterations, "
          f"{result.data_passes} data passes, {result.wall_time_s:.1f} s; converged: {result.converged}")
    print(f"results in {out}")
    return 0 if result.converged else 4


def _ingest_parser(sub):
    p = sub.add_parser("ingest", help="write an HDF5 result file as a Zarr store of angle-complete tiles")
    p.add_argument("input")
    p.add_argument("store")
    p.add_argument("--tile", type=int, default=256, help="tile edge in frames (default 256)")
    p.add_argument("--gap", type=float, metavar="L_ANGSTROM", help="record the sample gap L, Å")


def _run_ingest(args) -> int:
    from xpcsfit.io.store import ingest

    path, created = ingest(args.input, args.store, tile=args.tile, gap=args.gap)
    print(f"{path}: {'written' if created else 'already ingested from this input; nothing to do'}")
    return 0


def _simulate_parser(sub):
    p = sub.add_parser("simulate", help="write an APS-U-layout file from the model plus noise")
    p.add_argument("out", help="HDF5 file to write; <name>.truth.json is written beside it")
    p.add_argument("--mode", default="laminar_flow")
    p.add_argument("--q", type=float, nargs="+", default=[0.0055], help="q values, 1/Å")
    p.add_argument("--n-phi", type=int, default=8)
    p.add_argument("--n-frames", type=int, default=500)
    p.add_argument("--dt", type=float, default=0.1)
    p.add_argument("--gap", type=float, default=2.0e6, help="L, Å")
    p.add_argument("--noise", type=float, default=0.02, help="Gaussian noise sd per element")
    p.add_argument("--seed", type=int, default=0)


def _run_simulate(args) -> int:
    from xpcsfit.simulate import simulate, truth_path

    out = simulate(args.out, mode=args.mode, q=args.q, n_phi=args.n_phi, n_frames=args.n_frames,
                   dt=args.dt, gap=args.gap, noise=args.noise, seed=args.seed)
    print(f"wrote {out} and {truth_path(out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xpcsfit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _fit_parser(sub)
    _ingest_parser(sub)
    _simulate_parser(sub)
    _cmc_cli.add_parser(sub)
    return parser


_RUNNERS = {"fit": _run_fit, "ingest": _run_ingest, "simulate": _run_simulate, "cmc": _cmc_cli.run}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # xpcsfit's own warnings (UserWarning subclasses) show under Python's default filters;
    # "default" for every category would also print the ResourceWarnings of libraries.
    warnings.simplefilter("default", UserWarning)
    warnings.formatwarning = lambda message, category, *a, **k: f"xpcsfit: warning: {message}\n"
    try:
        return _RUNNERS[args.command](args)
    except XpcsfitError as exc:
        print(f"xpcsfit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("xpcsfit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
