"""Acceptance (apar-smol): the README's `apar serve` with its default model answers a list
question with a coherent numbered list written by parallel branches, through real gRPC."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from conftest import apar_command, start_serve, stop_serve, subprocess_env

from cluster.redis_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = "What are some tips for getting better sleep?"


def test_default_model_answers_a_list_with_parallel_branches(tmp_path):
    grpc_port, http_port = free_port(), free_port()
    env_url = os.environ.pop("APAR_REDIS_URL", None)  # as the README runs it: serve starts its own Redis
    try:  # no --model: the default is apar-smol, assembled onto its prepared base on first use
        proc = start_serve(
            ["--replicas", "1", "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
            tmp_path / "serve.log",
            timeout_s=600,
        )
    finally:
        if env_url is not None:
            os.environ["APAR_REDIS_URL"] = env_url
    try:
        assert "apar-smol" in (tmp_path / "serve.log").read_text()
        out = subprocess.run(
            [*apar_command(), "generate", "--server", f"127.0.0.1:{grpc_port}", "--prompt", PROMPT,
             "--max-tokens", "384", "--json"],
            capture_output=True, text=True, timeout=300, env=subprocess_env(),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
    finally:
        assert stop_serve(proc) == 0
    text = answer["text"]
    children = [b for b in answer["branches"] if b["parent"] is not None]
    assert len(children) >= 3, text
    assert "[Fork]" not in text and "[Child]" not in text and "<|im_" not in text
    items = re.findall(r"^\s*(\d+)\. ", text, re.M)
    assert [int(n) for n in items[:3]] == [1, 2, 3], text  # a numbered list, in reading order
    assert "sleep" in text.lower()  # on topic
    for child in children:  # every item body was written by its own branch, and reads as text
        assert len(child["text"].split()) >= 5, child
    assert answer["steps"] < answer["num_tokens"]  # parallel: fewer steps than tokens
