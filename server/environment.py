"""Which `BERTREC_*` environment variables `bertrec serve` accepts besides its settings.

A misspelt setting (`BERTREC_MAX_KK=5`) used to be ignored without a word, so the server ran
with the default; the TOML file already rejects unknown keys, and the environment now does the
same. Some `BERTREC_*` names are not server settings but belong to other tools that may share
the environment: they are listed here, the one place to add such a name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

PREFIX = "BERTREC_"

# Read by the test suite, CI scripts, client build scripts and docker compose, never by serve.
OTHER_TOOLS_VARIABLES = frozenset(
    {
        "BERTREC_REQUIRE_TOOLCHAINS",  # Makefile `make test`: a missing toolchain fails a test
        "BERTREC_SKIP_DEPLOY_TOOLS",  # tests/deploy: a missing deploy tool skips its test
        "BERTREC_CI_VENV",  # scripts/ci-deps.sh and tests: where the CI tools venv lives
        "BERTREC_JAVA_LIB_DIR",  # clients/java/classpath.sh
        "BERTREC_MODELS",  # deploy/compose: host folder mounted as the repository
        "BERTREC_MODEL_NAME",  # deploy/compose: becomes BERTREC_MODEL in the container
        "BERTREC_TRAIN_FEEDBACK",  # default of `bertrec train --feedback` (no password in argv)
    }
)

# Kubernetes "service links": each Service named bertrec or bertrec-* puts these in every pod of
# its namespace (BERTREC_SERVICE_HOST, BERTREC_SERVICE_PORT_GRPC, BERTREC_PORT_50051_TCP_ADDR,
# ...), unless the pod sets enableServiceLinks: false.
_SERVICE_LINK = re.compile(
    r"BERTREC_(?:[A-Z0-9_]+_)?"
    r"(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT_\d+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)"
)
# ... and `<SERVICE>_PORT=tcp://10.0.0.7:50051`, told apart from a misspelt setting by its value.
_SERVICE_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://\S+")


def unknown_variables_problem(env: Mapping[str, str], accepted: Iterable[str]) -> str | None:
    """Describe the `BERTREC_*` variables in `env` that nothing reads, or None if there are none.

    Args:
        env: the environment.
        accepted: the names `bertrec serve` reads (one per setting, and the config file's).
    Returns:
        One message naming each unknown variable and, where one is close, the name it was
        probably meant to be.
    """
    known = sorted({*accepted, *OTHER_TOOLS_VARIABLES})
    unknown = sorted(
        name
        for name, value in env.items()
        if name.startswith(PREFIX) and name not in known and not _service_link(name, value)
    )
    if not unknown:
        return None
    described = ", ".join(_with_suggestion(name, known) for name in unknown)
    return (
        f"unknown environment variable(s): {described}. A setting's variable is {PREFIX} "
        f"and its flag's name in capitals (--max-k: {PREFIX}MAX_K)"
    )


def _service_link(name: str, value: str) -> bool:
    if _SERVICE_LINK.fullmatch(name):
        return True
    return name.endswith("_PORT") and _SERVICE_LINK_URL.fullmatch(value) is not None


def _with_suggestion(name: str, known: list[str]) -> str:
    # Compared without the shared prefix, which would make every pair look alike.
    suffixes = [k.removeprefix(PREFIX) for k in known]
    close = difflib.get_close_matches(name.removeprefix(PREFIX), suffixes, n=1, cutoff=0.6)
    return f"{name} (did you mean {PREFIX}{close[0]}?)" if close else name
