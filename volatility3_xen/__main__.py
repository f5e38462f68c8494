"""``python -m volatility3_xen``: small helpers around the package.

python -m volatility3_xen plugin-dir     # what to pass to ``vol -p`` (checkouts)
python -m volatility3_xen samples ...    # unpack/build the bundled sample cores
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m volatility3_xen")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugin-dir", help="print the directory to pass to vol -p")
    samples = sub.add_parser("samples", help="unpack or build sample cores (see --help)")
    samples.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    if options.command == "plugin-dir":
        from .api import plugin_dir

        directory = plugin_dir()
        if directory is None:
            print("installed: vol finds the xen plugins without -p", file=sys.stderr)
            return 1
        print(directory)
        return 0
    from . import samples as samples_cli

    return samples_cli.main(options.args)


if __name__ == "__main__":
    sys.exit(main())
