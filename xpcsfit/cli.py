"""The ``xpcsfit`` command: one parser for fit, cmc, ingest, simulate, certs, batch and results.

Every :class:`~xpcsfit.XpcsfitError` ends as one line on stderr and a non-zero exit
code (2 input, 3 configuration, 5 sampling); a traceback means a bug in xpcsfit. A fit
that stops unconverged exits 4, a CMC run with a shard failing its diagnostics 5, a
batch run in which some fit failed or did not converge 6 (:data:`xpcsfit.errors.EXIT_INCOMPLETE`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from xpcsfit.errors import XpcsfitError


def _add_selection(p) -> None:
    """INPUT, --q / --q-index / --all-q, --phi, --frames and --dt: the keyword names of
    :func:`xpcsfit.open_dataset`, shared by ``fit`` and ``cmc``."""
    p.add_argument("input", help="APS-U / legacy HDF5 result file, or a store from `xpcsfit ingest`")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--q", type=float, nargs="+", metavar="VALUE", help="q value(s), 1/Å (nearest bin)")
    sel.add_argument("--q-index", type=int, nargs="+", metavar="K",
                     help="position(s) in the file's q grid (/xpcs/qmap/dynamic_v_list_dim0)")
    sel.add_argument("--all-q", action="store_true", help="every q with two-time maps (the default)")
    p.add_argument("--phi", type=float, nargs="+", metavar="DEG", help="subset of phi bins, degrees")
    p.add_argument("--frames", type=int, nargs=2, metavar=("A", "B"), help="inclusive frame range")
    p.add_argument("--dt", type=float, help="override the file's time step, s")


def _selection(args) -> dict:
    return dict(q=args.q, q_index=args.q_index, phi=args.phi,
                frames=tuple(args.frames) if args.frames else None, dt=args.dt)


def _add_where(p) -> None:
    """--scheduler ADDRESS or --cluster SPEC (one of them): where the work runs."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="address of a running Dask scheduler, tcp:// or tls:// (certificates from Dask's "
                            "configuration, see `xpcsfit certs`); default: start a LocalCluster")
    where.add_argument("--cluster", metavar="SPEC",
                       help="cluster to start: a spec file (see cluster/) or local, gpu, slurm, pbs, kubernetes")


def _default_out(args, suffix: str) -> Path:
    return Path(args.out) if args.out else Path.cwd() / f"{Path(args.input).name.split('.')[0]}_{suffix}"


def _fit_parser(sub):
    p = sub.add_parser("fit", help="fit the homodyne model to an HDF5 result file or store")
    _add_selection(p)
    p.add_argument("--mode", help="static or laminar_flow (default laminar_flow)")
    p.add_argument("--gap", type=float, metavar="L_ANGSTROM", help="gap L, Å (default 2.0e6, with a warning)")
    p.add_argument("--config", help="YAML file of fit settings (bounds, initial values, solver)")
    p.add_argument("--tile", type=int, help="tile edge in frames (default 128)")
    p.add_argument("--out", help="result directory (default ./<input name>_fit)")
    p.add_argument("--starts", type=int, metavar="N",
                   help="fit from N starts (the usual one and N-1 Latin hypercube starts inside the bounds) "
                        "in parallel on the cluster; keep the best, report how many reached it (default 1)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the Latin hypercube starts (default 0)")
    _add_where(p)
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if a checkpoint of this very fit (.OUT.checkpoint.json beside --out, "
                        "left by a killed run) would let it continue")


def _run_fit(args) -> int:
    from xpcsfit.leastsq.driver import fit

    out = _default_out(args, "fit")
    result = fit(args.input, **_selection(args), mode=args.mode, gap=args.gap, config=args.config, out=out, scheduler=args.scheduler, tile=args.tile,
                 resume=args.resume, cluster=args.cluster, starts=args.starts, seed=args.seed)
    print(f"\n{'parameter':<20}{'value':>14}{'stderr':>12}  unit")
    from xpcsfit.parameters import UNITS

    for name, v, s in zip(result.names, result.values, result.stderr):
        print(f"{name:<20}{v:>14.6g}{s:>12.3g}  {UNITS[name]}")
    print(f"reduced chi2 {result.reduced_chi2:.4g}, {result.iterations} iterations, "
          f"{result.data_passes} data passes, {result.wall_time_s:.1f} s; converged: {result.converged}")
    if result.starts is not None:
        st = result.starts
        print(f"starts: {st['reached_best']} of {st['n']} reached the best; "
              f"{len(st['distinct_minima'])} distinct minima")
    print(f"results in {out}")
    return 0 if result.converged else 4


