"""Issue 18 hardening: what a hostile or careless client can do to the engine and the cluster.

Engine tests run in-process on a tiny random model; the cluster tests use the shared
`apar_cluster` (conftest.py) and talk to it over gRPC on 127.0.0.1 only.
"""

from __future__ import annotations

import pytest
from engine_utils import make_model, make_tokenizer

from apar_worker.engine import Engine, EngineConfig
from apar_worker.types import GenerateRequest, SamplingParams

# -- 4. the end of the model's context is "length" ------------------------------------------------


@pytest.mark.parametrize("fork", [False, True])
def test_branch_at_the_end_of_the_context_finishes_with_length(fork):
    engine = Engine.from_model(make_model("llama", max_len=64), make_tokenizer(), EngineConfig(block_size=4))
    prompt = [3 + i % 200 for i in range(56)]
    req = GenerateRequest(
        prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=200, ignore_eos=True), fork=fork
    )
    out = engine.generate([req])[0]
    assert out.num_tokens < 200, "the context must end the request before max_tokens"
    assert any(b.finish_reason == "length" for b in out.branches)
    assert out.finish_reason == "length"
