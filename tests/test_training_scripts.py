"""The training scripts end to end: README commands, exact resume, a kill during a checkpoint save, 2-process
CPU DDP, NaN guard, configurations that must fail before training, fine-tuning from the Hub, push_to_hub.

Most runs are in-process (``main(argv)``) with tiny models on ``fixtures/images``; only the kill test and the
DDP test start processes (about 10 s of start-up each).
"""

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_rq import RQTransformerPipeline, RQVAEModel
from hf_rq.training import DataConfigError, LPIPS
from hf_rq.training.priors import PriorConfigError

REPO = Path(__file__).resolve().parents[1]
IMAGES = Path(__file__).parent / "fixtures" / "images"
CONFIGS = REPO / "training" / "configs"
TINY_TOKENIZER = str(CONFIGS / "rqvae_tiny.json")
TINY_PRIOR = str(CONFIGS / "rqtransformer_tiny.json")
TINY = {"rqvae": TINY_TOKENIZER, "llamagen-vq": str(CONFIGS / "llamagen_vq_tiny.json"), "rq": TINY_PRIOR,
        "llamagen": str(CONFIGS / "llamagen_gpt_tiny.json"), "ctf": str(CONFIGS / "ctf_tiny.json"),
        "dqvae": str(CONFIGS / "dqvae_tiny.json"), "dq": str(CONFIGS / "dqtransformer_tiny.json")}

# Appended to every README command (argparse: the last occurrence wins): tiny sizes, test images.
SMALL = ["--train_data_dir", str(IMAGES), "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "2",
         "--checkpointing_steps", "1", "--validation_steps", "2", "--num_validation_images", "2"]
SMALL_TOKENIZER = ["--disc_start", "1"]
SMALL_PRIOR = ["--lr_warmup_steps", "1", "--cache_batch_size", "8"]



@pytest.fixture(scope="module")
def scripts(repo_script):
    return {name: repo_script(f"training/{name}.py") for name in ("train_tokenizer", "train_prior")}


