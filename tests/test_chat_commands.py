"""Chat commands: multi-line messages, /set, /retry, as units and in a pseudo-terminal."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pexpect
import pytest
from rich.console import Console

from cli.chat_commands import run_command
from cli.chat_input import read_message
from offload.chat import ChatSession
from offload.engine import Engine
from offload.errors import OffloadError
from offload.generate import SamplingParams
from tests.test_chat_pty import PROMPT, slow_baby, spawn_chat  # noqa: F401  (slow_baby is a fixture)
from tests.test_chat_session import engine, reply  # noqa: F401  (engine is a fixture)


def typed(*lines: str):
    """A stand-in for input(): the lines in turn, then end of input; records the prompts shown."""
    queue = list(lines)
    prompts: list[str] = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        if not queue:
            raise EOFError
        return queue.pop(0)

    read.prompts = prompts
    return read


def test_only_a_plain_line_can_be_a_command() -> None:
    assert read_message(typed("/help")).plain
    assert not read_message(typed('"""/help"""')).plain
    assert not read_message(typed("/help \\", "me")).plain


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["one line"], "one line"),
        (["first \\", "second\\", "third"], "first \nsecond\nthird"),
        (['"""', "a", "", "b", '"""'], "a\n\nb"),
        (['"""start', 'end"""'], "start\nend"),
        (['"""all in one"""'], "all in one"),
        (['"""', "cut off"], "cut off"),  # end of input inside a block sends what was typed
        (["ends with \\"], "ends with "),
    ],
)
def test_multi_line_messages(lines: list[str], message: str) -> None:
    read = typed(*lines)
    assert read_message(read).text == message
    assert read.prompts[0] == ">>> " and set(read.prompts[1:]) <= {"... "}


def command(session: ChatSession, text: str, replies: list[str] | None = None) -> str:
    out = Console(file=io.StringIO(), width=300)
    run_command(text, session, out, autosave=None, reply=(replies if replies is not None else []).append)
    return out.file.getvalue()


def test_set_changes_sampling_and_refuses_bad_values(engine: Engine) -> None:  # noqa: F811
    session = ChatSession(engine, sampling=SamplingParams(temperature=0.7), max_new_tokens=8)
    command(session, "/set temperature 0.2")
    command(session, "/set top_p 0.9")
    command(session, "/set top-k 5")
    command(session, "/set seed 7")
    command(session, "/set max_new_tokens 9")
    assert session.sampling == SamplingParams(temperature=0.2, top_p=0.9, top_k=5, seed=7)
    assert session.max_new_tokens == 9
    assert "temperature 0.2 · top_p 0.9 · top_k 5 · seed 7 · max_new_tokens 9" in command(session, "/set")
    command(session, "/set seed none")
    assert session.sampling.seed is None
    for bad, message in [
        ("/set temperature nan", "expected a number"),
        ("/set temperature -1", "temperature must be"),
        ("/set top_p 2", "top_p must be in (0, 1]"),
        ("/set top_k many", "expected a whole number"),
        ("/set seed 99999999999999999999999", "out of range"),
        ("/set max_new_tokens 0", "out of range"),
        ("/set colour blue", "unknown setting"),
    ]:
        assert message in command(session, bad), bad
    assert session.sampling == SamplingParams(temperature=0.2, top_p=0.9, top_k=5, seed=None)
    assert session.max_new_tokens == 9


SEEDS, TOP_KS = "0 to 18446744073709551615", "0 to 2147483648"


