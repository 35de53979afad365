"""A checkpoint's own chat template, rendered as transformers renders it.

A fine-tune that is not Mixtral-Instruct (ChatML, Llama 3, ...) ships its prompt format as a Jinja
template: ``chat_template.jinja`` or the ``chat_template`` key of ``tokenizer_config.json``. The
template is untrusted code from the internet, so it runs in jinja2's immutable sandbox with only
what transformers gives it: the messages, ``add_generation_prompt``, the special tokens' text
(``bos_token``, ``eos_token``, ...), ``raise_exception`` and ``strftime_now``.

Mixtral-Instruct's own template (``[INST]`` as plain text) is not rendered: mistral-common's v1
encoding (``offload.chat_template``) is exact where the hub's template differs in its spaces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from offload.config import read_json
from offload.errors import TokenizerError

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
MAX_TEMPLATE_CHARS = 1_000_000  # real templates are a few kilobytes


@dataclass(frozen=True)
class TokenizerConfig:
    """What offload reads from a model directory's tokenizer_config.json (and chat_template.jinja)."""

    template: str | None = None  # the default chat template's source, if the model has one
    template_source: str = ""  # the file it came from, for messages
    special_tokens: dict[str, str] = field(default_factory=dict)  # "bos_token" -> "<s>", ...

    @classmethod
    def from_dir(cls, directory: Path) -> TokenizerConfig:
        config_path = directory / CONFIG_FILE
        raw = read_json(config_path, TokenizerError) if config_path.is_file() else {}
        if not isinstance(raw, dict):
            raise TokenizerError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = raw.get(name)
            if isinstance(value, dict):  # an AddedToken written out: {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        # transformers prefers chat_template.jinja over the key, and so do we.
        template_path = directory / TEMPLATE_FILE
        if template_path.is_file():
            try:
                template = template_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise TokenizerError(f"{template_path}: cannot read it ({err})") from None
            return cls(template, str(template_path), special)
        return cls(
            _default_template(raw.get("chat_template"), config_path), f"{config_path} chat_template", special
        )


def _default_template(value: Any, path: Path) -> str | None:
    """The template text: a string, or the entry named "default" of a list of named templates."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(
            f"{path}: chat_template lists {sorted(map(str, named))} but no 'default' template"
        )
    raise TokenizerError(f"{path}: chat_template must be a string or a list of named templates")


class JinjaTemplate:
    """A compiled chat template; ``render(messages)`` gives the prompt text, generation prompt included."""

    def __init__(self, text: str, source: str, special_tokens: dict[str, str]) -> None:
        # Deferred (50 ms): only a model with its own template needs jinja2.
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if len(text) > MAX_TEMPLATE_CHARS:
            raise TokenizerError(f"{source}: {len(text)} characters is too long for a chat template")
        self.source = source
        self.special_tokens = dict(special_tokens)
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        # transformers' tojson keeps non-ASCII text as it is and escapes no HTML.
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = environment.from_string(text)
        except jinja2.TemplateError as err:
            raise TokenizerError(f"{source}: not a valid Jinja template ({_first_line(err)})") from None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the template writes it, ending with the assistant's generation prompt."""
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except jinja2.TemplateError as err:  # raise_exception(...), a sandbox refusal, a bad expression
            raise TokenizerError(f"{self.source}: {_first_line(err)}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
            raise TokenizerError(f"{self.source}: the template failed ({_first_line(err)})") from None


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
