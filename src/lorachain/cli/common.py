"""What every subcommand shares: its exit code for unusable input and the error line."""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2


def fail(command: str, message: str) -> int:
    print(f"lorachain {command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
