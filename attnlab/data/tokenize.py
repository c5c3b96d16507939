"""Records -> token ids with a loss mask on the target (teacher forcing), and batch collation.

QA records use the model's chat template when it has one (user turn = prompt, assistant turn =
target + end-of-turn); otherwise `prompt + "\n" + target + eos`. Prompt and target are tokenized
separately so the mask boundary is exact. Plain-text records are packed into fixed-length blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .records import Record, SkipLog

IGNORE = -100
MIN_TARGET_TOKENS = 4


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]          # IGNORE on prompt and padding, token ids on the target
    prompt_len: int            # the first prompt_len ids are the prompt (what generation starts from)
    answer: str | None = None
    record: Record | None = None

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def prompt_text(tokenizer, prompt: str) -> str:
    """The text the model sees before its answer: the chat template's user turn, or prompt + newline."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n" if prompt else ""


def end_of_target(tokenizer) -> str:
    return tokenizer.eos_token or ""


def encode_qa(records: list[Record], tokenizer, max_length: int, log: SkipLog) -> list[Example]:
    """Tokenize prompt -> target pairs; cut over-long targets, drop those whose prompt leaves no room."""
    out = []
    log.seen += len(records)
    eos = end_of_target(tokenizer)
    for i, rec in enumerate(records):
        p_ids = tokenizer(prompt_text(tokenizer, rec.prompt), add_special_tokens=False)["input_ids"]
        t_ids = tokenizer(rec.target + eos, add_special_tokens=False)["input_ids"]
        if len(p_ids) + MIN_TARGET_TOKENS > max_length:
            log.skip(f"prompt longer than max_length - {MIN_TARGET_TOKENS}", f"record {i}")
            continue
        if len(p_ids) + len(t_ids) > max_length:
            log.truncated += 1
            t_ids = t_ids[: max_length - len(p_ids)]
        out.append(Example(input_ids=p_ids + t_ids, labels=[IGNORE] * len(p_ids) + t_ids,
                           prompt_len=len(p_ids), answer=rec.answer, record=rec))
    log.kept += len(out)
    return out


def encode_lm(records: list[Record], tokenizer, block: int, n_blocks: int) -> tuple[list[Example], int]:
    """Pack documents (joined by eos) into `n_blocks` blocks of `block` tokens; returns the blocks
    and how many documents were consumed, so a second call can start after them (held-out split)."""
    eos_id = tokenizer.eos_token_id
    stream: list[int] = []
    used = 0
    for rec in records:
        if len(stream) >= block * n_blocks:
            break
        stream += tokenizer(rec.target, add_special_tokens=False)["input_ids"] + [eos_id]
        used += 1
    blocks = [stream[i: i + block] for i in range(0, block * n_blocks, block) if len(stream) >= i + block]
    return [Example(input_ids=b, labels=list(b), prompt_len=0) for b in blocks], used


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-padded batch for teacher-forced training and scoring."""
    if not examples:
        raise ValueError("empty batch")
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_prompts(examples: list[Example], pad_id: int) -> dict:
    """Left-padded prompts, the layout batched generation needs."""
    if not examples:
        raise ValueError("empty batch")
    n = max(e.prompt_len for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = e.prompt_len
        ids[i, n - k:] = torch.tensor(e.input_ids[:k])
        mask[i, n - k:] = 1
    return {"input_ids": ids, "attention_mask": mask}
