"""The model card (README.md) saved with every plug-in, through huggingface_hub's ModelCard.

It says what the folder holds, in the Hub's format (YAML metadata + Markdown), without a network
call: the method and its options, the base model and its fingerprint hash (the same check
`load_plugin` does), the trainable parameter count, how to load it, and, when the run that produced
it passes them, its data, training settings, metrics and command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CARD_NAME = "README.md"

TEMPLATE = """---
{{ card_data }}
---

# `{{ method }}` plug-in for `{{ base_name }}`

An attnlab plug-in: a small module attached to the frozen base
model `{{ base_name }}`; only its {{ n_trainable }} parameters were trained, the base is unchanged.

| | |
|---|---|
| method | `{{ method }}` (defined in `{{ module }}`) |
| base model | `{{ base_name }}` |
| base fingerprint | `{{ fp_hash }}`: vocabulary {{ base.vocab_size }}, hidden size {{ base.hidden_size }}, embedding sha256 `{{ base.embedding_sha256 }}`, body sha256 `{{ base.body_sha256 }}` |
| trainable parameters | {{ n_trainable }} |
| files | {{ files }} |

## Options

```json
{{ config }}
```
{% if data %}
## Data

```json
{{ data }}
```
{% endif %}{% if training %}
## Training

```json
{{ training }}
```
{% endif %}
## Metrics
{% if metrics %}
| set | metric | value |
|---|---|---:|
{% for row in metrics %}| {{ row[0] }} | {{ row[1] }} | {{ row[2] }} |
{% endfor %}{% else %}
None recorded: this plug-in was saved outside `attnlab run`.
{% endif %}
## Load it

```python
import attnlab

bb = attnlab.load_backbone("{{ base_name }}")
plugin = attnlab.load_plugin(bb.model, "path/to/this/folder")   # refuses a base with another fingerprint
```
{% if peft %}
It is also a PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`):

```python
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/folder")  # base_model: the same base, no plug-in
```
{% endif %}{% if command %}
## Command

```bash
{{ command }}
```
{% endif %}"""


def _hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name or ""))


def _metric_rows(metrics: dict) -> list[tuple[str, str, str]]:
    rows = []
    for set_name, values in (metrics or {}).items():
        for k, v in (values or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            rows.append((set_name, k, f"{v:.4g}" if isinstance(v, float) else str(v)))
    return rows


def write_card(folder: Path, meta: dict, n_trainable: int, card: dict | None = None,
               exported: list[str] | None = None) -> Path:
    """folder/README.md for a plug-in saved with `meta` (method, module, config, base)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .backbone import fingerprint_hash

    card = card or {}
    base = meta["base"]
    peft = "adapter_config.json" in (exported or [])
    tags = ["attnlab", f"attnlab-{meta['method']}"] + (["peft", "lora"] if peft else [])
    data = ModelCardData(library_name="peft" if peft else "attnlab", tags=tags, pipeline_tag="text-generation",
                         base_model=base["model"] if _hub_id(base["model"]) else None)
    show = lambda x: json.dumps(x, indent=2, default=str, sort_keys=True) if x else ""  # noqa: E731
    text = ModelCard.from_template(
        data, template_str=TEMPLATE, method=meta["method"], module=meta.get("module", "?"), base_name=base["model"],
        base=base, fp_hash=fingerprint_hash(base), n_trainable=f"{n_trainable:,}", config=show(meta["config"]),
        files=", ".join(f"`{f}`" for f in sorted(set(exported or []) | {CARD_NAME, "manifest.json"})),
        data=show(card.get("data")), training=show(card.get("training")), metrics=_metric_rows(card.get("metrics")),
        command=card.get("command"), peft=peft)
    path = Path(folder) / CARD_NAME
    text.save(path)
    return path
