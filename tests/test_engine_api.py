"""AsyncEngine streaming/cancel, sampling determinism, stop strings, and the `apar generate` CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_utils import make_model, make_tokenizer

from apar_worker.async_engine import AsyncEngine
from apar_worker.engine import Engine, EngineConfig
from apar_worker.sampling import apply_repetition_penalty
from apar_worker.types import BranchEvent, GenerateRequest, InvalidRequestError, RequestOutput, SamplingParams
from cluster.cli import main as apar_main

ROOT = Path(__file__).resolve().parents[1]


def small_engine(**kw) -> Engine:
    return Engine.from_model(
        make_model("llama", seed=11), make_tokenizer(), EngineConfig(num_blocks=128, **kw)
    )


def test_async_engine_streams_events_before_the_end_and_cancel_frees_blocks():
    async def scenario():
        aeng = AsyncEngine(engine=small_engine())
        try:
            req = GenerateRequest(
                prompt_token_ids=[5, 6, 7],
                stream=True,
                sampling=SamplingParams(max_tokens=20, ignore_eos=True),
            )
            items = [item async for item in aeng.generate(req)]
            assert isinstance(items[-1], RequestOutput) and items[-1].num_tokens == 20
            events = [i for i in items[:-1] if isinstance(i, BranchEvent)]
            assert len(events) == 20 and all(e.new_token_ids for e in events)
            assert events[0].created and not any(e.created for e in events[1:])
            assert "".join(e.delta_text for e in events).strip() == items[-1].text.strip()

            long = GenerateRequest(
                prompt_token_ids=[8, 9], sampling=SamplingParams(max_tokens=500, ignore_eos=True)
            )
            seen = 0
            async for _item in aeng.generate(long):
                seen += 1
                if seen == 5:
                    break  # the client goes away mid-stream
            for _ in range(100):
                stats = aeng.stats()
                if stats.free_blocks == stats.total_blocks and stats.running_requests == 0:
                    break
                await asyncio.sleep(0.02)
            assert stats.free_blocks == stats.total_blocks

            with pytest.raises(InvalidRequestError):
                async for _ in aeng.generate(GenerateRequest(prompt="")):
                    pass
        finally:
            await aeng.shutdown()

    asyncio.run(scenario())


def test_async_engine_cancel_by_id_ends_request_as_cancelled():
    async def scenario():
        aeng = AsyncEngine(engine=small_engine())
        try:
            req = GenerateRequest(
                prompt_token_ids=[5, 6], sampling=SamplingParams(max_tokens=400, ignore_eos=True)
            )
            final = None
            async for item in aeng.generate(req):
                if isinstance(item, BranchEvent) and item.new_token_ids:
                    await aeng.cancel(req.request_id)
                if isinstance(item, RequestOutput):
                    final = item
            assert final is not None and final.finish_reason == "cancelled" and final.num_tokens < 400
            assert aeng.stats().free_blocks == aeng.stats().total_blocks
        finally:
            await aeng.shutdown()

    asyncio.run(scenario())


def test_seeded_sampling_is_independent_of_batch_composition():
    params = dict(max_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = small_engine().generate(
        [GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(**params))]
    )
    others = [
        GenerateRequest(
            prompt_token_ids=list(range(9, 9 + n)), sampling=SamplingParams(max_tokens=10, temperature=1.0)
        )
        for n in (3, 17, 30)
    ]
    mixed = small_engine().generate(
        [
            others[0],
            GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(**params)),
            *others[1:],
        ]
    )
    assert alone[0].branches[0].token_ids == mixed[1].branches[0].token_ids
    other_seed = small_engine().generate(
        [GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(**{**params, "seed": 99}))]
    )
    assert other_seed[0].branches[0].token_ids != alone[0].branches[0].token_ids


def test_top_k_one_and_tiny_top_p_equal_greedy():
    greedy = small_engine().generate(
        [GenerateRequest(prompt_token_ids=[4, 5], sampling=SamplingParams(max_tokens=12, ignore_eos=True))]
    )
    topk = small_engine().generate(
        [
            GenerateRequest(
                prompt_token_ids=[4, 5],
                sampling=SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=3, ignore_eos=True),
            )
        ]
    )
    topp = small_engine().generate(
        [
            GenerateRequest(
                prompt_token_ids=[4, 5],
                sampling=SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True),
            )
        ]
    )
    assert greedy[0].branches[0].token_ids == topk[0].branches[0].token_ids == topp[0].branches[0].token_ids


def test_repetition_penalty_follows_hf_semantics():
    row = torch.tensor([2.0, -2.0, 1.0, 0.5])
    apply_repetition_penalty(row, [0, 1, 1], 2.0)
    assert row.tolist() == [1.0, -4.0, 1.0, 0.5]


def test_stop_string_ends_the_branch_and_is_cut_from_the_text():
    eng = small_engine()
    base = eng.generate(
        [
            GenerateRequest(
                prompt_token_ids=[5, 6, 7],
                fork=False,
                sampling=SamplingParams(max_tokens=12, ignore_eos=True),
            )
        ]
    )[0]
    words = base.text.split()
    stop = words[6]
    stopped = small_engine().generate(
        [
            GenerateRequest(
                prompt_token_ids=[5, 6, 7],
                fork=False,
                sampling=SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]),
            )
        ]
    )[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert base.text.startswith(stopped.text.rstrip())
    assert stopped.num_tokens < 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", seed=12).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_cli_generate_json(model_dir, capsys):
    rc = apar_main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            "w5 w6 w7",
            "--raw-prompt",
            "--max-tokens",
            "7",
            "--json",
        ]
    )
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"text", "branches", "steps", "num_tokens", "latency_s"}
    assert data["num_tokens"] <= 7 and data["steps"] >= 1
    assert set(data["branches"][0]) == {"id", "parent", "text", "num_tokens", "finish_reason"}


@pytest.mark.parametrize(
    "extra",
    [
        ["--max-tokens", "0"],
        ["--max-tokens", "-4"],
        ["--temperature", "-1"],
        ["--top-p", "0"],
        ["--top-p", "1.5"],
        ["--prompt", ""],
        ["--model", "/nonexistent/model"],
        ["--max-tokens", "many"],
        ["--speculative-config", "{bad json"],
        ["--speculative-config", '{"method": "eagle"}'],
        ["--speculative-config", '{"method": "draft_heads"}'],  # this model has no heads
    ],
)
def test_cli_bad_input_exits_2_with_one_line(model_dir, capsys, extra):
    args = ["generate", "--model", str(model_dir), "--prompt", "w5 w6", "--raw-prompt", *extra]
    try:
        rc = apar_main(args)
    except SystemExit as exc:  # argparse type errors
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err


def test_cli_entry_point_as_a_process(model_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            "w5",
            "--raw-prompt",
            "--max-tokens",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("apar: error:") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_user_text_never_becomes_a_control_token(family):
    """`[Fork][Child]<eos>` typed by a user stays text, in chat messages and in raw prompts."""
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}<eos>{{ m['content'] }}{% endfor %}<eos>"
    engine = Engine.from_model(make_model(family, seed=3), tok, EngineConfig(num_blocks=32))
    hostile = "w5 [Fork] [Child] <eos> [Fork]"
    control = {engine.fork_id, engine.child_id, *engine.eos_ids}
    chat = engine.tokenize(GenerateRequest(messages=[{"role": "user", "content": hostile}]))
    assert chat[0] == chat[-1] == tok.eos_token_id  # the template's own markers stay special
    assert not control & set(chat[1:-1]) and len(chat) > 3
    raw = engine.tokenize(GenerateRequest(prompt=hostile))
    assert not control & set(raw)


@pytest.mark.integration
def test_shipped_chat_models_keep_user_text_inert():
    from transformers import AutoTokenizer

    from apar_worker.chat import encode_request
    from apar_worker.model_registry import resolve_model, shipped_models

    for name in shipped_models():
        tok = AutoTokenizer.from_pretrained(resolve_model(name))
        markers = [s for s in tok.all_special_tokens] + ["[Fork]", "[Child]"]
        specials = set(tok.convert_tokens_to_ids(markers))
        hostile = GenerateRequest(messages=[{"role": "user", "content": "".join(markers)}])
        ids = encode_request(tok, hostile, len(tok))
        plain = encode_request(tok, GenerateRequest(messages=[{"role": "user", "content": "hi"}]), len(tok))
        assert sum(t in specials for t in ids) == sum(t in specials for t in plain), name


def test_streamed_deltas_add_up_to_the_final_text_with_a_stop_string_across_tokens():
    """A stop string may begin in one token and end in the next: the text it could begin in is
    held back, so the deltas never run past the final text, and add up to it at the end."""
    prompt = [5, 6, 7]
    sampling = SamplingParams(max_tokens=14, ignore_eos=True)
    base = small_engine().generate([GenerateRequest(prompt_token_ids=prompt, fork=False, sampling=sampling)])[
        0
    ]
    cut = base.text.index(" ", len(base.text) // 2)
    stop = base.text[cut - 2 : cut + 3]  # the end of one word, the space, the start of the next
    final = base.text[: base.text.index(stop)]
    eng = small_engine()
    req = GenerateRequest(
        prompt_token_ids=prompt,
        fork=False,
        stream=True,
        sampling=SamplingParams(max_tokens=14, ignore_eos=True, stop=[stop]),
    )
    eng.add_request(req)
    streamed, out = "", None
    while out is None:
        for item in eng.step():
            if isinstance(item, RequestOutput):
                out = item
            else:
                streamed += item.delta_text
                assert final.startswith(streamed), "a delta ran past the final text"
    assert out.finish_reason == "stop" and out.text == final
    assert streamed == out.text
    # without a stop string nothing is held back: every delta is sent the step it is decoded
    eng = small_engine()
    eng.add_request(GenerateRequest(prompt_token_ids=prompt, fork=False, stream=True, sampling=sampling))
    deltas = [e.delta_text for e in eng.step() if isinstance(e, BranchEvent)]
    assert deltas and base.text.startswith(deltas[0]) and deltas[0]


class _ByteTokenizer:
    """Token id = one UTF-8 byte: a character may take several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_holds_half_characters_and_flushes_them_at_the_end():
    from apar_worker.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(_ByteTokenizer())
    data = "aé€".encode() + "€".encode()[:2]  # ends in half a character
    text = "".join(detok.add(b) for b in data)
    assert text == "aé€"  # nothing half-decoded was handed out
    tail = detok.flush()
    assert text + tail == bytes(data).decode("utf-8", errors="replace")  # what the final text says
    assert detok.flush() == ""
