"""Generation controls on the command line: --stop, --repetition-penalty, --min-p, --prompt-file,
stdin handling, and the notice when a reply is cut by --max-new-tokens."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from cli.options import stop_strings
from offload.chat import ChatSession
from offload.engine import Engine
from offload.generate import SamplingParams, generate_ids
from offload.settings.flags import LoadFlags
from tests.baby import BabySpec, write_baby
from tests.test_chat_pty import spawn_chat
from tests.test_cli_generate import offload_here, sentencepiece_v1

GREEDY = ("--temperature", "0", "--dtype", "float32")


@pytest.fixture(scope="module")
def baby(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A baby with Mixtral's real tokenizer, and its transformers oracle."""
    directory = tmp_path_factory.mktemp("controls-baby")
    reference = write_baby(
        BabySpec("controls", hidden_size=48, intermediate_size=64, vocab_size=32000), directory
    )
    shutil.copy(sentencepiece_v1(), directory / "tokenizer.model")
    return directory, reference


def generate_json(monkeypatch, capfd, directory: Path, *args: str, stdin: bytes = b"") -> tuple[dict, str]:
    code, out, err = offload_here(
        monkeypatch, capfd, "generate", "--model", str(directory), *GREEDY, "--json", *args, stdin=stdin
    )
    assert code == 0, err
    return json.loads(out), err


def test_stop_ends_the_reply_before_the_stop_text(baby, monkeypatch, capfd) -> None:
    directory, _ = baby
    full, _ = generate_json(monkeypatch, capfd, directory, "--max-new-tokens", "24", "Hello")
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    cut, _ = generate_json(
        monkeypatch, capfd, directory, "--max-new-tokens", "24", "--stop", "zzzq", "--stop", stop, "Hello"
    )
    assert cut["text"] == text[: text.index(stop)]
    assert cut["finish_reason"] == "stop"
    assert len(cut["token_ids"]) < len(full["token_ids"])


def test_stop_values_read_backslash_escapes() -> None:
    assert stop_strings(["a\\nb", "\\\\n", "\\t", "plain"]) == ("a\nb", "\\n", "\t", "plain")
    assert stop_strings(None) == ()


def test_repetition_penalty_matches_transformers(baby, monkeypatch, capfd) -> None:
    directory, reference = baby
    result, _ = generate_json(
        monkeypatch,
        capfd,
        directory,
        "--no-chat",
        "--max-new-tokens",
        "16",
        "--repetition-penalty",
        "1.3",
        "Hello Hello",
    )
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([result["prompt_ids"]]),
            max_new_tokens=16,
            do_sample=False,
            repetition_penalty=1.3,
            eos_token_id=2,
            pad_token_id=0,
        )[0, len(result["prompt_ids"]) :].tolist()
    plain, _ = generate_json(
        monkeypatch, capfd, directory, "--no-chat", "--max-new-tokens", "16", "Hello Hello"
    )
    assert result["token_ids"] == expected
    assert result["token_ids"] != plain["token_ids"]  # the penalty changed something, so it was applied


def test_min_p_one_keeps_only_the_likeliest_token(baby, monkeypatch, capfd) -> None:
    directory, _ = baby
    greedy, _ = generate_json(monkeypatch, capfd, directory, "--max-new-tokens", "12", "Hi")
    sampled, _ = generate_json(
        monkeypatch,
        capfd,
        directory,
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.5",
        "--seed",
        "7",
        "--min-p",
        "1",
        "Hi",
    )
    assert sampled["token_ids"] == greedy["token_ids"]


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [
        ("--min-p", "1.5", "0 to 1"),
        ("--min-p", "nan", "0 to 1"),
        ("--repetition-penalty", "0", "0.01 to 100"),
        ("--repetition-penalty", "1e9", "0.01 to 100"),
    ],
)
def test_out_of_range_controls_are_one_line_before_loading(
    monkeypatch, capfd, tmp_path: Path, flag: str, value: str, allowed: str
) -> None:
    # A model directory that does not exist: the flag's error must come first.
    code, _, err = offload_here(
        monkeypatch, capfd, "generate", "--model", str(tmp_path / "none"), flag, value, "Hi"
    )
    assert code == 2
    assert flag in err and allowed in err
    assert len(err.strip().splitlines()) == 1


def test_the_cli_bounds_are_the_engine_bounds() -> None:
    import cli.options
    import offload.generate

    assert (cli.options.MIN_PENALTY, cli.options.MAX_PENALTY) == (
        offload.generate.MIN_PENALTY,
        offload.generate.MAX_PENALTY,
    )


