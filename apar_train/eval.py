"""`apar eval`: does the APAR model fork when it should, how many steps it saves, at what loss.

Generation runs through the real engine, greedy (docs/design.md "steps"): one request at a time,
or `--batch N` at once (a request's step count is the same either way unless it is preempted,
which the report counts); the baseline decodes with `fork=False`. Held-out loss is a plain
forward pass of each model over the same answer text tokens (control tokens and EOS
excluded), so the two are comparable; the baseline may be the pretrained base itself.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from apar_train.data import tree_from_dict
from apar_train.examples import IGNORE, apar_examples, seq_example, special_ids, tree_token_counts
from apar_train.tokenizer import prompt_ids

HELDOUT_PROMPTS = Path(__file__).resolve().parent / "heldout_prompts.jsonl"


@dataclass
class Prompt:
    id: str
    kind: str
    prompt: str
    answer: str | None = None
    tree: dict | None = None


def load_prompts(path: Path) -> list[Prompt]:
    """JSON lines {"id", "kind": "structured"|"unstructured", "prompt"} (+ optional reference)."""
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from exc
            if not isinstance(d, dict) or d.get("kind") not in ("structured", "unstructured"):
                raise ValueError(f"{path}:{n}: needs kind 'structured' or 'unstructured'")
            if not isinstance(d.get("prompt"), str) or not d["prompt"].strip():
                raise ValueError(f"{path}:{n}: needs a non-empty 'prompt'")
            out.append(Prompt(str(d.get("id", n)), d["kind"], d["prompt"], d.get("answer"), d.get("tree")))
    return out


def _request(prompt: str, fork: bool, max_tokens: int, repetition_penalty: float):
    from apar_worker.types import GenerateRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=repetition_penalty)
    return GenerateRequest(messages=[{"role": "user", "content": prompt}], sampling=sampling, fork=fork)


def run_alone(engine, prompt: str, fork: bool, max_tokens: int, repetition_penalty: float = 1.0):
    """One request alone in the engine, greedy: the RequestOutput (its `steps` as in docs/design.md)."""
    return run_batch(engine, [prompt], fork, max_tokens, repetition_penalty)[0]


def run_batch(engine, prompts: list[str], fork: bool, max_tokens: int, repetition_penalty: float = 1.0):
    """Several requests decoded together; outputs in the order of `prompts`."""
    return engine.generate([_request(p, fork, max_tokens, repetition_penalty) for p in prompts])


def distinct_2(text: str) -> float:
    """Share of distinct word bigrams: 1.0 never repeats a bigram, low values loop."""
    words = text.split()
    pairs = list(zip(words, words[1:], strict=False))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


@torch.no_grad()
def answer_loss(model, tok, items: list[Prompt], mode: str) -> tuple[float, int]:
    """Mean NLL per answer text token (no control tokens, no EOS) of `model` on `items`."""
    ids = special_ids(tok)
    skip = {ids.fork, ids.child, ids.eos}
    total, count = 0.0, 0
    for it in items:
        p = prompt_ids(tok, it.prompt)
        if it.tree is not None:
            tree = tree_from_dict(it.tree)
            exs = apar_examples(tok, p, tree, ids) if mode == "apar" else [seq_example(tok, p, tree, "", ids)]
        else:
            exs = [seq_example(tok, p, None, it.answer or "", ids)]
        for ex in exs:
            inp = torch.tensor([ex.input_ids])
            logits = model(input_ids=inp).logits[0, :-1].float()
            target = torch.tensor(ex.labels[1:])
            keep = torch.tensor([t != IGNORE and t not in skip for t in ex.labels[1:]])
            nll = torch.nn.functional.cross_entropy(logits, target.clamp(min=0), reduction="none")
            total += float(nll[keep].sum())
            count += int(keep.sum())
    return total / max(1, count), count


def evaluate(
    model: str,
    baseline: str,
    prompts: list[Prompt],
    max_tokens: int,
    progress: bool = True,
    repetition_penalty: float = 1.0,
    batch: int = 1,
) -> dict:
    """Both models on the same prompts, greedy: the fork, speed and quality figures of one report."""
    from apar_worker.engine import Engine, EngineConfig

    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    outputs = {}
    for role, name, fork in (("apar", model, True), ("seq", baseline, False)):
        eng = Engine(EngineConfig(model=name, device="cpu", kv_cache_memory_mb=512))
        if role == "apar":
            tok = eng.tokenizer
        outs = []
        for start in range(0, len(prompts), batch):
            chunk = [p.prompt for p in prompts[start : start + batch]]
            outs += run_batch(eng, chunk, fork, max_tokens, repetition_penalty)
            log(f"{role}: {len(outs)}/{len(prompts)} prompts")
        outputs[role] = outs
        del eng
    rows = [prompt_row(p, outputs["apar"][i], outputs["seq"][i], tok) for i, p in enumerate(prompts)]
    report = summarize(rows, max_tokens, repetition_penalty)
    ref = [p for p in prompts if p.answer is not None]
    if ref:
        log("held-out loss ...")
        report["heldout_loss"] = heldout_loss(model, baseline, tok, ref)
    report["per_prompt"] = rows
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()}


def prompt_row(p: Prompt, a, s, tok) -> dict:
    """One prompt's figures: the APAR answer `a` next to the baseline's `s`."""
    from apar_train.rewrite import has_numbered_list

    row = {
        "id": p.id,
        "kind": p.kind,
        "children": len(a.branches) - 1,
        "apar_steps": a.steps,
        "seq_steps": s.steps,
        "apar_finish": a.finish_reason,
        "seq_finish": s.finish_reason,
        "control_tokens_in_text": "[Fork]" in a.text or "[Child]" in a.text,
        "misfire": len(a.branches) > 1 and not has_numbered_list(a.text),
        "distinct_2": {"apar": round(distinct_2(a.text), 4), "seq": round(distinct_2(s.text), 4)},
        "preempted": a.num_preemptions + s.num_preemptions,
        "text": {"apar": a.text, "seq": s.text},
    }
    if p.tree is not None:
        longest, total = tree_token_counts(tok, tree_from_dict(p.tree))
        row["oracle_ratio"] = longest / total
    return row


def summarize(rows: list[dict], max_tokens: int, repetition_penalty: float) -> dict:
    """The report's headline figures (docs/design.md, "Benchmark figures")."""
    struct = [r for r in rows if r["kind"] == "structured"]
    plain = [r for r in rows if r["kind"] == "unstructured"]
    forked = [r for r in struct if r["children"] >= 2]

    def both(key: str, fn) -> dict:
        return {"apar": fn(r[f"apar_{key}"] for r in rows), "seq": fn(r[f"seq_{key}"] for r in rows)}

    return {
        "prompts": {"structured": len(struct), "unstructured": len(plain)},
        "max_tokens": max_tokens,
        "decoding": f"greedy, repetition_penalty={repetition_penalty}",
        "fork_rate": _mean([r["children"] >= 2 for r in struct]),
        "spurious_fork_rate": _mean([r["children"] >= 1 for r in plain]),
        "step_ratio": _mean([r["apar_steps"] / r["seq_steps"] for r in struct]),
        "step_ratio_forked": _mean([r["apar_steps"] / r["seq_steps"] for r in forked]),
        "step_ratio_total": sum(r["apar_steps"] for r in struct)
        / max(1, sum(r["seq_steps"] for r in struct)),
        "oracle_step_ratio": _mean([r["oracle_ratio"] for r in struct if "oracle_ratio" in r]),
        "mean_branches": _mean([r["children"] + 1 for r in struct]),
        "misfire_rate": _mean([r["misfire"] for r in rows]),
        "eos_before_budget": both("finish", lambda xs: _mean([x == "stop" for x in xs])),
        "distinct_2": {
            "apar": _mean([r["distinct_2"]["apar"] for r in rows]),
            "seq": _mean([r["distinct_2"]["seq"] for r in rows]),
        },
        "preempted_requests": sum(r["preempted"] > 0 for r in rows),
        "length_finishes": both("finish", lambda xs: sum(x == "length" for x in xs)),
        "control_tokens_in_text": sum(r["control_tokens_in_text"] for r in rows),
    }


