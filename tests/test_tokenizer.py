"""The offline Qwen3 tokenizer is Qwen3's tokenizer; load_tokenizer fails clearly without the Hub.

Expected values are published facts about Qwen3 (ids of "Hello world", the added-token table with
its `special` flags, the chat format), tiktoken's independent encoding of the same ranks, or strings
written by hand from the logic of Qwen3's chat template.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
import unicodedata

import huggingface_hub
import pytest
import tiktoken
import tiktoken.load

from distillspec_jax import tokenizer as tokenizer_lib

# Published facts (Qwen3-0.6B's tokenizer.json and tokenizer_config.json).
HELLO_WORLD_IDS = [9707, 1879]
QWEN3_ADDED_TOKENS = {
    151643: "<|endoftext|>",
    151644: "<|im_start|>",
    151645: "<|im_end|>",
    151646: "<|object_ref_start|>",
    151647: "<|object_ref_end|>",
    151648: "<|box_start|>",
    151649: "<|box_end|>",
    151650: "<|quad_start|>",
    151651: "<|quad_end|>",
    151652: "<|vision_start|>",
    151653: "<|vision_end|>",
    151654: "<|vision_pad|>",
    151655: "<|image_pad|>",
    151656: "<|video_pad|>",
    151657: "<tool_call>",
    151658: "</tool_call>",
    151659: "<|fim_prefix|>",
    151660: "<|fim_middle|>",
    151661: "<|fim_suffix|>",
    151662: "<|fim_pad|>",
    151663: "<|repo_name|>",
    151664: "<|file_sep|>",
    151665: "<tool_response>",
    151666: "</tool_response>",
    151667: "<think>",
    151668: "</think>",
}
# Added tokens that tokenizer.json marks "special": false; all others are special.
QWEN3_NOT_SPECIAL = {
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
}  # fmt: skip
QWEN3_LEN = 151669
QWEN3_NUM_BPE_TOKENS = 151643
QWEN3_NUM_MERGES = QWEN3_NUM_BPE_TOKENS - 256  # one merge per multi-byte token
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
QWEN3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The standard-library sample: small enough to keep the file fast, varied enough to matter.
NUM_ASCII_FILES = 14
NUM_NON_ASCII_FILES = 6
MAX_SAMPLE_CHARS = 40_000
HUB_FAIL_FAST_S = 15.0  # without the probe, huggingface_hub retries for ~50 s


@pytest.fixture(scope="session")
def qwen3_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("qwen3_tokenizer_cache")


@pytest.fixture(scope="session")
def qwen3(qwen3_cache):
    """Built once per session into a private cache (so the build path itself is exercised)."""
    return tokenizer_lib.offline_qwen3_tokenizer(cache_dir=qwen3_cache)


@pytest.fixture(scope="session")
def reference_encoding() -> tiktoken.Encoding:
    """tiktoken over the same ranks and regex: an independent BPE implementation."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(tokenizer_lib.qwen3_vocab_file()))
    return tiktoken.Encoding(
        "qwen3_reference",
        pat_str=QWEN3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={content: token_id for token_id, content in QWEN3_ADDED_TOKENS.items()},
    )


