"""Shared helpers of the benchmarks: prompts, statistics, Poisson arrivals, tables, results files.

Kept free of torch/Ray imports so the statistics are cheap to test and `apar bench --help` is fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "results"
HELDOUT_PROMPTS = ROOT / "apar_train" / "heldout_prompts.jsonl"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class BenchError(Exception):
    """A user-facing problem (bad flag, missing model): the CLI prints one line and exits 2."""


def model_dir(name: str) -> Path:
    """A model's directory; a missing one is a BenchError."""
    from apar_worker.model_registry import resolve_model
    from apar_worker.types import ModelLoadError

    try:
        return resolve_model(name)
    except ModelLoadError as exc:
        raise BenchError(str(exc)) from None


def model_pair(args: Any) -> tuple[Path, Path]:
    """The APAR model's directory and its twin's (`args.baseline`, by default the model's base,
    set on `args`); a missing model is "not found" before any baseline is looked up."""
    from apar_worker.model_registry import default_baseline

    apar_dir = model_dir(args.model)
    args.baseline = args.baseline or default_baseline(args.model)
    return apar_dir, model_dir(args.baseline)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a measurement, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Prompt:
    id: str
    kind: str  # "structured" | "unstructured"
    text: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


def load_prompts(
    path: str | Path | None = None, kind: str | None = None, limit: int | None = None
) -> list[Prompt]:
    """Prompts from a JSONL file (`prompt` or `text`, optional `kind`, `id`), in file order.

    The default file is the held-out split the models were never trained on.
    """
    path = Path(path) if path else HELDOUT_PROMPTS
    if not path.is_file():
        raise BenchError(f"prompt file {path} not found")
    out: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row.get("prompt") or row.get("text")
            except (json.JSONDecodeError, AttributeError):
                raise BenchError(f"{path}:{n}: not a JSON object") from None
            if not isinstance(text, str) or not text.strip():
                raise BenchError(f"{path}:{n}: needs a non-empty 'prompt'")
            p = Prompt(str(row.get("id", n)), str(row.get("kind", "unknown")), text)
            if kind is None or p.kind == kind:
                out.append(p)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise BenchError(f"no {kind + ' ' if kind else ''}prompts in {path}")
    return out


def mixed_prompts(path: str | Path | None, n: int, seed: int = 0) -> list[Prompt]:
    """n prompts alternating structured / unstructured where the file has both, shuffled."""
    allp = load_prompts(path)
    groups = [[p for p in allp if p.kind == k] for k in ("structured", "unstructured")]
    groups = [g for g in groups if g] or [allp]
    rng = random.Random(seed)
    for g in groups:
        rng.shuffle(g)
    out = [groups[i % len(groups)][(i // len(groups)) % len(groups[i % len(groups)])] for i in range(n)]
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50)


def summarize(values: list[float]) -> dict[str, float]:
    """p50 / p99 / mean of a sample (NaN when empty), the figures every latency table shows."""
    mean = sum(values) / len(values) if values else math.nan
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "mean": mean}


def ratio(num: float, den: float) -> float:
    return num / den if den and not math.isnan(den) and not math.isnan(num) else math.nan


def poisson_arrivals(rate: float, duration_s: float, max_requests: int, seed: int = 0) -> list[float]:
    """Arrival offsets (s) of a Poisson process at `rate`/s within `duration_s`, at most `max_requests`.

    Bounded in both count and time, so a load run can never run away.
    """
    if rate <= 0 or duration_s <= 0 or max_requests < 1:
        raise ValueError("rate, duration and max_requests must be positive")
    rng = random.Random(seed)
    t, out = 0.0, []
    while len(out) < max_requests:
        t += rng.expovariate(rate)
        if t > duration_s:
            break
        out.append(t)
    return out


def check_loopback(address: str) -> tuple[str, int]:
    """HOST:PORT on this machine only: load generators never target another host."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit():
        raise BenchError(f"--server must be HOST:PORT, got {address!r}")
    if host not in LOOPBACK_HOSTS:
        raise BenchError(f"load generators target loopback only (127.0.0.1), got {host!r}")
    return host, int(port)


def machine() -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def fmt(x: Any, digits: int = 2) -> str:
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.{digits}f}"
    return "-" if x is None else str(x)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width text table (first column left-aligned, the rest right-aligned)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _clean(obj: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2, ensure_ascii=False) + "\n")
    return path


def pyplot():
    """matplotlib with the file-only backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
