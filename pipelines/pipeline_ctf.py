from hf_rq.ctf.pipeline import CTFPipeline  # noqa: F401  (shim for DiffusionPipeline.from_pretrained(custom_pipeline=...))
