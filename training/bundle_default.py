"""Copy a trained pipeline folder into the package's bundled models (``src/hf_rq/bundled/<name>``).

    python training/bundle_default.py runs/defaults/rq-emoji-64 --name rq-emoji-64 --data_dir ../shared/data/emoji

What is kept: ``model_index.json``, each component's config and weights, the model card (its usage line
rewritten to the bundled name ``hf-rq/<name>``), ``eval_results.json``, the final sample grid, and the data's
attribution and licences. Training state (checkpoints, code cache, logs) stays behind.

Floating-point weights are stored as float16 to keep the repository small to clone; both diffusers and
transformers load them back as float32 (the configs say float32), so nothing changes for users except that
the weights were rounded once. Integer tensors (e.g. CTF's fine-to-coarse table) are kept as they are.

``--sampling_defaults '{"guidance_scale": 2.5, ...}'`` writes those values into the bundled prior's
``generation_config.json`` (what ``pipe(...)`` uses when no sampling argument is given); the values chosen
for the shipped models, and how, are in ``src/hf_rq/bundled/TRAINING.md``.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "hf_rq" / "bundled"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
DATA_NOTICES = ("ATTRIBUTION.txt", "LICENSE-Noto-Emoji-Apache-2.0.txt", "LICENSE-emoji-data-MIT.txt")


def to_float16(src: Path, dst: Path) -> int:
    """Write ``src`` with float tensors as float16; refuses a tensor that float16 cannot hold."""
    tensors = load_file(str(src))
    out = {}
    for key, value in tensors.items():
        if value.is_floating_point():
            if value.abs().max() > torch.finfo(torch.float16).max:
                raise ValueError(f"{src}: '{key}' exceeds the float16 range; keep this model in float32")
            value = value.to(torch.float16)
        out[key] = value.contiguous()
    save_file(out, str(dst), metadata={"format": "pt"})
    return sum(v.numel() for v in out.values())


def set_sampling_defaults(pipeline_dir: Path, values: dict, save: bool = True) -> None:
    """Update the prior's saved generation config; a keyword the pipeline's ``__call__`` does not take, or a value
    a call would refuse, is an error (the same rules as at sampling time, per code depth for RQ)."""
    from transformers import GenerationConfig

    import hf_rq
    from hf_rq.pipeline_utils import unknown_call_keywords
    from hf_rq.sampling_args import validate_generation_config

    pipeline_cls = getattr(hf_rq, json.loads((pipeline_dir / "model_index.json").read_text())["_class_name"])
    unknown = unknown_call_keywords(pipeline_cls, values)
    if unknown:
        raise ValueError(f"--sampling_defaults: {pipeline_cls.__name__} takes no {', '.join(unknown)}")
    prior_dir = pipeline_dir / "transformer"
    config = GenerationConfig.from_pretrained(prior_dir)
    for key, value in values.items():
        setattr(config, key, value)
    depth = json.loads((prior_dir / "config.json").read_text()).get("code_depth")
    validate_generation_config(config, tuple(values), depth)
    if save:
        config.save_pretrained(prior_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline_dir", type=Path, help="output_dir of training/train_prior.py")
    parser.add_argument("--name", required=True, help="bundled name, loaded as hf-rq/<name>")
    parser.add_argument("--data_dir", type=Path, required=True, help="the training data (for its attribution)")
    parser.add_argument("--sampling_defaults", type=json.loads, default=None, metavar="JSON",
                        help="generation-config values to save with the prior (JSON object)")
    args = parser.parse_args(argv)
    if args.sampling_defaults is not None and not isinstance(args.sampling_defaults, dict):
        parser.error("--sampling_defaults must be a JSON object, e.g. '{\"guidance_scale\": 2.5}'")

    index_file = args.pipeline_dir / "model_index.json"
    if not index_file.is_file():
        parser.error(f"{args.pipeline_dir} has no model_index.json: not a pipeline folder")
    if args.sampling_defaults:
        try:  # checked on the source first, so that a bad value leaves the bundled copy as it was
            set_sampling_defaults(args.pipeline_dir, args.sampling_defaults, save=False)
        except (ValueError, TypeError) as exc:
            parser.error(str(exc))
    target = BUNDLED / args.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    index = json.loads(index_file.read_text())
    # Optional components a pipeline was saved without (e.g. a class model's text encoder) are [null, null]: dropped.
    index = {k: v for k, v in index.items() if not (isinstance(v, list) and v[0] is None)}
    (target / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    components = [k for k, v in index.items() if isinstance(v, list)]
    numel = 0
    for component in components:
        (target / component).mkdir()
        for file in sorted((args.pipeline_dir / component).iterdir()):
            if file.name in WEIGHTS:
                numel += to_float16(file, target / component / file.name)
            elif file.suffix == ".json":
                shutil.copy(file, target / component / file.name)
    card = (args.pipeline_dir / "README.md").read_text()
    card = card.replace(f"from_pretrained('{args.pipeline_dir.name}')", f"from_pretrained('hf-rq/{args.name}')")
    (target / "README.md").write_text(card)
    for name in ("eval_results.json",):
        if (args.pipeline_dir / name).is_file():
            shutil.copy(args.pipeline_dir / name, target / name)
    samples = args.pipeline_dir / "validation" / "samples-final.png"
    if samples.is_file():
        shutil.copy(samples, target / "samples.png")
    for name in DATA_NOTICES:
        if (args.data_dir / name).is_file():
            shutil.copy(args.data_dir / name, target / name)
    if args.sampling_defaults:
        set_sampling_defaults(target, args.sampling_defaults)
    print(f"{target}: {len(components)} components, {numel / 1e6:.2f}M values stored as float16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
