"""`bertrec auth`: make tokens and the credentials-file entries that hold only their hashes."""

from __future__ import annotations

import argparse
import secrets
import sys

from bertrec.errors import BertrecError
from bertrec.server.auth import ROLES, hash_token

TOKEN_BYTES = 32  # 256 bits: guessing is hopeless, so a plain SHA-256 of it is safe to store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `auth` subcommand."""
    parser = sub.add_parser(
        "auth",
        help="make a bearer token, or hash one, for the server's --auth-file",
        description=(
            "new-token prints a fresh random token on stderr (give it to the client, once) and "
            "the [[token]] entry to append to the --auth-file on stdout; hash-token reads a "
            "token on stdin and prints its entry. The file never holds a token."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("new-token", "a new random token and its entry"),
                       ("hash-token", "the entry of a token read from stdin")):  # fmt: skip
        action = actions.add_parser(name, help=text)
        action.add_argument("--name", required=True, help="who holds it (logs and metrics)")
        action.add_argument(
            "--roles", required=True, help=f"comma-separated, of {', '.join(sorted(ROLES))}"
        )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    if not roles or not set(roles) <= ROLES:
        raise BertrecError(f"--roles must name some of {', '.join(sorted(ROLES))}")
    if args.action == "new-token":
        token = secrets.token_urlsafe(TOKEN_BYTES)
        # stderr: `bertrec auth new-token ... >> auth.toml` must append only the hash.
        print(f"token for {args.name} (shown once; keep it in the client's secret):",
              file=sys.stderr)  # fmt: skip
        print(token, file=sys.stderr)
    else:
        token = sys.stdin.readline().strip()
        if not token:
            raise BertrecError("no token on stdin")
    quoted = ", ".join(f'"{r}"' for r in roles)
    print(f'[[token]]\nname = "{args.name}"\nsha256 = "{hash_token(token)}"\nroles = [{quoted}]')
    return 0