def _evenly_spaced(items: list, count: int) -> list:
    assert len(items) >= count, f"only {len(items)} candidates for {count} samples"
    return [items[(i * len(items)) // count] for i in range(count)]


@pytest.fixture(scope="session")
def stdlib_sample() -> dict[str, str]:
    """{relative path: text} for a fixed spread of this interpreter's standard-library sources.

    Only NFC text is kept: Qwen3 normalises to NFC, so other text cannot come back byte for byte
    (test_nfc_normalisation covers that case).
    """
    lib = pathlib.Path(os.path.dirname(os.__file__))
    ascii_texts: list[tuple[str, str]] = []
    non_ascii_texts: list[tuple[str, str]] = []
    for path in sorted(lib.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text or len(text) > MAX_SAMPLE_CHARS or unicodedata.normalize("NFC", text) != text:
            continue
        (ascii_texts if text.isascii() else non_ascii_texts).append((str(path.relative_to(lib)), text))
    sample = _evenly_spaced(ascii_texts, NUM_ASCII_FILES) + _evenly_spaced(non_ascii_texts, NUM_NON_ASCII_FILES)
    return dict(sample)


# ------------------------------------------------------------------------------------------------
# Vocabulary and encoding.
# ------------------------------------------------------------------------------------------------


def test_hello_world_encodes_to_published_ids(qwen3):
    assert qwen3.encode("Hello world") == HELLO_WORLD_IDS  # and no BOS in front
    assert qwen3("Hello world")["input_ids"] == HELLO_WORLD_IDS
    assert qwen3.decode(HELLO_WORLD_IDS) == "Hello world"


def test_added_tokens_have_qwen3_ids_and_special_flags(qwen3):
    assert len(qwen3) == QWEN3_LEN
    for token_id, content in QWEN3_ADDED_TOKENS.items():
        assert qwen3.convert_tokens_to_ids(content) == token_id
        assert qwen3.convert_ids_to_tokens(token_id) == content
        assert qwen3.encode(content) == [token_id]  # recognised inside text, never split
        assert qwen3.added_tokens_decoder[token_id].special == (content not in QWEN3_NOT_SPECIAL)
    assert sorted(qwen3.added_tokens_decoder) == sorted(QWEN3_ADDED_TOKENS)


def test_eos_pad_bos_and_padding_side(qwen3):
    assert (qwen3.eos_token, qwen3.eos_token_id) == ("<|im_end|>", IM_END)
    assert (qwen3.pad_token, qwen3.pad_token_id) == ("<|endoftext|>", ENDOFTEXT)
    assert qwen3.bos_token is None
    assert qwen3.padding_side == "right"


def test_skip_special_tokens_keeps_think_and_tool_markers(qwen3):
    text = "<|im_start|>assistant\n<think>\nhm\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|><|endoftext|>"
    ids = qwen3.encode(text)
    assert qwen3.decode(ids) == text
    assert qwen3.decode(ids, skip_special_tokens=True) == (
        "assistant\n<think>\nhm\n</think>\n\n<tool_call>\n{}\n</tool_call>"
    )


def test_nfc_normalisation(qwen3):
    decomposed, composed = "caf" + "e\N{COMBINING ACUTE ACCENT}", "caf\N{LATIN SMALL LETTER E WITH ACUTE}"
    assert qwen3.encode(decomposed) == qwen3.encode(composed)
    assert qwen3.decode(qwen3.encode(decomposed)) == composed


def test_stdlib_sample_round_trips_exactly(qwen3, stdlib_sample):
    assert sum(not text.isascii() for text in stdlib_sample.values()) == NUM_NON_ASCII_FILES
    for name, text in stdlib_sample.items():
        assert qwen3.decode(qwen3.encode(text)) == text, name


def test_stdlib_sample_ids_equal_tiktoken(qwen3, reference_encoding, stdlib_sample):
    for name, text in stdlib_sample.items():
        expected = reference_encoding.encode(text, allowed_special="all")
        assert qwen3.encode(text) == expected, name


def test_multilingual_ids_equal_tiktoken(qwen3, reference_encoding):
    texts = [
        "中文测试，你好世界！", "日本語のテキスト", "한국어 텍스트", "emoji 🤖🚀👍🏽 mixed",
        "١٢٣ عربي", "digits 1234567 3.14159", "don't I'LL we're", "  spaces\n\n\t tabs\r\n",
    ]  # fmt: skip
    for text in texts:
        assert qwen3.encode(text) == reference_encoding.encode(text, allowed_special="all"), text
        assert qwen3.decode(qwen3.encode(text)) == text


def test_batch_padding_uses_endoftext_and_masks_it(qwen3):
    batch = qwen3(["Hello world", "Hello"], padding=True)
    hello = qwen3.encode("Hello")
    assert batch["input_ids"] == [HELLO_WORLD_IDS, hello + [ENDOFTEXT]]
    assert batch["attention_mask"] == [[1, 1], [1, 0]]


# ------------------------------------------------------------------------------------------------
# Merges and the cache.
# ------------------------------------------------------------------------------------------------


def _byte_ranks() -> dict[bytes, int]:
    return {bytes([value]): value for value in range(256)}


def test_bpe_merges_follow_creation_order():
    ranks = {**_byte_ranks(), b"ab": 256, b"bc": 257, b"abc": 258}
    # Replaying BPE on "abc" with ranks below 258 merges "ab" (256) before "bc" (257).
    assert tokenizer_lib.bpe_merges_from_ranks(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]


def test_bpe_merges_reject_unreachable_token():
    with pytest.raises(ValueError, match="lower-rank"):
        tokenizer_lib.bpe_merges_from_ranks({**_byte_ranks(), b"xyz": 256})


def test_backend_matches_qwen3_tokenizer_json_settings(qwen3):
    backend = json.loads(qwen3.backend_tokenizer.to_str())
    assert len(backend["model"]["merges"]) == QWEN3_NUM_MERGES
    assert backend["model"]["ignore_merges"] is False
    assert backend["normalizer"] == {"type": "NFC"}
    split, byte_level = backend["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"] == {"Regex": QWEN3_PATTERN} and split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and byte_level["use_regex"] is False


def test_cache_holds_one_complete_json_entry_and_is_reused(qwen3, qwen3_cache, monkeypatch):
    entries = list(qwen3_cache.iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no staging leftovers
    files = {path.name for path in entries[0].iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    assert all(name.endswith((".json", ".jinja")) for name in files)  # safe formats only

    def no_build(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tokenizer_lib, "build_qwen3_tokenizer", no_build)
    cached = tokenizer_lib.offline_qwen3_tokenizer(cache_dir=qwen3_cache)
    assert cached.encode("Hello world") == HELLO_WORLD_IDS
    assert cached.chat_template == qwen3.chat_template
    assert [(t.content, t.special) for t in cached.added_tokens_decoder.values()] == [
        (t.content, t.special) for t in qwen3.added_tokens_decoder.values()
    ]


def test_cache_race_keeps_first_complete_entry(qwen3, tmp_path, monkeypatch):
    """A second process finishing its build after the first one leaves the first entry intact."""
    winner_dir: list[pathlib.Path] = []

    def build_while_another_process_wins(*args, **kwargs):
        # Simulate the other process: its complete entry appears while this one is building.
        entry = tmp_path / tokenizer_lib._qwen3_cache_key(tokenizer_lib.qwen3_vocab_file())
        qwen3.save_pretrained(entry)
        (entry / "winner").write_text("first")
        winner_dir.append(entry)
        return qwen3

    monkeypatch.setattr(tokenizer_lib, "build_qwen3_tokenizer", build_while_another_process_wins)
    tokenizer = tokenizer_lib.offline_qwen3_tokenizer(cache_dir=tmp_path)
    assert tokenizer.encode("Hello world") == HELLO_WORLD_IDS
    assert [path.name for path in tmp_path.iterdir()] == [winner_dir[0].name]
    assert (winner_dir[0] / "winner").read_text() == "first"


def test_cache_root_follows_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path))
    assert tokenizer_lib.qwen3_cache_dir() == tmp_path / "qwen3_tokenizer"
    monkeypatch.delenv("DISTILLSPEC_CACHE")
    assert tokenizer_lib.qwen3_cache_dir() == pathlib.Path("~/.cache/distillspec_jax/qwen3_tokenizer").expanduser()


# ------------------------------------------------------------------------------------------------
# Chat template (expected strings written from the logic of Qwen3's published template).
# ------------------------------------------------------------------------------------------------


def _render(qwen3, messages, **kwargs) -> str:
    return qwen3.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template_user_turn_ids(qwen3):
    ids = qwen3.apply_chat_template(
        [{"role": "user", "content": "Hello world"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,  # transformers 5 returns a BatchEncoding by default
    )
    expected = (
        [IM_START] + qwen3.encode("user\nHello world") + [IM_END] + qwen3.encode("\n")
        + [IM_START] + qwen3.encode("assistant\n")
    )  # fmt: skip
    assert list(ids) == expected


def test_chat_template_system_and_user(qwen3):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert _render(qwen3, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert _render(qwen3, messages) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_template_enable_thinking_false_prefills_empty_think(qwen3):
    messages = [{"role": "user", "content": "Hi"}]
    assert _render(qwen3, messages, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Thinking on (the default, or explicit) leaves the assistant turn open for the model.
    expected_open = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert _render(qwen3, messages, add_generation_prompt=True, enable_thinking=True) == expected_open


def test_chat_template_strips_reasoning_of_earlier_assistant_turns(qwen3):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert _render(qwen3, messages, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_keeps_reasoning_after_last_user_turn(qwen3):
    with_reasoning = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nbe kind\n</think>\n\nHello!"},
    ]
    assert _render(qwen3, with_reasoning) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nbe kind\n</think>\n\nHello!<|im_end|>\n"
    )
    # The final assistant turn always carries a (here empty) think block.
    without_reasoning = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert _render(qwen3, without_reasoning) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n"
    )


def test_chat_template_tool_call_and_response(qwen3):
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    tool_json = (
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
    )
    assert _render(qwen3, messages, tools=[tool], add_generation_prompt=True) == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + tool_json
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------------------------------------
# load_tokenizer.
# ------------------------------------------------------------------------------------------------


def test_load_tokenizer_from_saved_folder(qwen3, tmp_path):
    qwen3.save_pretrained(tmp_path)
    loaded = tokenizer_lib.load_tokenizer(tmp_path)
    text = "Hello world <think>x</think> 中文 🤖"
    assert loaded.encode(text) == qwen3.encode(text)
    assert loaded.decode(qwen3.encode(text), skip_special_tokens=True) == text  # <think> is not special
    assert loaded.chat_template == qwen3.chat_template
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (IM_END, ENDOFTEXT, QWEN3_LEN)


def test_load_tokenizer_offline_hub_id_fails_fast_and_names_fixes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(tokenizer_lib.HubUnreachableError) as raised:
        tokenizer_lib.load_tokenizer("Qwen/Qwen3-0.6B")
    assert time.monotonic() - start < HUB_FAIL_FAST_S
    message = str(raised.value)
    assert "Qwen/Qwen3-0.6B" in message and "cannot be reached" in message
    assert "local folder" in message and "offline_qwen3_tokenizer()" in message


def test_load_tokenizer_unreachable_hub_fails_fast(monkeypatch):
    """Online mode, but nothing listens at the endpoint: the probe answers, not 5 retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1:9")  # discard port
    for proxy_var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy_var, raising=False)
    start = time.monotonic()
    with pytest.raises(tokenizer_lib.HubUnreachableError, match="local folder"):
        tokenizer_lib.load_tokenizer("Qwen/Qwen3-0.6B")
    assert time.monotonic() - start < HUB_FAIL_FAST_S


def test_load_tokenizer_missing_local_folder_names_path(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer") as raised:
        tokenizer_lib.load_tokenizer(missing)
    assert str(missing) in str(raised.value)
    with pytest.raises(FileNotFoundError, match=r"\./relative_missing"):
        tokenizer_lib.load_tokenizer("./relative_missing")
