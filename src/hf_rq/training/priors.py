"""Per-family pieces of prior (stage-2) training: building the prior for a tokenizer, the training loss, the pipeline.

`train_prior.py` is family-agnostic; what differs between RQ, LlamaGen, CTF and DQ lives in one `PriorSpec`
subclass each. A spec is usable only when its family's classes exist in this installation
(`FamilyNotAvailableError` otherwise).

Every spec derives the prior's vocabulary, code grid and classes from the tokenizer and the dataset; a
``--model_config`` that states them differently, or a pretrained prior that does not fit, raises
`PriorConfigError` before any training.
"""

from __future__ import annotations

import logging

import torch

from .families import WrongModelClassError, _import, find_component, load_diffusers_model


logger = logging.getLogger("hf_rq.training")


class PriorConfigError(ValueError):
    """A prior that does not fit the tokenizer or the dataset; raised before training starts."""


def _check_overrides(config: dict, derived: dict) -> None:
    clash = {k: (config[k], v) for k, v in derived.items() if k in config and config[k] != v}
    if clash:
        detail = ", ".join(f"{k}={a} (tokenizer/data: {b})" for k, (a, b) in clash.items())
        raise PriorConfigError(f"--model_config does not match the tokenizer / dataset: {detail}; drop these keys, "
                               "they are taken from the tokenizer and the dataset")


def _check_classes(have: int, want: int) -> None:
    if have == want:
        return
    if want == 0:
        raise PriorConfigError(f"the pretrained prior is class-conditional ({have} classes) but the dataset has no labels")
    raise PriorConfigError(f"the pretrained prior has {have} classes but the dataset has {want}"
                           + (" (pass --unconditional for an unconditional prior)" if have == 0 else ""))


def _check_grid(have, want, resolution) -> None:
    if tuple(have) != tuple(want):
        raise PriorConfigError(f"the prior models a {'x'.join(map(str, have))} code grid but --resolution {resolution} "
                               f"gives {'x'.join(map(str, want))} with this tokenizer")


