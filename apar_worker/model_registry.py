"""Resolve a model name or a local directory to a Hugging Face model directory, offline.

Three kinds of name: a shipped full model (`apar-tiny`: its weights are in the package), a
shipped adapter model (`apar-smol`: a LoRA delta + tokenizer, assembled once onto its base
into `$APAR_HOME/models/`), and a preparable base (`smollm2-135m-instruct`, see base_models).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from apar_worker.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from apar_worker.base_models import (
    BASE_MODELS,
    build_atomically,
    cache_lock,
    ensure_base,
    models_dir,
    sha256_file,
)
from apar_worker.types import ModelLoadError

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "models"
ASSEMBLED = "apar_assembled.json"


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()


def shipped_models() -> list[str]:
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_MODELS_DIR.iterdir() if _is_model_dir(p))


def resolve_model(name_or_path: str) -> Path:
    """A shipped model name wins over a relative path of the same name; no network access."""
    shipped = SHIPPED_MODELS_DIR / name_or_path
    if "/" not in name_or_path and _is_model_dir(shipped):
        return assemble(shipped) if (shipped / ADAPTER_CONFIG).is_file() else shipped
    if name_or_path in BASE_MODELS:
        return ensure_base(name_or_path)
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    if (path / ADAPTER_CONFIG).is_file():
        return assemble(path.resolve())
    known = ", ".join(shipped_models() + sorted(BASE_MODELS)) or "none"
    raise ModelLoadError(
        f"model {name_or_path!r} not found: not a shipped or base model (known: {known}) "
        "and not a directory with a config.json or adapter_config.json"
    )


def assembled_dir(adapter_dir: Path) -> Path:
    """Cache dir keyed by the adapter's checksum: a new adapter never reuses an old assembly."""
    digest = sha256_file(adapter_dir / ADAPTER_WEIGHTS)[:12]
    return models_dir() / f"{adapter_dir.name}-{digest}"


def assemble(adapter_dir: Path, progress: bool = True) -> Path:
    """Base + adapter merged into a plain checkpoint in the cache (once; atomic rename)."""
    out = assembled_dir(adapter_dir)
    if (out / ASSEMBLED).is_file() and (out / "config.json").is_file():
        return out
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = ensure_base(cfg["base"], progress=progress) if cfg["base"] in BASE_MODELS else Path(cfg["base"])
    with cache_lock(out.name):
        if (out / ASSEMBLED).is_file() and (out / "config.json").is_file():
            return out  # another process assembled it while we waited
        return _assemble_locked(adapter_dir, base, out, cfg["base"], progress)


def _assemble_locked(adapter_dir: Path, base: Path, out: Path, base_name: str, progress: bool) -> Path:
    if progress:
        print(f"apar: assembling {adapter_dir.name} onto {base_name} into {out} (once)", file=sys.stderr)
    return build_atomically(
        out, lambda tmp: build_assembly(adapter_dir, base, tmp), f"assembling {adapter_dir.name}", progress
    )


def build_assembly(adapter_dir: Path, base: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from apar_worker.adapters import load_adapter, merge_into

    hf_logging.disable_progress_bar()
    cfg, state = load_adapter(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, local_files_only=True)
    merge_into(model, state, cfg)
    tok = AutoTokenizer.from_pretrained(str(adapter_dir), local_files_only=True)
    if len(tok) != cfg.vocab_size:
        raise ModelLoadError(f"{adapter_dir}: tokenizer has {len(tok)} tokens, the adapter {cfg.vocab_size}")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    for extra in ("README.md", "training.json"):
        if (adapter_dir / extra).is_file():
            shutil.copy(adapter_dir / extra, out / extra)
    info = {
        "adapter": str(adapter_dir),
        "base": cfg.base,
        "adapter_sha256": sha256_file(adapter_dir / ADAPTER_WEIGHTS),
    }
    (out / ASSEMBLED).write_text(json.dumps(info, indent=2) + "\n")


def adapter_of(model_dir: Path) -> Path | None:
    """The adapter directory an assembled checkpoint was built from (files shipped beside the
    adapter, such as draft heads, live there); None for any other directory."""
    marker = model_dir / ASSEMBLED
    if not marker.is_file():
        return None
    return Path(json.loads(marker.read_text())["adapter"])


def default_baseline(name: str) -> str:
    """The sequential baseline a figure compares a model with: an adapter model's own base,
    a shipped model's `-seq` twin; anything else must name its baseline."""
    shipped = SHIPPED_MODELS_DIR / name
    if (shipped / ADAPTER_CONFIG).is_file():
        return json.loads((shipped / ADAPTER_CONFIG).read_text())["base"]
    if _is_model_dir(SHIPPED_MODELS_DIR / f"{name}-seq"):
        return f"{name}-seq"
    path = Path(name).expanduser()
    if (path / ADAPTER_CONFIG).is_file():
        return json.loads((path / ADAPTER_CONFIG).read_text())["base"]
    raise ModelLoadError(f"no default baseline for {name!r}: name one with --baseline")
