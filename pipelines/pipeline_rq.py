from hf_rq.rq.pipeline import RQTransformerPipeline  # noqa: F401  (shim for DiffusionPipeline.from_pretrained(custom_pipeline=...))
