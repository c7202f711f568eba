"""Sharded training: FSDP on CPU (gloo) against DDP, FSDP resume, the shipped Accelerate / DeepSpeed configs.

FSDP on CPU: the installed torch (2.13) runs FSDP2 (``fully_shard``) on CPU tensors with gloo, but Accelerate
(1.15, ``AcceleratorState``) switches to FSDP only for GPU-type distributed types, so a CPU launch with an FSDP
config would silently train as DDP. The scripts refuse that (``ParallelismConfigError``, tested below), and the
FSDP run here goes through ``FSDP_ON_CPU``, a launcher shim that lifts only that gate; everything else (auto-wrap
on the block class, sharded DCP checkpoints, gathering the final model) is Accelerate's and the script's own.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "accelerate_configs"
IMAGES = Path(__file__).parent / "fixtures" / "images"

FSDP_ON_CPU = """
import os, runpy, sys
import accelerate.state as state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

init = state.AcceleratorState.__init__

def init_with_fsdp_on_cpu(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        state.PartialState().distributed_type = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

state.AcceleratorState.__init__ = init_with_fsdp_on_cpu
# Runs separated by "::" go one after the other in the same processes (one launch, half the start-up time);
# each is a fresh main(): new model, optimizer and Accelerator, restored from disk when resuming.
args, runs = sys.argv[1:], [[]]
for a in args:
    runs.append([]) if a == "::" else runs[-1].append(a)
import torch.distributed as dist
destroy = dist.destroy_process_group
for i, run in enumerate(runs):
    # end_training() closes the process group; keep it open for the next run (re-creating it can hang).
    dist.destroy_process_group = destroy if i == len(runs) - 1 else (lambda *a, **k: None)
    sys.argv = ["train_prior.py", *run]
    runpy.run_path(os.path.join("training", "train_prior.py"), run_name="__main__")
"""


def _fsdp_on_cpu_unavailable() -> str | None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with gloo is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from hf_rq import RQVAEModel

    torch.manual_seed(0)
    config = json.loads((REPO / "training" / "configs" / "rqvae_tiny.json").read_text())
    path = tmp_path_factory.mktemp("tok") / "rqvae"
    RQVAEModel(**config, sample_size=16).save_pretrained(path)
    return path


def prior_args(tokenizer, out, steps, extra=()):
    # A constant schedule, so that 2 steps + a resume to 4 is the same run as 4 steps straight.
    return ["--model", "rq", "--tokenizer_name_or_path", str(tokenizer),
            "--model_config", str(REPO / "training" / "configs" / "rqtransformer_tiny.json"),
            "--train_data_dir", str(IMAGES), "--resolution", "16", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--checkpointing_steps", "2", "--validation_steps", "100", "--num_validation_images", "0",
            "--report_to", "none", "--mixed_precision", "no", "--code_cache_dir", str(Path(out).parent / "cache"),
            "--output_dir", str(out), *extra]


def launch(program, args, config=None, timeout=400):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--config_file", str(config)] if config else ["--multi_gpu"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + [str(program), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_fsdp_matches_ddp_and_resumes(tokenizer_dir, tmp_path):
    """2-process FSDP (full shard, GPTBlock auto-wrap) on CPU: 2 steps, resume from the sharded checkpoint to
    step 4; the final weights and validation loss equal 4 steps of 2-process DDP, and the folder loads."""
    reason = _fsdp_on_cpu_unavailable()
    if reason:
        pytest.skip(reason)
    from hf_rq import RQTransformerPipeline

    shim = tmp_path / "fsdp_on_cpu.py"
    shim.write_text(FSDP_ON_CPU)
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    config = CONFIGS / "fsdp_gpt_blocks.yaml"
    proc = launch(shim, prior_args(tokenizer_dir, fsdp, 2) + ["::"]
                  + prior_args(tokenizer_dir, fsdp, 4, ["--resume_from_checkpoint", "latest"]), config)
    assert "resuming from" in proc.stdout + proc.stderr
    checkpoint = fsdp / "checkpoints" / "checkpoint-2"
    # Accelerate's sharded FSDP format: one torch.distributed.checkpoint file per rank, model and optimizer.
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model.safetensors").exists()
    assert (fsdp / "checkpoints" / "latest").read_text().strip() == "checkpoint-4"
    launch(REPO / "training" / "train_prior.py", prior_args(tokenizer_dir, ddp, 4))

    a = load_file(str(fsdp / "transformer" / "model.safetensors"))
    b = load_file(str(ddp / "transformer" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # the same math; only the order of the gradient reductions differs
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    loss = [json.loads((run / "eval_results.json").read_text())["val_loss"] for run in (fsdp, ddp)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5, abs=1e-6)

    pipe = RQTransformerPipeline.from_pretrained(fsdp)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_fsdp_request_that_accelerate_ignores_is_refused(tokenizer_dir, tmp_path, monkeypatch):
    """An FSDP launch where Accelerate sets up no FSDP (here: on CPU) stops instead of training unsharded."""
    import importlib.util

    from hf_rq.training import ParallelismConfigError

    spec = importlib.util.spec_from_file_location("_train_prior_sharded", REPO / "training" / "train_prior.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ParallelismConfigError, match=r"asked for FSDP .* but Accelerate set up NO \(1 process\(es\) on cpu\)"):
        script.main(prior_args(tokenizer_dir, tmp_path / "out", 1))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_use_ema_with_fsdp_is_refused():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hf_rq.training import ParallelismConfigError, check_parallelism

    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(ParallelismConfigError, match="--use_ema is not supported with fsdp"):
        check_parallelism(accelerator, SimpleNamespace(use_ema=True))
    with pytest.raises(ParallelismConfigError, match="plain data parallelism only, got fsdp"):
        check_parallelism(accelerator, SimpleNamespace(use_ema=False), allow_sharding=False)
    check_parallelism(accelerator, SimpleNamespace(use_ema=False))


# ------------------------------------------------------------------------------------------ config files
def _load_accelerate_config(path):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


@pytest.mark.parametrize("name, block", [("fsdp_gpt_blocks", "GPTBlock"), ("fsdp_llamagen_blocks", "LlamaGenBlock")])
def test_fsdp_configs_wrap_each_familys_block(name, block):
    """Accelerate reads the file; the plugin it builds from it wraps exactly the blocks of those families."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    config = _load_accelerate_config(CONFIGS / f"{name}.yaml")
    assert config.distributed_type == "FSDP"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == block
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[fsdp["fsdp_transformer_layer_cls_to_wrap"]],
        state_dict_type=fsdp["fsdp_state_dict_type"], reshard_after_forward=fsdp["fsdp_reshard_after_forward"])
    assert plugin.transformer_cls_names_to_wrap == [block]
    # the class names exist and are the repeated block of the families that the file is for
    from hf_rq.ctf.llamagen import LlamaGenPreTrainedModel
    from hf_rq.dq.prior import DQTransformerPreTrainedModel
    from hf_rq.rq.prior import RQTransformerPreTrainedModel

    families = {"GPTBlock": (RQTransformerPreTrainedModel, DQTransformerPreTrainedModel),
                "LlamaGenBlock": (LlamaGenPreTrainedModel,)}[block]
    assert all(cls._no_split_modules == [block] for cls in families)