class PriorSpec:
    name: str = ""
    tokenizer_module = tokenizer_class = ""
    prior_module = prior_class = config_class = ""
    pipeline_module = pipeline_class = ""
    tokenizer_component = "vqvae"
    prior_component = "transformer"
    store_latents = False
    needs_labels = False
    supports_text = False  # a text-conditional prior (--caption_column)

    # ------------------------------------------------------------------ classes
    def classes(self):
        what = f"the {self.name} prior"
        return (_import(self.tokenizer_module, self.tokenizer_class, what),
                _import(self.prior_module, self.prior_class, what),
                _import(self.prior_module, self.config_class, what),
                _import(self.pipeline_module, self.pipeline_class, what))

    # ------------------------------------------------------------------ loading
    def load_tokenizer(self, name_or_path: str, revision: str | None = None):
        tok_cls = self.classes()[0]
        try:
            return load_diffusers_model(tok_cls, name_or_path, revision)
        except WrongModelClassError as exc:
            raise PriorConfigError(f"the {self.name} prior needs a {tok_cls.__name__} tokenizer: {exc}") from exc

    def load_prior(self, name_or_path: str, revision: str | None = None):
        prior_cls = self.classes()[1]
        subfolder = find_component(name_or_path, prior_cls.__name__, revision)
        return prior_cls.from_pretrained(name_or_path, subfolder=subfolder, revision=revision)

    def grid(self, tokenizer, resolution: int) -> tuple[int, int]:
        side = resolution // tokenizer.downsample_factor
        return side, side

    def check_data(self, num_classes: int) -> None:
        if self.needs_labels and num_classes == 0:
            raise PriorConfigError(f"the {self.name} prior is class-conditional only: the dataset needs a label column")

    def build_prior(self, tokenizer, config: dict, num_classes: int, args):
        """A freshly initialised prior for ``tokenizer``'s codes; ``config``: the architecture (--model_config)."""
        raise NotImplementedError

    def check_prior(self, prior, tokenizer, num_classes: int, args) -> None:
        """Raise `PriorConfigError` unless a pretrained prior fits the tokenizer and the dataset's classes."""
        raise NotImplementedError

    def set_class_names(self, prior, id2label) -> None:
        if id2label:
            prior.config.id2label = {int(k): v for k, v in id2label.items()}
            prior.config.label2id = {v: int(k) for k, v in id2label.items()}

    def warm_start(self, prior, source) -> tuple[list[str], list[str]]:
        """``--init_prior_weights``: copy ``source``'s matching weights into ``prior``; -> (copied, kept fresh)."""
        return copy_matching_weights(prior, source)

    def prepare_for_training(self, prior, args) -> None:
        """Freeze what this run does not train (e.g. one CTF stage), so DDP sees no unused parameters."""

    # ------------------------------------------------------------------ training
    def training_loss(self, prior, tokenizer, batch: dict, args, generator: torch.Generator):
        """(loss, {name: scalar tensor to log}) for one batch of cached codes."""
        raise NotImplementedError

    @torch.no_grad()
    def validation_loss(self, prior, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def make_pipeline(self, tokenizer, prior, text_tokenizer=None):
        pipe_cls = self.classes()[3]
        text = {} if text_tokenizer is None else {"tokenizer": text_tokenizer}
        return pipe_cls(**{self.tokenizer_component: tokenizer, self.prior_component: prior}, **text)

    def sample(self, pipeline, class_labels, num_images: int, generator, guidance_scale=None, prompts=None) -> list:
        """PIL images: one per entry of ``class_labels`` (or of ``prompts``), or ``num_images`` unconditional ones."""
        pipeline.set_progress_bar_config(disable=True)
        kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        if prompts is not None:
            return pipeline(prompt=prompts, generator=generator, **kwargs).images
        if class_labels is None:
            return pipeline(num_images_per_prompt=num_images, generator=generator, **kwargs).images
        return pipeline(class_labels=class_labels, generator=generator, **kwargs).images


# ------------------------------------------------------------------------------------------------------ RQ
class RQPriorSpec(PriorSpec):
    """RQ-Transformer on RQ-VAE codes, with the paper's soft labels and stochastic codes (ARCHITECTURE.md 3.2)."""

    name = "rq"
    tokenizer_module, tokenizer_class = "hf_rq.rq.tokenizer", "RQVAEModel"
    prior_module, prior_class, config_class = "hf_rq.rq.prior", "RQTransformerForImageGeneration", "RQTransformerConfig"
    pipeline_module, pipeline_class = "hf_rq.rq.pipeline", "RQTransformerPipeline"
    store_latents = True  # soft labels and stochastic codes are drawn from the latent at every step
    supports_text = True

    def build_prior(self, tokenizer, config, num_classes, args, text_tokenizer=None):
        _, prior_cls, config_cls, _ = self.classes()
        tc = tokenizer.config
        h, w = self.grid(tokenizer, args.resolution)
        derived = dict(codebook_size=tc.codebook_size, code_depth=tc.code_depth, code_embed_dim=tc.embed_dim,
                       shared_codebook=tc.shared_codebook, grid_height=h, grid_width=w, num_classes=num_classes)
        if text_tokenizer is not None:  # the text prefix's size comes from the text tokenizer and --text_length
            derived.update(text_length=text_tokenizer.model_max_length, text_vocab_size=len(text_tokenizer),
                           text_pad_token_id=text_tokenizer.pad_token_id, use_null_text=args.text_dropout_prob > 0,
                           text_dropout_prob=args.text_dropout_prob)
            config = {k: v for k, v in config.items() if k != "text_length"}  # read by load_text_tokenizer
        _check_overrides(config, derived)
        dropout = args.class_dropout_prob if num_classes else 0.0
        use_null = num_classes > 0 and (dropout > 0 or config.get("use_null_class", False))
        cfg = config_cls(**{**config, **derived, "use_null_class": use_null, "class_dropout_prob": dropout})
        return prior_cls.from_tokenizer(cfg, tokenizer)

    def check_prior(self, prior, tokenizer, num_classes, args, text_tokenizer=None):
        c = prior.config
        try:
            prior.check_codebook(tokenizer)
        except ValueError as exc:
            raise PriorConfigError(f"the prior's vocabulary does not match the tokenizer: {exc}") from exc
        _check_grid((c.grid_height, c.grid_width), self.grid(tokenizer, args.resolution), args.resolution)
        if (text_tokenizer is not None) != c.is_text_conditional:
            raise PriorConfigError("the pretrained prior is " + ("text-conditional: pass --caption_column"
                                   if c.is_text_conditional else "not text-conditional: drop --caption_column"))
        if text_tokenizer is not None:
            if len(text_tokenizer) != c.text_vocab_size or text_tokenizer.pad_token_id != c.text_pad_token_id:
                raise PriorConfigError(f"the text tokenizer ({len(text_tokenizer)} tokens, pad id "
                                       f"{text_tokenizer.pad_token_id}) does not fit the prior ({c.text_vocab_size} "
                                       f"tokens, pad id {c.text_pad_token_id})")
            text_tokenizer.model_max_length = c.text_length
            if args.text_dropout_prob > 0 and not c.use_null_text:
                if c.text_pad_token_id is None:
                    raise PriorConfigError("caption dropout needs the prior's text_pad_token_id (the null text)")
                c.use_null_text = True  # fine-tuning with caption dropout teaches the null text from here on
            c.text_dropout_prob = args.text_dropout_prob if c.use_null_text else 0.0
            return
        _check_classes(c.num_classes, num_classes)

    def training_loss(self, prior, tokenizer, batch, args, generator):
        labels = batch.get("class_labels")
        if args.soft_labels or args.stochastic_codes:
            latents = batch["latents"].permute(0, 2, 3, 1).float()
            # The same computation as RQVAEModel.get_soft_codes(images, ...) after the encoder (cached latents).
            soft, codes = tokenizer.quantizer.soft_codes(latents, args.soft_label_temperature, args.stochastic_codes,
                                                         generator)
            if not args.soft_labels:
                soft = None
        else:
            soft, codes = None, batch["codes"].long()
        out = prior(codes=codes, class_labels=labels, labels=None if soft is not None else codes, soft_labels=soft,
                    text_ids=batch.get("text_ids"))
        logs = {f"loss_depth_{d}": v for d, v in enumerate(out.loss_per_depth)}
        if out.text_loss is not None:
            logs["text_loss"] = out.text_loss
        return out.loss, logs

    @torch.no_grad()
    def validation_loss(self, prior, batch):
        codes = batch["codes"].long()
        return prior(codes=codes, class_labels=batch.get("class_labels"), labels=codes, text_ids=batch.get("text_ids")).loss


# ------------------------------------------------------------------------------------------------ LlamaGen
class LlamaGenPriorSpec(PriorSpec):
    """LlamaGen's class-conditional GPT on LlamaGen VQ codes (next-token cross-entropy, label dropout to a null class)."""

    name = "llamagen"
    tokenizer_module, tokenizer_class = "hf_rq.ctf.tokenizer", "LlamaGenVQModel"
    prior_module, prior_class, config_class = "hf_rq.ctf.llamagen", "LlamaGenForImageGeneration", "LlamaGenConfig"
    pipeline_module, pipeline_class = "hf_rq.ctf.pipeline", "LlamaGenPipeline"
    needs_labels = True

    def build_prior(self, tokenizer, config, num_classes, args):
        _, prior_cls, config_cls, _ = self.classes()
        h, w = self.grid(tokenizer, args.resolution)
        derived = dict(vocab_size=tokenizer.config.codebook_size, input_vocab_size=tokenizer.config.codebook_size,
                       num_classes=num_classes, grid_size=h, class_dropout_prob=args.class_dropout_prob)
        _check_overrides(config, derived)
        return prior_cls(config_cls(**{**config, **derived}))

    def check_prior(self, prior, tokenizer, num_classes, args):
        c, k = prior.config, tokenizer.config.codebook_size
        if c.vocab_size != k or c.input_vocab_size != k:
            raise PriorConfigError(f"the prior's vocabulary ({c.vocab_size} codes) does not match the tokenizer's "
                                   f"codebook ({k} codes)")
        _check_grid((c.grid_size, c.grid_size), self.grid(tokenizer, args.resolution), args.resolution)
        _check_classes(c.num_classes, num_classes)

    def training_loss(self, prior, tokenizer, batch, args, generator):
        codes = batch["codes"].long()
        return prior(codes=codes, class_labels=batch["class_labels"], labels=codes).loss, {}

    @torch.no_grad()
    def validation_loss(self, prior, batch):
        codes = batch["codes"].long()
        return prior(codes=codes, class_labels=batch["class_labels"], labels=codes).loss


# ------------------------------------------------------------------------------------------------------ CTF
class CTFPriorSpec(LlamaGenPriorSpec):
    """CTF: k-means coarse labels of the codebook, stage 1 (AR over coarse labels) and stage 2 (fine codes).

    ``--ctf_stage both`` trains the two stages together (their losses add; they share no weights, so this is
    the same as two separate runs on the same batches); ``coarse`` / ``fine`` trains one and freezes the other.
    The clustering is computed once, when the prior is built, with ``--num_clusters`` and ``--seed``.
    """

    name = "ctf"
    prior_module, prior_class, config_class = "hf_rq.ctf.prior", "CTFForImageGeneration", "CTFConfig"
    pipeline_module, pipeline_class = "hf_rq.ctf.pipeline", "CTFPipeline"

    def build_prior(self, tokenizer, config, num_classes, args):
        _, prior_cls, config_cls, _ = self.classes()
        from hf_rq.ctf.clustering import build_coarse_labels

        h, _ = self.grid(tokenizer, args.resolution)
        derived = dict(codebook_size=tokenizer.config.codebook_size, codebook_dim=tokenizer.config.embed_dim,
                       num_classes=num_classes, grid_size=h, class_dropout_prob=args.class_dropout_prob)
        _check_overrides(config, derived)
        # CTF uses 512 coarse labels for a 16384-code codebook; keep that ratio unless told otherwise.
        num_clusters = config.pop("num_clusters", None)
        num_clusters = args.num_clusters or num_clusters or max(1, tokenizer.config.codebook_size // 32)
        try:
            coarse = build_coarse_labels(tokenizer, num_clusters=num_clusters, seed=args.seed)
        except ValueError as exc:
            raise PriorConfigError(f"cannot cluster the tokenizer's codebook: {exc}") from exc
        prior = prior_cls(config_cls(**{**config, **derived, "num_clusters": num_clusters}))
        prior.set_coarse_labels(coarse)
        return prior

    def check_prior(self, prior, tokenizer, num_classes, args):
        c = prior.config
        try:
            prior.check_tokenizer(tokenizer)
        except ValueError as exc:
            raise PriorConfigError(f"the prior's vocabulary does not match the tokenizer: {exc}") from exc
        _check_grid((c.grid_size, c.grid_size), self.grid(tokenizer, args.resolution), args.resolution)
        _check_classes(c.num_classes, num_classes)

    def prepare_for_training(self, prior, args):
        if args.ctf_stage == "coarse":
            prior.fine_model.requires_grad_(False)
        elif args.ctf_stage == "fine":
            prior.coarse_model.requires_grad_(False)

    def training_loss(self, prior, tokenizer, batch, args, generator):
        codes = batch["codes"].long()
        out = prior(codes=codes, class_labels=batch["class_labels"], labels=codes, stage=args.ctf_stage)
        logs = {k: getattr(out, k) for k in ("coarse_loss", "fine_loss") if getattr(out, k) is not None}
        return out.loss, logs

    @torch.no_grad()
    def validation_loss(self, prior, batch):
        codes = batch["codes"].long()
        return prior(codes=codes, class_labels=batch["class_labels"], labels=codes).loss


# ------------------------------------------------------------------------------------------------------- DQ
class DQPriorSpec(PriorSpec):
    """DQ-Transformer on DQ-VAE codes + granularity maps (the authors' position and content losses).

    The authors' DQ-Transformer has no null class; with ``--class_dropout_prob > 0`` (class-conditional data) the
    prior gets one (``use_null_class``), so that classifier-free guidance can be used. A pretrained prior without
    one gains it (``add_null_class``, every weight kept), as does a ``--init_prior_weights`` source.
    """

    name = "dq"
    tokenizer_module, tokenizer_class = "hf_rq.dq.tokenizer", "DQVAEModel"
    prior_module, prior_class, config_class = "hf_rq.dq.prior", "DQTransformerForImageGeneration", "DQTransformerConfig"
    pipeline_module, pipeline_class = "hf_rq.dq.pipeline", "DQTransformerPipeline"

    @staticmethod
    def _grids(tokenizer, resolution):
        if tokenizer.config.sample_size != resolution:
            raise PriorConfigError(f"the DQ-VAE works at {tokenizer.config.sample_size}x{tokenizer.config.sample_size} "
                                   f"only; --resolution is {resolution}")
        if tokenizer.config.num_grains != 2:
            raise PriorConfigError("the DQ-Transformer models two granularities; this DQ-VAE has "
                                   f"{tokenizer.config.num_grains}")
        return tokenizer.coarse_grid_size

    def build_prior(self, tokenizer, config, num_classes, args):
        _, prior_cls, config_cls, _ = self.classes()
        hc = self._grids(tokenizer, args.resolution)
        derived = dict(codebook_size=tokenizer.config.codebook_size, coarse_grid_size=hc, num_classes=num_classes)
        _check_overrides(config, derived)
        dropout = args.class_dropout_prob if num_classes else 0.0
        derived.update(use_null_class=num_classes > 0 and (dropout > 0 or config.get("use_null_class", False)),
                       class_dropout_prob=dropout)
        longest = hc * hc + (2 * hc) ** 2 + 4  # every region fine, plus start/end tokens (ARCHITECTURE.md 2.2)
        config = {"max_position_embeddings": longest, **config}
        if config["max_position_embeddings"] < longest:
            raise PriorConfigError(f"max_position_embeddings={config['max_position_embeddings']} is shorter than the "
                                   f"longest DQ sequence of this tokenizer ({longest} tokens)")
        return prior_cls(config_cls(**{**config, **derived}))

    def check_prior(self, prior, tokenizer, num_classes, args):
        c = prior.config
        if c.codebook_size != tokenizer.config.codebook_size:
            raise PriorConfigError(f"the prior's vocabulary ({c.codebook_size} codes) does not match the tokenizer's "
                                   f"codebook ({tokenizer.config.codebook_size} codes)")
        hc = self._grids(tokenizer, args.resolution)
        _check_grid((c.coarse_grid_size,) * 2, (hc, hc), args.resolution)
        _check_classes(c.num_classes, num_classes)
        if num_classes and args.class_dropout_prob > 0 and not c.use_null_class:
            prior.add_null_class()  # fine-tuning with class dropout teaches the null class from here on
            logger.info("the pretrained DQ-Transformer had no null class: added one (class rows' mean) for class dropout")
        c.class_dropout_prob = args.class_dropout_prob if c.use_null_class else 0.0

    def warm_start(self, prior, source):
        if prior.config.use_null_class and source.config.num_classes and not source.config.use_null_class:
            source.add_null_class()  # so that the grown vocabularies match and every row is copied
        return super().warm_start(prior, source)

    def training_loss(self, prior, tokenizer, batch, args, generator):
        out = prior(codes=batch["codes"].long(), granularity=batch["granularity"].long(),
                    class_labels=batch.get("class_labels"))
        return out.loss, {"content_loss": out.content_loss, "position_loss": out.position_loss}

    @torch.no_grad()
    def validation_loss(self, prior, batch):
        return prior(codes=batch["codes"].long(), granularity=batch["granularity"].long(),
                     class_labels=batch.get("class_labels")).loss


PRIORS = {"rq": RQPriorSpec(), "llamagen": LlamaGenPriorSpec(), "ctf": CTFPriorSpec(), "dq": DQPriorSpec()}


def get_prior_spec(name: str) -> PriorSpec:
    """The spec for ``--model name``; raises `FamilyNotAvailableError` if the family is not installed."""
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose from {sorted(PRIORS)}")
    spec = PRIORS[name]
    spec.classes()
    return spec


@torch.no_grad()
def copy_matching_weights(prior, source):
    """Copy ``source``'s tensors into ``prior`` where name and shape match; -> (copied names, names left as they were)."""
    theirs = source.state_dict()
    copied, skipped = [], []
    for name, tensor in prior.state_dict().items():
        if name in theirs and theirs[name].shape == tensor.shape:
            tensor.copy_(theirs[name])
            copied.append(name)
        else:
            skipped.append(name)
    if not copied:
        raise ValueError("--init_prior_weights: no tensor of that prior matches this one's names and shapes")
    return copied, skipped
