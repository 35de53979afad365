"""`offload generate` through the real console-script entry point."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload.tokenizer import Tokenizer
from tests.baby import BabySpec, write_baby


def sentencepiece_v1() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def chat_baby(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A baby with Mixtral's real 32000-piece tokenizer, so prompts are real text."""
    directory = tmp_path_factory.mktemp("chat-baby")
    reference = write_baby(
        BabySpec("chat-baby", hidden_size=48, intermediate_size=64, vocab_size=32000), directory
    )
    shutil.copy(sentencepiece_v1(), directory / "tokenizer.model")
    return directory, reference


def offload(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the console script's entry point in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import run; run()", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
    )


def offload_here(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, *args: str, stdin: bytes = b""
) -> tuple[int, str, str]:
    """The same entry point in this process (faster): (exit code, stdout, stderr)."""
    from cli.main import run

    monkeypatch.setattr(sys, "argv", ["offload", *args])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as exited:
        run()
        sys.exit(0)
    out, err = capfd.readouterr()
    return exited.value.code or 0, out, err


def test_generate_json_matches_transformers_greedy(chat_baby: tuple[Path, object]) -> None:
    directory, reference = chat_baby
    done = offload(
        "generate", "--model", str(directory), "--no-chat", "--temperature", "0", "--max-new-tokens", "16",
        "--dtype", "float32", "--json", "Hello",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["prompt_ids"][0] == 1  # BOS
    assert result["dtype"] == "float32"  # the compute dtype is reported (--dtype float32)
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([result["prompt_ids"]]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )[0, len(result["prompt_ids"]) :].tolist()
    assert result["token_ids"] == expected
    assert set(result["timings"]) >= {"ttft_seconds", "prefill_tokens_per_second", "decode_tokens_per_second"}
    # A raw completion's text is what its tokens add to the prompt's (its first word keeps its space).
    tokenizer = Tokenizer.from_dir(directory)
    prompt_text = tokenizer.decode(result["prompt_ids"])
    assert prompt_text + result["text"] == tokenizer.decode(result["prompt_ids"] + result["token_ids"])


def test_generate_chat_reads_stdin(
    chat_baby: tuple[Path, object], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    directory, _ = chat_baby
    code, out, err = offload_here(
        monkeypatch, capfd,
        "generate", "--model", str(directory), "--temperature", "0", "--max-new-tokens", "8", "--json", "-",
        stdin="Qu'est-ce que json.dumps ? 🐍".encode(),
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_ids"][:3] == [1, 733, 16289]  # <s> ▁[ INST
    assert len(result["token_ids"]) == 8


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--model", "/no/such/dir"], None, "no such model directory"),
        (["--model", "{empty}"], None, "config.json"),
        (["--model", "{baby}", "--max-new-tokens", "600"], None, "context of 512"),
        (["--model", "{baby}", "--no-chat", "--max-new-tokens", "1", "-"], b"Hello " * 600, "context of 512"),
        (["--model", "{baby}", "--dtype", "float64"], None, "float64"),
        (["--model", "{baby}", "--device", "tpu"], None, "tpu"),
        (["--model", "{baby}", "--temperature", "-1"], None, "temperature"),
        (["--model", "{baby}", "-"], b"\xff\xfe bad", "UTF-8"),
        (["--model", "{baby}", "-k", "0"], None, "from 1 to 8"),
        (["--model", "{baby}", "-k", "9"], None, "from 1 to 8"),
        (["--model", "{baby}", "-k", "1,2,3"], None, "lists 3 values but the model has 2 layers"),
        (["--model", "{baby}", "-k", "two"], None, "'two' is not an integer"),
        (
            ["--model", "{baby}", "-k", "2", "--prefetch", "-1"],
            None,
            "--prefetch -1 is out of range: 0 (off) to 8",
        ),
        (
            ["--model", "{baby}", "-k", "2", "--cache-policy", "fifo"],
            None,
            "--cache-policy 'fifo' is not one of",
        ),
        (["--model", "{baby}", "--link", "emulated:fast"], None, "bad link 'emulated:fast'"),
        (["--model", "{baby}", "--profile", "no-such-profile"], None, "profile 'no-such-profile' not found"),
    ],
)
def test_user_errors_are_one_line(
    chat_baby: tuple[Path, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
    args: list[str],
    stdin: bytes | None,
    message: str,
) -> None:
    directory, _ = chat_baby
    args = [a.replace("{baby}", str(directory)).replace("{empty}", str(tmp_path)) for a in args]
    if "-" not in args:
        args.append("Hello")
    code, _, stderr = offload_here(monkeypatch, capfd, "generate", *args, stdin=stdin or b"")
    stderr = stderr.strip()
    assert code == 2
    assert message in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert "Traceback" not in stderr


def test_version_and_help_do_not_import_torch() -> None:
    code = "import sys; from cli.main import run; sys.argv=['offload','--help']\ntry: run()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith("False")
    assert "generate" in done.stdout
    version = offload("--version")
    assert version.returncode == 0 and version.stdout.decode().startswith("offload ")


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    # A 128-row embedding with Mixtral's 32000-piece tokenizer: "Hello" alone encodes past row 127.
    write_baby(BabySpec("small-vocab", vocab_size=128), tmp_path)
    shutil.copy(sentencepiece_v1(), tmp_path / "tokenizer.model")
    capfd.readouterr()  # transformers' progress bar while writing the baby
    code, _, stderr = offload_here(monkeypatch, capfd, "generate", "--model", str(tmp_path), "Hello")
    assert code == 2
    assert "32000 tokens" in stderr and "vocab_size 128" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
