"""The command line's argument parser: a mistake is one line and exit status 2, not a usage block."""

from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """Argument mistakes print one line (no usage block) and exit with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
