"""Cache of what the frozen base computes for head-only training: final hidden states at target positions.

The base never changes, so one pass over the training set is enough for every epoch, method and
seed that only trains the output head. Hidden states are stored in fp16 (.npy, memory-mapped on
read) with the target tokens and per-example offsets, under a key that hashes the model's
fingerprint and every example's token ids and loss mask (so data or tokenization changes miss the
cache). Written atomically with a checksum manifest, verified on every load (a damaged entry is
rebuilt); `numpy.load(allow_pickle=False)` reads it back, no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .atomic import remove_stale_temps, verify_dir, write_dir
from .backbone import cache_dir, fingerprint
from .data import Example, collate
from .errors import DamagedFile

DEFAULT_MAX_BYTES = 4 << 30


def cache_key(model, spec: str, examples: list[Example]) -> str:
    h = hashlib.sha256(json.dumps(fingerprint(model, spec), sort_keys=True).encode())
    h.update(str(model.dtype).encode())
    for e in examples:
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(e.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


class FeatureCache:
    """hidden (T x E fp16), tokens (T,), offsets (n+1,): example i owns rows offsets[i]:offsets[i+1]."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.hidden = np.load(self.path / "hidden.npy", mmap_mode="r", allow_pickle=False)
        self.tokens = np.load(self.path / "tokens.npy", allow_pickle=False)
        self.offsets = np.load(self.path / "offsets.npy", allow_pickle=False)
        self.meta = json.loads((self.path / "meta.json").read_text())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def batch(self, ids: list[int], device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (float32) and target tokens of the examples `ids`, in that order."""
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in ids])
        h = torch.from_numpy(np.ascontiguousarray(self.hidden[rows])).to(device=device, dtype=dtype)
        t = torch.from_numpy(self.tokens[rows].astype(np.int64)).to(device)
        return h, t


def build_feature_cache(model, spec: str, examples: list[Example], pad_id: int, batch_size: int = 8,
                        root: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                        log=print) -> FeatureCache | None:
    """Load the cache for (model, examples), building it with one base pass if needed. Returns None
    (callers then compute live) when it would exceed `max_bytes`."""
    from .evaluate import target_hidden

    n_tok = sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    need = n_tok * hidden_size * 2
    if need > max_bytes:
        log(f"[attnlab] feature cache would take {need / 2**30:.1f} GiB > {max_bytes / 2**30:.1f} GiB: computing live")
        return None
    root = Path(root) if root else cache_dir() / "features"
    target = root / cache_key(model, spec, examples)
    remove_stale_temps(root)  # half-written entries a crash left (only folders attnlab marked as its own)
    if (target / "meta.json").is_file():
        try:
            verify_dir(target)
            cache = FeatureCache(target)
            if len(cache) == len(examples) and cache.n_tokens == n_tok:
                return cache
            raise DamagedFile(f"{target} holds {len(cache)} examples / {cache.n_tokens} tokens, not "
                              f"{len(examples)} / {n_tok}")
        except (DamagedFile, ValueError, OSError) as e:
            log(f"[attnlab] feature cache {target.name} is damaged ({' '.join(str(e).split())[:160]}); rebuilding it")
            shutil.rmtree(target, ignore_errors=True)
    dev = next(model.parameters()).device
    hidden = np.empty((n_tok, hidden_size), dtype=np.float16)
    tokens = np.empty(n_tok, dtype=np.int32)
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    pos = 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i: i + batch_size]
            batch = {k: v.to(dev) for k, v in collate(chunk, pad_id).items()}
            h, t = target_hidden(model, batch)
            # rows come out example by example (boolean-mask order is row-major), so offsets follow counts
            counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
            hidden[pos: pos + len(t)] = h.to(torch.float16).cpu().numpy()
            tokens[pos: pos + len(t)] = t.cpu().numpy()
            for j, c in enumerate(counts):
                offsets[i + j + 1] = offsets[i + j] + c
            pos += len(t)
    def write(tmp):
        np.save(tmp / "hidden.npy", hidden)
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "offsets.npy", offsets)
        (tmp / "meta.json").write_text(json.dumps({"spec": spec, "n_examples": len(examples), "n_tokens": n_tok,
                                                   "hidden_size": hidden_size, "dtype": "float16"}))

    write_dir(target, write)
    return FeatureCache(target)
