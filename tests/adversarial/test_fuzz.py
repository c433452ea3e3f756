"""Property-based fuzz of every RPC the server answers, with hypothesis, through real gRPC.

Two generators per method: well-typed but hostile messages (huge or negative k, empty, blank,
unicode, NUL and very long strings, unknown and duplicate ids, tensors whose shapes,
datatypes and byte lengths disagree), and raw-byte mutations of valid requests (bit flips,
truncation, insertions, random bytes, a string field re-sent as invalid UTF-8).

The property: a client mistake is never answered UNKNOWN or INTERNAL (nor CANCELLED, nor
UNIMPLEMENTED for a method the server lists), the status message stays under 1 KB, bytes that
do not parse as the request message are INVALID_ARGUMENT, and afterwards the server is healthy
and has logged no traceback. Runs are derandomized: a failure repeats, run after run, and
hypothesis prints the smallest falsifying request it found.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adversarial.conftest import AdversarialServer
from adversarial.rpcs import (
    CONTROL,
    LIMITS,
    RPCS,
    Code,
    assert_healthy,
    invoke,
    path,
    served_methods,
    tracebacks,
)
from adversarial.strategies import STRATEGIES, mutated

SERVER_SETTINGS = {**LIMITS, **CONTROL}
# Sized so the module (every method x 2 generators) runs well inside 90 s on two busy cores;
# the requests with the most ways to be wrong (tensors, model-control parameters) get more.
EXAMPLES = 40
MORE_EXAMPLES = {path("oip", "ModelInfer"): 200, path("oip", "RepositoryModelLoad"): 300,
                 path("oip", "RepositoryModelUnload"): 300,
                 path("rec", "RecordFeedback"): 150}  # fmt: skip
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CALL_TIMEOUT_S = 5.0
# Mostly a roomy deadline; sometimes one that expires while the call is queued or running.
deadlines = st.sampled_from([CALL_TIMEOUT_S, CALL_TIMEOUT_S, CALL_TIMEOUT_S, 0.002, 0.05])


# -- the properties ------------------------------------------------------------------------------


def _after(server: AdversarialServer, channel: grpc.Channel, logged: int) -> None:
    assert_healthy(channel)
    new = tracebacks(server.log()[logged:])
    assert not new, f"the server logged {len(new)} traceback(s) for client mistakes: {new[:3]}"


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_hostile_messages(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel, method: str
) -> None:
    rpc, logged = RPCS[method], len(adversarial_server.log())

    @settings(FUZZ, max_examples=MORE_EXAMPLES.get(method, EXAMPLES))
    @given(
        request=STRATEGIES[method],
        timeout_s=deadlines,
    )
    def answers_properly(request: Message, timeout_s: float) -> None:
        outcome = invoke(adversarial_channel, rpc, request.SerializeToString(), timeout_s)
        assert outcome.problem() is None, outcome.problem()

    answers_properly()
    _after(adversarial_server, adversarial_channel, logged)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_mutated_bytes(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel, method: str
) -> None:
    rpc, logged = RPCS[method], len(adversarial_server.log())

    @settings(FUZZ, max_examples=MORE_EXAMPLES.get(method, EXAMPLES))
    @given(payload=mutated(method))
    def answers_properly(payload: bytes) -> None:
        outcome = invoke(adversarial_channel, rpc, payload, CALL_TIMEOUT_S)
        assert outcome.problem() is None, outcome.problem()
        if not rpc.decodes(payload):
            assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details[:200])

    answers_properly()
    _after(adversarial_server, adversarial_channel, logged)


def test_every_served_method_is_fuzzed(adversarial_channel: grpc.Channel) -> None:
    served = served_methods(adversarial_channel)
    assert served == set(STRATEGIES), (
        f"not fuzzed: {served - set(STRATEGIES)}; not served: {set(STRATEGIES) - served}"
    )
