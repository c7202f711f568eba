"""Gradient checkpointing (``--gradient_checkpointing``): the same loss and gradients as without, per family.

Dropout is on in every model, so the checkpointed recompute must replay the same masks (non-reentrant
``torch.utils.checkpoint`` restores the RNG state). Each test also counts how often a block's MLP runs: twice
per step (forward + recompute) with checkpointing, once without, so a silently disabled checkpoint fails.
The memory it saves is measured by ``benchmarks/bench_training_memory.py``.
"""

import copy

import pytest
import torch

from hf_rq.training import enable_gradient_checkpointing


def _prior_rq():
    from hf_rq.rq.prior import RQTransformerConfig, RQTransformerForImageGeneration

    config = RQTransformerConfig(hidden_size=32, num_spatial_layers=2, num_depth_layers=2, num_attention_heads=2,
                                 codebook_size=16, code_depth=3, grid_height=3, grid_width=3, num_classes=2,
                                 use_null_class=True, class_dropout_prob=0.5, embd_pdrop=0.1, attn_pdrop=0.1,
                                 resid_pdrop=0.1)
    model = RQTransformerForImageGeneration(config)
    codes = torch.randint(0, 16, (3, 3, 3, 3), generator=torch.Generator().manual_seed(1))

    def loss(m):
        return m(codes=codes, class_labels=torch.tensor([0, 1, 0]), labels=codes).loss

    # both stacks: the spatial (body) and the depth (head) transformer
    return model, loss, ["spatial_transformer.blocks.0.mlp", "depth_transformer.blocks.1.mlp"]


def _prior_dq():
    from hf_rq.dq.prior import DQTransformerConfig, DQTransformerForImageGeneration

    config = DQTransformerConfig(codebook_size=16, coarse_grid_size=4, num_classes=2, hidden_size=32,
                                 num_position_layers=2, num_content_layers=2, num_attention_heads=4,
                                 max_position_embeddings=90)
    model = DQTransformerForImageGeneration(config)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (2, 8, 8), generator=g)
    granularity = torch.ones(2, 4, 4, dtype=torch.long)  # all fine: any code grid is consistent with it

    def loss(m):
        return m(codes=codes, granularity=granularity, class_labels=torch.tensor([0, 1])).loss

    return model, loss, ["position_transformer.blocks.0.mlp", "content_transformer.blocks.1.mlp"]


def _prior_llamagen():
    from hf_rq.ctf.llamagen import LlamaGenConfig, LlamaGenForImageGeneration

    config = LlamaGenConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, multiple_of=32, vocab_size=16,
                            num_classes=2, grid_size=4, drop_path_rate=0.1)
    model = LlamaGenForImageGeneration(config)
    codes = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(1))

    def loss(m):
        return m(codes=codes, class_labels=torch.tensor([0, 1, 2]), labels=codes).loss

    return model, loss, ["model.layers.0.mlp", "model.layers.1.mlp"]


def _prior_ctf():
    from hf_rq.ctf.prior import CTFConfig, CTFForImageGeneration

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, multiple_of=32)
    config = CTFConfig(coarse_config=tiny, fine_config=tiny, num_clusters=4, codebook_size=16, codebook_dim=4,
                       num_classes=2, grid_size=4)
    model = CTFForImageGeneration(config)
    model.set_coarse_labels(torch.arange(16) % 4)
    codes = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(1))

    def loss(m):
        return m(codes=codes, class_labels=torch.tensor([0, 1]), labels=codes).loss

    return model, loss, ["coarse_model.model.layers.1.mlp", "fine_model.model.layers.0.mlp"]


def _tokenizer_rqvae():
    from hf_rq import RQVAEModel

    model = RQVAEModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, attn_resolutions=(8,),
                       latent_channels=8, embed_dim=8, codebook_size=16, code_depth=2, norm_num_groups=8)
    return _tokenizer_case(model)


def _tokenizer_llamagen_vq():
    from hf_rq import LlamaGenVQModel

    model = LlamaGenVQModel(block_out_channels=(16, 32), layers_per_block=1, latent_channels=8, embed_dim=8,
                            codebook_size=16, norm_num_groups=8)
    return _tokenizer_case(model)


