"""Training examples see exactly what the engine lets a branch see; a tiny config trains on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_utils import make_data_dir, make_items, tiny_run_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from apar_train.batches import cut_after_opening, loss_sum, opening_weights, packed_loss_sum
from apar_train.config import TrainConfig, load_config
from apar_train.data import tree_from_dict
from apar_train.examples import (
    IGNORE,
    apar_examples,
    branch_tokens,
    pack_tree,
    seq_example,
    sequential_tokens,
    special_ids,
    tree_token_counts,
)
from apar_train.rewrite import Tree, assemble
from apar_train.tokenizer import encode_text, prompt_ids
from apar_train.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tok(data_dir: Path):
    return AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))


def _tree() -> Tree:
    return Tree(
        ["Intro\n1. Sleep:", "\n2. Exercise:", "\nBye"],
        [Tree([" Get 8 hours."]), Tree([" Walk daily."])],
    )


def test_child_example_sees_prompt_parent_through_fork_and_child(tok) -> None:
    ids = special_ids(tok)
    p = prompt_ids(tok, "Tips?")
    tree = _tree()
    root, c1, c2 = apar_examples(tok, p, tree)
    own, forks = branch_tokens(tok, tree, ids)
    # root: prompt + its own tokens (titles + [Fork]s + continuation) + EOS, loss on all of them
    assert root.input_ids == p + own and own[-1] == ids.eos
    assert root.labels == [IGNORE] * len(p) + own
    # child 2: prompt + root through ITS [Fork] (both titles, first [Fork]) + [Child] + body + EOS
    body2 = encode_text(tok, " Walk daily.") + [ids.eos]
    assert c2.input_ids == p + own[: forks[1] + 1] + [ids.child] + body2
    assert c2.labels == [IGNORE] * (len(c2) - len(body2)) + body2  # loss on the body + EOS only
    assert not set(encode_text(tok, " Get 8 hours.")) <= set(c2.input_ids)  # sibling body invisible
    assert c1.input_ids == p + own[: forks[0] + 1] + [ids.child] + encode_text(tok, " Get 8 hours.") + [
        ids.eos
    ]
    assert tok.decode(c2.input_ids[len(p) :], skip_special_tokens=False).startswith(
        "Intro\n1. Sleep:[Fork]\n2."
    )


def test_twin_example_has_same_text_tokens_in_reading_order(tok) -> None:
    ids = special_ids(tok)
    p = prompt_ids(tok, "Tips?")
    tree = _tree()
    twin = seq_example(tok, p, tree, assemble(tree))
    assert tok.decode(twin.input_ids[len(p) : -1]) == assemble(tree)
    apar_text = [
        t
        for e in apar_examples(tok, p, tree)
        for t, lab in zip(e.input_ids, e.labels, strict=True)
        if lab != IGNORE
    ]
    control = {ids.fork, ids.eos}
    assert sorted(t for t in apar_text if t not in control) == sorted(sequential_tokens(tok, tree))


def test_oracle_step_counts(tok) -> None:
    ids = special_ids(tok)
    tree = _tree()
    own, forks = branch_tokens(tok, tree, ids)
    b1 = len(encode_text(tok, " Get 8 hours.")) + 1
    b2 = len(encode_text(tok, " Walk daily.")) + 1
    longest, total = tree_token_counts(tok, tree)
    assert longest == max(len(own), forks[0] + 1 + b1, forks[1] + 1 + b2)
    assert total == len(sequential_tokens(tok, tree)) + 1


def test_engine_branch_context_equals_training_example(tok) -> None:
    """Force the engine to decode the reference tree; each branch's token sequence (its attention
    context, positions 0..n-1) must be exactly that branch's training example."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from apar_worker.engine import Engine, EngineConfig
    from apar_worker.types import GenerateRequest, SamplingParams

    ids = special_ids(tok)
    items = make_items()
    item = next(it for it in items if it.tree is not None)
    tree = tree_from_dict(item.tree)
    p = prompt_ids(tok, item.prompt)
    examples = apar_examples(tok, p, tree)
    own, forks = branch_tokens(tok, tree, ids)
    targets = {None: own}  # keyed by fork index in the root's output
    for child, f in zip(tree.children, forks, strict=True):
        targets[f] = [ids.child] + branch_tokens(tok, child, ids)[0]
    seen: dict = {}

    def force(rows, logits):
        out = torch.full_like(logits, -1e9)
        for i, (_, br) in enumerate(rows):
            key = None if br.parent is None else br.fork_index
            want = targets[key][len(br.tokens) - br.own_start]
            out[i, want] = 0.0
            seen[key] = list(br.tokens) + [want]
        return out

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            eos_token_id=ids.eos,
            bos_token_id=None,
        )
    )
    engine = Engine.from_model(
        model, tok, EngineConfig(device="cpu", kv_cache_memory_mb=8), logits_hook=force
    )
    out = engine.generate(
        [
            GenerateRequest(
                messages=[{"role": "user", "content": item.prompt}], sampling=SamplingParams(max_tokens=500)
            )
        ]
    )[0]
    assert out.text == item.answer
    assert len(out.branches) == 1 + len(tree.children)
    assert sorted(map(tuple, seen.values())) == sorted(tuple(e.input_ids) for e in examples)


