"""``xpcsfit cmc``: the command-line front of :func:`xpcsfit.cmc.driver.cmc`.

``add_parser(subparsers)`` adds the subcommand; ``run(args)`` runs it and returns the
exit code. XpcsfitError propagates (the CLI's main turns it into one line and a code).
"""

from __future__ import annotations

from pathlib import Path

from xpcsfit.cli_args import add_selection


def add_parser(subparsers):
    """Add the ``cmc`` subcommand to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "cmc", help="posterior by Consensus Monte Carlo: NUTS shards on Dask, combined",
        description="Bayesian uncertainties: K angle-complete shards of the data, each one NumPyro "
                    "NUTS task on the Dask cluster (prior raised to 1/K), combined by consensus "
                    "Monte Carlo (Scott et al. 2016).")
    add_selection(p)
    p.add_argument("--mode", help="static or laminar_flow (default: the fit's, else laminar_flow)")
    p.add_argument("--gap", type=float, metavar="L_ANGSTROM", help="gap L, Å (default: the fit's, else 2.0e6)")
    p.add_argument("--config", help="YAML file of fit settings (bounds; used by the least-squares fit too)")
    p.add_argument("--shards", type=int, metavar="K", help="number of shards (default: from the data size)")
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
    p.add_argument("--scheduler", help="address of a running Dask scheduler (default: start a LocalCluster)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run(args) -> int:
    """Run ``xpcsfit cmc``; 0 when every shard passed its diagnostics, 5 otherwise."""
    from xpcsfit.cmc.driver import cmc

    out = Path(args.out) if args.out else Path.cwd() / f"{Path(args.input).name.split('.')[0]}_cmc"
    result = cmc(args.input, q=args.q, q_index=args.q_index, phi=args.phi,
                 frames=tuple(args.frames) if args.frames else None, dt=args.dt, mode=args.mode,
                 gap=args.gap, config=args.config, shards=args.shards, warmup=args.warmup,
                 samples=args.samples, chains=args.chains, thin=args.thin, combine=args.combine,
                 from_fit=args.from_fit, seed=args.seed, target_accept=args.target_accept, out=out,
                 scheduler=args.scheduler, progress=not args.quiet)
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
