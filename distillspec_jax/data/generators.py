"""DistillSpec's four data generators and the stored teacher (design §4), registered in GENERATORS, as batch
sources of the loop.

    fixed          y from the dataset
    target         y ~ p(·|x), sampled once by the target before training (`generate_responses`, the data stage)
    draft          y ~ q(·|x), on-policy: sampled by the current draft, refreshed every `regenerate_every` steps
    mix            per example, with probability λ a draft-generated y, otherwise a target-generated (or fixed) y
    target_logits  y from the target (or fixed), with the target's top-k log-probabilities at every response
                   position stored once by the data stage (`teacher_store`): training loads no target
    serving        online learning while serving: the training prompts are served by speculative decoding with
                   the current draft, and the draft learns from the verify calls' distributions (`serving`)

A source is `data_source.BatchSource`: `(position, context) -> Iterator[batch]`, each batch this host's rows
of global batch `position`: `tokens` [b, L] and `loss_mask` [b, L] (the positions whose next token is a
response token). L is static per generator, so the step compiles once: prompt_len + response budget.

Randomness is addressed, not streamed: the draft's samples for batch p use fold_in(rng, p), and the
mix coin of example i at batch p uses (seed, p, i). A resumed run therefore draws the same data an
uninterrupted one would, except that on-policy responses come from the restored draft (as they did).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distillspec_jax import objective
from distillspec_jax import generate as gen
from distillspec_jax import sharding as shd
from distillspec_jax.data import pipeline
from distillspec_jax.data import source as data_source
from distillspec_jax.models import qwen3
from distillspec_jax.progress import Progress
from distillspec_jax.sampling import Sampler

MIX_OTHERS = ("target", "fixed")
LOGITS_OF = ("target", "fixed")  # whose responses target_logits stores the teacher's top-k on
_MIX_OTHER = "mix_other"  # a generator's stored responses named by the config's generator.mix_other
_LOGITS_OF = "logits_of"  # ... named by generator.logits_of
_MIX_STREAM = 0x6D6978  # separates the mix coin's random stream from data order ("mix")


@dataclasses.dataclass(frozen=True)
class Generator:
    """A registered data generator: where each training example's response comes from."""

    stored: str  # the responses kept with the examples: fixed (the dataset's) | target (sampled before) | ''
    on_policy: bool  # the current draft samples responses during training (all rows, or the mix's share)
    teacher: str = "model"  # where the loss's p comes from: model (the target at every step) | store | serving

    @property
    def stores_logits(self) -> bool:
        """The data stage stores the target's top-k per position; training needs no target."""
        return self.teacher == "store"

    @property
    def stored_teacher(self) -> bool:
        """The loss reads p from the batch (stored or served top-k), not from a target model."""
        return self.teacher != "model"

    @property
    def mixes(self) -> bool:
        """Per example, a coin picks the draft's response or the stored one."""
        return self.on_policy and bool(self.stored)


GENERATORS: dict[str, Generator] = {
    "fixed": Generator(stored="fixed", on_policy=False),
    "target": Generator(stored="target", on_policy=False),
    "draft": Generator(stored="", on_policy=True),
    "mix": Generator(stored=_MIX_OTHER, on_policy=True),
    "target_logits": Generator(stored=_LOGITS_OF, on_policy=False, teacher="store"),
    "serving": Generator(stored="", on_policy=False, teacher="serving"),
}
DISTILLSPEC_GENERATORS = ("fixed", "target", "draft", "mix")  # the paper's four


