"""The engine's non-blocking entry point answers exactly as the blocking one (asyncio servers)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from server_harness import MODEL

from bertrec.server.config import ServerConfig
from bertrec.server.engine import Call, Recommender
from bertrec.server.errors import NotFound
from bertrec.server.metrics import ServerMetrics
from bertrec.server.model import load_model


def test_recommend_future_matches_recommend_and_raises_at_once(model_repo: Path, ref) -> None:
    config = ServerConfig(model_repo=model_repo, model=MODEL, providers=("CPUExecutionProvider",))
    engine = Recommender(load_model(config), config, ServerMetrics())
    engine.start()
    try:
        deadline = time.monotonic() + 10

        async def both(user: str) -> tuple[list[str], list[str]]:
            answer = await asyncio.wrap_future(
                engine.recommend_future(user, 4, True, (), (), deadline)
            )
            blocking = engine.recommend(user, 4, True, (), (), Call(deadline))
            return [i.item_id for i in answer.items], [i.item_id for i in blocking.items]

        for user in ("u0001", "u0002"):
            via_future, via_call = asyncio.run(both(user))
            assert via_future == via_call == [i for i, _ in ref.recommend(user, 4)]
        with pytest.raises(NotFound):
            engine.recommend_future("ghost", 4, True, (), (), deadline)
    finally:
        engine.close()
