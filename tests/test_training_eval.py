"""`apar eval` end to end on two tiny freshly trained models (engine decoding, loss, cards)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from training_utils import make_data_dir, tiny_run_config

from apar_train.eval import HELDOUT_PROMPTS, evaluate, load_prompts
from apar_train.train import train
from cluster.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    data = make_data_dir(tmp / "data")
    out = []
    for mode in ("apar", "seq"):
        cfg = tiny_run_config(data, tmp, mode, steps=40, checkpoint_every=40)
        train(cfg, progress=False)
        out.append(Path(cfg.out_dir))
    prompts = tmp / "prompts.jsonl"
    rows = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()]
    with prompts.open("w") as f:
        for r in rows[:4]:
            f.write(json.dumps({k: r[k] for k in ("id", "kind", "prompt", "answer", "tree")}) + "\n")
    return out[0], out[1], prompts


def test_evaluate_reports_every_figure(models: tuple[Path, Path, Path]) -> None:
    apar, seq, prompts = models
    items = load_prompts(prompts)
    report = evaluate(str(apar), str(seq), items, max_tokens=48, progress=False)
    assert report["prompts"] == {"structured": 2, "unstructured": 2}
    assert len(report["per_prompt"]) == 4
    for row in report["per_prompt"]:
        assert 1 <= row["apar_steps"] <= 48 and 1 <= row["seq_steps"] <= 48
        assert row["children"] >= 0 and not row["control_tokens_in_text"]
    assert 0.0 <= report["fork_rate"] <= 1.0 and 0.0 <= report["spurious_fork_rate"] <= 1.0
    assert report["step_ratio"] > 0 and 0 < report["oracle_step_ratio"] < 1
    loss = report["heldout_loss"]
    assert loss["tokens"]["apar"] == loss["tokens"]["seq"] > 0  # the very same answer tokens
    assert math.isfinite(loss["apar"]) and math.isfinite(loss["seq"])
    assert loss["apar"] < math.log(400) and loss["seq"] < math.log(400)  # trained: better than uniform


def eval_args(apar: Path, seq: Path, prompts: Path, *extra: str) -> list[str]:
    """`apar eval` on the two tiny models and prompts, 16 tokens, plus `extra`."""
    return [
        "eval",
        "--model",
        str(apar),
        "--baseline",
        str(seq),
        "--prompts",
        str(prompts),
        "--max-tokens",
        "16",
        *extra,
    ]


def test_eval_cli_writes_json_and_cards(models: tuple[Path, Path, Path], tmp_path: Path, capsys) -> None:
    apar, seq, prompts = models
    out = tmp_path / "report.json"
    rc = main(eval_args(apar, seq, prompts, "--json", str(out), "--update-cards"))
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert "fork_rate" in summary and len(json.loads(out.read_text())["per_prompt"]) == 4
    for d in (apar, seq):
        card = (d / "README.md").read_text()
        assert "## Evaluation" in card and "fork_rate" in card and "apar eval" in card


def test_eval_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "kind": "poem", "prompt": "x"}\n')
    assert main(["eval", "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kind" in err[0]
    assert main(["eval", "--model", "no-such-model", "--prompts", str(HELDOUT_PROMPTS), "--limit", "1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_shipped_heldout_prompts_file() -> None:
    items = load_prompts(HELDOUT_PROMPTS)
    kinds = [p.kind for p in items]
    assert kinds.count("structured") >= 40 and kinds.count("unstructured") >= 40
    assert len({p.id for p in items}) == len(items)
    assert all(p.tree is not None for p in items if p.kind == "structured")


def test_batched_eval_matches_one_at_a_time_and_writes_side_by_side(
    models: tuple[Path, Path, Path], tmp_path: Path, capsys
) -> None:
    apar, seq, prompts = models
    items = load_prompts(prompts)
    alone = evaluate(str(apar), str(seq), items, max_tokens=32, progress=False)
    together = evaluate(str(apar), str(seq), items, max_tokens=32, progress=False, batch=4)
    for a, b in zip(alone["per_prompt"], together["per_prompt"], strict=True):
        assert (a["apar_steps"], a["seq_steps"], a["text"]) == (b["apar_steps"], b["seq_steps"], b["text"])
    for key in ("misfire_rate", "eos_before_budget", "distinct_2"):
        assert key in together
    assert 0.0 <= together["misfire_rate"] <= 1.0
    side = tmp_path / "side.md"
    rc = main(eval_args(apar, seq, prompts, "--batch", "2", "--side-by-side", str(side)))
    assert rc == 0
    text = side.read_text()
    assert text.count("## ") == 4 and f"**{seq}**" in text and f"**{apar}**" in text  # 2 + 2 prompts