def _cmc_parser(sub):
    p = sub.add_parser(
        "cmc", help="posterior by Consensus Monte Carlo: NUTS shards on Dask, combined",
        description="Bayesian uncertainties: K angle-complete shards of the data, each one NumPyro "
                    "NUTS task on the Dask cluster (prior raised to 1/K), combined by consensus "
                    "Monte Carlo (Scott et al. 2016).")
    _add_selection(p)
    p.add_argument("--mode", help="static or laminar_flow (default: the fit's, else laminar_flow)")
    p.add_argument("--gap", type=float, metavar="L_ANGSTROM", help="gap L, Å (default: the fit's, else 2.0e6)")
    p.add_argument("--config", help="YAML file of fit settings (bounds; used by the least-squares fit too)")
    p.add_argument("--shards", type=int, metavar="K",
                   help="number of shards (default: the worker threads, fewer where a shard's data would "
                        "determine J or gamma_dot to worse than 6 %%)")
    p.add_argument("--warmup", type=int, default=500, metavar="N", help="NUTS warm-up iterations (default 500)")
    p.add_argument("--samples", type=int, default=500, metavar="N", help="draws per chain (default 500)")
    p.add_argument("--chains", type=int, default=2, metavar="C", help="chains per shard (default 2)")
    p.add_argument("--thin", type=int, metavar="S",
                   help="condition on every S-th frame in t1 and t2 (default 2)")
    p.add_argument("--combine", default="consensus", choices=("consensus", "parametric"),
                   help="sample-wise consensus (default) or the Gaussian product of the shards")
    p.add_argument("--from-fit", metavar="FIT_JSON",
                   help="fit.json (or its directory) to start from; default: run the least-squares fit first")
    p.add_argument("--target-accept", type=float, default=0.9, metavar="P",
                   help="NUTS target acceptance probability (default 0.9; raise it to 0.95 or 0.98 "
                        "when shards report divergent transitions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="result directory (default ./<input name>_cmc)")
    _add_where(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _run_cmc(args) -> int:
    """Run ``xpcsfit cmc``; 0 when every shard passed its diagnostics, 5 otherwise."""
    from xpcsfit.cmc.driver import cmc

    out = _default_out(args, "cmc")
    result = cmc(args.input, **_selection(args), mode=args.mode, gap=args.gap, config=args.config, shards=args.shards, warmup=args.warmup,
                 samples=args.samples, chains=args.chains, thin=args.thin, combine=args.combine,
                 from_fit=args.from_fit, seed=args.seed, target_accept=args.target_accept, out=out,
                 scheduler=args.scheduler, cluster=args.cluster, progress=not args.quiet)
    s = result.summary
    if args.quiet:  # the progress lines already carry the table otherwise
        print(f"{'parameter':<20}{'mean':>14}{'sd':>12}{'q03':>14}{'q97':>14}{'r_hat':>8}{'ess':>7}")
        for name, p in s["parameters"].items():
            print(f"{name:<20}{p['mean']:>14.6g}{p['sd']:>12.3g}{p['q03']:>14.6g}{p['q97']:>14.6g}"
                  f"{p['r_hat']:>8.3f}{p['ess_bulk']:>7.0f}")
    failing = s["shards_failing_diagnostics"]
    print(f"{len(s['shards'])} shards, {len(failing)} failing diagnostics"
          + (f" ({', '.join(failing)}; see summary.json)" if failing else "")
          + f"; {s['wall_time_s']:.0f} s; results in {out}")
    return 5 if failing else 0


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
    p.add_argument("--speckle", action="store_true",
                   help="simulate the measurement: moving particles, speckle, Poisson counts, a correlator's c2 "
                        "(correlated noise as real data have; --noise is then not used)")
    p.add_argument("--pixels", type=int, default=256, help="--speckle: pixels per (q, phi) bin")
    p.add_argument("--particles", type=int, default=256, help="--speckle: scatterers per bin")
    p.add_argument("--counts", type=float, default=2.0, help="--speckle: mean photons per pixel per frame")


def _run_simulate(args) -> int:
    from xpcsfit.simulate import simulate, truth_path

    out = simulate(args.out, mode=args.mode, q=args.q, n_phi=args.n_phi, n_frames=args.n_frames,
                   dt=args.dt, gap=args.gap, noise=args.noise, seed=args.seed, speckle=args.speckle,
                   pixels=args.pixels, particles=args.particles, counts=args.counts)
    print(f"wrote {out} and {truth_path(out)}")
    return 0


def _certs_parser(sub):
    p = sub.add_parser("certs", help="make a CA and a TLS certificate for the cluster specs",
                       description="Write ca.pem, ca-key.pem, cert.pem and key.pem (keys mode 0600) for "
                                   "the tls: sections of cluster specs. Files in DIR that xpcsfit certs did "
                                   "not write are never replaced.")
    p.add_argument("dir", nargs="?", metavar="DIR",
                   help="directory (default: where specs without tls: look, ~/.config/xpcsfit/certs)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a further host name or IP address for the certificate (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")


def _run_certs(args) -> int:
    from xpcsfit.engine.security import dask_tls_environment, default_certificate_directory, make_certificates

    directory = Path(args.dir) if args.dir else default_certificate_directory()
    paths = make_certificates(directory, hosts=tuple(args.host), days=args.days)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if args.dir:
        print(f"cluster specs use them with:\n  tls: {{ca: {paths['ca']}, cert: {paths['cert']}, key: {paths['key']}}}")
    else:
        print("cluster specs without a tls: section use them")
    print("`--scheduler tls://HOST:PORT` and dask scheduler/worker use them with:")
    for name, value in dask_tls_environment(paths["ca"], paths["cert"], paths["key"]).items():
        print(f"  export {name}={value}")
    return 0


def _batch_parser(sub):
    p = sub.add_parser(
        "batch", help="fit every two-time result file under ROOT(s) on one cluster; catalogue and report",
        description="Fit every unit (file x q) under the ROOTs that has no current result, many at once on "
                    "one Dask cluster; record each attempt in the catalogue (<out-root or first ROOT>/"
                    "xpcsfit.sqlite) and rewrite its report (index.html beside it). An xpcsfit.yaml in a "
                    "directory sets the fit settings of the files below it. Exit status: 0 every fit "
                    "converged, 6 some fit failed or did not converge (or a damaged file or bad setting "
                    "kept a file from being fitted), 2/3 bad input or option.")
    p.add_argument("roots", nargs="+", metavar="ROOT", help="directory searched recursively, or a file")
    p.add_argument("--glob", metavar="PATTERN",
                   help="file name pattern, or with / a pattern on the path below ROOT (default *.hdf *.h5 *.hdf5 *.nxs)")
    p.add_argument("--config", metavar="FILE", help="YAML settings under every xpcsfit.yaml (nearest wins)")
    p.add_argument("--out-root", metavar="DIR",
                   help="result directories under DIR, mirroring each ROOT (default: beside each input)")
    _add_where(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan (fit or skip each unit, and why); fit nothing")
    p.add_argument("--force", action="store_true", help="fit every unit again, even with a current result")
    p.add_argument("--watch", action="store_true",
                   help="then keep watching the ROOTs and fit each new or changed file once complete; SIGTERM stops")
    p.add_argument("--settle", type=float, metavar="SECONDS",
                   help="with --watch: seconds a file's size and mtime must stay unchanged (default 10)")
    p.add_argument("--poll", action="store_true",
                   help="with --watch: poll instead of change events (network filesystems)")


def _run_batch(args) -> int:
    from xpcsfit.batch.run import batch

    if not args.watch and (args.settle is not None or args.poll):
        from xpcsfit.errors import ConfigError

        raise ConfigError("--settle and --poll go with --watch")
    summary = batch(args.roots, pattern=args.glob, config=args.config, out_root=args.out_root,
                    scheduler=args.scheduler, cluster=args.cluster, dry_run=args.dry_run, force=args.force,
                    watch=args.watch, settle=10.0 if args.settle is None else args.settle, poll=args.poll)
    return summary.exit_code


def _results_parser(sub):
    p = sub.add_parser("results", help="query the results catalogue of xpcsfit batch runs")
    p.add_argument("db", nargs="?", default="xpcsfit.sqlite",
                   help="the catalogue (default ./xpcsfit.sqlite; a batch run writes <out-root>/xpcsfit.sqlite)")
    p.add_argument("--where", metavar="EXPR", help="SQL condition over the result columns, e.g. \"converged AND q > 0.005\"")
    p.add_argument("--format", default="table", choices=("table", "csv", "json"),
                   help="table (the main columns), csv or json (every column)")


def _run_results(args) -> int:
    from xpcsfit.batch.query import results_text

    sys.stdout.write(results_text(args.db, args.where, args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``xpcsfit`` parser: one subcommand per runner of :data:`_RUNNERS`."""
    parser = argparse.ArgumentParser(
        prog="xpcsfit", description="Fit XPCS two-time correlation data (c2) on a Dask cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    _fit_parser(sub)
    _cmc_parser(sub)
    _ingest_parser(sub)
    _simulate_parser(sub)
    _certs_parser(sub)
    _batch_parser(sub)
    _results_parser(sub)
    return parser


_RUNNERS = {"fit": _run_fit, "ingest": _run_ingest, "simulate": _run_simulate, "cmc": _run_cmc,
            "certs": _run_certs, "batch": _run_batch, "results": _run_results}


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
