"""deploy/'s scheduled `xpcsfit batch` (systemd service + timer, the watch service, the
cron line) agrees with the CLI: each command parses with xpcsfit's own parser, and the
units agree with each other and with the batch exit codes."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from xpcsfit.cli import build_parser
from xpcsfit.errors import EXIT_INCOMPLETE

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SYSTEMD = DEPLOY / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)  # a key twice is an error here
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def xpcsfit_args(argv: list[str]):
    """The parsed `xpcsfit ...` command inside ``argv`` (after flock, before redirections)."""
    start = next(i for i, a in enumerate(argv) if Path(a).name == "xpcsfit")
    end = next((i for i, a in enumerate(argv) if a.startswith((">", "2>"))), len(argv))
    return build_parser().parse_args(argv[start + 1:end])


@pytest.mark.parametrize("name", ["xpcsfit-batch.service", "xpcsfit-watch.service"])
def test_service_runs_a_batch_command_the_parser_takes(name):
    service = unit(name)["Service"]
    args = xpcsfit_args(shlex.split(service["ExecStart"]))
    assert args.command == "batch" and args.out_root and not args.dry_run
    assert args.watch == (name == "xpcsfit-watch.service")
    # some fits not converging is a run that went through, not a failed unit
    assert str(EXIT_INCOMPLETE) in service["SuccessExitStatus"].split()
    assert service["KillSignal"] == "SIGTERM"  # batch stops cleanly on it
    assert service["Type"] == ("simple" if args.watch else "oneshot")
    bin_dir = str(Path(shlex.split(service["ExecStart"])[0]).parent)
    assert service["Environment"].startswith(f"PATH={bin_dir}:")


def test_timer_starts_the_batch_service_nightly():
    timer = unit("xpcsfit-batch.timer")
    assert "Unit" not in timer["Timer"]  # the default: the service of the same name
    assert (SYSTEMD / "xpcsfit-batch.service").is_file()
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:30:00" and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_cron_line_runs_what_the_timer_runs():
    lines = [ln for ln in (DEPLOY / "xpcsfit-batch.cron").read_text().splitlines() if ln and not ln.startswith("#")]
    (line,) = lines
    fields = line.split(None, 5)
    assert fields[:5] == ["30", "2", "*", "*", "*"]  # the timer's 02:30
    argv = shlex.split(fields[5])
    assert argv[:3] == ["flock", "-n", "/tmp/xpcsfit-batch.lock"]
    cron = xpcsfit_args(argv)
    timer = xpcsfit_args(shlex.split(unit("xpcsfit-batch.service")["Service"]["ExecStart"]))
    assert vars(cron) == vars(timer)


def test_guide_names_every_file():
    guide = (DEPLOY / "README.md").read_text()
    for path in [*SYSTEMD.iterdir(), DEPLOY / "xpcsfit-batch.cron"]:
        assert path.name in guide, path.name
