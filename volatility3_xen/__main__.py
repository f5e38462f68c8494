"""``python -m volatility3_xen``: small helpers around the package.

python -m volatility3_xen plugin-dir     # what to pass to ``vol -p`` (checkouts)
python -m volatility3_xen samples ...    # build the sample cores (samples --help)
python -m volatility3_xen triage ...     # many images x plugins on Dask (triage --help)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["samples"]:
        # The samples command has its own parser (and --help); hand it the rest as is.
        from .testdata import samples

        return samples.main(argv[1:])
    if argv[:1] == ["triage"]:
        # Fleet triage has its own parser too (needs the triage extra).
        from .triage import cli

        return cli.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m volatility3_xen")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugin-dir", help="print the directory to pass to vol -p")
    sub.add_parser("samples", help="build the sample cores (samples --help)")
    sub.add_parser("triage", help="run plugins over many images on Dask (triage --help)")
    parser.parse_args(argv)
    from .api import plugin_dir

    directory = plugin_dir()
    if directory is None:
        print("installed: vol finds the xen plugins without -p", file=sys.stderr)
        return 1
    print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
