"""Client helpers for the scheduler's cluster tests (routing, failover) on the shared
`apar_cluster` fixture: gRPC calls through the generated stubs, and prompts that share long
prefixes per conversation."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

from protos.apar.v1 import apar_pb2 as pb
from protos.apar.v1 import apar_pb2_grpc as pb_grpc

TOPICS = ["staying healthy", "learning a language", "saving money", "sleeping well", "studying", "cooking"]


class Client:
    """Generate / GenerateStream on a cluster address, messages API, greedy."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.AparServiceStub(self.channel)

    def _req(self, messages: list[tuple[str, str]], max_tokens: int, **kw: str) -> pb.GenerateRequest:
        msgs = [pb.ChatMessage(role=r, content=c) for r, c in messages]
        return pb.GenerateRequest(messages=msgs, max_tokens=max_tokens, **kw)

    def generate(self, messages: list[tuple[str, str]], max_tokens: int, timeout: float = 180, **kw: str):
        return self.stub.Generate(self._req(messages, max_tokens, **kw), timeout=timeout)

    def stream(self, messages: list[tuple[str, str]], max_tokens: int, timeout: float = 180, **kw: str):
        return self.stub.GenerateStream(self._req(messages, max_tokens, **kw), timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def ask(i: int) -> list[tuple[str, str]]:
    """A short question the APAR model answers with a list (so it forks)."""
    # No per-call suffix: the shipped model forks on these plain questions, not on decorated ones.
    return [("user", f"What are some tips for {TOPICS[i % len(TOPICS)]}?")]


def long_system(tag: int) -> str:
    """A long system prompt whose very first words differ per `tag` (distinct prefix chains)."""
    head = f"Conversation {tag} w{100 + tag} w{140 + tag} w{180 + tag}. "
    body = "You are a helpful assistant. Answer with a short numbered list of practical tips. " * 8
    return head + body


def make_fork_model(out_dir: Path, fork_scale: float = 3.0) -> Path:
    """Dev/CI stand-in for apar-tiny (APAR_TEST_MODEL=DIR): random llama, word-level tokenizer
    with a plain chat template, [Fork] logit scaled up so that answers fork."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_utils import make_model, make_tokenizer

    model, tok = make_model("llama", seed=1), make_tokenizer()
    with torch.no_grad():
        model.lm_head.weight[tok.convert_tokens_to_ids("[Fork]")] *= fork_scale
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":  # python tests/cluster_testkit.py DIR
    print(make_fork_model(Path(sys.argv[1])))
