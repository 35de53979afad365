"""A checkpoint's own chat template (tokenizer_config.json or chat_template.jinja), against transformers;
and Mixtral-Instruct's template, which stays mistral-common's exact v1 encoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from offload.chat import ChatSession
from offload.engine import Engine
from offload.errors import TokenizerError
from offload.generate import SamplingParams, generate_ids
from offload.settings.flags import LoadFlags
from offload.tokenizer import Tokenizer
from tests.baby import BabySpec, write_baby
from tests.test_chat_template import CONVERSATIONS, V1_MODEL, mistral_common_ids
from tests.test_cli_generate import offload_here
from tests.test_tokenizer import train_metaspace_bpe

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The hub's Mixtral-8x7B-Instruct-v0.1 template (its tokenizer_config.json), which differs from
# mistral-common in its spaces: it must not be rendered.
MIXTRAL_HUB = (
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n"
    "{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n{%- endfor %}\n"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! Café 😀"},
    {"role": "user", "content": "What does json.dumps do?"},
]


def chatml_dir(directory: Path, template_in: str = "config") -> Path:
    train_metaspace_bpe(directory / "tokenizer.json", SPECIALS)
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if template_in == "config":
        config["chat_template"] = CHATML
    else:
        config["chat_template"] = "{{ raise_exception('the .jinja file wins') }}"
        (directory / "chat_template.jinja").write_text(CHATML)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def transformers_ids(directory: Path, chat: list[dict[str, str]]) -> list[int]:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(directory))
    return list(reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"])


@pytest.mark.parametrize("template_in", ["config", "jinja-file"])
def test_a_chatml_template_gives_transformers_ids(tmp_path: Path, template_in: str) -> None:
    directory = chatml_dir(tmp_path, template_in)
    tokenizer = Tokenizer.from_dir(directory)
    ids = tokenizer.encode_chat(CHAT)
    assert ids == transformers_ids(directory, CHAT)  # transformers too prefers chat_template.jinja
    from tokenizers import Tokenizer as HFTokenizer

    vocabulary = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    im_start, im_end = (vocabulary.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert ids.count(im_start) == 5 and ids.count(im_end) == 4  # four turns, then the generation prompt
    assert tokenizer.eos_id == im_end  # the config's eos_token, so a reply stops at the end of its turn


def test_mixtral_instruct_template_still_equals_mistral_common(tmp_path: Path) -> None:
    shutil.copy(V1_MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": MIXTRAL_HUB, "bos_token": "<s>", "eos_token": "</s>"})
    )
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.template is None and tokenizer.incremental_chat
    for chat in CONVERSATIONS.values():
        assert tokenizer.encode_chat(chat) == mistral_common_ids(chat)


def test_a_template_refusal_is_a_tokenizer_error(tmp_path: Path) -> None:
    train_metaspace_bpe(tmp_path / "tokenizer.json", SPECIALS)
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}{% endif %}ok"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="chat_template: first message must be the user"):
        tokenizer.encode_chat([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ messages.__class__.__mro__ }}", "unsafe|access to attribute"),
        ("{{ ''.__class__.__subclasses__() }}", "unsafe|access to attribute"),
        ("{% set x = messages.append(1) %}", "unsafe|immutable|access"),
    ],
)
def test_templates_run_in_an_immutable_sandbox(tmp_path: Path, template: str, message: str) -> None:
    train_metaspace_bpe(tmp_path / "tokenizer.json", SPECIALS)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dir(tmp_path).encode_chat([{"role": "user", "content": "x"}])


def test_a_broken_template_is_refused_at_load(tmp_path: Path) -> None:
    train_metaspace_bpe(tmp_path / "tokenizer.json", SPECIALS)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(TokenizerError, match="not a valid Jinja template"):
        Tokenizer.from_dir(tmp_path)


@pytest.fixture(scope="module")
def chatml_baby(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("chatml-baby")
    write_baby(BabySpec("chatml", hidden_size=48, intermediate_size=64, vocab_size=1024), directory)
    return chatml_dir(directory)


def test_generate_uses_the_checkpoint_template(chatml_baby: Path, monkeypatch, capfd) -> None:
    code, out, err = offload_here(
        monkeypatch, capfd, "generate", "--model", str(chatml_baby), "--system", "Be brief.", "--temperature", "0",
        "--max-new-tokens", "2", "--json", "What does json.dumps do?",
    )  # fmt: skip
    assert code == 0, err
    expected = transformers_ids(chatml_baby, [CHAT[0], CHAT[3]])
    assert json.loads(out)["prompt_ids"] == expected


def test_a_chat_with_a_template_reuses_the_cache_and_equals_a_fresh_prefill(chatml_baby: Path) -> None:
    engine = Engine.load(chatml_baby, LoadFlags(dtype="float32"))
    greedy = SamplingParams(temperature=0)
    session = ChatSession(engine, system="Be brief.", sampling=greedy, max_new_tokens=6)
    first = list(session.send("Hi there"))
    second = list(session.send("What does json.dumps do?"))
    full_prompt = engine.tokenizer.encode_chat(
        [{"role": "system", "content": "Be brief."}, *session.messages[:3]]
    )
    assert full_prompt == transformers_ids(
        chatml_baby, [{"role": "system", "content": "Be brief."}, *session.messages[:3]]
    )
    second_ids = [r.token for r in second if r.token is not None]
    assert second_ids == generate_ids(
        engine.model, full_prompt, max_new_tokens=6, sampling=greedy, stop_ids={engine.tokenizer.eos_id, 2}
    )
    # The first turn's prompt stayed in the cache: only the rest was prefilled.
    assert second[-1].timings.prompt_tokens <= len(full_prompt) - first[-1].timings.prompt_tokens
