"""`--model ORG/NAME` downloads what is not cached (safe files only, asked first on a terminal, one line
offline), and `offload models` lists the hub cache and $OFFLOAD_HOME/models."""

from __future__ import annotations

import json
import shutil
import sys
from fnmatch import fnmatch
from pathlib import Path

import pexpect
import pytest

from tests import fake_hub
from tests.baby import BabySpec, write_baby
from tests.test_cli_generate import offload_here, sentencepiece_v1


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the fake hub serves: a baby with its tokenizer, plus files offload must never fetch."""
    directory = tmp_path_factory.mktemp("repo")
    write_baby(BabySpec("repo", hidden_size=48, intermediate_size=64, vocab_size=32000), directory)
    shutil.copy(sentencepiece_v1(), directory / "tokenizer.model")
    for name in ("pytorch_model.bin", "consolidated.00.pt", "modeling_evil.py", "weights.pkl"):
        (directory / name).write_bytes(b"never fetched")
    (directory / "consolidated.safetensors").write_bytes(b"a duplicate of every weight")
    return directory


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty huggingface_hub cache, online (the calls are faked) unless a test says otherwise."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return cache


def one_line_error(code: int, err: str, *parts: str) -> None:
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in err


def test_offline_the_missing_repo_is_refused_in_one_line(hub: Path, monkeypatch, capfd) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = offload_here(monkeypatch, capfd, "generate", "--model", "someone/tiny", "Hi")
    one_line_error(code, err, "someone/tiny: not in the Hugging Face cache", "HF_HUB_OFFLINE is set")


def test_an_unreachable_hub_is_refused_in_one_line(hub: Path, monkeypatch, capfd) -> None:
    import huggingface_hub
    from huggingface_hub.errors import DryRunError, LocalEntryNotFoundError

    def unreachable(repo_id: str, **options: object) -> None:
        if options.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise DryRunError("Dry run cannot be performed as the repository cannot be accessed.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    code, _, err = offload_here(monkeypatch, capfd, "generate", "--model", "someone/tiny", "Hi")
    one_line_error(code, err, "someone/tiny: not in the Hugging Face cache", "cannot be reached")


def test_a_missing_repo_is_downloaded_with_safe_patterns_only(
    repo: Path, hub: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    log = tmp_path / "calls.jsonl"
    fake_hub.install(repo, hub, log, monkeypatch.setattr)
    args = (
        "generate",
        "--model",
        "someone/tiny",
        "--temperature",
        "0",
        "--max-new-tokens",
        "2",
        "--json",
        "Hi",
    )
    code, out, err = offload_here(monkeypatch, capfd, *args)
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 2
    assert "downloading someone/tiny" in err  # not a terminal: no question, but said on stderr
    fetch = [
        call for call in fake_hub.calls(log) if not call.get("dry_run") and not call.get("local_files_only")
    ]
    assert len(fetch) == 1
    allowed, ignored = fetch[0]["allow_patterns"], fetch[0]["ignore_patterns"]

    def fetched(name: str) -> bool:
        return any(fnmatch(name, p) for p in allowed) and not any(fnmatch(name, p) for p in ignored)

    for name in ("model.safetensors", "model-00001-of-00019.safetensors", "model.safetensors.index.json",
                 "config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):  # fmt: skip
        assert fetched(name), name
    for name in ("pytorch_model.bin", "consolidated.00.pt", "modeling_mixtral.py", "weights.pkl",
                 "consolidated.safetensors", "tokenizer.py", "model.ckpt", "model.h5"):  # fmt: skip
        assert not fetched(name), name
    snapshot = hub / "models--someone--tiny" / "snapshots" / "0000"
    assert not any(
        (snapshot / name).exists() for name in ("pytorch_model.bin", "modeling_evil.py", "weights.pkl")
    )

    # The second run finds it in the cache and fetches nothing.
    code, _, err = offload_here(monkeypatch, capfd, *args)
    assert code == 0, err
    assert (
        len([call for call in fake_hub.calls(log) if not call.get("local_files_only")]) == 2
    )  # dry run + fetch


def test_a_repo_without_safetensors_is_refused_before_downloading(
    hub: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    pickles_only = tmp_path / "pickles"
    pickles_only.mkdir()
    (pickles_only / "config.json").write_text("{}")
    (pickles_only / "pytorch_model.bin").write_bytes(b"pickle")
    log = tmp_path / "calls.jsonl"
    fake_hub.install(pickles_only, hub, log, monkeypatch.setattr)
    code, _, err = offload_here(monkeypatch, capfd, "generate", "--model", "someone/old", "Hi")
    one_line_error(code, err, "someone/old", "offload reads only safetensors")
    assert all(call.get("dry_run") or call.get("local_files_only") for call in fake_hub.calls(log))


DRIVER = (
    "import sys; from pathlib import Path; from tests import fake_hub; "
    "fake_hub.install(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])); "
    "sys.argv = ['offload', *sys.argv[4:]]; from cli.main import run; run()"
)


@pytest.mark.parametrize("answer", ["n", "y"])
def test_a_terminal_is_asked_before_downloading(repo: Path, tmp_path: Path, answer: str) -> None:
    cache, log = tmp_path / "hub", tmp_path / "calls.jsonl"
    child = pexpect.spawn(
        sys.executable,
        [
            "-c",
            DRIVER,
            str(repo),
            str(cache),
            str(log),
            "generate",
            "--model",
            "someone/tiny",
            "--temperature",
            "0",
            "--max-new-tokens",
            "2",
            "Hi",
        ],
        env={"HF_HUB_CACHE": str(cache), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd())},
        encoding="utf-8",
        timeout=90,
        dimensions=(40, 300),
    )
    child.expect(r"Download someone/tiny \(\d+ files, [\d.]+ MiB\) from Hugging Face into .*\? \[y/N\]")
    child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    fetched = [c for c in fake_hub.calls(log) if not c.get("dry_run") and not c.get("local_files_only")]
    if answer == "n":
        assert "not downloaded (the answer was no)" in child.before
        assert child.exitstatus == 2 and fetched == []
    else:
        assert child.exitstatus == 0, child.before
        assert len(fetched) == 1


def test_models_lists_the_hub_cache_and_offload_home(
    repo: Path, hub: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    fake_hub.install(repo, hub, tmp_path / "calls.jsonl", monkeypatch.setattr)
    from offload.checkpoint.hub import resolve_model_dir

    snapshot = resolve_model_dir("someone/tiny")
    # scan_cache_dir reads the real layout: blobs, refs and a snapshot; the fake wrote only the snapshot.
    (hub / "models--someone--tiny" / "refs").mkdir()
    (hub / "models--someone--tiny" / "refs" / "main").write_text("0000")
    (hub / "models--someone--tiny" / "blobs").mkdir()
    home = tmp_path / "home"
    converted = home / "models" / "tiny-q"
    converted.mkdir(parents=True)
    config = json.loads((snapshot / "config.json").read_text())
    (converted / "config.json").write_text(json.dumps({**config, "quantization": {"experts": ["hqq:4:64"]}}))
    (converted / "model.safetensors").write_bytes(b"\0" * 3000)
    monkeypatch.setenv("OFFLOAD_HOME", str(home))

    code, out, err = offload_here(monkeypatch, capfd, "models", "--json")
    assert code == 0, err
    listed = {model["name"]: model for model in json.loads(out)}
    assert listed["someone/tiny"]["source"] == "hub" and listed["someone/tiny"]["converted"] is False
    assert listed[str(converted)]["source"] == "home" and listed[str(converted)]["converted"] is True
    assert listed[str(converted)]["size_bytes"] >= 3000
    assert listed["someone/tiny"]["model_type"] == "mixtral"

    code, out, _ = offload_here(monkeypatch, capfd, "models")
    rows = [line for line in out.splitlines() if "hub cache" in line or "$OFFLOAD_HOME" in line]
    assert code == 0 and len(rows) == 2
    assert "someone/tiny" in rows[0] and " no " in rows[0] and " yes " in rows[1]


def test_models_says_where_it_looked_when_there_are_none(
    hub: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path / "home"))
    code, out, _ = offload_here(monkeypatch, capfd, "models")
    assert code == 0 and "No models" in out and "home" in out
    bundled = next(line for line in out.splitlines() if "bundled" in line)
    assert "demo" in bundled and "mixtral" in bundled  # the bundled demo, by the name --model takes
    code, out, _ = offload_here(monkeypatch, capfd, "models", "--json")
    assert [model["name"] for model in json.loads(out) if model["source"] == "bundled"] == ["demo"]


def test_demo_names_the_bundled_model_unless_a_local_directory_has_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed user has no path to the demo inside site-packages: `-m demo` is it (convert, bench, plan).
    from offload.checkpoint.hub import DEMO_MODEL, resolve_model_dir

    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("demo") == DEMO_MODEL
    (tmp_path / "demo").mkdir()
    assert resolve_model_dir("demo") == Path("demo")