def test_packed_tree_equals_per_branch_examples(tok) -> None:
    """The packed row with its tree mask is the per-branch examples in one pass: every token sees
    the same (token, position) context, predicts the same target, and the loss is identical."""
    from transformers import LlamaConfig, LlamaForCausalLM

    items = make_items()
    item = next(it for it in items if it.tree is not None)
    tree = Tree(
        ["Intro\n1. A:", "\n2. B:", "\nBye"],
        [Tree([" x y.", " z."], [Tree([" nested body."])]), Tree([" Walk daily."])],
    )  # includes a grandchild: depth 2
    for t in (tree, tree_from_dict(item.tree)):
        p = prompt_ids(tok, "Tips?")
        exs = apar_examples(tok, p, t)
        packed = pack_tree(tok, p, t)
        mask = packed.attention_mask()
        contexts = set()
        for i in range(len(packed)):
            seen = [(packed.input_ids[j], packed.position_ids[j]) for j in range(len(packed)) if mask[i, j]]
            assert [q for _, q in seen] == list(range(len(seen)))  # contiguous positions 0..i
            if packed.targets[i] != IGNORE:
                contexts.add((tuple(x for x, _ in seen), packed.targets[i]))
        expected = {
            (tuple(e.input_ids[: k + 1]), e.labels[k + 1])
            for e in exs
            for k in range(len(e) - 1)
            if e.labels[k + 1] != IGNORE
        }
        assert contexts == expected

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).eval()
    with torch.no_grad():
        per_branch = 0.0
        for e in exs:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            per_branch += float(
                torch.nn.functional.cross_entropy(
                    logits, torch.tensor(e.labels[1:]), ignore_index=IGNORE, reduction="sum"
                )
            )
        logits = model(
            input_ids=torch.tensor([packed.input_ids]),
            attention_mask=mask[None, None],
            position_ids=torch.tensor([packed.position_ids]),
        ).logits[0]
        one_pass = float(
            torch.nn.functional.cross_entropy(
                logits, torch.tensor(packed.targets), ignore_index=IGNORE, reduction="sum"
            )
        )
        # the training loss (LM head on labelled positions only) is the same sum
        trained = float(
            packed_loss_sum(
                model,
                torch.tensor([packed.input_ids]),
                torch.tensor([packed.position_ids]),
                torch.tensor([packed.targets]),
                mask[None, None],
            )
        )
    assert one_pass == pytest.approx(per_branch, rel=1e-4)
    assert trained == pytest.approx(one_pass, rel=1e-4)
    assert len(packed) < sum(len(e) for e in exs)