def test_prompt_file_and_stdin_lose_their_final_newline(baby, monkeypatch, capfd, tmp_path: Path) -> None:
    directory, _ = baby
    (tmp_path / "q.txt").write_text("What is json?\n")
    argument, _ = generate_json(monkeypatch, capfd, directory, "--max-new-tokens", "1", "What is json?")
    from_file, _ = generate_json(
        monkeypatch, capfd, directory, "--max-new-tokens", "1", "--prompt-file", str(tmp_path / "q.txt")
    )
    from_stdin, _ = generate_json(
        monkeypatch, capfd, directory, "--max-new-tokens", "1", "-", stdin=b"What is json?\n"
    )
    assert from_file["prompt_ids"] == argument["prompt_ids"] == from_stdin["prompt_ids"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-file", "{missing}"], "--prompt-file {missing}: No such file or directory"),
        (["--prompt-file", "{dir}"], "--prompt-file {dir}: Is a directory"),
        (["--prompt-file", "{file}", "Hi"], "not both"),
        ([], "give PROMPT"),
    ],
)
def test_prompt_source_errors_come_before_loading(monkeypatch, capfd, tmp_path: Path, args, message) -> None:
    (tmp_path / "q.txt").write_text("Hi")
    names = {
        "{missing}": str(tmp_path / "none.txt"),
        "{dir}": str(tmp_path),
        "{file}": str(tmp_path / "q.txt"),
    }
    for key, value in names.items():
        args = [a.replace(key, value) for a in args]
        message = message.replace(key, value)
    # A model that does not exist: the prompt's error must come first.
    code, _, err = offload_here(monkeypatch, capfd, "generate", "--model", str(tmp_path / "no-model"), *args)
    assert code == 2
    assert message in " ".join(err.split())
    assert "no such model directory" not in err


def test_a_prompt_file_too_large_names_its_size(baby, monkeypatch, capfd, tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_bytes(b"word " * 2000)
    code, _, err = offload_here(
        monkeypatch, capfd, "generate", "--model", str(baby[0]), "--prompt-file", str(tmp_path / "big.txt")
    )
    assert code == 2
    assert "is 10,000 bytes, more than the 8,192 bytes" in err and "context of 512 tokens" in err


def test_a_reply_cut_by_max_new_tokens_says_so(baby, monkeypatch, capfd) -> None:
    directory, _ = baby
    code, out, err = offload_here(
        monkeypatch, capfd, "generate", "--model", str(directory), *GREEDY, "--max-new-tokens", "3", "Hi"
    )
    assert code == 0, err
    assert "(reply cut at --max-new-tokens 3)" in err and "reply cut" not in out
    result, err = generate_json(monkeypatch, capfd, directory, "--max-new-tokens", "3", "Hi")
    assert result["finish_reason"] == "length" and "reply cut" not in err


def test_a_terminal_on_stdin_is_told_how_to_end_the_prompt(baby) -> None:
    child = pexpect.spawn(
        sys.executable,
        [
            "-c",
            "from cli.main import run; run()",
            "generate",
            "--model",
            str(baby[0]),
            *GREEDY,
            "--max-new-tokens",
            "2",
            "--json",
            "-",
        ],
        encoding="utf-8",
        timeout=90,
    )
    child.expect_exact("reading the prompt from stdin (Ctrl-D to end)")
    child.sendline("Hello")
    child.sendeof()
    child.expect('"prompt_ids"')
    child.expect(pexpect.EOF)


def test_piped_stdin_gets_no_terminal_notice(baby, monkeypatch, capfd) -> None:
    _, err = generate_json(monkeypatch, capfd, baby[0], "--max-new-tokens", "1", "-", stdin=b"Hello")
    assert "Ctrl-D" not in err


def test_a_chat_reply_ends_at_a_stop_string_and_the_next_turn_sees_the_transcript(baby) -> None:
    directory, _ = baby
    engine = Engine.load(directory, LoadFlags(dtype="float32"))
    greedy = SamplingParams(temperature=0)
    full = list(ChatSession(engine, sampling=greedy, max_new_tokens=24).send("Hello"))
    text = "".join(r.text for r in full)
    stop = text[len(text) // 2 : len(text) // 2 + 3]

    session = ChatSession(engine, sampling=greedy, max_new_tokens=24, stop_strings=(stop,))
    shown = "".join(r.text for r in session.send("Hello"))
    assert shown == session.messages[-1]["content"] == text[: text.index(stop)]
    # What the model holds is the transcript, so the next turn equals a fresh prefill of it.
    assert session.tokens == engine.tokenizer.encode_chat(session.messages)[:-1]
    second = [r.token for r in session.send("Go on") if r.token is not None]
    prompt = engine.tokenizer.encode_chat([*session.messages[:2], {"role": "user", "content": "Go on"}])
    assert (
        second
        == generate_ids(engine.model, prompt, max_new_tokens=24, sampling=greedy, stop_ids={2})[: len(second)]
    )


def test_chat_says_when_a_reply_is_cut(baby) -> None:
    child = spawn_chat(baby[0], *GREEDY, "--max-new-tokens", "2")
    child.sendline("Hello")
    child.expect_exact("(reply cut at --max-new-tokens 2)")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)


def test_chat_stop_flag_ends_replies_and_the_saved_chat_keeps_the_shown_text(
    baby, monkeypatch, capfd, tmp_path: Path
) -> None:
    def chat_reply(*extra: str) -> str:
        saved = tmp_path / f"chat{len(extra)}.json"
        stdin = f"Hello\n/save {saved}\n".encode()
        code, _, err = offload_here(
            monkeypatch,
            capfd,
            "chat",
            "--model",
            str(baby[0]),
            *GREEDY,
            "--max-new-tokens",
            "24",
            *extra,
            stdin=stdin,
        )
        assert code == 0, err
        return json.loads(saved.read_text())["messages"][1]["content"]

    full = chat_reply()
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert chat_reply("--stop", stop) == full[: full.index(stop)]
