from hf_rq.ctf.pipeline import LlamaGenPipeline  # noqa: F401  (shim for DiffusionPipeline.from_pretrained(custom_pipeline=...))