def stored_responses(kind: str, mix_other: str, logits_of: str = "target") -> str:
    """The stored responses generator `kind` trains on: 'fixed', 'target' (sampled by the data stage), or ''."""
    stored = GENERATORS[kind].stored
    return {_MIX_OTHER: mix_other, _LOGITS_OF: logits_of}.get(stored, stored)


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    """How responses are produced. Validated on creation (before any model is loaded)."""

    kind: str  # fixed | target | draft | mix
    sampler: Sampler  # sampling of generated responses (the evaluation's decoding)
    max_new_tokens: int  # budget of a generated response
    eos_ids: tuple[int, ...]  # ids that end a generated response
    pad_id: int
    mix_lambda: float = 0.5  # mix: probability of a draft-generated response
    mix_other: str = "target"  # mix: where the other responses come from
    regenerate_every: int = 1  # steps between refreshes of the generating draft's parameters
    logits_k: int = 64  # target_logits: teacher ids stored per position (their log-probabilities, and the tail)
    logits_of: str = "target"  # target_logits: whose responses: target (sampled) | fixed (the dataset's)

    def __post_init__(self):
        if self.kind not in GENERATORS:
            raise ValueError(f"unknown generator {self.kind!r}; choose one of {tuple(GENERATORS)}")
        # The mix settings are checked whatever the kind: a bad value is a typo even while it is unused.
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise ValueError(f"generator.mix_lambda must be in [0, 1], got {self.mix_lambda}")
        if self.mix_other not in MIX_OTHERS:
            raise ValueError(f"generator.mix_other must be one of {MIX_OTHERS}, got {self.mix_other!r}")
        if self.max_new_tokens < 1 or self.regenerate_every < 1:
            raise ValueError("generator.max_new_tokens and generator.regenerate_every must be >= 1")
        if self.logits_k < 1:
            raise ValueError(f"generator.logits_k must be >= 1 (teacher ids stored per position), got {self.logits_k}")
        if self.logits_of not in LOGITS_OF:
            raise ValueError(f"generator.logits_of must be one of {LOGITS_OF}, got {self.logits_of!r}")

    @property
    def generator(self) -> Generator:
        return GENERATORS[self.kind]

    @property
    def stored_responses(self) -> str:
        return stored_responses(self.kind, self.mix_other, self.logits_of)

    @property
    def needs_target_responses(self) -> bool:
        """Whether the data stage must sample responses from the target first."""
        return self.stored_responses == "target"

    @property
    def on_policy(self) -> bool:
        return self.generator.on_policy


def _generate_all(model: qwen3.Qwen3, local_prompts: dict[str, np.ndarray], generation: GeneratorSpec,
                  rng: jax.Array, mesh) -> gen.GenerationOutput:
    """Samples responses for this host's prompt rows with a (possibly sharded) model; returns every host's
    rows as NumPy arrays (the global batch), on every host."""
    prompts_bt = shd.global_batch(local_prompts["prompts"], mesh)
    lens_b = shd.global_batch(local_prompts["prompt_lens"], mesh)
    out = gen.generate(model, prompts_bt, lens_b, generation.max_new_tokens, generation.sampler, rng,
                       eos_ids=generation.eos_ids, pad_id=generation.pad_id, return_sequences=True)
    return gen.GenerationOutput(**shd.to_host(out._asdict()))


def _local_rows(out: gen.GenerationOutput) -> gen.GenerationOutput:
    rows = shd.host_slice(len(out.lengths))
    return gen.GenerationOutput(**{k: None if v is None else v[rows] for k, v in out._asdict().items()})


