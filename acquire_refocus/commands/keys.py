"""`acquire-refocus keys DIR [--client NAME]`: CURVE keys for the daemon's sockets (acquire_refocus.security)."""

from __future__ import annotations

import argparse
from pathlib import Path

_DESCRIPTION = """\
Create the daemon's CURVE key pair in DIR (once) and a key pair for one client, authorised at once. Set
publishing.keys_dir: DIR in the daemon's config; from then on both of its sockets (publishing and control) are
encrypted and accept only clients holding an authorised client key. Give a client DIR/server.key and its
NAME.key / NAME.key_secret (in a folder of its own, secret file readable by its owner only) and run e.g.
'acquire-refocus listen --keys THAT_FOLDER'. Existing keys are never replaced. Required before binding an address
beyond loopback (tcp://0.0.0.0:...).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = _DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("dir", metavar="DIR", type=Path, help="folder for the keys (created, readable by you only)")
    parser.add_argument(
        "--client", default="client", metavar="NAME", help="name of the client key pair to add (default: client)"
    )


def run(args: argparse.Namespace) -> int:
    from acquire_refocus.security import generate_keys

    for path in generate_keys(args.dir, args.client):
        print(path)
    print(
        f"set publishing.keys_dir: {args.dir.resolve()} in the daemon's config; clients pass --keys with "
        f"server.key and {args.client}.key_secret"
    )
    return 0
