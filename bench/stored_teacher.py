"""How close the stored top-k teacher comes to the full one: on the `:tiny` pair, the loss, the direction of the
draft's gradient (cosine) and the acceptance estimate 1 − TVD of the sparse (k + 1)-bucket teacher against the
full-vocabulary computation, for each divergence and k, on the target's own sampled responses.

    python -m bench.stored_teacher --workdir=/tmp/stored_teacher_bench     # builds :tiny once (minutes on a CPU)

The batches are the distill stage's first `--batches` batches of target-generated data (generator `target`,
16 rows each, HumanEval prompts); the draft is the undistilled `:tiny` draft. Gradients are those of the step
(`Distiller.gradients`), flattened over every draft parameter. Storage is what a shard holds per response token:
k int32 ids, k float32 log-probabilities and the float32 tail (plus the token itself).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from configs import fkl
from distillspec_jax import experiment, objective, train
from distillspec_jax import sharding as shd
from distillspec_jax.data import pipeline, teacher_store
from distillspec_jax.stages import data as data_stage
from distillspec_jax.stages import prepare as prepare_stage


def _cosine(a, b) -> float:
    x = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(a)])
    y = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(b)])
    return float(jnp.dot(x, y) / (jnp.linalg.norm(x) * jnp.linalg.norm(y)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="workdir of the :tiny models and the target's responses")
    parser.add_argument("--ks", type=common.int_list, default=[8, 32, 64, 256], help="teacher ids kept per position")
    parser.add_argument("--divergences", default="fkl,rkl,jsd,tvd")
    parser.add_argument("--batches", type=int, default=4, help="training batches averaged over")
    args = parser.parse_args(argv)

    c = fkl.get_config("tiny")
    c.generator.kind, c.stages, c.plots = "target", "prepare,data", False
    mesh = shd.make_mesh(-1, 1, 1)
    with contextlib.redirect_stdout(sys.stderr):  # the run's progress lines; stdout is the JSON
        experiment.run(c, args.workdir)  # builds the :tiny pair once and samples the target's responses once
        models = prepare_stage.prepare(c, args.workdir, mesh)
    generation = data_stage.generator_spec(c, models.eos_ids, models.pad_id)
    items = data_stage.training_items(c, args.workdir, generation)
    batcher = pipeline.Batcher(items, c.distill.batch_size, c.seed, models.pad_id, c.data.pad_multiple, c.data.bucket)
    prompt_len = pipeline.round_up(max(len(it.prompt) for it in items), c.data.pad_multiple)
    length = prompt_len + max(len(it.response) for it in items)
    packed = [batcher.sequences(p, length=length) for p in range(args.batches)]
    batches = [{"tokens": b["tokens"], "loss_mask": objective.next_token_loss_mask(b["response_mask"])}
               for b in packed]
    temperature = c.distill.temperature
    top = jax.jit(teacher_store.teacher_top_k, static_argnames=("k", "temperature", "chunk"))

    rows = []
    for name in args.divergences.split(","):
        base = dict(divergence=name, temperature=temperature, loss_chunk=c.distill.loss_chunk, steps=10,
                    warmup_steps=1, batch_size=c.distill.batch_size)
        online = train.Distiller(train.TrainConfig(**base), prepare_stage.load_draft(c, models.draft_dir, mesh),
                                 models.target, mesh)
        params = online.init_state().params
        full = [online.gradients(params, online.global_batch(b)) for b in batches]
        for k in args.ks:
            stored = train.Distiller(train.TrainConfig(**base, stored_teacher=True),
                                     prepare_stage.load_draft(c, models.draft_dir, mesh), None, mesh)
            per_batch = []
            for b, (g_full, m_full) in zip(batches, full):
                tokens = jnp.asarray(b["tokens"])
                ids, logprobs, tail = shd.to_host(top(models.target, tokens, k=k, temperature=temperature,
                                                      chunk=c.distill.loss_chunk))
                sparse_batch = stored.global_batch({**b, "teacher_ids": ids, "teacher_logprobs": logprobs,
                                                    "teacher_tail": tail})
                g_sparse, m_sparse = stored.gradients(params, sparse_batch)
                per_batch.append({"loss_full": float(m_full["loss"]), "loss_sparse": float(m_sparse["loss"]),
                                  "acceptance_full": float(m_full["acceptance"]),
                                  "acceptance_sparse": float(m_sparse["acceptance"]),
                                  "grad_cosine": _cosine(g_full, g_sparse),
                                  "grad_norm_ratio": float(m_sparse["grad_norm"] / m_full["grad_norm"])})
            mean = {key: float(np.mean([r[key] for r in per_batch])) for key in per_batch[0]}
            rows.append({"divergence": name, "k": k, **mean,
                         "loss_ratio": mean["loss_sparse"] / mean["loss_full"],
                         "storage_bytes_per_token": k * 8 + 4 + 4})
            common.log(f"{name} k={k}: loss {mean['loss_sparse']:.4f} / {mean['loss_full']:.4f}, cosine "
                       f"{mean['grad_cosine']:.4f}, 1-TVD {mean['acceptance_sparse']:.4f} / {mean['acceptance_full']:.4f}")
    return {"benchmark": "stored_teacher", "machine": common.machine_info(), "date": time.strftime("%Y-%m-%d"),
            "vocab_size": models.target_cfg.real_vocab_size, "temperature": temperature, "batches": args.batches,
            "rows_per_batch": c.distill.batch_size, "batch_length": length, "results": rows}


if __name__ == "__main__":
    common.print_json(main())
