"""The scoring job: plan -> shards -> (decode -> model -> encode) -> Parquet.

``plan`` (run ids and stored plans), ``scorer`` (one shard to one file; no
Ray), ``masks`` (anomaly maps to RLE, boxes, heat maps), ``runner`` (the
Ray driver and actors), ``progress`` (terminal bar and log lines).
"""