def generate_responses(model: qwen3.Qwen3, prompts: Sequence[np.ndarray], generation: GeneratorSpec,
                       batch_rows: int, prompt_len: int, rng: jax.Array, mesh, stage: str = "data") -> list[np.ndarray]:
    """Samples one response per prompt (the target-generated data): [len(prompts)] int32 arrays, on every host.

    Batches of `batch_rows` global rows with one static prompt length; the last batch is filled up with
    copies of the first prompt, whose responses are dropped. Batch i uses fold_in(rng, i).
    """
    responses: list[np.ndarray] = []
    n_batches = -(-len(prompts) // batch_rows)
    progress = Progress(stage, n_batches, unit="batch")
    local = shd.host_slice(batch_rows)
    for i in range(n_batches):
        chunk = list(prompts[i * batch_rows : (i + 1) * batch_rows])
        real = len(chunk)
        chunk += [prompts[0]] * (batch_rows - real)
        padded = pipeline.pad_prompts(chunk, prompt_len, generation.pad_id)
        out = _generate_all(model, {k: v[local] for k, v in padded.items()}, generation, jax.random.fold_in(rng, i),
                            mesh)
        responses += [out.tokens[b, : out.lengths[b]].astype(np.int32) for b in range(real)]
        progress.update(note=f"{sum(len(r) for r in responses)} tokens")
    progress.done()
    return responses


def batch_length(prompt_len: int, generation: GeneratorSpec, responses: Sequence[np.ndarray | None]) -> int:
    """The static length L of every training batch: the padded prompt length plus the response budget, or the
    longest stored response when that is longer."""
    longest = max((len(r) for r in responses if r is not None), default=0)
    return prompt_len + max(generation.max_new_tokens, longest)


def make_source(generation: GeneratorSpec, batcher: pipeline.Batcher, prompt_len: int,
                seed: int) -> data_source.BatchSource:
    """The training batch source of `generation.kind` over `batcher`'s examples (whose responses are the fixed,
    or the target-generated, ones). prompt_len: the static padded prompt length of generation."""
    length = batch_length(prompt_len, generation, [it.response for it in batcher.items])

    def offline(position: int) -> dict[str, np.ndarray]:
        packed = batcher.sequences(position, length=length)
        return {"tokens": packed["tokens"], "loss_mask": objective.next_token_loss_mask(packed["response_mask"])}

    def on_policy(position: int, model: qwen3.Qwen3, context: data_source.DataContext) -> dict[str, np.ndarray]:
        prompts = batcher.prompts(position, length=prompt_len)
        out = _local_rows(_generate_all(model, prompts, generation, jax.random.fold_in(context.rng, position),
                                        context.mesh))
        tokens = _pad_to(out.sequences, length, generation.pad_id)
        response = _pad_to(out.response_mask.astype(np.float32), length, 0)
        if generation.generator.mixes:
            other = batcher.sequences(position, length=length)
            rows = batcher.indices(position)[shd.host_slice(batcher.global_batch)]
            use_draft = mix_takes_draft(seed, position, rows, generation.mix_lambda)[:, None]
            tokens = np.where(use_draft, tokens, other["tokens"])
            response = np.where(use_draft, response, other["response_mask"])
        return {"tokens": tokens.astype(np.int32), "loss_mask": objective.next_token_loss_mask(response)}

    def batches(position: int, context: data_source.DataContext) -> Iterator[dict[str, np.ndarray]]:
        generator_model = None
        while True:
            if not generation.on_policy:
                yield offline(position)
            else:
                if generator_model is None or position % generation.regenerate_every == 0:
                    generator_model = _snapshot(context.draft(), copy=generation.regenerate_every > 1)
                yield on_policy(position, generator_model, context)
            position += 1

    return batches


def mix_takes_draft(seed: int, position: int, rows_b: np.ndarray, mix_lambda: float) -> np.ndarray:
    """[B] bool: which rows of batch `position` take the draft's response under `mix`, each with
    probability mix_lambda. rows_b: [B] example indices. A function of (seed, position, example) alone, so
    every host and every resume draws the same coins whatever the mesh."""
    coins_b = np.asarray([np.random.default_rng([seed, _MIX_STREAM, position, int(r)]).random() for r in rows_b])
    return coins_b < mix_lambda


def _snapshot(model: qwen3.Qwen3, copy: bool) -> qwen3.Qwen3:
    """The generating draft. The loop donates the parameters' buffers at the next step, so a draft kept
    for several steps (regenerate_every > 1) must own a copy."""
    if not copy:
        return model
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def _pad_to(x_bl: np.ndarray, length: int, value) -> np.ndarray:
    """Right-pads (or keeps) [B, L'] to [B, length]."""
    if x_bl.shape[1] > length:
        raise ValueError(f"generated sequences of {x_bl.shape[1]} positions exceed the static length {length}")
    return np.pad(np.asarray(x_bl), [(0, 0), (0, length - x_bl.shape[1])], constant_values=value)
