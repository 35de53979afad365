"""The tokenizer on both file formats: round trips, special ids, chat encoding, streaming detokenization.

Three tokenizer files are used:
- mistral-common's bundled `tokenizer.model.v1` (Mixtral 8x7B v0.1, read by sentencepiece);
- a hub-style `tokenizer.json` built from that model's vocabulary (Prepend/Replace normalizer, BPE with
  byte fallback), the shape of the hub's Mixtral file;
- a tiny BPE trained here with a Metaspace pre-tokenizer, the shape of the bundled demo model's file.
"""

from __future__ import annotations

import json
import pydoc_data.topics
import shutil
from pathlib import Path

import mistral_common
import pytest
import sentencepiece
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from offload.errors import TokenizerError
from offload.tokenizer import Tokenizer

V1_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
BYTE_PIECES = [f"<0x{value:02X}>" for value in range(256)]

UNICODE_SAMPLES = [
    "Café crème brûlée, naïve résumé",
    "東京で寿司を食べました。你好，世界！",
    "emoji 😀👍🏽 and flags 🇫🇷🇯🇵",
    "combining A\u030a and e\u0301",
    "tab\there\r\nnew  line   and trailing  ",
    "  two leading spaces",
    "<s> and </s> and [INST] typed by a user",
]
# "▁" (U+2581) is excluded: both libraries read it as a space, so it cannot round-trip.
texts = st.text(st.characters(codec="utf-8", exclude_characters="\u2581"), max_size=60) | st.sampled_from(
    UNICODE_SAMPLES
)
SETTINGS = settings(max_examples=60, deadline=None)


def _corpus() -> list[str]:
    """English prose from the standard library's docs plus some non-Latin text, to train a tiny BPE."""
    prose = [text for _, text in sorted(pydoc_data.topics.topics.items())]
    return prose[:40] + UNICODE_SAMPLES * 20


def train_metaspace_bpe(path: Path, special_tokens: list[str], vocab_size: int = 800) -> Path:
    """Train a small Metaspace BPE with byte fallback and save it as a tokenizer.json."""
    tokenizer = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Metaspace(replacement="▁", prepend_scheme="first"),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    # Listing the byte pieces as special tokens is the simplest way to get them into the vocabulary.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens + BYTE_PIECES, show_progress=False
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    tokenizer.save(str(path))
    return path


def hub_style_json_from_sentencepiece(model_path: Path, path: Path) -> Path:
    """A tokenizer.json with the sentencepiece model's vocabulary, laid out like the hub's Mixtral file.

    sentencepiece's BPE merges the pair whose result has the highest score first, so every way of
    splitting a piece into two known pieces becomes a merge ranked by the piece's score.
    """
    model = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    vocab = {model.id_to_piece(i): i for i in range(model.get_piece_size())}
    ranked = []
    for piece, piece_id in vocab.items():
        if model.is_control(piece_id) or model.is_byte(piece_id) or model.is_unknown(piece_id):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-model.get_score(piece_id), piece_id, vocab[left], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    tokenizer = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in ("<unk>", "<s>", "</s>")])
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def sp_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(V1_MODEL)


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_metaspace_bpe(tmp_path_factory.mktemp("tiny") / "tokenizer.json", ["<unk>", "<s>", "</s>"])


@pytest.fixture(scope="module")
def hub_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hub_style_json_from_sentencepiece(V1_MODEL, tmp_path_factory.mktemp("hub") / "tokenizer.json")


@pytest.fixture(scope="module")
def hub_tokenizer(hub_json: Path) -> Tokenizer:
    return Tokenizer.from_file(hub_json)


