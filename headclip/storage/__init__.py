"""Where things are kept: fsspec access, the Parquet contract, the layout of a run, reading runs back.

``fs`` (local and ``s3://`` alike, atomic writes, URI helpers), ``schema``
(the output columns), ``layout`` (every path of a run and an audit history),
``results`` (a run as pandas; masks and heat maps as numpy).
"""
