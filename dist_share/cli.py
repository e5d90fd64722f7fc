"""Command line entry point (placeholder replaced by the CLI module)."""
import argparse

from dist_share import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-share")
    parser.add_argument("--version", action="version", version=f"dist-share {__version__}")
    parser.parse_args(argv)
    return 0
