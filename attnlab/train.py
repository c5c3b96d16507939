"""One trainer for every plug-in: only the plug-in's parameters get gradients.

AdamW with linear warmup and cosine decay, gradient clipping and accumulation, seeded data order,
a progress bar, metrics appended as JSONL, atomic safetensors checkpoints and resume. Accelerate
handles devices, so the same code runs under `accelerate launch` on several GPUs.

The loss is the mean cross-entropy over the target tokens of one optimizer step (all its
micro-batches together), computed from the LM head at target positions only, unless the plug-in
brings its own objective (e.g. distillation from the frozen base).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import write_dir
from .data import IGNORE, Example, collate
from .errors import AttnlabError
from .evaluate import target_hidden, target_logits
from .modules import Plugin

CKPT = "checkpoint"


@dataclass
class TrainConfig:
    steps: int = 100                 # optimizer steps
    batch_size: int = 8              # examples per micro-batch
    grad_accum: int = 1              # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 50       # 0: only at the end
    progress: bool = True

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"need steps >= 0, batch_size >= 1, grad_accum >= 1; got {self.steps}, "
                             f"{self.batch_size}, {self.grad_accum}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")


class NonFiniteLoss(AttnlabError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    steps: int
    tokens: int                      # target tokens trained on
    seconds: float
    history: list = field(default_factory=list)
    resumed_from: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def batch_order(n: int, cfg: TrainConfig, step: int, world: int = 1) -> list[list[int]]:
    """Example indices of each micro-batch of optimizer step `step` (grad_accum x world of them;
    process r takes every world-th): a seeded permutation per epoch, so the order depends only on
    (seed, step), and resuming needs no sampler state."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    start = step * per_step
    idx = []
    while len(idx) < per_step:
        epoch, pos = divmod(start + len(idx), n)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        idx += perm[pos: pos + per_step - len(idx)]
    return [idx[i: i + cfg.batch_size] for i in range(0, per_step, cfg.batch_size)]


def _n_predicted(e: Example) -> int:
    return sum(1 for t in e.labels[1:] if t != IGNORE)


class TargetLoss(nn.Module):
    """Summed cross-entropy over target tokens, from token ids or from cached final hidden states.
    A module so that Accelerate/DDP can wrap it. A head with its own `target_loss` (e.g. a chunked
    one) computes the loss itself."""

    def __init__(self, model: nn.Module, objective=None):
        super().__init__()
        self.model = model
        self.objective = objective  # a plug-in's own loss (e.g. distillation); None: target CE

    def forward(self, input_ids=None, attention_mask=None, labels=None, hidden=None, tokens=None):
        head = self.model.get_output_embeddings()
        if hidden is None:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            if self.objective is not None:
                loss = self.objective(self.model, batch)
                if loss is not None:
                    return loss
            if not hasattr(head, "target_loss"):
                logits, tokens = target_logits(self.model, batch)
                return F.cross_entropy(logits.float(), tokens, reduction="sum")
            hidden, tokens = target_hidden(self.model, batch)
        if hasattr(head, "target_loss"):
            return head.target_loss(hidden, tokens)
        return F.cross_entropy(head(hidden).float(), tokens, reduction="sum")


