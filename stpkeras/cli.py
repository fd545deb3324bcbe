"""CLI stage: the `stp` click group. Each command parses, builds a config, calls one library function
and prints a short summary. TensorFlow loads inside the commands, so `stp --help` is instant.

Exit codes (documented in the README):
  0  everything succeeded
  1  the command ran but some inputs failed (e.g. videos that could not be converted; see the manifest)
  2  bad usage or bad input to the command itself (click's convention)
  3  verification found corrupt or inconsistent data
"""

from __future__ import annotations

import sys

import click

from stpkeras import __version__

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_CORRUPT = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="stp")
def main():
    """stpkeras: videos -> spacetime patches (TFRecords) -> Keras Conv3D models -> TF Serving."""


# --- commands are added below, one block per stage -------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
