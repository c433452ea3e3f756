"""Which versions of the model the server keeps loaded: `latest`, `latest K` or `specific N`.

TF Serving's and Triton's version policies, in one string so a flag, an environment variable
and a TOML key can all carry it:

    latest          the newest complete version (the default)
    latest K        the K newest; the newest serves calls that name no version, the others
                    answer calls that name them (a canary, or a slow client's pinned version)
    specific N      exactly version N (several: "specific 4,5"; the highest serves by default)

`select` is pure: given the complete versions in the repository it returns the versions to keep.
Which of them are actually loaded, and when, is the watcher's business (`version_watcher.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from bertrec.errors import BertrecError

LATEST = "latest"
SPECIFIC = "specific"
_FORM = re.compile(r"\s*(latest|specific)(?:\s*[\s:=]\s*([0-9][0-9,\s]*))?\s*", re.IGNORECASE)


class PolicyError(BertrecError):
    """A version policy string that does not parse (the message shows the accepted forms)."""


@dataclass(frozen=True)
class VersionPolicy:
    """A parsed version policy. Build with `parse`, `latest` or `specific`.

    Attributes:
        kind: "latest" or "specific".
        count: how many of the newest versions `latest` keeps (1 for plain `latest`).
        versions: the versions `specific` keeps, ascending (empty for `latest`).
    """

    kind: str = LATEST
    count: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (LATEST, SPECIFIC):
            raise PolicyError(f"unknown policy kind {self.kind!r}")
        if self.kind == LATEST and self.count < 1:
            raise PolicyError(f"latest keeps at least 1 version, got {self.count}")
        if self.kind == SPECIFIC and (not self.versions or min(self.versions) < 1):
            raise PolicyError(f"specific needs version numbers >= 1, got {list(self.versions)}")

    @staticmethod
    def latest(count: int = 1) -> VersionPolicy:
        return VersionPolicy(LATEST, count)

    @staticmethod
    def specific(*versions: int) -> VersionPolicy:
        return VersionPolicy(SPECIFIC, 1, tuple(sorted(set(versions))))

    @staticmethod
    def parse(text: str) -> VersionPolicy:
        """Parse "latest", "latest K", "specific N" or "specific N,M" (":" or "=" also
        separate the kind from its numbers; case is ignored).

        Raises:
            PolicyError: anything else, or a count or version below 1.
        """
        match = _FORM.fullmatch(text)
        if match is None:
            raise PolicyError(
                f"version policy {text!r}: expected 'latest', 'latest K' or 'specific N[,M...]'"
            )
        kind, numbers = match.group(1).lower(), match.group(2)
        values = [int(n) for n in re.split(r"[\s,]+", numbers.strip())] if numbers else []
        if kind == LATEST:
            if len(values) > 1:
                raise PolicyError(f"version policy {text!r}: 'latest' takes one count")
            return VersionPolicy.latest(values[0] if values else 1)
        if not values:
            raise PolicyError(f"version policy {text!r}: 'specific' needs a version number")
        return VersionPolicy.specific(*values)

    def select(self, available: Iterable[int]) -> tuple[int, ...]:
        """The versions to keep loaded among `available` (complete versions), ascending.

        Empty when none qualifies (no version yet, or the specific ones are not published):
        the caller then keeps whatever it serves, never unloading the only version.
        """
        ordered = sorted(set(available))
        if self.kind == LATEST:
            return tuple(ordered[-self.count :])
        wanted = set(self.versions)
        return tuple(v for v in ordered if v in wanted)

    def __str__(self) -> str:
        if self.kind == LATEST:
            return LATEST if self.count == 1 else f"{LATEST} {self.count}"
        return f"{SPECIFIC} {','.join(str(v) for v in self.versions)}"
