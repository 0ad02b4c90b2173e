"""Stored teacher outputs (generator `target_logits`, design §4): the target's top-k log-probabilities at
every response position, written once by the data stage into sharded ArrayRecord files and read back by
training, which then needs no target in memory.

Format. ArrayRecord files read through grain's `ArrayRecordDataSource`, the pair maxtext and tunix use: random
access by record index, so a batch at data position p is read directly (resume needs no replay), and the
files are sharded by host. A record is one example, serialised with msgpack (flax.serialization: arrays and
numbers only, never pickle):

    example   int       the example's index in data/train.json's order
    tokens    [S] int32 prompt + response
    prompt_len int
    ids       [R, k] int32    the teacher's top-k ids at response token j (R response tokens), most likely first
    logprobs  [R, k] float32  log p at those ids
    tail      [R] float32     log of the mass outside them (`sparse_teacher.TopK`)

Row j is the distribution that generated response token j, i.e. the target's output at sequence position
prompt_len + j − 1, which is where a batch puts it (the loss's next-token alignment).

Layout, in <workdir>/data/target_logits/:

    meta.json                               k, vocabulary, tokenizer fingerprint, temperature, hosts (process 0)
    shard-00001-of-00002.array_record       host 1's records
    shard-00001-of-00002.json               its record count and examples; written last, it marks the shard whole

Each host writes the examples it computed and reads only its own shard: host h's rows of batch p are records
of shard h, in an order that is a function of (seed, epoch, h). Files are written under a temporary name and
renamed (locally) or uploaded whole (gs://), so a shard is all there or absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from etils import epath
from flax import serialization

from distillspec_jax import files, objective, sparse_teacher
from distillspec_jax import sharding as shd
from distillspec_jax.data import pipeline
from distillspec_jax.data import source as data_source
from distillspec_jax.progress import Progress
from distillspec_jax.sampling import MASK_VALUE, Sampler, filtered_logits
from distillspec_jax.sparse_teacher import TEACHER_KEYS

STORE_DIR = "target_logits"  # inside the data stage's folder
META_FILE = "meta.json"
FORMAT = 1
RECORD_KEYS = ("example", "tokens", "prompt_len", "ids", "logprobs", "tail")


@dataclasses.dataclass(frozen=True)
class StoreMeta:
    """What the stored outputs are: training must match every field (`check_compatible`)."""

    k: int  # teacher ids kept per position
    real_vocab_size: int  # the models' real vocabulary (ids are below it)
    tokenizer: str  # fingerprint of the tokenizer the tokens were made with (`tokenizer_fingerprint`)
    temperature: float  # the distribution's temperature (the loss's, distill.temperature)
    hosts: int  # shards: one per host that wrote
    length: int  # static sequence length L of a training batch (prompt + response budget)
    format: int = FORMAT


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id): equal exactly when ids mean the same tokens."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def shard_name(host: int, hosts: int) -> str:
    return f"shard-{host:05d}-of-{hosts:05d}"


def _put(local_file: str, target: epath.Path) -> None:
    """Moves a finished local file to `target` whole: a rename locally, one upload on gs://."""
    if files.is_remote(target):
        target.write_bytes(epath.Path(local_file).read_bytes())
        os.remove(local_file)
    else:
        os.replace(local_file, target)


def write_shard(directory: epath.Path, host: int, hosts: int, records: Sequence[dict]) -> None:
    """Writes host `host`'s records (dicts of RECORD_KEYS) as one ArrayRecord shard, then its sidecar."""
    from array_record.python.array_record_module import ArrayRecordWriter

    directory.mkdir(parents=True, exist_ok=True)
    name = shard_name(host, hosts)
    local_dir = str(directory) if not files.is_remote(directory) else tempfile.mkdtemp()
    tmp = os.path.join(local_dir, f".{name}.array_record.tmp")
    writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: cheap random access
    for record in records:
        writer.write(serialization.msgpack_serialize({k: record[k] for k in RECORD_KEYS}))
    writer.close()
    _put(tmp, directory / f"{name}.array_record")
    files.write_json(directory / f"{name}.json", {"records": len(records),
                                                  "examples": [int(r["example"]) for r in records]})


def write_meta(directory: epath.Path, meta: StoreMeta) -> None:
    files.write_json(directory / META_FILE, dataclasses.asdict(meta))


def read_meta(directory: epath.Path) -> StoreMeta:
    meta = directory / META_FILE
    if not meta.exists():
        raise FileNotFoundError(f"no stored teacher outputs in {directory} ({META_FILE} is missing); rerun the data "
                                "stage (--config.stages=data, or include it)")
    return StoreMeta(**json.loads(meta.read_text()))