def readme_commands():
    """Shell commands of the ```bash blocks of training/README.md (continuation lines joined)."""
    text = (REPO / "training" / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def split_command(argv):
    """-> (program, args): 'train_tokenizer' / 'train_prior' / 'lpips', dropping env vars and launchers."""
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
        argv = argv[1:]
    if argv[:2] == ["python", "-m"]:
        assert argv[2] == "hf_rq.training.lpips", argv
        return "lpips", argv[3:]
    if argv[0] == "accelerate":
        script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        argv = ["python", *argv[script:]]
    assert argv[0] == "python" and argv[1].startswith("training/"), argv
    return Path(argv[1]).stem, argv[2:]


def random_lpips_sources(folder):
    """Stand-ins for torchvision's vgg16 file and the lpips package's vgg.pth (random weights, same layout)."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in LPIPS().state_dict().items()}
    torch.save({k.removeprefix("vgg."): v for k, v in sd.items() if k.startswith("vgg.")}, folder / "vgg16-397923af.pth")
    torch.save({k: v.abs() for k, v in sd.items() if k.startswith("lin")}, folder / "vgg.pth")


@pytest.fixture(scope="module")
def readme_runs(scripts, tmp_path_factory):
    """Execute every command of training/README.md in order, in a scratch folder that has ``training/``."""
    from test_training_components import _fake_hub
    from hf_rq.training import lpips as lpips_module

    work = tmp_path_factory.mktemp("readme")
    os.symlink(REPO / "training", work / "training")
    random_lpips_sources(work)
    cwd = os.getcwd()
    os.chdir(work)
    ran = []
    try:
        for argv in readme_commands():
            program, args = split_command(argv)
            if program == "lpips":
                lpips_module.main(args)
            else:
                extra = SMALL + (SMALL_TOKENIZER if program == "train_tokenizer" else SMALL_PRIOR)
                if "--model_config" in args:
                    extra += ["--model_config", TINY[args[args.index("--model") + 1]]]
                with _fake_hub():
                    scripts[program].main(args + extra)
            ran.append((program, args))
    finally:
        os.chdir(cwd)
    return work, ran


def test_readme_commands(readme_runs):
    work, ran = readme_runs
    assert [p for p, _ in ran].count("train_tokenizer") >= 4 and [p for p, _ in ran].count("train_prior") >= 4
    runs = work / "runs"
    tokenizer = RQVAEModel.from_pretrained(runs / "rqvae-emoji64")
    assert (runs / "rqvae-emoji64" / "validation" / "reconstructions-final.png").is_file()
    assert list((runs / "rqvae-emoji64" / "logs" / "train_tokenizer").glob("events.out.tfevents.*"))
    metrics = json.loads((runs / "rqvae-emoji64" / "eval_results.json").read_text())
    assert metrics["val_num_images"] == 2 and metrics["val_psnr"] > 0
    lpips_run = runs / "rqvae-emoji64-lpips"
    assert "--lpips_weights lpips_vgg16.safetensors" in (lpips_run / "README.md").read_text()
    pipe = RQTransformerPipeline.from_pretrained(runs / "rq-emoji64")
    assert pipe.id2label == {0: "animals_nature", 1: "smileys_emotion"}
    assert pipe.transformer.config.use_null_class and pipe.transformer.config.class_dropout_prob == 0.1
    out = pipe(class_labels=["smileys_emotion", 0], guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (2, 16, 16, 3)
    assert torch.equal(pipe.vqvae.quantizer.codebooks[0].weight, tokenizer.quantizer.codebooks[0].weight)
    assert list((runs / "rq-emoji64" / "code_cache").glob("codes-*/hf_rq_code_cache.json"))
    # fine-tuned runs start from the pretrained weights
    assert RQTransformerPipeline.from_pretrained(runs / "rq-emoji64-finetuned").id2label == pipe.id2label
    assert RQVAEModel.from_pretrained(runs / "rqvae-digits64").config.codebook_size == 32
    # pushed to the (fake, offline) Hub with an hf_rq model card
    hub = RQTransformerPipeline.from_pretrained("your-name/rq-emoji64")
    assert hub.id2label == pipe.id2label
    from huggingface_hub import ModelCard, try_to_load_from_cache

    card = ModelCard.load(try_to_load_from_cache("your-name/rq-emoji64", "README.md"))
    assert card.data.library_name == "hf_rq" and "animals_nature" in card.text
    assert try_to_load_from_cache("your-name/rq-emoji64", "checkpoints/latest") is None
    # the CTF family: LlamaGen tokenizer, CTF prior (with its clustering) and the LlamaGen GPT baseline
    from hf_rq import CTFPipeline, LlamaGenPipeline

    ctf = CTFPipeline.from_pretrained(runs / "ctf-emoji64")
    assert ctf.transformer.has_coarse_labels and ctf.transformer.config.num_clusters == 4
    ctf.transformer.check_tokenizer(ctf.vqvae)
    llamagen = LlamaGenPipeline.from_pretrained(runs / "llamagen-emoji64")
    # the DQ family: the tiny DQ-VAE has a feature router (budget loss); the prior samples codes + granularity
    from hf_rq import DQTransformerPipeline

    dq = DQTransformerPipeline.from_pretrained(runs / "dq-emoji64")
    assert dq.transformer.config.codebook_size == 32 and dq.vqvae.config.router_type == "feature"
    assert dq.transformer.config.use_null_class and dq.transformer.config.class_dropout_prob == 0.1  # for guidance
    for p in (ctf, llamagen, dq):
        p.set_progress_bar_config(disable=True)
        images = p(class_labels=["animals_nature"], generator=torch.Generator().manual_seed(0), output_type="np").images
        assert images.shape == (1, 16, 16, 3)
    guided = dq(class_labels=["animals_nature"], guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                output_type="np").images
    assert guided.shape == (1, 16, 16, 3)


def tokenizer_args(out, steps=6, extra=()):
    return ["--model", "rqvae", "--model_config", TINY_TOKENIZER, "--train_data_dir", str(IMAGES), "--resolution", "16",
            "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_train_steps", str(steps),
            "--perceptual_weight", "0", "--disc_start", "1", "--use_ema", "--random_flip", "--no-center_crop",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--learning_rate", "1e-3", "--checkpointing_steps", "3",
            "--validation_steps", "100", "--report_to", "none", "--output_dir", str(out), *extra]


class Interrupt(Exception):
    pass


def run_interrupted(script, argv, at_step):
    """Run ``script.main(argv)`` and stop it right after the checkpoint of step ``at_step`` is written."""
    original = script.save_checkpoint

    def save_then_stop(accelerator, output_dir, state, limit):
        path = original(accelerator, output_dir, state, limit)
        if state.step == at_step:
            raise Interrupt
        return path

    script.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Interrupt):
            script.main(argv)
    finally:
        script.save_checkpoint = original


def assert_same_weights(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    diff = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"weights differ: {diff}"


def test_tokenizer_exact_resume(scripts, tmp_path):
    """Interrupted at step 3 and resumed == uninterrupted at step 6 (mid-epoch, accumulation, GAN, EMA, flips)."""
    tt = scripts["train_tokenizer"]
    tt.main(tokenizer_args(tmp_path / "straight"))
    run_interrupted(tt, tokenizer_args(tmp_path / "resumed"), at_step=3)
    assert not (tmp_path / "resumed" / "config.json").exists()
    tt.main(tokenizer_args(tmp_path / "resumed", extra=["--resume_from_checkpoint", "latest"]))
    assert_same_weights(tmp_path / "straight" / "diffusion_pytorch_model.safetensors",
                        tmp_path / "resumed" / "diffusion_pytorch_model.safetensors")
    for name in ("model.safetensors", "model_1.safetensors"):  # raw (non-EMA) weights and the discriminator
        assert_same_weights(tmp_path / "straight" / "checkpoints" / "checkpoint-6" / name,
                            tmp_path / "resumed" / "checkpoints" / "checkpoint-6" / name)


def prior_args(tokenizer, out, steps=4, extra=()):
    return ["--model", "rq", "--tokenizer_name_or_path", str(tokenizer), "--model_config", TINY_PRIOR,
            "--train_data_dir", str(IMAGES), "--resolution", "16", "--train_batch_size", "2", "--random_flip",
            "--max_train_steps", str(steps), "--lr_warmup_steps", "1", "--checkpointing_steps", "2", "--use_ema",
            "--validation_steps", "100", "--num_validation_images", "2", "--report_to", "none",
            "--code_cache_dir", str(Path(out).parent / "cache"), "--output_dir", str(out), *extra]


def test_prior_exact_resume(scripts, readme_runs, tmp_path):
    """Stochastic codes, soft labels and class dropout draw the same numbers after a resume."""
    tp = scripts["train_prior"]
    tokenizer = readme_runs[0] / "runs" / "rqvae-emoji64"
    tp.main(prior_args(tokenizer, tmp_path / "straight"))
    run_interrupted(tp, prior_args(tokenizer, tmp_path / "resumed"), at_step=2)
    tp.main(prior_args(tokenizer, tmp_path / "resumed", extra=["--resume_from_checkpoint", "latest"]))
    assert_same_weights(tmp_path / "straight" / "transformer" / "model.safetensors",
                        tmp_path / "resumed" / "transformer" / "model.safetensors")


KILLER = """
import os, runpy, signal, sys, torch
torch.set_num_threads(int(sys.argv[1]))
real_save = torch.save
def save(obj, f, *args, **kwargs):  # SIGKILL in the middle of writing checkpoint-2 (model written, optimizer not)
    if ".tmp-checkpoint-2" in str(f) and "optimizer" in os.path.basename(str(f)):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = ["train_tokenizer.py", *sys.argv[2:]]
runpy.run_path(os.path.join("training", "train_tokenizer.py"), run_name="__main__")
"""


def test_kill_during_checkpoint_save(scripts, tmp_path):
    """A process killed while writing a checkpoint leaves the previous one intact, loadable and `latest`."""
    from hf_rq.training import latest_checkpoint

    args = tokenizer_args(tmp_path / "killed", steps=3, extra=["--checkpointing_steps", "1"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(torch.get_num_threads()), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = tmp_path / "killed" / "checkpoints"
    partial = root / ".tmp-checkpoint-2"
    assert (partial / "model.safetensors").is_file() and not (partial / "optimizer.bin").exists()
    assert not (root / "checkpoint-2").exists()
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-1"
    assert (root / "latest").read_text().strip() == "checkpoint-1"
    # resuming from it reproduces the uninterrupted run
    tt = scripts["train_tokenizer"]
    tt.main(args + ["--resume_from_checkpoint", "latest"])
    assert not partial.exists()
    tt.main(tokenizer_args(tmp_path / "straight", steps=3, extra=["--checkpointing_steps", "1"]))
    assert_same_weights(tmp_path / "straight" / "diffusion_pytorch_model.safetensors",
                        tmp_path / "killed" / "diffusion_pytorch_model.safetensors")


def test_two_process_cpu_ddp(tmp_path):
    """Real data parallelism (gloo): the ranks train on different images and end with identical weights."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "training/train_tokenizer.py", *tokenizer_args(out, steps=2, extra=["--write_rank_report"])]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank_report_{r}.json").read_text()) for r in (0, 1)]
    assert all(r["num_processes"] == 2 for r in reports)
    # 2 steps x 2 micro-batches x 2 images = 8 images per rank; an epoch gives each rank 4 of the 8 images
    assert [len(r["indices"]) for r in reports] == [8, 8]
    for epoch in (0, 1):
        seen = [set(r["indices"][4 * epoch:4 * epoch + 4]) for r in reports]
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(8)), (epoch, seen)
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"]
    assert (out / "diffusion_pytorch_model.safetensors").is_file()