def heldout_loss(model: str, baseline: str, tok, ref: list[Prompt]) -> dict:
    """Mean answer-token loss of each model on the held-out reference answers."""
    from transformers import AutoModelForCausalLM

    from apar_worker.model_registry import resolve_model

    torch.set_grad_enabled(False)
    m_apar = AutoModelForCausalLM.from_pretrained(str(resolve_model(model))).eval()
    m_seq = AutoModelForCausalLM.from_pretrained(str(resolve_model(baseline))).eval()
    la, na = answer_loss(m_apar, tok, ref, "apar")
    ls, ns = answer_loss(m_seq, tok, ref, "seq")
    return {
        "apar": round(la, 4),
        "seq": round(ls, 4),
        "relative_gap": round(la / ls - 1, 4),
        "tokens": {"apar": na, "seq": ns},
    }


def _mean(xs: list) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def run_eval_cli(args) -> int:
    from apar_train.card import write_eval
    from apar_worker.cli_generate import fail
    from apar_worker.model_registry import default_baseline, resolve_model
    from apar_worker.types import ModelLoadError

    path = Path(args.prompts) if args.prompts else HELDOUT_PROMPTS
    if args.batch < 1:
        return fail("--batch must be >= 1")
    try:
        prompts = load_prompts(path)
    except (OSError, ValueError) as exc:
        return fail(str(exc))
    if args.limit:
        prompts = [p for p in prompts if p.kind == "structured"][: args.limit] + [
            p for p in prompts if p.kind == "unstructured"
        ][: args.limit]
    try:
        resolve_model(args.model)  # a missing model is "not found", before any baseline
        args.baseline = args.baseline or default_baseline(args.model)
        report = evaluate(
            args.model, args.baseline, prompts, args.max_tokens, True, args.repetition_penalty, args.batch
        )
    except ModelLoadError as exc:
        return fail(str(exc))
    summary = {k: v for k, v in report.items() if k != "per_prompt"}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.side_by_side:
        write_side_by_side(Path(args.side_by_side), args.model, args.baseline, prompts, report["per_prompt"])
    if args.update_cards:
        cmd = ["apar", "eval", "--model", args.model, "--baseline", args.baseline]
        cmd += ["--max-tokens", str(args.max_tokens)] + (["--prompts", args.prompts] if args.prompts else [])
        cmd = shlex.join(cmd + (["--limit", str(args.limit)] if args.limit else []))
        from apar_worker.base_models import BASE_MODELS

        for name in (args.model, args.baseline):
            if name not in BASE_MODELS:  # a base's card is its publisher's, not ours
                write_eval(card_dir(name), cmd, summary)
    return 0