def test_ddp_config():
    config = _load_accelerate_config(CONFIGS / "ddp.yaml")
    assert config.distributed_type == "MULTI_GPU" and config.num_processes > 1


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_builds_the_accelerate_plugin(stage):
    """The YAML Accelerate reads, the JSON it points to, and the `DeepSpeedPlugin` built from it with every
    "auto" filled as `Accelerator.prepare` fills it; DeepSpeed's own config parser too when it is installed."""
    from accelerate.utils import DeepSpeedPlugin

    config = _load_accelerate_config(CONFIGS / f"deepspeed_zero{stage}.yaml")
    assert config.distributed_type == "DEEPSPEED"
    json_path = REPO / config.deepspeed_config["deepspeed_config_file"]
    assert json_path == CONFIGS / f"zero{stage}.json" and json_path.is_file()
    ds = json.loads(json_path.read_text())
    assert ds["zero_optimization"]["stage"] == stage
    if stage == 3:  # the final save_pretrained folder needs the gathered 16-bit weights
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    plugin = DeepSpeedPlugin(hf_ds_config=str(json_path), zero3_init_flag=config.deepspeed_config["zero3_init_flag"])
    assert plugin.zero_stage == stage
    plugin.set_mixed_precision("bf16")
    # what Accelerator._prepare_deepspeed does with the script's batch size and accumulation (8 GPUs)
    plugin.deepspeed_config_process(must_match=True, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2,
                                    train_batch_size=4 * 2 * 8)
    filled = plugin.deepspeed_config
    assert "auto" not in json.dumps(filled), filled
    assert filled["bf16"]["enabled"] is True and filled["train_batch_size"] == 64
    assert filled["gradient_clipping"] == 1.0  # = train_prior.py's default --max_grad_norm (checked at start-up)
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        return  # the optional extra is not installed: the checks above are what Accelerate needs
    # DeepSpeed checks the batch arithmetic against the world size, 1 outside a launch
    parsed = DeepSpeedConfig({**filled, "train_batch_size": 4 * 2})
    assert parsed.zero_optimization_stage == stage and parsed.gradient_clipping == 1.0


def test_deepspeed_is_an_optional_extra():
    setup = (REPO / "setup.py").read_text()
    assert '"deepspeed": ["deepspeed' in setup
    install_requires = setup.split("install_requires = [")[1].split("]")[0]
    assert "deepspeed" not in install_requires
