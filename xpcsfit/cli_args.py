"""Command-line arguments shared by ``xpcsfit fit`` and ``xpcsfit cmc``: the input and
its selection (the keyword names of :func:`xpcsfit.open_dataset`)."""

from __future__ import annotations


def add_selection(p) -> None:
    """Add INPUT, --q / --q-index / --all-q, --phi, --frames and --dt to an argparse parser."""
    p.add_argument("input", help="APS-U / legacy HDF5 result file, or a store from `xpcsfit ingest`")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--q", type=float, nargs="+", metavar="VALUE", help="q value(s), 1/Å (nearest bin)")
    sel.add_argument("--q-index", type=int, nargs="+", metavar="K",
                     help="position(s) in the file's q grid (/xpcs/qmap/dynamic_v_list_dim0)")
    sel.add_argument("--all-q", action="store_true", help="every q with two-time maps (the default)")
    p.add_argument("--phi", type=float, nargs="+", metavar="DEG", help="subset of phi bins, degrees")
    p.add_argument("--frames", type=int, nargs=2, metavar=("A", "B"), help="inclusive frame range")
    p.add_argument("--dt", type=float, help="override the file's time step, s")
