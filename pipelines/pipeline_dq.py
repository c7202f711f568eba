from hf_rq.dq.pipeline import DQTransformerPipeline  # noqa: F401  (shim for DiffusionPipeline.from_pretrained(custom_pipeline=...))