def test_opening_weight_falls_on_the_answer_opening_in_both_modes(tok) -> None:
    """Both modes up-weight the same first answer tokens, and the loss grows by exactly their share."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tree = Tree(["Here are some useful tips for you today\n1. A:", "\nBye"], [Tree([" Walk daily."])])
    p = prompt_ids(tok, "Tips?")
    packed, seq = pack_tree(tok, p, tree), seq_example(tok, p, tree, assemble(tree))
    k = 4
    t = TrainConfig(opening_tokens=k, opening_weight=3.0)
    w_packed = opening_weights(torch.tensor([packed.targets]), t)[0]
    w_seq = opening_weights(torch.tensor([seq.labels[1:]]), t)[0]
    opening = [x for x in packed.targets if x != IGNORE][:k]
    assert [x for x in seq.labels[1:] if x != IGNORE][:k] == opening
    assert [x for x, w in zip(packed.targets, w_packed.tolist(), strict=True) if w == 3.0] == opening
    assert [x for x, w in zip(seq.labels[1:], w_seq.tolist(), strict=True) if w == 3.0] == opening
    assert int((w_packed == 1.0).sum()) == sum(x != IGNORE for x in packed.targets) - k

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).eval()
    inp, lab = torch.tensor([seq.input_ids]), torch.tensor([seq.labels])
    with torch.no_grad():
        plain, n = loss_sum(model, inp, lab)
        weighted, _ = loss_sum(model, inp, lab, t)
        logits = model(input_ids=inp).logits[0, :-1]
        ce = torch.nn.functional.cross_entropy(logits, lab[0, 1:], ignore_index=IGNORE, reduction="none")
    first = ce[lab[0, 1:] != IGNORE][:k].sum()
    assert n == sum(x != IGNORE for x in seq.labels[1:])
    assert float(weighted) == pytest.approx(float(plain + 2.0 * first), rel=1e-4)


def test_opening_only_rows_keep_the_prompt_and_the_first_answer_tokens(tok) -> None:
    tree = Tree(["Here are some useful tips for you today\n1. A:", "\nBye"], [Tree([" Walk daily."])])
    p = prompt_ids(tok, "Tips?")
    packed, seq = pack_tree(tok, p, tree), seq_example(tok, p, tree, assemble(tree))
    n = 5
    cut_p, cut_s = cut_after_opening(packed, n), cut_after_opening(seq, n)
    assert [t for t in cut_p.targets if t != IGNORE] == [t for t in packed.targets if t != IGNORE][:n]
    assert [t for t in cut_s.labels if t != IGNORE] == [t for t in seq.labels if t != IGNORE][:n]
    assert (
        cut_p.input_ids == packed.input_ids[: len(cut_p)] and cut_s.input_ids == seq.input_ids[: len(cut_s)]
    )
    assert len(cut_p) == len(p) + n - 1 and len(cut_s) == len(p) + n
    k = len(cut_p)  # every kept token sees exactly what it sees in the whole row
    assert torch.equal(cut_p.attention_mask(), packed.attention_mask()[:k, :k])
    assert cut_after_opening(seq, 10_000) is seq
    with pytest.raises(ValueError):
        cut_after_opening(seq, 0)


@pytest.mark.parametrize("mode", ["apar", "seq"])
def test_tiny_config_trains_resumes_and_exports(data_dir: Path, tmp_path: Path, mode: str) -> None:
    cfg = tiny_run_config(
        data_dir, tmp_path, mode, steps=25, micro_tokens=2048, checkpoint_every=5, threads=1
    )
    info = train(cfg, progress=False)
    assert info["steps"] == 25 and not info["stopped_early"]
    ckpt = torch.load(Path(cfg.run_dir) / "ckpt.pt", weights_only=False)
    history = ckpt["history"]
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5  # it learns
    cfg.train.steps = 28  # resume from the checkpoint instead of starting over
    cfg.decide = TrainConfig(steps=3, batch_turns=4, lr=1e-3, warmup=1, opening_tokens=8, opening_only=True)
    info = train(cfg, progress=False)
    assert info["steps"] == 28 and info["decide"]["steps"] == 3
    assert len(torch.load(Path(cfg.run_dir) / "ckpt.pt", weights_only=False)["history"]) == 28
    assert torch.load(Path(cfg.run_dir) / "decide" / "ckpt.pt", weights_only=False)["step"] == 3
    out = Path(cfg.out_dir)
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.generation_config.eos_token_id == tok.eos_token_id
    card = (out / "README.md").read_text()
    assert "apar train --config" in card and "Decision stage (from the weights above" in card


def test_shipped_configs_load_and_twin_matches() -> None:
    a = load_config(ROOT / "apar_train" / "configs" / "apar-tiny.yaml")
    s = load_config(ROOT / "apar_train" / "configs" / "apar-tiny-seq.yaml")
    assert (a.mode, s.mode) == ("apar", "seq")
    assert a.model == s.model and a.train == s.train and a.data == s.data and a.data_dir == s.data_dir
    assert a.decide is not None and a.decide == s.decide


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmode: parallel\n")
    with pytest.raises(ValueError, match="mode must be"):
        load_config(bad)
    bad.write_text("name: x\nmode: apar\ntrain: {stepz: 3}\n")
    with pytest.raises(ValueError, match="stepz"):
        load_config(bad)


def test_train_config_names_resolve_to_shipped_files(tmp_path, capsys) -> None:
    from apar_train.cli import config_path
    from cluster.cli import main as apar

    assert config_path("apar-smol") == ROOT / "apar_train" / "configs" / "apar-smol.yaml"
    assert config_path("apar-tiny.yaml") == ROOT / "apar_train" / "configs" / "apar-tiny.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("model: {}\n")
    assert config_path(str(own)) == own
    assert config_path("no-such-config") is None
    assert apar(["train", "--config", "no-such-config"]) == 2
    err = capsys.readouterr().err
    assert "no-such-config" in err and "apar-smol" in err and "Traceback" not in err
