"""Data sources, task templates (Qwen3 chat format), tokenisation and deterministic batching."""

import json

import numpy as np
import pytest

from configs import jsd
from distillspec_jax import checks
from distillspec_jax.data import pipeline, sources, tasks
from distillspec_jax.tokenizer import offline_qwen3_tokenizer
from tests.conftest import run_main


@pytest.fixture(scope="module")
def qwen_tok():
    return offline_qwen3_tokenizer()


def _chat(user: str) -> str:
    """Qwen3's format for one user turn plus the assistant header, non-thinking mode (by hand)."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def test_tfds_source_through_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        rows = sources.load("tfds", "gsm8k", split="train")
        again = sources.load("tfds", "gsm8k", split="train", limit=4)  # mock data ignores split slices
    assert len(rows) == 6 and len(again) == 4
    assert all(isinstance(r["question"], str) and isinstance(r["answer"], str) for r in rows)
    assert [r["question"] for r in again] == [r["question"] for r in rows[:4]]  # file order, no shuffling


def test_tfds_unknown_name_and_split_are_errors():
    with pytest.raises(sources.DataSourceError, match="unknown TFDS dataset 'squad'.*gsm8k"):
        sources.load("tfds", "squad")
    with pytest.raises(sources.DataSourceError, match="no split 'validation'.*'train', 'test'"):
        sources.load("tfds", "gsm8k", split="validation")


def test_hf_datasets_source_from_local_json(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sources.load("hf", str(path), split="train") == rows
    assert sources.load("hf", str(path), split="train", limit=2) == rows[:2]
    with pytest.raises(sources.DataSourceError, match="does not exist"):
        sources.load("hf", str(tmp_path / "missing.jsonl"))


def test_hf_hub_dataset_offline_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(sources.hub, "probe_hub", lambda: "no route (test)")
    with pytest.raises(ConnectionError, match="local files.*:tiny"):
        sources.load("hf", "openai/gsm8k", "main")


def test_jsonl_source(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert sources.load("jsonl", str(path)) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(sources.DataSourceError, match="line 2 is not JSON"):
        sources.load("jsonl", str(path))


def test_humaneval_source_is_the_packaged_problems():
    rows = sources.load("humaneval")
    assert len(rows) == 164
    assert [r["task_id"] for r in rows[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert rows[0]["prompt"].lstrip().startswith("from typing import List")
    assert "def has_close_elements" in rows[0]["prompt"] and rows[0]["canonical_solution"].strip()


def test_stdlib_corpus_is_deterministic_library_source():
    a, b = sources.stdlib_corpus(limit=40), sources.stdlib_corpus(limit=40)
    assert a == b and len(a) == 40
    paths = [r["path"] for r in sources.stdlib_corpus()]
    assert paths == sorted(paths) and len(paths) > 300
    assert not any(p.startswith(("test/", "idlelib/")) or "/test_" in p for p in paths)
    assert "os.py" in paths and all(r["text"] for r in a)


def test_stdlib_docstrings_are_real_prose_of_library_objects():
    import ast
    import sysconfig

    rows = sources.load("stdlib_docstrings", limit=50)
    assert len(rows) == 50 and rows == sources.stdlib_docstrings(limit=50)
    assert all(len(r["text"]) >= sources.DOCSTRING_MIN_CHARS for r in rows)
    # Each text is the docstring of some module, class or function of the file it names.
    root = sysconfig.get_paths()["stdlib"]
    for row in rows[:10]:
        tree = ast.parse(open(f"{root}/{row['path']}", encoding="utf-8").read())
        docs = {ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))}
        assert row["text"] in docs


def test_unknown_source_is_an_error():
    with pytest.raises(sources.DataSourceError, match="unknown data source 'csv'"):
        sources.load("csv", "x")


# ------------------------------------------------------------------------------------------------
# Templates
# ------------------------------------------------------------------------------------------------

EXAMPLES = {
    "gsm8k": {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
    "xsum": {"document": "A long article.", "summary": "Short."},
    "cnn_dailymail": {"article": "News text.", "highlights": "Key points."},
    "wmt_en_de": {"translation": {"en": "Good morning.", "de": "Guten Morgen."}},
    "lm1b": {"text": "the quick brown fox jumps over"},
    "mbpp": {"text": "Add two numbers.", "code": "def add(a, b):\n    return a + b\n",
             "test_list": ["assert add(1, 2) == 3"]},
    "humaneval": {"prompt": "def f(x):\n    \"\"\"Return x.\"\"\"\n", "canonical_solution": "    return x\n"},
    "alpaca": {"instruction": "Name a colour.", "input": "", "output": "Blue."},
}
EXPECTED_USER_TURNS = {
    "gsm8k": "Solve the following math problem step by step. End your answer with '#### ' followed by the final "
             "number.\n\nWhat is 2+3?",
    "xsum": "Summarize the following article in one sentence.\n\nA long article.",
    "cnn_dailymail": "Summarize the following news article in a few sentences.\n\nNews text.",
    "wmt_en_de": "Translate the following English text to German.\n\nGood morning.",
    "lm1b": "Continue the following text.\n\nthe quick brown",
    "mbpp": "Add two numbers.\nWrite a Python function. Your code should pass these tests:\n\nassert add(1, 2) == 3",
    "humaneval": "Complete the following Python function.\n\n```python\ndef f(x):\n    \"\"\"Return x.\"\"\"\n```",
    "alpaca": "Name a colour.",
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_templates_render_the_qwen3_chat_format_exactly(qwen_tok, name):
    task = tasks.get_task(name)
    text = tasks.render_prompt(task, EXAMPLES[name], qwen_tok, chat=True)
    assert text == _chat(EXPECTED_USER_TURNS[name])
    messages = [{"role": "user", "content": EXPECTED_USER_TURNS[name]}]
    ids = qwen_tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tokenize=True,
                                       return_dict=False)
    assert qwen_tok.encode(text, add_special_tokens=False) == list(ids)
    response = tasks.render_response(task, EXAMPLES[name], qwen_tok, chat=True)
    assert response.endswith("<|im_end|>")


def test_raw_templates_for_base_models(qwen_tok):
    he = tasks.get_task("humaneval")
    assert tasks.render_prompt(he, EXAMPLES["humaneval"], qwen_tok, chat=False) == EXAMPLES["humaneval"]["prompt"]
    assert tasks.render_response(he, EXAMPLES["humaneval"], qwen_tok, chat=False) == "    return x\n"
    lm = tasks.get_task("lm1b")
    prompt = tasks.render_prompt(lm, EXAMPLES["lm1b"], qwen_tok, chat=False)
    response = tasks.render_response(lm, EXAMPLES["lm1b"], qwen_tok, chat=False)
    # Prompt and response are tokenized apart and concatenated: the response must carry the space itself.
    assert prompt + response == EXAMPLES["lm1b"]["text"] and response.startswith(" ")


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        tasks.get_task("squad")


def test_tokenize_truncates_the_instruction_but_keeps_the_template(qwen_tok):
    long = {"document": "word " * 400, "summary": "s " * 100}
    (item,) = pipeline.tokenize([long], tasks.get_task("xsum"), qwen_tok, max_prompt_len=64, max_response_len=10)
    assert len(item.prompt) <= 64 and len(item.response) == 10
    text = qwen_tok.decode(item.prompt.tolist())
    assert text.startswith("<|im_start|>user\nSummarize") and text.endswith(_chat("x").split("x")[1])


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------


def _items(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [pipeline.Tokenized(rng.integers(5, 100, rng.integers(3, 30)).astype(np.int32),
                               rng.integers(5, 100, rng.integers(1, 20)).astype(np.int32)) for _ in range(n)]


def test_batches_are_deterministic_and_addressed_by_position():
    items = _items()
    a = pipeline.Batcher(items, global_batch=8, seed=3, pad_id=0, pad_multiple=8)
    b = pipeline.Batcher(items, global_batch=8, seed=3, pad_id=0, pad_multiple=8)
    for pos in [0, 3, 4, 5, 11]:  # 5 batches per epoch: 5 and 11 are in later epochs
        assert np.array_equal(a.indices(pos), b.indices(pos))
    epoch0 = np.concatenate([a.indices(p) for p in range(5)])
    assert sorted(epoch0.tolist()) == sorted(set(epoch0.tolist()))  # no example twice in an epoch
    assert not np.array_equal(np.concatenate([a.indices(p) for p in range(5, 10)]), epoch0)  # reshuffled
    c = pipeline.Batcher(items, global_batch=8, seed=4, pad_id=0, pad_multiple=8)
    assert not all(np.array_equal(a.indices(p), c.indices(p)) for p in range(5))


def test_hosts_take_disjoint_slices_of_the_same_global_batch():
    items = _items()
    whole = pipeline.Batcher(items, global_batch=8, seed=0, pad_id=0, pad_multiple=64).prompts(2)
    parts = [pipeline.Batcher(items, global_batch=8, seed=0, pad_id=0, pad_multiple=64, host_index=h,
                              host_count=2).prompts(2) for h in range(2)]
    assert np.array_equal(np.concatenate([p["prompts"] for p in parts]), whole["prompts"])
    assert np.array_equal(np.concatenate([p["prompt_lens"] for p in parts]), whole["prompt_lens"])


def test_padding_gives_static_shapes_and_bucketing_reduces_waste():
    items = _items(n=256, seed=1)
    for bucket in (True, False):
        batcher = pipeline.Batcher(items, global_batch=8, seed=0, pad_id=0, pad_multiple=16, bucket=bucket)
        shapes = {batcher.sequences(p)["tokens"].shape[1] for p in range(batcher.batches_per_epoch)}
        assert all(t % 16 == 0 for t in shapes)
    def waste(bucket):
        batcher = pipeline.Batcher(items, global_batch=8, seed=0, pad_id=0, pad_multiple=1, bucket=bucket)
        return sum((1 - batcher.sequences(p)["response_mask"]).sum() for p in range(batcher.batches_per_epoch))
    assert waste(True) < 0.8 * waste(False)


def test_sequences_put_each_response_right_after_its_prompt():
    batch = pipeline.pack_examples([np.array([1, 2, 3]), np.array([4])], [np.array([7, 8]), np.array([9, 9, 9])],
                                   pad_id=0, pad_multiple=4)
    assert batch["tokens"].tolist() == [[1, 2, 3, 7, 8, 0, 0, 0], [4, 9, 9, 9, 0, 0, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]]
    prompts = pipeline.pad_prompts([np.array([1, 2, 3]), np.array([4])], 5, pad_id=0)
    assert prompts["prompts"].tolist() == [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]] and prompts["prompt_lens"].tolist() == [3, 1]
    with pytest.raises(ValueError, match="does not fit"):
        pipeline.pad_prompts([np.arange(9)], 5, pad_id=0)


def test_fixed_responses_required_for_sequences():
    items = [pipeline.Tokenized(np.array([1, 2], np.int32), None)] * 4
    with pytest.raises(ValueError, match="needs responses"):
        pipeline.Batcher(items, global_batch=2, seed=0, pad_id=0).sequences(0)


# ------------------------------------------------------------------------------------------------
# Data errors come before any model loads, naming the file, row, line and field (checks.load_examples)
# ------------------------------------------------------------------------------------------------


def _jsonl_config(path):
    c = jsd.get_config("test")
    c.data.update(source="jsonl", name=str(path), eval_split="")
    return c


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"def f{i}():\n", "canonical_solution": f"    return {i}\n"} for i in range(n)]


def _write_jsonl(path, rows, blank_after: int | None = None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_an_empty_source_says_empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(sources.DataSourceError, match=r"empty\.jsonl is empty \(0 rows\)"):
        checks.load_examples(_jsonl_config(path))


def test_a_row_without_its_field_is_named_by_row_and_line(tmp_path):
    rows = _rows(20)
    rows[6] = {"question": "what?"}  # row 7; a blank line before it puts it on line 8
    path = _write_jsonl(tmp_path / "rows.jsonl", rows, blank_after=2)
    with pytest.raises(sources.DataSourceError, match=r"rows\.jsonl, row 7 \(line 8\): no field 'prompt' "
                                                      r"\(found fields: question\); task 'humaneval'"):
        checks.load_examples(_jsonl_config(path))
    rows[6] = {"prompt": 5, "canonical_solution": "x"}  # there, but not text
    with pytest.raises(sources.DataSourceError, match="row 7 .*field 'prompt' holds int 5, not text"):
        checks.load_examples(_jsonl_config(_write_jsonl(tmp_path / "rows.jsonl", rows)))


def test_too_few_rows_for_evaluation_and_a_batch(tmp_path):
    c = _jsonl_config(_write_jsonl(tmp_path / "few.jsonl", _rows(12)))
    with pytest.raises(sources.DataSourceError, match=r"has 12 rows, fewer than the eval.num_prompts=8 .* "
                                                      r"distill.batch_size=8"):
        checks.load_examples(c)
    train, held_out = checks.load_examples(_jsonl_config(_write_jsonl(tmp_path / "ok.jsonl", _rows(16))))
    assert (len(train), len(held_out)) == (8, 8)


def test_held_out_prompts_do_not_depend_on_the_amount_of_training_data(tmp_path):
    """Data scaling compares drafts on the same evaluation prompts: the hold-out comes from the whole split,
    and a smaller training set is the start of a larger one."""
    path = _write_jsonl(tmp_path / "rows.jsonl", _rows(40))
    runs = {}
    for n in (-1, 24, 10):
        c = _jsonl_config(path)
        c.data.num_train_examples = n
        runs[n] = checks.load_examples(c)
    assert [len(runs[n][0]) for n in (-1, 24, 10)] == [32, 24, 10]
    assert runs[24][1] == runs[10][1] == runs[-1][1]
    assert runs[10][0] == runs[24][0][:10] and runs[24][0] == runs[-1][0][:24]
    held = {r["prompt"] for r in runs[-1][1]}
    assert not held & {r["prompt"] for r in runs[-1][0]}


def test_a_line_that_is_not_an_object_is_an_error(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(sources.DataSourceError, match=r"line 2 is a JSON list, not an object"):
        sources.jsonl(str(path))


def test_main_reports_a_bad_row_before_loading_any_model(tmp_path):
    rows = _rows(20)
    rows[3] = {"text": "no prompt here"}
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    proc = run_main(tmp_path / "w", "--config.data.source=jsonl", f"--config.data.name={path}",
                    "--config.data.eval_split=", check=False)
    assert proc.returncode == 1 and "row 4 (line 4): no field 'prompt'" in proc.stderr, proc.stderr[-2000:]
    assert "[prepare]" not in proc.stdout and "Traceback" not in proc.stderr