@pytest.fixture(scope="module", params=["sentencepiece", "hub-json", "tiny-json"])
def any_tokenizer(request: pytest.FixtureRequest, sp_tokenizer: Tokenizer) -> Tokenizer:
    if request.param == "sentencepiece":
        return sp_tokenizer
    if request.param == "hub-json":
        return request.getfixturevalue("hub_tokenizer")
    return Tokenizer.from_file(request.getfixturevalue("tiny_json"))


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Every push's output, then the flush's."""
    decoder = tokenizer.stream_decoder()
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


# --- loading and special ids ---


def test_sentencepiece_model_has_mixtral_special_ids(sp_tokenizer: Tokenizer) -> None:
    assert (sp_tokenizer.bos_id, sp_tokenizer.eos_id, sp_tokenizer.vocab_size) == (1, 2, 32000)


def test_tokenizer_json_reads_bos_and_eos_from_its_special_tokens(tmp_path: Path) -> None:
    path = train_metaspace_bpe(tmp_path / "tokenizer.json", ["<pad>", "<unk>", "<s>", "</s>"], vocab_size=400)
    tokenizer = Tokenizer.from_file(path)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (2, 3)
    assert tokenizer.vocab_size == HFTokenizer.from_file(str(path)).get_vocab_size()
    assert tokenizer.encode("hi", add_bos=True)[0] == 2


def test_from_dir_prefers_tokenizer_json_and_falls_back_to_tokenizer_model(
    tmp_path: Path, tiny_json: Path
) -> None:
    shutil.copy(V1_MODEL, tmp_path / "tokenizer.model")
    shutil.copy(tiny_json, tmp_path / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).vocab_size == Tokenizer.from_file(tiny_json).vocab_size
    (tmp_path / "tokenizer.json").unlink()
    assert Tokenizer.from_dir(tmp_path).vocab_size == 32000


def test_tokenizer_json_without_a_decoder_still_decodes_text(tmp_path: Path, tiny_json: Path) -> None:
    spec = json.loads(tiny_json.read_text(encoding="utf-8"))
    spec["decoder"] = None
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    tokenizer = Tokenizer.from_file(path)
    text = "plain words, then é and 😀\nnext line"
    assert tokenizer.decode(tokenizer.encode(text)) == text


# --- encode and decode ---


@SETTINGS
@given(text=texts)
def test_decode_inverts_encode(any_tokenizer: Tokenizer, text: str) -> None:
    expected = text
    if any_tokenizer.source.parent.name.startswith("tiny") and text.startswith(" "):
        # A Metaspace pre-tokenizer adds "▁" only when the text does not already start with a
        # space, so `tokenizers` itself loses one leading space with such a file.
        expected = text[1:]
    assert any_tokenizer.decode(any_tokenizer.encode(text)) == expected


def test_metaspace_json_loses_one_leading_space_as_tokenizers_does(tiny_json: Path) -> None:
    tokenizer = Tokenizer.from_file(tiny_json)
    library = HFTokenizer.from_file(str(tiny_json))
    assert tokenizer.encode("  two") == library.encode("  two", add_special_tokens=False).ids
    assert tokenizer.decode(tokenizer.encode("  two")) == " two"


@SETTINGS
@given(text=texts)
def test_hub_style_json_encodes_like_sentencepiece(
    sp_tokenizer: Tokenizer, hub_tokenizer: Tokenizer, text: str
) -> None:
    assert hub_tokenizer.encode(text) == sp_tokenizer.encode(text)


def test_hub_style_json_encodes_prose_like_sentencepiece(
    sp_tokenizer: Tokenizer, hub_tokenizer: Tokenizer
) -> None:
    # Runs of spaces and indentation are where a wrongly ranked merge list shows.
    prose = pydoc_data.topics.topics["class"] + pydoc_data.topics.topics["lambda"]
    assert hub_tokenizer.encode(prose) == sp_tokenizer.encode(prose)


def test_encode_adds_bos_only_when_asked_and_decode_skips_bos_and_eos(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode("Hello there")
    assert any_tokenizer.bos_id not in ids and any_tokenizer.eos_id not in ids
    assert any_tokenizer.encode("Hello there", add_bos=True) == [any_tokenizer.bos_id, *ids]
    assert any_tokenizer.decode([any_tokenizer.bos_id, *ids, any_tokenizer.eos_id]) == "Hello there"


def test_special_token_text_typed_by_a_user_stays_text(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode("say <s> or </s>")
    assert any_tokenizer.bos_id not in ids and any_tokenizer.eos_id not in ids
    assert any_tokenizer.decode(ids) == "say <s> or </s>"


def test_unseen_characters_fall_back_to_bytes_not_unknown(tiny_json: Path) -> None:
    tokenizer = Tokenizer.from_file(tiny_json)
    text = "Ωmega ⊕ 𝄞 🦀"  # none of these are in the training text
    unknown_id = HFTokenizer.from_file(str(tiny_json)).token_to_id("<unk>")
    assert unknown_id not in tokenizer.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_out_of_range_ids_are_a_tokenizer_error(sp_tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="32000"):
        sp_tokenizer.decode([5, 32000])
    with pytest.raises(TokenizerError, match="-1"):
        sp_tokenizer.stream_decoder().push(-1)


# --- chat encoding with tokenizer.json files ---

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another, in français: é?"},
]


def test_chat_with_a_metaspace_json_is_the_template_segments_encoded_one_by_one(tiny_json: Path) -> None:
    tokenizer = Tokenizer.from_file(tiny_json)
    expected = [
        tokenizer.bos_id,
        *tokenizer.encode("[INST] Be brief.\n\nName a colour. [/INST]"),
        *tokenizer.encode("Blue."),
        tokenizer.eos_id,
        *tokenizer.encode("[INST] Another, in français: é? [/INST]"),
    ]
    ids = tokenizer.encode_chat(CHAT)
    assert ids == expected
    assert ids.count(tokenizer.bos_id) == 1
    assert (
        tokenizer.decode(ids)
        == "[INST] Be brief.\n\nName a colour. [/INST] Blue. [INST] Another, in français: é? [/INST]"
    )
    assert ids == tokenizer.encode_chat(CHAT[:2]) + tokenizer.encode_reply("Blue.") + [
        tokenizer.eos_id,
        *tokenizer.encode_turn("Another, in français: é?"),
    ]


def test_chat_with_a_hub_style_json_equals_the_sentencepiece_model(
    sp_tokenizer: Tokenizer, hub_tokenizer: Tokenizer
) -> None:
    for chat in (CHAT, CHAT[1:], [*CHAT, {"role": "assistant", "content": " 東京 😀  spaced  "}]):
        assert hub_tokenizer.encode_chat(chat) == sp_tokenizer.encode_chat(chat)


# --- streaming ---


@SETTINGS
@given(text=texts)
def test_streamed_text_equals_decode(any_tokenizer: Tokenizer, text: str) -> None:
    ids = any_tokenizer.encode(text)
    assert "".join(stream(any_tokenizer, ids)) == any_tokenizer.decode(ids)


@SETTINGS
@given(data=st.data())
def test_streaming_arbitrary_ids_equals_decode(any_tokenizer: Tokenizer, data: st.DataObject) -> None:
    # Models emit any id: stray byte pieces, BOS/EOS, lone "▁" pieces. Streaming must still match decode.
    # Ids 3..258 are the byte pieces in all three files; "🦀鳕" gives lead and continuation bytes.
    interesting = [any_tokenizer.bos_id, any_tokenizer.eos_id, *any_tokenizer.encode("🦀鳕 x")]
    token_id = (
        st.sampled_from(interesting) | st.integers(3, 258) | st.integers(0, any_tokenizer.vocab_size - 1)
    )
    ids = data.draw(st.lists(token_id, max_size=16))
    assert "".join(stream(any_tokenizer, ids)) == any_tokenizer.decode(ids)


@SETTINGS
@given(prompt=texts, data=st.data())
def test_a_continuation_streams_the_text_it_adds_to_its_prompt(
    any_tokenizer: Tokenizer, prompt: str, data: st.DataObject
) -> None:
    # A raw completion's text is what the new ids add to the prompt's: prompt + completion reads as one text,
    # so "The capital of France" + " of" keeps its space (a chat reply starts afresh and drops it).
    prompt_ids = any_tokenizer.encode(prompt, add_bos=True)
    ids = data.draw(st.lists(st.integers(3, any_tokenizer.vocab_size - 1), max_size=12))
    decoder = any_tokenizer.stream_decoder(prompt_ids)
    streamed = "".join([decoder.push(token_id) for token_id in ids] + [decoder.flush()])
    before = any_tokenizer.decode(prompt_ids)
    after = any_tokenizer.decode(prompt_ids + ids)
    # (A stray byte piece after a prompt that ends in one joins it into an invalid character: no text to add to.)
    assume(after.startswith(before))
    assert streamed == after[len(before) :]


def test_a_continuation_after_a_long_run_of_byte_pieces(any_tokenizer: Tokenizer) -> None:
    # The prompt ends in more byte pieces than the decoder's window: the window starts where the run does,
    # not inside a character (the tokenizers library decodes a run with one bad byte as all U+FFFDs).
    prompt_ids = any_tokenizer.encode("\x80\x80\x08𐀀", add_bos=True)
    decoder = any_tokenizer.stream_decoder(prompt_ids)
    byte_zero = 3  # "<0x00>"
    streamed = decoder.push(byte_zero) + decoder.flush()
    before = any_tokenizer.decode(prompt_ids)
    assert streamed == any_tokenizer.decode([*prompt_ids, byte_zero])[len(before) :] == "\x00"


def test_a_continuation_keeps_the_space_before_its_first_word(any_tokenizer: Tokenizer) -> None:
    prompt_ids = any_tokenizer.encode("The capital of France", add_bos=True)
    word = any_tokenizer.encode("of")  # "▁of", as the model emits it after the prompt
    assert "".join(stream(any_tokenizer, word)) == "of"  # a chat reply's first word
    decoder = any_tokenizer.stream_decoder(prompt_ids)
    assert "".join([decoder.push(token_id) for token_id in word] + [decoder.flush()]) == " of"


def test_stream_emits_each_character_whole_and_keeps_spaces(any_tokenizer: Tokenizer) -> None:
    text = "Hello world: é, 東京, 😀 and 👍🏽 done"
    ids = any_tokenizer.encode(text)
    pieces = stream(any_tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    # The reply's first piece drops its "▁" like decode does; later ones keep theirs (the join above).
    first_text = next(piece for piece in pieces if piece)
    assert first_text.startswith("H")


def test_stream_holds_back_a_character_split_over_byte_pieces(sp_tokenizer: Tokenizer) -> None:
    ids = sp_tokenizer.encode("a 🦀")  # "▁a", "▁", then four byte pieces
    assert len(ids) == 6
    assert stream(sp_tokenizer, ids) == ["a", " ", "", "", "", "🦀", ""]


def test_stream_holds_a_byte_run_until_a_text_piece_with_tokenizers_json(tiny_json: Path) -> None:
    # `tokenizers` decodes a run of byte pieces as a whole, so its text is final only when the run ends.
    tokenizer = Tokenizer.from_file(tiny_json)
    ids = tokenizer.encode("🦀🦀 and")
    pieces = stream(tokenizer, ids)
    assert pieces[:8] == [""] * 8
    assert "".join(pieces) == "🦀🦀 and"


def test_flush_returns_an_unfinished_character_as_decode_does(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode("a 🦀")[:-1]
    pieces = stream(any_tokenizer, ids)
    assert pieces[-2] == ""
    assert "".join(pieces) == any_tokenizer.decode(ids)
    assert pieces[-1].endswith("\ufffd")


def test_stream_decodes_a_short_window_per_token(
    sp_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    window_sizes: list[int] = []
    original = sp_tokenizer.decode

    def spy(ids: list[int]) -> str:
        window_sizes.append(len(ids))
        return original(ids)

    monkeypatch.setattr(sp_tokenizer, "decode", spy)
    text = pydoc_data.topics.topics["class"][:3000] + " 😀 東京" * 20
    ids = sp_tokenizer.encode(text)
    assert len(ids) > 500
    assert "".join(stream(sp_tokenizer, ids)) == text
    assert max(window_sizes) <= 8
