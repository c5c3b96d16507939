"""One trainer for every plug-in: only the plug-in's parameters get gradients.

AdamW with linear warmup and cosine decay, gradient clipping and accumulation, seeded data order,
a progress bar, metrics appended as JSONL, atomic safetensors checkpoints and resume. Accelerate
handles devices, so the same code runs under `accelerate launch` on several GPUs.
Precision (bf16 / fp16 autocast, fp32 master weights and losses) is attnlab/precision.py;
`gradient_checkpointing` recomputes the frozen body's blocks in the backward (attnlab/checkpointing.py).

The loss is the mean cross-entropy over the target tokens of one optimizer step (all its
micro-batches together), computed from the LM head at target positions only, unless the plug-in
brings its own objective (e.g. distillation from the frozen base).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import remove_stale_temps, verify_dir, write_dir, write_failed
from .checkpointing import checkpointed
from .config import apply_rules, as_bool, as_float, as_int, as_mapping, reject_unknown
from .data import IGNORE, Example, collate
from .errors import AttnlabError, ConfigError, DamagedFile
from .evaluate import target_hidden, target_logits
from .modules import Plugin
from .precision import as_mixed, autocast, compute_dtype, grad_scaler, master_weights

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
    max_grad_norm: float = 1.0       # gradient clipping; 0 turns it off
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 50       # 0: only at the end
    eval_every: int = 0              # validation loss every N steps (needs a val_fn); 0: off
    patience: int = 0                # stop after this many validations without improvement; 0: never
    progress: bool = True
    log_with: str | None = None      # "tensorboard": records also go to <out_dir>/tensorboard; None: metrics.jsonl only
    mixed_precision: str | None = None   # bf16 | fp16 | no; None: the base's dtype decides (attnlab/precision.py)
    gradient_checkpointing: bool = False  # recompute the frozen body's layers in the backward (attnlab/checkpointing.py)

    def __post_init__(self):
        apply_rules(self, "train", {
            "steps": (as_int, {"min": 0}), "batch_size": (as_int, {"min": 1}), "grad_accum": (as_int, {"min": 1}),
            "lr": (as_float, {"min": 0, "strict_min": True}), "weight_decay": (as_float, {"min": 0}),
            "warmup_steps": (as_int, {"min": 0}), "min_lr_ratio": (as_float, {"min": 0, "max": 1}),
            "max_grad_norm": (as_float, {"min": 0}), "seed": (as_int, {}), "log_every": (as_int, {"min": 1}),
            "checkpoint_every": (as_int, {"min": 0}), "eval_every": (as_int, {"min": 0}),
            "patience": (as_int, {"min": 0}), "progress": (as_bool, {}), "log_with": (_as_tracker, {}),
            "mixed_precision": (as_mixed, {}), "gradient_checkpointing": (as_bool, {})})

    @classmethod
    def from_dict(cls, d, where: str = "train") -> "TrainConfig":
        """Validated TrainConfig from a config section; unknown keys name the allowed ones."""
        d = as_mapping(where, d)
        reject_unknown(where, d, [f.name for f in fields(cls)])
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(str(e).replace("train.", f"{where}.", 1)) from None


def _as_tracker(where: str, v) -> str | None:
    """None / "none" (no tracker) or "tensorboard" (installed: tensorboard or tensorboardX)."""
    if v is None or (isinstance(v, str) and v.lower() == "none"):
        return None
    if v != "tensorboard":
        raise ConfigError(f"{where}: {v!r} is not supported; use tensorboard or none")
    from accelerate.utils import is_tensorboard_available

    if not is_tensorboard_available():
        raise ConfigError(f"{where}: tensorboard is not installed; pip install tensorboard (or set {where}: none)")
    return v


class ResumeMismatch(AttnlabError, ValueError):
    """A checkpoint written for another base, data, plug-in or training settings."""


class NonFiniteLoss(AttnlabError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    steps: int
    tokens: int                      # target tokens trained on
    seconds: float
    history: list = field(default_factory=list)
    resumed_from: int = 0
    val_history: list = field(default_factory=list)   # [[step, validation loss], ...]
    best_step: int | None = None                       # the step whose weights were kept (early stopping)
    stopped_early: bool = False

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


def _train_mode(plugin: Plugin, on: bool) -> None:
    for m in plugin.training_modules():
        m.train(on)


@torch.no_grad()
def _start_hidden(model, examples, features, pad_id, dev, n=64):
    """The base's final hidden states at the target positions of the first n training examples."""
    if features is not None:
        return features.batch(list(range(min(n, len(features)))), device=dev)[0]
    chunk = examples[:n // 8]  # the body runs here: fewer examples
    return target_hidden(model, {k: v.to(dev) for k, v in collate(chunk, pad_id).items()})[0].float()


def train(model: nn.Module, plugin: Plugin, examples: list[Example], cfg: TrainConfig,
          out_dir: str | os.PathLike | None = None, pad_id: int = 0, accelerator=None,
          features=None, val_fn=None, run_fingerprint: dict | None = None, log=print) -> TrainResult:
    """Train `plugin`'s parameters (attached to the frozen `model`) on `examples`.

    `features` (a FeatureCache of the same examples) lets a head-only plug-in train from the base's
    cached hidden states instead of running the frozen body every step.

    `val_fn()` (the validation loss of the model as it is, no gradients) is called every
    `cfg.eval_every` steps and at the end; the plug-in ends with the weights of the best
    validation, and `cfg.patience` stops early after that many validations without improvement.

    With `out_dir`, metrics go to out_dir/metrics.jsonl and checkpoints to out_dir/checkpoint
    (verified by checksum on resume; the previous one is kept as checkpoint.prev); a second call
    with the same out_dir resumes from the last good checkpoint. `run_fingerprint` (base, data,
    plug-in) is stored with it, and a checkpoint of another run is refused, not resumed."""
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
    if cfg.log_with and (out is None or accelerator is not None):
        raise ConfigError(f"train.log_with: {cfg.log_with} needs an out_dir to write into and the trainer's own "
                          f"Accelerator; pass out_dir (and no accelerator), or set log_with: none")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.log_with,
                                             project_dir=out if cfg.log_with else None)
    if cfg.log_with:
        accelerator.init_trackers("tensorboard", config={k: v for k, v in asdict(cfg).items() if v is not None})
    dtype = compute_dtype(model, cfg.mixed_precision)   # None: fp32; else autocast to bf16 / fp16
    master_weights(params)                              # plug-in weights stay fp32 whatever the base's dtype
    scaler = grad_scaler(model, dtype)                  # fp16 only
    # checkpointing only helps where the backward goes through the body (not a head trained on features)
    recompute = cfg.gradient_checkpointing and features is None and not plugin.head_only
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    loss_module, opt = accelerator.prepare(TargetLoss(model, plugin.objective), opt)
    validate = val_fn is not None and cfg.eval_every > 0

    st = _State()
    if out is not None:
        # every process reads the checkpoint; only the main one writes (it alone checkpoints, too)
        st = _resume(out, plugin, opt, cfg, run_fingerprint, log, main=accelerator.is_main_process,
                     processes=accelerator.num_processes)
        accelerator.wait_for_everyone()
    if st.step == 0:  # a fresh run (not resumed): the plug-in may initialise itself from the data
        plugin.on_train_start(lambda: _start_hidden(model, examples, features, pad_id, accelerator.device))
    history = st.history
    tokens, seconds = st.tokens, st.elapsed_s
    bar = tqdm(total=cfg.steps, initial=st.step, disable=not cfg.progress or not accelerator.is_main_process,
               desc=f"train {plugin.method}", mininterval=1.0, dynamic_ncols=True)
    t0 = time.perf_counter() - seconds
    dev = accelerator.device
    world = accelerator.num_processes
    step = st.step
    for step in range(st.step, cfg.steps if not st.stopped_early else st.step):
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
        _train_mode(plugin, True)  # the plug-in's dropout acts in optimizer steps only
        with autocast(model, dtype):
            plugin.on_step_start()
        for k, ids in enumerate(mine):
            if features is not None:
                h, t = features.batch(ids, device=dev)
                b = {"hidden": h, "tokens": t}
            else:
                b = {key: v.to(dev) for key, v in collate([examples[i] for i in ids], pad_id).items()}
            sync = accelerator.no_sync(loss_module) if k < len(mine) - 1 else _nullcontext()
            with sync:
                with autocast(model, dtype), checkpointed(model, recompute):
                    loss = loss_module(**b).float() / n_tok                # the loss in fp32
                accelerator.backward((scaler.scale(loss) if scaler else loss) * world)  # DDP averages over processes
            local += loss.detach()
        # Several processes: gradients a plug-in adds after the micro-batches are averaged like DDP's.
        plugin.on_step_end(reduce=(lambda t: accelerator.reduce(t, "mean")) if world > 1 else None)
        _train_mode(plugin, False)
        loss_sum = float(accelerator.reduce(local, "sum")) if world > 1 else float(local)
        if scaler is not None:
            scaler.unscale_(opt)
        if cfg.max_grad_norm > 0:
            grad_norm = float(accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm))
        else:
            norms = [p.grad.detach().norm() for p in params.values() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        overflow = scaler is not None and math.isfinite(loss_sum) and not math.isfinite(grad_norm)
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)) and not overflow:
            opt.zero_grad(set_to_none=True)
            where = f"{out / CKPT}" if out is not None and (out / CKPT).exists() else "none was written yet"
            raise NonFiniteLoss(f"{plugin.method}: loss {loss_sum} / grad norm {grad_norm} at step {step} "
                                f"(lr {lr:.3g}). Stopped; the last good checkpoint is kept ({where}). "
                                f"Lower the learning rate or check the data.")
        if scaler is not None:  # fp16: a step whose scaled gradients overflowed is skipped, the scale lowered
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += n_tok
        elapsed = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "elapsed_s": round(elapsed, 3), "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
        if overflow:
            rec["skipped_overflow"] = True
        last = step + 1 == cfg.steps
        if validate and ((step + 1) % cfg.eval_every == 0 or last):
            val = float(val_fn())
            rec["val_loss"] = val
            st.val_history.append([step + 1, val])
            if st.best_val is None or val < st.best_val:
                st.best_val, st.best_step, st.bad = val, step + 1, 0
                st.best_state = {k: v.clone() for k, v in plugin.state_dict().items()}  # a copy, not a view
            else:
                st.bad += 1
                if cfg.patience and st.bad >= cfg.patience:
                    st.stopped_early = True
        logged = (step + 1) % cfg.log_every == 0 or last or st.stopped_early
        if logged:
            history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        st.step, st.tokens, st.elapsed_s = step + 1, tokens, round(elapsed, 3)
        if out is not None and accelerator.is_main_process:
            if logged:
                _append_jsonl(out / "metrics.jsonl", rec)
                if cfg.log_with:
                    accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step + 1)
            if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or last or st.stopped_early:
                save_checkpoint(out / CKPT, plugin, opt, st, cfg, run_fingerprint, processes=world)
        if st.stopped_early:
            log(f"[attnlab] {plugin.method}: stopped early at step {step + 1}: validation has not improved for "
                f"{cfg.patience} evaluations (best {st.best_val:.4f} at step {st.best_step})")
            break
    bar.close()
    if cfg.log_with:
        accelerator.end_training()
    if st.best_state is not None:
        plugin.load_state_dict(st.best_state)
    return TrainResult(steps=st.step, tokens=tokens, seconds=time.perf_counter() - t0, history=history,
                       resumed_from=st.resumed_from, val_history=st.val_history,
                       best_step=st.best_step, stopped_early=st.stopped_early)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _append_jsonl(path: Path, rec: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:  # a torn last line is dropped on resume
        raise write_failed(path, e) from None


# --- checkpoints: safetensors + JSON + a checksum manifest, written atomically -------------------

@dataclass
class _State:
    """Where training is: everything a resume needs besides the weights and optimizer moments."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    history: list = field(default_factory=list)
    val_history: list = field(default_factory=list)
    best_val: float | None = None
    best_step: int | None = None
    bad: int = 0
    best_state: dict | None = None
    stopped_early: bool = False
    resumed_from: int = 0


def save_checkpoint(path: Path, plugin: Plugin, opt, st: _State, cfg: TrainConfig,
                    run_fingerprint: dict | None = None, processes: int = 1) -> None:
    """Plug-in weights, AdamW moments, RNG states and the trainer's state at `st.step`; replaces
    the previous checkpoint (kept as checkpoint.prev) only once the new one is complete on disk.
    `processes`: how many trained together (the global batch is batch_size x grad_accum x processes)."""
    names = list(plugin.trainable_parameters())
    by_param = {id(p): n for n, p in plugin.trainable_parameters().items()}
    moments = {}
    for p, s in opt.state.items():
        for k, v in s.items():
            if torch.is_tensor(v):
                moments[f"{by_param[id(p)]}::{k}"] = v.detach().cpu().contiguous()
    moments["__rng__"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, r in enumerate(torch.cuda.get_rng_state_all()):
            moments[f"__cuda_rng_{i}__"] = r

    def write(tmp):
        save_file(plugin.state_dict(), str(tmp / "plugin.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        if st.best_state is not None:
            save_file(st.best_state, str(tmp / "best.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "step": st.step, "tokens": st.tokens, "elapsed_s": st.elapsed_s, "params": names,
            "train": asdict(cfg), "method": plugin.method, "plugin": _plain(asdict(plugin.config)),
            "run": _plain(run_fingerprint), "val_history": st.val_history, "best_val": st.best_val,
            "best_step": st.best_step, "bad": st.bad, "stopped_early": st.stopped_early, "processes": processes}))

    write_dir(path, write, replace=True, keep_previous=f"{path.name}.prev")


def _plain(obj):
    """JSON round trip, so that a saved and a live config compare equal (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))


