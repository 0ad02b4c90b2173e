"""Online learning while serving: on the `:test` pair, the draft that learns from the requests it serves accepts
more of the later requests than the initial draft accepts of the same requests; the buffer keeps the newest
records; a buffer smaller than one verify block is refused."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs import fkl
from distillspec_jax import experiment, speculative
from distillspec_jax import sharding as shd
from distillspec_jax.data import pipeline, serving
from distillspec_jax.sampling import Sampler
from distillspec_jax.stages import data as data_stage
from distillspec_jax.stages import prepare as prepare_stage

GAMMA, UPDATES, STEPS_PER_UPDATE = 3, 8, 4
SEEDS = 4  # serving runs of the initial draft per request batch: the run-to-run spread of τ


def test_learning_while_serving_raises_tau_on_the_requests_it_serves(pipeline_workdir, tmp_path):
    c = fkl.get_config("test")
    c.generator.kind, c.generator.logits_k = "serving", 32
    # Sampled serving: τ then follows 1 − TVD, which the loss moves (the :test draft shares no greedy argmax with
    # its target, so greedy τ stays 1 for a dozen steps).
    c.serving.update(gamma=GAMMA, temperature=1.0, requests_per_update=c.distill.batch_size,
                     steps_per_update=STEPS_PER_UPDATE)
    c.distill.update(steps=UPDATES * STEPS_PER_UPDATE, warmup_steps=1)
    c.tiny.cache_dir, c.plots, c.stages = str(pipeline_workdir / "models"), False, "data,distill"
    workdir = tmp_path / "serving"
    experiment.run(c, str(workdir))
    log = [json.loads(x) for x in (workdir / serving.LOG_FILE).read_text().splitlines()]
    assert [r["update"] for r in log] == list(range(UPDATES))
    assert [r["requests_served"] for r in log] == [c.distill.batch_size * (u + 1) for u in range(UPDATES)]
    assert log[0]["train_s_previous_update"] is None and all(r["train_s_previous_update"] > 0 for r in log[1:])

    # The same requests served by the initial draft, SEEDS times each: the spread between those runs is what one
    # serving run of a request batch varies by when nothing is learned.
    mesh = shd.make_mesh(-1, 1, 1)
    models = prepare_stage.prepare(c, str(workdir), mesh)
    items = data_stage.load_data(str(workdir), "train")
    batcher = pipeline.Batcher(items, c.distill.batch_size, c.seed, models.pad_id, c.data.pad_multiple, c.data.bucket)
    prompt_len = pipeline.round_up(max(len(it.prompt) for it in items), c.data.pad_multiple)
    initial = np.zeros((UPDATES, SEEDS))
    for update in range(UPDATES):
        prompts = batcher.prompts(update, length=prompt_len)
        for seed in range(SEEDS):
            out = speculative.speculative_generate(models.target, models.draft, prompts["prompts"],
                                                   prompts["prompt_lens"], GAMMA, c.generator.max_new_tokens,
                                                   Sampler(temperature=1.0), jax.random.key(100 + seed),
                                                   eos_ids=models.eos_ids, pad_id=models.pad_id)
            initial[update, seed] = speculative.summarize(out.stats)["block_efficiency"]
    spread = initial.std(axis=1, ddof=1).mean()  # run-to-run standard deviation of one batch's τ
    late = slice(UPDATES // 2, UPDATES)
    served = np.asarray([r["block_efficiency"] for r in log])
    gain = served[late].mean() - initial[late].mean()
    margin = 3 * spread * np.sqrt(1 / (UPDATES - UPDATES // 2) + 1 / initial[late].size)
    assert gain > margin, (gain, margin, served, initial)


def test_the_buffer_keeps_the_newest_requests_up_to_its_tokens():
    buffer = serving._Buffer(10)
    held = []
    for i, n in enumerate([4, 4, 4, 12, 3]):
        buffer.add({"example": i, "ids": np.zeros((n, 2))})
        held.append([r["example"] for r in buffer.records])
    # 4+4+4 > 10 drops the oldest; a record longer than the buffer is kept alone; the next one displaces it.
    assert held == [[0], [0, 1], [1, 2], [3], [4]]


def test_a_buffer_smaller_than_one_verify_block_is_refused():
    with pytest.raises(ValueError, match="smaller than one verify block"):
        serving.ServingSpec(gamma=4, buffer_tokens=4)
    with pytest.raises(ValueError, match="multiple of distill.batch_size=8"):
        serving.ServingSpec(requests_per_update=12).check_batch(8)
