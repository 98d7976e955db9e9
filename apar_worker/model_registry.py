"""Resolve a model name (`apar-tiny`) or a local directory to a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

from apar_worker.types import ModelLoadError

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "models"


def shipped_models() -> list[str]:
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_MODELS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model(name_or_path: str) -> Path:
    """A shipped model name wins over a relative path of the same name; no network access."""
    shipped = SHIPPED_MODELS_DIR / name_or_path
    if "/" not in name_or_path and (shipped / "config.json").is_file():
        return shipped
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    known = ", ".join(shipped_models()) or "none"
    raise ModelLoadError(
        f"model {name_or_path!r} not found: not a shipped model (known: {known}) "
        "and not a directory with a config.json"
    )
