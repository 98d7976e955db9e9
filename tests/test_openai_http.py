"""The OpenAI-compatible HTTP API of a running `apar serve`, driven by the real `openai` package."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = "What are some tips for staying healthy?"


@pytest.fixture(scope="module")
def client(apar_cluster) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{apar_cluster.http_port}/v1", api_key="unused", max_retries=0, timeout=120
    )


def _chat(client, model, stream: bool, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=64,
        temperature=0,
        stream=stream,
        **kw,
    )


def test_models_and_health(apar_cluster, client):
    assert [m.id for m in client.models.list().data] == [apar_cluster.model]
    with urllib.request.urlopen(f"http://127.0.0.1:{apar_cluster.http_port}/health", timeout=30) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_chat_stream_adds_up_to_the_unary_answer(apar_cluster, client):
    whole = _chat(client, apar_cluster.model, False)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.total_tokens > whole.usage.completion_tokens
    extra = whole.model_extra or {}
    assert extra["apar"]["branches"] and whole.usage.model_extra["branches"] == len(extra["apar"]["branches"])
    chunks = list(_chat(client, apar_cluster.model, True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same answer, streamed in reading order
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completions_and_the_fork_switch(apar_cluster, client):
    kw = dict(model=apar_cluster.model, prompt="w1 w2 w3", max_tokens=24, temperature=0)
    whole = client.completions.create(**kw)
    parts = client.completions.create(stream=True, **kw)
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text
    seq = _chat(client, apar_cluster.model, False, extra_body={"fork": False})
    assert seq.usage.model_extra["branches"] == 1 and seq.usage.model_extra["steps"] >= 1


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"temperature": "hot"}, "'temperature' must be a number"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"n": 2}, "only n=1"),
        ({"messages": []}, "'messages' must be a non-empty list"),
    ],
)
def test_bad_requests_are_400_with_a_clear_message(apar_cluster, client, kw, words):
    args = {
        "model": apar_cluster.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        **kw,
    }
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**args)
    assert words in err.value.message and "Traceback" not in err.value.message


def test_unknown_model_is_404_and_bad_json_is_400(apar_cluster, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    req = urllib.request.Request(
        f"http://127.0.0.1:{apar_cluster.http_port}/v1/chat/completions", data=b"{not json", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and json.loads(err.value.read())["error"]["type"] == "invalid_request_error"


def test_live_page_is_one_self_contained_file(apar_cluster):
    with urllib.request.urlopen(f"http://127.0.0.1:{apar_cluster.http_port}/", timeout=30) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/html")
        page = r.read().decode()
    assert "/v1/chat/completions" in page and "apar_events" in page
    assert "http://" not in page and "https://" not in page  # no CDN, nothing fetched from elsewhere


def test_bench_load_drives_grpc_and_http_of_one_cluster(apar_cluster, client):
    """`apar bench load --server --http`: both endpoints of the same cluster, same token counts."""
    from types import SimpleNamespace

    from bench.common import Prompt
    from bench.load import APAR, APAR_HTTP, run_cluster

    prompts = [Prompt("p0", "structured", PROMPT)]
    args = SimpleNamespace(
        timeout=120.0, unary=False, rates=[2.0], duration=3.0, max_requests=2, max_tokens=24
    )
    grpc_addr, http_addr = f"127.0.0.1:{apar_cluster.grpc_port}", f"127.0.0.1:{apar_cluster.http_port}"
    rows = run_cluster((APAR, APAR_HTTP), grpc_addr, http_addr, True, prompts, args)
    assert set(rows) == {APAR, APAR_HTTP}
    for name in (APAR, APAR_HTTP):
        (row,) = rows[name]
        assert row["failed"] == 0 and row["requests"] >= 1, row
        assert row["ttft_s"]["p50"] > 0 and row["out_tok_s"] > 0
    # greedy and the same prompt: both endpoints decode the same number of tokens
    assert rows[APAR][0]["mean_tokens"] == rows[APAR_HTTP][0]["mean_tokens"]