@pytest.mark.parametrize(
    ("text", "flag", "allowed"),
    [
        ("/set seed abc", [], SEEDS),
        ("/set seed -5", ["--seed", "-5"], SEEDS),
        ("/set seed 18446744073709551616", ["--seed", "18446744073709551616"], SEEDS),
        ("/set top_k many", [], TOP_KS),
        ("/set top_k -1", ["--top-k", "-1"], TOP_KS),
        ("/set top_k 2147483649", ["--top-k", "2147483649"], TOP_KS),
    ],
)
def test_set_states_the_range_the_flags_state(
    engine: Engine,  # noqa: F811
    text: str,
    flag: list[str],
    allowed: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    """One range per setting, whatever the mistake: a word, a number below or above it; /set and the flag."""
    from tests.test_cli_generate import offload_here

    session = ChatSession(engine, sampling=SamplingParams(seed=3, top_k=4), max_new_tokens=8)
    shown = command(session, text)
    assert shown.count("\n") == 1 and shown.startswith("error: /set ") and shown.rstrip().endswith(allowed)
    assert (session.sampling.seed, session.sampling.top_k) == (3, 4)
    if flag:  # a word is typer's to refuse
        code, _, err = offload_here(monkeypatch, capfd, "generate", *flag, "Hi")
        assert code == 2 and err.rstrip().endswith(f"is out of range: {allowed}"), err


def test_set_takes_the_ends_of_the_ranges(engine: Engine) -> None:  # noqa: F811
    session = ChatSession(engine, sampling=SamplingParams(), max_new_tokens=8)
    command(session, "/set seed 18446744073709551615")
    command(session, "/set top_k 2147483648")
    assert (session.sampling.seed, session.sampling.top_k) == ((1 << 64) - 1, 1 << 31)


def test_set_system_keeps_the_conversation(engine: Engine) -> None:  # noqa: F811
    session = ChatSession(engine, sampling=SamplingParams(temperature=0), max_new_tokens=4)
    reply(session, "Hi")
    command(session, "/set system Answer in French.")
    assert session.system == "Answer in French." and len(session.messages) == 2
    _, timings = reply(session, "Again")
    chat = [{"role": "system", "content": "Answer in French."}, *session.messages[:3]]
    assert timings.prompt_tokens == len(engine.tokenizer.encode_chat(chat))  # prefilled again, system first
    command(session, "/set system")
    assert session.system is None


def test_retry_regenerates_the_last_reply_from_the_cache(engine: Engine) -> None:  # noqa: F811
    session = ChatSession(engine, sampling=SamplingParams(temperature=0), max_new_tokens=5)
    with pytest.raises(OffloadError, match="nothing to retry"):
        session.retry()
    reply(session, "First question")
    first_reply = session.messages[1]["content"]
    second, _ = reply(session, "Second question")
    replies: list[str] = []
    command(session, "/retry", replies)
    assert replies == ["Second question"]
    assert [m["content"] for m in session.messages] == ["First question", first_reply]
    again, timings = reply(session, replies[0])
    assert again == second  # greedy: the same reply, from the same conversation
    assert timings.prompt_tokens <= len(engine.tokenizer.encode_turn("Second question")) + 2  # only the turn
    assert len(session.messages) == 4


def test_commands_in_a_terminal(slow_baby: Path, tmp_path: Path) -> None:  # noqa: F811
    child = spawn_chat(slow_baby, "--max-new-tokens", "3", "--temperature", "0")
    child.sendline("first line \\")
    child.expect_exact("... ")
    child.sendline("second line")
    child.expect(r"tok/s · TTFT")
    child.expect_exact(PROMPT)
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("/not a command")
    child.expect_exact("... ")
    child.sendline('"""')
    child.expect(r"tok/s · TTFT")
    child.expect_exact(PROMPT)
    child.sendline("/set temperature 0.5")
    child.expect("temperature = 0.5")
    child.expect_exact(PROMPT)
    child.sendline("/retry")
    child.expect(r"tok/s · TTFT")
    child.expect_exact(PROMPT)
    child.sendline("/help")
    child.expect("/retry")
    child.expect_exact(PROMPT)
    saved = tmp_path / "chat.json"
    child.sendline(f"/save {saved}")
    child.expect("saved to")
    child.expect_exact(PROMPT)
    users = [m["content"] for m in json.loads(saved.read_text())["messages"][::2]]
    assert users == ["first line \nsecond line", "/not a command"]
    child.sendline("/exit")
    child.expect(pexpect.EOF)
