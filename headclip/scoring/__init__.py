"""The scoring job: listing -> plan -> Ray Data pipeline (read -> decode -> model -> publish) -> Parquet.

``config`` (JobConfig), ``plan`` (run ids and stored plans), ``stages`` (reading,
decoding, publishing; no Ray), ``scorer`` (the model stage; no Ray), ``masks``
(anomaly maps to RLE, boxes, heat maps), ``pipeline`` (the Ray Data pipeline,
top to bottom), ``runner`` (the driver: plan, run, summary), ``placement``
(actor size, pool bounds, waits), ``progress`` (terminal bar and log lines).
The public Ray Data stages are in :mod:`headclip.ray`.
"""