NEUTRAL = ("progress", "checkpoint_every", "log_every", "log_with", "gradient_checkpointing")  # same numbers


def _read_checkpoint(ckpt: Path) -> dict:
    """state.json of a checkpoint whose files all match its manifest, else DamagedFile."""
    if not (ckpt / "state.json").is_file():
        raise DamagedFile(f"{ckpt / 'state.json'} is missing")
    verify_dir(ckpt, required=("state.json", "plugin.safetensors", "optimizer.safetensors"))
    try:
        state = json.loads((ckpt / "state.json").read_text())
        int(state["step"])
        return state
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DamagedFile(f"{ckpt / 'state.json'} is damaged (not the JSON a checkpoint writes)") from None


def _resume(out: Path, plugin: Plugin, opt, cfg: TrainConfig, run_fingerprint: dict | None, log,
            main: bool = True, processes: int = 1) -> _State:
    """The state to go on from; `main`: this process may change files (the others only read)."""
    if not main:
        log = lambda *a, **k: None  # noqa: E731  (the main process says it)
    stale = remove_stale_temps(out, CKPT) if out.is_dir() and main else 0
    if stale:
        log(f"[attnlab] removed {stale} half-written checkpoint folder(s) in {out}")
    candidates = [out / CKPT, out / f"{CKPT}.prev", out / f".{CKPT}.old"]  # .old: a crash between two renames
    state = ckpt = None
    for c in candidates:
        if not c.exists():
            continue
        try:
            state, ckpt = _read_checkpoint(c), c
            moments = load_file(str(c / "optimizer.safetensors"))
            weights = load_file(str(c / "plugin.safetensors"))
            best = load_file(str(c / "best.safetensors")) if (c / "best.safetensors").is_file() else None
            break
        except (DamagedFile, OSError, RuntimeError, ValueError) as e:
            log(f"[attnlab] checkpoint {c} is damaged ({' '.join(str(e).split())[:200]}); trying an earlier one")
            state = ckpt = None
    if state is None:
        if any(c.exists() for c in candidates):
            log(f"[attnlab] no usable checkpoint in {out}: starting {plugin.method} from step 0")
        if main and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()  # metrics of a run that never checkpointed
        return _State()
    if int(state.get("processes", 1)) != processes:
        raise ResumeMismatch(f"{ckpt} was written by a run of {state.get('processes', 1)} process(es), this one has "
                             f"{processes} (another global batch: batch_size x grad_accum x processes); resume it "
                             f"with {state.get('processes', 1)}, or delete {out} (or run with --fresh) to start over")
    saved_cfg = {k: v for k, v in state["train"].items() if k not in NEUTRAL}
    now_cfg = {k: v for k, v in asdict(cfg).items() if k not in NEUTRAL}
    defaults = asdict(TrainConfig())  # a key newer than the checkpoint: it was written with the default
    changed = {k: (saved_cfg.get(k, defaults[k]), v) for k, v in now_cfg.items() if saved_cfg.get(k, defaults[k]) != v}
    if changed:
        raise ResumeMismatch(f"{ckpt} was written with other training settings {changed}; delete {out} (or run "
                             f"with --fresh) to start over")
    if "plugin" in state and (state["method"], state["plugin"]) != (plugin.method, _plain(asdict(plugin.config))):
        raise ResumeMismatch(f"{ckpt} was written by '{state['method']}' with options {state['plugin']}, not "
                             f"'{plugin.method}' with {_plain(asdict(plugin.config))}; delete {out} (or run with "
                             f"--fresh) to start over")
    saved_run, now_run = state.get("run"), _plain(run_fingerprint)
    if saved_run is not None or now_run is not None:
        keys = sorted(set(saved_run or {}) | set(now_run or {}))
        differ = [k for k in keys if (saved_run or {}).get(k) != (now_run or {}).get(k)]
        if differ:
            raise ResumeMismatch(f"{ckpt} belongs to a run with another {', '.join(differ)} "
                                 f"({'; '.join(f'{k}: {(saved_run or {}).get(k)} then, {(now_run or {}).get(k)} now' for k in differ)[:300]}); "
                                 f"rerun with --fresh or another out_dir to start over")
    plugin.load_state_dict(weights)
    torch.set_rng_state(moments.pop("__rng__"))
    cuda = sorted(k for k in moments if k.startswith("__cuda_rng_"))
    states = [moments.pop(k) for k in cuda]
    if states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states)
    params = plugin.trainable_parameters()
    for key, v in moments.items():
        name, k = key.split("::")
        p = params[name]
        opt.state[p][k] = v.to(p.device) if k != "step" else v
    step = int(state["step"])
    history = []
    if (out / "metrics.jsonl").exists():
        for i, line in enumerate((out / "metrics.jsonl").read_text(errors="replace").splitlines()):
            if not line.strip():
                continue
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:
                log(f"[attnlab] {out / 'metrics.jsonl'} line {i + 1} is torn; dropped")
        history = [h for h in history if isinstance(h, dict) and h.get("step", 1e18) <= step]
        tmp = out / ".metrics.jsonl.tmp"
        if main:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
            os.replace(tmp, out / "metrics.jsonl")
    log(f"[attnlab] {plugin.method}: resumed from step {step} ({ckpt.name})")
    return _State(step=step, tokens=int(state.get("tokens", history[-1]["tokens"] if history else 0)),
                  elapsed_s=float(state.get("elapsed_s", history[-1]["elapsed_s"] if history else 0.0)),
                  history=history, val_history=state.get("val_history", []), best_val=state.get("best_val"),
                  best_step=state.get("best_step"), bad=int(state.get("bad", 0)), best_state=best,
                  stopped_early=bool(state.get("stopped_early")), resumed_from=step)
