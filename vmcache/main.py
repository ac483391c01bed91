"""VMCache server: keeps cached VMs ready and hands them out over gRPC.

Usage: server [--config PATH]

Not serving yet: the server lands with the VMCache issue. Until then this
prints its usage and exits 0.
"""
import sys
from typing import Sequence

from absl import app


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    print(__doc__.strip())
    return 0


if __name__ == "__main__":
    app.run(main)