def _tokenizer_dqvae():
    from hf_rq import DQVAEModel

    model = DQVAEModel(sample_size=16, block_out_channels=(8, 8, 16), layers_per_block=1, attn_resolutions=(8,),
                       decoder_block_out_channels=(8, 8), decoder_layers_per_block=1, decoder_attn_resolutions=(),
                       latent_channels=4, embed_dim=4, codebook_size=8, norm_num_groups=4, router_type="feature",
                       router_norm_num_groups=2)
    return _tokenizer_case(model)


def _tokenizer_case(model):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def loss(m):
        out = m(images)
        extra = out.extra_loss if getattr(out, "extra_loss", None) is not None else 0.0  # DQ's budget loss
        return (out.sample - images).square().mean() + out.commitment_loss + extra

    return model, loss, ["encoder.down_blocks.0.resnets.0", "decoder.up_blocks.0.resnets.0"]


CASES = {"rq": _prior_rq, "dq": _prior_dq, "llamagen": _prior_llamagen, "ctf": _prior_ctf,
         "rqvae": _tokenizer_rqvae, "llamagen-vq": _tokenizer_llamagen_vq, "dqvae": _tokenizer_dqvae}


def _grads(model, loss_fn, probe_names):
    """(loss, {name: grad}, calls of each probe module) of one training step. Pre-hooks: the recompute stops
    early, once the last saved tensor is rebuilt, so a probe's forward may not return the second time."""
    calls = [0] * len(probe_names)
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, n in enumerate(probe_names)]
    torch.manual_seed(123)  # the dropout masks
    loss = loss_fn(model)
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls


@pytest.mark.parametrize("family", sorted(CASES))
def test_same_gradients_with_checkpointing(family):
    torch.manual_seed(0)
    model, loss_fn, probes = CASES[family]()
    model.train()
    checkpointed = copy.deepcopy(model)
    enable_gradient_checkpointing(checkpointed)
    loss0, grads0, calls0 = _grads(model, loss_fn, probes)
    loss1, grads1, calls1 = _grads(checkpointed, loss_fn, probes)
    assert calls0 == [1] * len(probes), calls0
    assert calls1 == [2] * len(probes), f"{family}: the blocks were not recomputed (calls {calls1})"
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads1.keys() == grads0.keys() and len(grads0) > 0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=f"{family}: grad of {name}")


def test_unsupported_model_is_named():
    with pytest.raises(ValueError, match="neither a transformers nor a diffusers model"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_flag_reaches_the_models_in_both_scripts(tmp_path, monkeypatch):
    """``--gradient_checkpointing`` turns checkpointing on for the model each script trains (1 step each)."""
    import importlib.util
    import json
    from pathlib import Path

    from hf_rq import LlamaGenVQModel

    repo = Path(__file__).resolve().parents[1]
    images, configs = repo / "tests" / "fixtures" / "images", repo / "training" / "configs"
    enabled = []

    def load(name):
        spec = importlib.util.spec_from_file_location(f"_gc_{name}", repo / "training" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

        def spy(model):
            enable_gradient_checkpointing(model)
            enabled.append(model)

        monkeypatch.setattr(module, "enable_gradient_checkpointing", spy)
        return module

    common = ["--train_data_dir", str(images), "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "1",
              "--validation_steps", "100", "--num_validation_images", "0", "--report_to", "none",
              "--gradient_checkpointing"]
    load("train_tokenizer").main(["--model", "llamagen-vq", "--model_config", str(configs / "llamagen_vq_tiny.json"),
                                  "--perceptual_weight", "0", "--disc_weight", "0", "--output_dir", str(tmp_path / "tok"),
                                  *common])
    assert isinstance(enabled[-1], LlamaGenVQModel) and enabled[-1].encoder.gradient_checkpointing
    LlamaGenVQModel(**json.loads((configs / "llamagen_vq_tiny.json").read_text())).save_pretrained(tmp_path / "vq")
    load("train_prior").main(["--model", "llamagen", "--tokenizer_name_or_path", str(tmp_path / "vq"),
                              "--model_config", str(configs / "llamagen_gpt_tiny.json"), "--lr_warmup_steps", "0",
                              "--output_dir", str(tmp_path / "prior"), *common])
    assert type(enabled[-1]).__name__ == "LlamaGenForImageGeneration"
    assert all(layer.gradient_checkpointing for layer in enabled[-1].model.layers)