def train(model: nn.Module, plugin: Plugin, examples: list[Example], cfg: TrainConfig,
          out_dir: str | os.PathLike | None = None, pad_id: int = 0, accelerator=None,
          features=None) -> TrainResult:
    """Train `plugin`'s parameters (attached to the frozen `model`) on `examples`.

    `features` (a FeatureCache of the same examples) lets a head-only plug-in train from the base's
    cached hidden states instead of running the frozen body every step.

    With `out_dir`, metrics go to out_dir/metrics.jsonl and checkpoints to out_dir/checkpoint; a
    second call with the same out_dir resumes from the last checkpoint."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    params = plugin.trainable_parameters()
    if not params or cfg.steps == 0:
        return TrainResult(steps=0, tokens=0, seconds=0.0)
    if not examples:
        raise ValueError("no training examples")
    if features is not None:
        if not plugin.head_only:
            raise ValueError(f"{plugin.method} changes more than the output head: it cannot train from cached features")
        if len(features) != len(examples):
            raise ValueError(f"the feature cache holds {len(features)} examples, not {len(examples)}")
    out = Path(out_dir) if out_dir else None
    torch.manual_seed(cfg.seed)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    loss_module, opt = accelerator.prepare(TargetLoss(model, plugin.objective), opt)

    start, history = 0, []
    if out is not None:
        start, history = _resume(out, plugin, opt, cfg)
    tokens = sum(h["tokens"] for h in history[-1:]) if history else 0
    seconds = history[-1]["elapsed_s"] if history else 0.0
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress or not accelerator.is_main_process,
               desc=f"train {plugin.method}", mininterval=1.0, dynamic_ncols=True)
    t0 = time.perf_counter() - seconds
    dev = accelerator.device
    world = accelerator.num_processes
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        order = batch_order(len(examples), cfg, step, world)
        # Normalise by the target tokens of the whole step (all micro-batches, all processes).
        n_tok = sum(_n_predicted(examples[i]) for ids in order for i in ids)
        if n_tok == 0:
            raise ValueError(f"step {step}: the batch has no target tokens (check the loss mask / data)")
        mine = order[accelerator.process_index::world]
        local = torch.zeros((), device=dev)
        plugin.on_step_start()
        for k, ids in enumerate(mine):
            if features is not None:
                h, t = features.batch(ids, device=dev)
                b = {"hidden": h, "tokens": t}
            else:
                b = {key: v.to(dev) for key, v in collate([examples[i] for i in ids], pad_id).items()}
            sync = accelerator.no_sync(loss_module) if k < len(mine) - 1 else _nullcontext()
            with sync:
                loss = loss_module(**b) / n_tok
                accelerator.backward(loss * world)  # DDP averages gradients over processes
            local += loss.detach()
        # Several processes: gradients a plug-in adds after the micro-batches are averaged like DDP's.
        plugin.on_step_end(reduce=(lambda t: accelerator.reduce(t, "mean")) if world > 1 else None)
        loss_sum = float(accelerator.reduce(local, "sum")) if world > 1 else float(local)
        grad_norm = accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        grad_norm = float(grad_norm)
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            where = f"{out / CKPT}" if out is not None and (out / CKPT).exists() else "none was written yet"
            raise NonFiniteLoss(f"{plugin.method}: loss {loss_sum} / grad norm {grad_norm} at step {step} "
                                f"(lr {lr:.3g}). Stopped; the last good checkpoint is kept ({where}). "
                                f"Lower the learning rate or check the data.")
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += n_tok
        elapsed = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "elapsed_s": round(elapsed, 3), "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
        history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if out is not None and accelerator.is_main_process:
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                _append_jsonl(out / "metrics.jsonl", rec)
            if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or step + 1 == cfg.steps:
                save_checkpoint(out / CKPT, plugin, opt, step + 1, cfg)
    bar.close()
    return TrainResult(steps=cfg.steps, tokens=tokens, seconds=time.perf_counter() - t0, history=history,
                       resumed_from=start)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _append_jsonl(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# --- checkpoints: safetensors + JSON, written atomically -----------------------------------------

def save_checkpoint(path: Path, plugin: Plugin, opt, step: int, cfg: TrainConfig) -> None:
    """Plug-in weights, AdamW moments and RNG state at `step`; replaces the previous checkpoint only
    once the new one is complete on disk."""
    names = list(plugin.trainable_parameters())
    by_param = {id(p): n for n, p in plugin.trainable_parameters().items()}
    moments = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                moments[f"{by_param[id(p)]}::{k}"] = v.detach().cpu().contiguous()
    moments["__rng__"] = torch.get_rng_state()

    def write(tmp):
        save_file(plugin.state_dict(), str(tmp / "plugin.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "params": names, "train": asdict(cfg),
                                                    "method": plugin.method,
                                                    "plugin": _plain(asdict(plugin.config))}))

    write_dir(path, write, replace=True)


def _plain(obj):
    """JSON round trip, so that a saved and a live config compare equal (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))


def _resume(out: Path, plugin: Plugin, opt, cfg: TrainConfig) -> tuple[int, list]:
    ckpt = out / CKPT
    if not ckpt.exists() and (out / f".{CKPT}.old").exists():
        ckpt = out / f".{CKPT}.old"  # a crash between the two renames of write_dir
    if not (ckpt / "state.json").is_file():
        if (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()  # metrics of a run that never checkpointed
        return 0, []
    state = json.loads((ckpt / "state.json").read_text())
    saved_cfg = {k: v for k, v in state["train"].items() if k not in ("progress", "checkpoint_every", "log_every")}
    now_cfg = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "checkpoint_every", "log_every")}
    changed = {k: (saved_cfg.get(k), v) for k, v in now_cfg.items() if saved_cfg.get(k) != v}
    if changed:
        raise ValueError(f"{ckpt} was written with other training settings {changed}; "
                         f"delete {out} (or run with --fresh) to start over")
    if "plugin" in state and (state["method"], state["plugin"]) != (plugin.method, _plain(asdict(plugin.config))):
        raise ValueError(f"{ckpt} was written by '{state['method']}' with options {state['plugin']}, not "
                         f"'{plugin.method}' with {_plain(asdict(plugin.config))}; delete {out} (or run with "
                         f"--fresh) to start over")
    plugin.load_state_dict(load_file(str(ckpt / "plugin.safetensors")))
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(moments.pop("__rng__"))
    params = plugin.trainable_parameters()
    for key, v in moments.items():
        name, k = key.split("::")
        p = params[name]
        opt.state[p][k] = v.to(p.device) if k != "step" else v
    step = int(state["step"])
    history = []
    if (out / "metrics.jsonl").exists():
        history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
        history = [h for h in history if h["step"] <= step]
        tmp = out / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
        os.replace(tmp, out / "metrics.jsonl")
    return step, history