def card_dir(name: str) -> Path:
    """Where a model's card lives: the shipped directory (not its assembled cache copy)."""
    from apar_worker.model_registry import SHIPPED_MODELS_DIR, resolve_model

    shipped = SHIPPED_MODELS_DIR / name
    return shipped if "/" not in name and (shipped / "README.md").is_file() else resolve_model(name)


def write_side_by_side(
    out: Path, model: str, baseline: str, prompts: list[Prompt], rows: list[dict], n: int = 10
):
    """The first n structured and n // 2 unstructured answers of both models, for a person to read."""
    picked = [r for r in rows if r["kind"] == "structured"][:n] + [
        r for r in rows if r["kind"] == "unstructured"
    ][: n // 2]
    by_id = {p.id: p for p in prompts}
    lines = [
        f"# {model} vs {baseline}: held-out answers side by side",
        "",
        "Greedy, same prompts; the APAR answer is the assembled text of all its branches.",
        "",
    ]
    for r in picked:
        lines += [
            f"## {r['id']} ({r['kind']}): {by_id[r['id']].prompt.strip()[:200]}",
            "",
            f"**{baseline}** ({r['seq_steps']} steps, {r['seq_finish']}):",
            "",
            _quote(r["text"]["seq"]),
            "",
            f"**{model}** ({r['children']} children, {r['apar_steps']} steps, {r['apar_finish']}):",
            "",
            _quote(r["text"]["apar"]),
            "",
        ]
    out.write_text("\n".join(lines))


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())