def check_compatible(meta: StoreMeta, directory: epath.Path, *, k: int, real_vocab_size: int, tokenizer: str,
                     temperature: float, hosts: int) -> None:
    """Refuses stored outputs that do not belong to this run, naming what differs and the fix."""
    fix = "rerun the data stage for this configuration (delete data/ or run in a new workdir)"
    expected = [  # (stored, this run's, how a difference reads)
        (meta.format, FORMAT, f"format {meta.format} (this code reads {FORMAT})"),
        (meta.real_vocab_size, real_vocab_size, f"a vocabulary of {meta.real_vocab_size} ids (the draft has "
                                                f"{real_vocab_size})"),
        (meta.tokenizer, tokenizer, f"tokenizer {meta.tokenizer} (this run's is {tokenizer})"),
        (meta.k, k, f"k={meta.k} ids per position (generator.logits_k={k})"),
        (meta.temperature, temperature, f"temperature {meta.temperature} (distill.temperature={temperature})"),
        (meta.hosts, hosts, f"{meta.hosts} shards, one per writing host (this run has {hosts} hosts)"),
    ]
    wrong = [why for stored, ours, why in expected if stored != ours]
    if wrong:
        raise ValueError(f"the stored teacher outputs in {directory} have " + "; ".join(wrong) + f": {fix}")


class ShardReader:
    """One host's shard: random access to whole, checked records."""

    def __init__(self, directory: epath.Path, host: int, hosts: int, k: int):
        import grain

        self.name, self.k = shard_name(host, hosts), k
        sidecar, data = directory / f"{self.name}.json", directory / f"{self.name}.array_record"
        if not sidecar.exists() or not data.exists():
            missing = data.name if not data.exists() else sidecar.name
            raise FileNotFoundError(f"stored teacher shard {missing} is missing in {directory} (host {host} of "
                                    f"{hosts}): the data stage did not finish; rerun it")
        self.expected = int(json.loads(sidecar.read_text())["records"])
        try:
            self._source = grain.sources.ArrayRecordDataSource([str(data)])
            count = len(self._source)
        except Exception as err:  # noqa: BLE001 - any reader failure is a damaged shard
            raise ValueError(f"stored teacher shard {data} cannot be read ({err}); it is damaged or truncated: "
                             "rerun the data stage") from None
        if count != self.expected:
            raise ValueError(f"stored teacher shard {data} holds {count} records but its sidecar says "
                             f"{self.expected}: it is truncated; rerun the data stage")

    def __len__(self) -> int:
        return self.expected

    def record(self, index: int, position: int) -> dict:
        """Record `index`, whole and consistent, or an error naming the shard, the record and data position."""
        where = f"record {index} of stored teacher shard {self.name} (data position {position})"
        try:
            record = serialization.msgpack_restore(self._source[index])
        except Exception as err:  # noqa: BLE001 - a record that does not decode is a partial one
            raise ValueError(f"{where} cannot be decoded ({err}): the shard is damaged; rerun the data stage") from None
        if not isinstance(record, dict) or set(record) != set(RECORD_KEYS):
            raise ValueError(f"{where} is partial (keys {sorted(record) if isinstance(record, dict) else '?'}); "
                             "rerun the data stage")
        r = len(record["tokens"]) - int(record["prompt_len"])
        if (record["ids"].shape != (r, self.k) or record["logprobs"].shape != (r, self.k)
                or record["tail"].shape != (r,)):
            raise ValueError(f"{where} is partial: {r} response tokens but teacher arrays of shapes "
                             f"{record['ids'].shape}, {record['logprobs'].shape}, {record['tail'].shape}; rerun the "
                             "data stage")
        return record


def epoch_order(count: int, seed: int, epoch: int, host: int) -> np.ndarray:
    """The order in which a host reads its shard's records in one epoch: the same on every rerun."""
    return np.random.default_rng([seed, epoch, host, 0x746C]).permutation(count)


