"""Model cards for trained hf_rq models and the upload of a finished training run to the Hub."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

# Folders of a training output directory that are not part of the published model.
IGNORE_PATTERNS = ["checkpoints/**", "logs/**", "validation/**", "code_cache/**", "rank_report_*.json", ".*"]

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Usage

```python
{{ usage }}
```

## Training

Trained with hf_rq's `training/{{ script }}`{% if base_model %}, fine-tuned from `{{ base_model }}`{% endif %}, on
{% if dataset_link %}[{{ dataset }}]({{ dataset_link }}){% else %}`{{ dataset }}`{% endif %}.

| setting | value |
|---|---|
{% for k, v in hyperparameters %}| {{ k }} | {{ v }} |
{% endfor %}
{% if metrics %}
## Results

| metric | value |
|---|---|
{% for k, v in metrics %}| {{ k }} | {{ v }} |
{% endfor %}{% endif %}
{% if class_names %}
## Classes

{{ class_names }}
{% endif %}
Command line:

```bash
{{ command }}
```
"""


def _is_hub_dataset(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") <= 1 and not name.startswith((".", "/"))


def _redact(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            out.append("***")
            skip = False
        elif a == "--hub_token":
            out.append(a)
            skip = True
        else:
            out.append("--hub_token=***" if a.startswith("--hub_token=") else a)
    return out


def make_model_card(folder, *, repo_id: str, kind: str, model_class: str, script: str, args, id2label=None,
                    metrics: dict | None = None, usage: str, tags: list[str] | None = None):
    """Write ``README.md`` into ``folder`` (an hf_rq card: ``library_name: hf_rq``) and return the `ModelCard`.

    ``kind``: ``"tokenizer"`` or ``"pipeline"``; ``args``: the parsed training flags (hyperparameters and the
    command line are taken from them).
    """
    from huggingface_hub import ModelCard, ModelCardData

    dataset = args.dataset_name or args.train_data_dir
    hub_dataset = args.dataset_name if _is_hub_dataset(args.dataset_name) else None
    base = args.pretrained_model_name_or_path if _is_hub_dataset(args.pretrained_model_name_or_path) else None
    data = ModelCardData(
        library_name="hf_rq",
        license="apache-2.0",
        pipeline_tag=(("text-to-image" if getattr(args, "caption_column", None) else "unconditional-image-generation")
                      if kind == "pipeline" else None),
        tags=["hf_rq", kind, *(tags or [])],
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=base,
    )
    keys = ["resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
            "lr_warmup_steps", "max_train_steps", "mixed_precision", "use_ema", "seed"]
    hyper = [(k, getattr(args, k)) for k in keys if hasattr(args, k)]
    hyper += [(k, v) for k, v in sorted(getattr(args, "card_extras", {}).items())]
    if kind == "tokenizer":
        what = "image tokenizer (images to discrete codes and back)"
    else:
        condition = (f"text-conditional, captions from column {args.caption_column!r}" if getattr(args, "caption_column", None)
                     else f"class-conditional, {len(id2label)} classes" if id2label else "unconditional")
        what = f"generation pipeline ({condition})"
    summary = f"A `{model_class}` {what} trained with hf_rq."
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id,
        summary=summary,
        usage=usage.strip(),
        script=script,
        base_model=args.pretrained_model_name_or_path,
        dataset=dataset,
        dataset_link=f"https://huggingface.co/datasets/{hub_dataset}" if hub_dataset else None,
        hyperparameters=hyper,
        metrics=sorted((metrics or {}).items()),
        class_names=", ".join(f"{i}: {n}" for i, n in sorted(id2label.items())) if id2label else None,
        command=f"python training/{script} " + " ".join(shlex.quote(a) for a in _redact(getattr(args, "argv", None) or sys.argv[1:])),
    )
    card.save(str(Path(folder) / "README.md"))
    return card


def push_folder_to_hub(folder, repo_id: str, token: str | None = None, private: bool = False,
                       commit_message: str = "Upload model trained with hf_rq") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (without checkpoints and logs). Returns the repo id."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                      ignore_patterns=IGNORE_PATTERNS)
    return repo_id