def test_bf16_mixed_precision(scripts, readme_runs, tmp_path):
    """Autocast + Accelerate's fp32 output conversion (which rebuilds the model outputs) on both scripts."""
    scripts["train_tokenizer"].main(tokenizer_args(tmp_path / "tok", steps=2, extra=["--mixed_precision", "bf16"]))
    assert (tmp_path / "tok" / "diffusion_pytorch_model.safetensors").is_file()
    scripts["train_prior"].main(prior_args(readme_runs[0] / "runs" / "rqvae-emoji64", tmp_path / "prior", steps=2,
                                           extra=["--mixed_precision", "bf16"]))
    assert (tmp_path / "prior" / "model_index.json").is_file()


def test_nan_guard_stops_or_skips(scripts, tmp_path, monkeypatch):
    tt = scripts["train_tokenizer"]
    calls = {"n": 0}
    forward = RQVAEModel.forward

    def poisoned(self, sample, return_dict=True):
        out = forward(self, sample, return_dict)
        calls["n"] += 1
        if self.training and calls["n"] == 3:  # micro-batch 3 = step 2 (two micro-batches per step)
            out.sample = out.sample * float("nan")
        return out

    monkeypatch.setattr(RQVAEModel, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"step 2: term\(s\) 'reconstruction'"):
        tt.main(tokenizer_args(tmp_path / "stop", steps=3))
    assert not (tmp_path / "stop" / "config.json").exists()
    calls["n"] = 0
    tt.main(tokenizer_args(tmp_path / "skip", steps=3, extra=["--max_nan_skips", "1"]))
    weights = load_file(str(tmp_path / "skip" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_bad_configuration_fails_before_training(scripts, readme_runs, tmp_path):
    tt, tp = scripts["train_tokenizer"], scripts["train_prior"]
    runs = readme_runs[0] / "runs"
    with pytest.raises(DataConfigError, match="--resolution 15 is not divisible by the downsampling factor 2"):
        tt.main(tokenizer_args(tmp_path / "a", extra=["--resolution", "15"]))
    with pytest.raises(DataConfigError, match="--label_column 'category' is not a column"):
        tp.main(prior_args(runs / "rqvae-emoji64", tmp_path / "b", extra=["--label_column", "category"]))
    with pytest.raises(ValueError, match="keys that RQVAEModel does not take: \\['channels'\\]"):
        tt.main(tokenizer_args(tmp_path / "a", extra=["--model_config", '{"channels": 64}']))
    empty = tmp_path / "empty" / "train" / "cats"
    empty.mkdir(parents=True)
    with pytest.raises(DataConfigError, match="no images"):
        tt.main(tokenizer_args(tmp_path / "c", extra=["--train_data_dir", str(tmp_path / "empty")]))
    clash = json.dumps({"hidden_size": 32, "num_spatial_layers": 1, "num_depth_layers": 1, "num_attention_heads": 2,
                        "codebook_size": 64})
    with pytest.raises(PriorConfigError, match="codebook_size=64 \\(tokenizer/data: 32\\)"):
        tp.main(prior_args(runs / "rqvae-emoji64", tmp_path / "d", extra=["--model_config", clash]))
    # a pretrained prior with another tokenizer: its vocabulary (codebook copy) does not match
    with pytest.raises(PriorConfigError, match="vocabulary does not match the tokenizer"):
        tp.main(["--model", "rq", "--pretrained_model_name_or_path", str(runs / "rq-emoji64"),
                 "--tokenizer_name_or_path", str(runs / "rqvae-digits64"), "--train_data_dir", str(IMAGES),
                 "--resolution", "16", "--output_dir", str(tmp_path / "e"), "--report_to", "none"])
    with pytest.raises(PriorConfigError, match="class-conditional \\(2 classes\\) but the dataset has no labels"):
        tp.main(["--model", "rq", "--pretrained_model_name_or_path", str(runs / "rq-emoji64"), "--unconditional",
                 "--train_data_dir", str(IMAGES), "--resolution", "16", "--output_dir", str(tmp_path / "f"),
                 "--report_to", "none"])
    with pytest.raises(SystemExit):
        tt.main(["--model", "rqvae", "--train_data_dir", str(IMAGES), "--output_dir", str(tmp_path / "g")])
    lg = ["--tokenizer_name_or_path", str(runs / "llamagen-vq-emoji64"), "--train_data_dir", str(IMAGES),
          "--resolution", "16", "--report_to", "none"]
    with pytest.raises(PriorConfigError, match="num_clusters \\(100\\) is larger than the codebook \\(64 codes\\)"):
        tp.main(["--model", "ctf", "--model_config", TINY["ctf"], "--num_clusters", "100", *lg,
                 "--output_dir", str(tmp_path / "h")])
    with pytest.raises(PriorConfigError, match="class-conditional only"):
        tp.main(["--model", "llamagen", "--model_config", TINY["llamagen"], "--unconditional", *lg,
                 "--output_dir", str(tmp_path / "i")])
    with pytest.raises(PriorConfigError, match="needs a LlamaGenVQModel tokenizer: .*holds a RQVAEModel"):
        tp.main(["--model", "ctf", "--pretrained_model_name_or_path", str(runs / "ctf-emoji64"),
                 "--tokenizer_name_or_path", str(runs / "rqvae-emoji64"), *lg[2:], "--output_dir", str(tmp_path / "j")])
    for d in "abcdefghij":
        assert not (tmp_path / d / "checkpoints").exists()


def test_fine_tune_tokenizer_from_hub_id(scripts, readme_runs, tmp_path):
    from hub_utils import put_in_hub_cache

    put_in_hub_cache(readme_runs[0] / "runs" / "rq-emoji64", "someone/rq-emoji-pipeline")
    start = RQVAEModel.from_pretrained("someone/rq-emoji-pipeline", subfolder="vqvae")
    scripts["train_tokenizer"].main([
        "--model", "rqvae", "--pretrained_model_name_or_path", "someone/rq-emoji-pipeline", "--train_data_dir",
        str(IMAGES), "--resolution", "16", "--train_batch_size", "4", "--max_train_steps", "1", "--learning_rate", "1e-6",
        "--perceptual_weight", "0", "--disc_weight", "0", "--report_to", "none", "--output_dir", str(tmp_path / "ft")])
    tuned = RQVAEModel.from_pretrained(tmp_path / "ft")
    w0, w1 = start.decoder.conv_out.weight, tuned.decoder.conv_out.weight
    assert not torch.equal(w0, w1) and (w0 - w1).abs().max() < 1e-4  # one tiny step away from the pretrained weights


def encoder_side(model, decoder_modules):
    return {k: v for k, v in model.state_dict().items() if k.split(".")[0] not in decoder_modules}


def test_train_decoder_only_keeps_the_codes(scripts, readme_runs, tmp_path):
    """Decoder-only fine-tuning leaves every encoder-side tensor and every code as it was: the tiny DQ-VAE has a
    feature router (its gate is sampled in train mode), the RQ-VAE an EMA codebook with restarts."""
    from hf_rq import DQVAEModel
    from hf_rq.training import TOKENIZERS

    tt, runs = scripts["train_tokenizer"], readme_runs[0] / "runs"
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    base = ["--train_data_dir", str(IMAGES), "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "2",
            "--learning_rate", "1e-2", "--perceptual_weight", "0", "--disc_start", "1", "--report_to", "none",
            "--validation_steps", "2", "--num_validation_images", "2", "--train_decoder_only"]
    # the README's command (runs/dq-emoji64 is a pipeline: its tokenizer is used), and a wider decoder
    wider = tmp_path / "dq-wider"
    tt.main(["--model", "dqvae", "--pretrained_model_name_or_path", str(runs / "dq-emoji64"), *base,
             "--model_config", '{"decoder_block_out_channels": [16, 32]}', "--output_dir", str(wider)])
    rq_out = tmp_path / "rq-decoder"
    tt.main(["--model", "rqvae", "--pretrained_model_name_or_path", str(runs / "rqvae-emoji64"), *base,
             "--output_dir", str(rq_out)])
    cases = [("dqvae", DQVAEModel.from_pretrained(runs / "dq-emoji64", subfolder="vqvae"), runs / "dqvae-emoji64-decoder"),
             ("dqvae", DQVAEModel.from_pretrained(runs / "dq-emoji64", subfolder="vqvae"), wider),
             ("rqvae", RQVAEModel.from_pretrained(runs / "rqvae-emoji64"), rq_out)]
    for family, before, folder in cases:
        after = type(before).from_pretrained(folder).eval()
        before.eval()
        modules = TOKENIZERS[family].decoder_modules
        mine, theirs = encoder_side(after, modules), encoder_side(before, modules)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), folder
        with torch.no_grad():
            out_before, out_after = before(images), after(images)
        assert torch.equal(out_before.codes, out_after.codes), folder
        assert not torch.allclose(out_before.sample, out_after.sample), folder  # the decoder did train
    assert DQVAEModel.from_pretrained(wider).config.decoder_block_out_channels == [16, 32]
    with pytest.raises(ValueError, match="may only change the decoder.*got \\['block_out_channels'\\]"):
        tt.main(["--model", "rqvae", "--pretrained_model_name_or_path", str(runs / "rqvae-emoji64"), *base,
                 "--model_config", '{"block_out_channels": [8, 8]}', "--output_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit):  # nothing to keep the codes of
        tt.main(["--model", "rqvae", "--model_config", TINY_TOKENIZER, *base, "--output_dir", str(tmp_path / "y")])
    assert not (tmp_path / "x" / "checkpoints").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------- captions
def caption_folder(tmp_path):
    """fixtures/images with captions, through training/make_caption_metadata.py (as the emoji default is made)."""
    spec = importlib.util.spec_from_file_location("make_caption_metadata", REPO / "training" / "make_caption_metadata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = ["file_name,split,label,caption,text"]
    for i, path in enumerate(sorted(IMAGES.glob("*/*/*.png"))):
        rel = path.relative_to(IMAGES)
        rows.append(f"{rel.as_posix()},{rel.parts[0]},{rel.parts[1]},\"{rel.parts[1].split('_')[0]} number {i}\",{path.stem}")
    (tmp_path / "annotations.csv").write_text("\n".join(rows) + "\n")
    module.main(["--data_dir", str(IMAGES), "--annotations", str(tmp_path / "annotations.csv"),
                 "--output_dir", str(tmp_path / "captioned")])
    return tmp_path / "captioned"


def caption_args(tokenizer, data, out, extra=()):
    return ["--model", "rq", "--tokenizer_name_or_path", str(tokenizer), "--model_config", TINY_PRIOR,
            "--train_data_dir", str(data), "--caption_column", "caption", "--text_vocab_size", "40", "--text_length", "6",
            "--text_dropout_prob", "0.5", "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "2",
            "--lr_warmup_steps", "1", "--checkpointing_steps", "2", "--validation_steps", "100",
            "--num_validation_images", "2", "--report_to", "none", "--code_cache_dir", str(Path(out).parent / "cache"),
            "--output_dir", str(out), *extra]


def test_text_to_image_prior_training(scripts, tmp_path):
    from evaluation_utils import tiny_rqvae

    tp = scripts["train_prior"]
    data = caption_folder(tmp_path)
    assert (data / "train" / "metadata.jsonl").is_file() and (data / "test" / "metadata.jsonl").is_file()
    tiny_rqvae(sample_size=16).save_pretrained(tmp_path / "tok")
    tp.main(caption_args(tmp_path / "tok", data, tmp_path / "t2i"))
    pipe = RQTransformerPipeline.from_pretrained(tmp_path / "t2i")
    c = pipe.transformer.config
    assert (c.text_length, c.num_classes, c.use_null_text, c.text_dropout_prob) == (6, 0, True, 0.5)
    assert c.text_vocab_size == len(pipe.tokenizer) and c.text_pad_token_id == pipe.tokenizer.pad_token_id == 0
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt="animals number 1", guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    assert "prompt=" in (tmp_path / "t2i" / "README.md").read_text()
    # Other captions, same images: the code cache is reused (captions are joined on the row index, not cached).
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir())
    tp.main(caption_args(tmp_path / "tok", data, tmp_path / "t2i-text", extra=["--caption_column", "text"]))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == caches
    # Fine-tuning the text pipeline reuses its tokenizer.
    tp.main(caption_args(tmp_path / "tok", data, tmp_path / "ft", extra=["--pretrained_model_name_or_path",
                                                                           str(tmp_path / "t2i")]))
    assert RQTransformerPipeline.from_pretrained(tmp_path / "ft").tokenizer.get_vocab() == pipe.tokenizer.get_vocab()


def test_text_to_image_bad_configuration(scripts, tmp_path):
    tp = scripts["train_prior"]
    with pytest.raises(DataConfigError, match="--caption_column 'nope'"):
        tp.main(caption_args(tmp_path / "tok", IMAGES, tmp_path / "x", extra=["--caption_column", "nope"]))
    with pytest.raises(SystemExit):  # the DQ prior has no text-conditional form
        tp.main(caption_args(tmp_path / "tok", IMAGES, tmp_path / "x", extra=["--model", "dq"]))