def pack_records(records: Sequence[dict], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch [b, L] of records: tokens and loss_mask as every source gives them, and the teacher's arrays at
    the positions that predict each response token. Positions the loss does not count hold a valid one-bucket
    distribution (all mass on the first id), so they contribute 0, never NaN."""
    b, k = len(records), records[0]["ids"].shape[-1]
    tokens = np.full((b, length), pad_id, np.int32)
    response = np.zeros((b, length), np.float32)
    ids = np.broadcast_to(np.arange(k, dtype=np.int32), (b, length, k)).copy()
    logprobs = np.full((b, length, k), MASK_VALUE, np.float32)
    logprobs[..., 0] = 0.0
    tail = np.full((b, length), MASK_VALUE, np.float32)
    for i, rec in enumerate(records):
        seq, start = np.asarray(rec["tokens"], np.int32), int(rec["prompt_len"])
        if len(seq) > length:
            raise ValueError(f"a stored example of {len(seq)} tokens exceeds the batch length {length}")
        tokens[i, : len(seq)] = seq
        response[i, start : len(seq)] = 1.0
        rows = slice(start - 1, len(seq) - 1)  # position t predicts token t + 1
        ids[i, rows], logprobs[i, rows], tail[i, rows] = rec["ids"], rec["logprobs"], rec["tail"]
    return {"tokens": tokens, "loss_mask": objective.next_token_loss_mask(response),
            **dict(zip(TEACHER_KEYS, (ids, logprobs, tail)))}


def make_source(directory: epath.Path, global_batch: int, seed: int, pad_id: int, host: int,
                hosts: int) -> data_source.BatchSource:
    """The training batches of stored teacher outputs: host `host`'s rows of each global batch, from its shard.

    Every host's batches per epoch are min over shards of (records // rows per host), so all hosts agree
    on where an epoch ends; the records beyond it in a larger shard are left out of that epoch.
    """
    meta = read_meta(directory)
    if global_batch % hosts:
        raise ValueError(f"global batch {global_batch} does not divide over {hosts} hosts")
    rows = global_batch // hosts
    counts = []
    for h in range(hosts):
        sidecar = directory / f"{shard_name(h, hosts)}.json"
        counts.append(int(json.loads(sidecar.read_text())["records"]) if sidecar.exists() else 0)
    reader = ShardReader(directory, host, hosts, meta.k)
    per_epoch = min(counts) // rows
    if per_epoch < 1:
        raise ValueError(f"the stored teacher shards hold {counts} records, fewer than one batch's {rows} rows per "
                         "host; use more training examples or a smaller distill.batch_size")

    def batches(position: int, context: data_source.DataContext) -> Iterator[dict[str, np.ndarray]]:
        del context  # stored outputs need no model and no randomness
        orders: dict[int, np.ndarray] = {}
        while True:
            epoch, i = divmod(position, per_epoch)
            if epoch not in orders:
                orders = {epoch: epoch_order(len(reader), seed, epoch, host)}
            chosen = orders[epoch][i * rows : (i + 1) * rows]
            yield pack_records([reader.record(int(j), position) for j in chosen], meta.length, pad_id)
            position += 1

    return batches


# ----------------------------------------------------------------------------------------------
# Writing: the target's top-k at every response position
# ----------------------------------------------------------------------------------------------


def teacher_top_k(model, tokens_bt, k: int, temperature: float, chunk: int):
    """The target's sparse teacher at every position of tokens_bt: TopK of [B, L, k] and [B, L], computed in
    chunks of positions so that only [B, C, V] logits exist at a time."""
    sampler = Sampler(temperature=temperature)
    hidden_btd = model.hidden_states(tokens_bt)

    def one_chunk(carry, h_bcd):
        logits_bcv = filtered_logits(model.logits(h_bcd), sampler, model.cfg.real_vocab_size)
        return carry, tuple(sparse_teacher.top_k(logits_bcv, k))

    return objective.scan_positions(one_chunk, None, hidden_btd, chunk)[1]


def store_teacher_outputs(model, prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], directory: epath.Path,
                          meta: StoreMeta, *, batch_rows: int, pad_id: int, mesh, chunk: int,
                          stage: str = "data: target top-k") -> None:
    """Computes the target's top-k at every response position of each (prompt, response) and writes them:
    this host's rows of every global batch of `batch_rows` into its shard, and (process 0) meta.json.
    The last batch is filled up with copies of the first example, whose records are dropped."""
    fn = jax.jit(teacher_top_k, static_argnames=("k", "temperature", "chunk"))
    host, hosts = jax.process_index(), jax.process_count()
    local = shd.host_slice(batch_rows)
    records: list[dict] = []
    n_batches = -(-len(prompts) // batch_rows)
    progress = Progress(stage, n_batches, unit="batch")
    for i in range(n_batches):
        rows = list(range(i * batch_rows, min((i + 1) * batch_rows, len(prompts))))
        rows += [0] * (batch_rows - len(rows))
        packed = pipeline.pack_examples([prompts[j] for j in rows], [responses[j] for j in rows], pad_id,
                                        length=meta.length)
        tokens_bt = shd.global_batch(packed["tokens"][local], mesh)
        top = shd.to_host(fn(model, tokens_bt, k=meta.k, temperature=meta.temperature, chunk=chunk))
        for b in range(local.start, local.stop):
            if i * batch_rows + b >= len(prompts):
                continue
            j = rows[b]
            start, end = len(prompts[j]), len(prompts[j]) + len(responses[j])
            records.append({"example": j, "tokens": packed["tokens"][b, :end], "prompt_len": start,
                            "ids": top[0][b, start - 1 : end - 1], "logprobs": top[1][b, start - 1 : end - 1],
                            "tail": top[2][b, start - 1 : end - 1]})
        progress.update(note=f"{len(records)} examples")
    progress.done()
    write_shard(directory, host, hosts, records)
    if host == 0:
        write_meta(directory, meta)
