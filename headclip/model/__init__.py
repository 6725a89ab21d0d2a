"""The model: a frozen CLIP ViT with HeadCLIP's learned parts; knows nothing of Ray, files or Parquet.

``config`` (the paper's defaults), ``backbone`` (open_clip loading),
``vision`` (dual-path encoder, head weights and the forward's rewrites),
``inference`` (tower precision, torch.compile), ``profile`` (FLOPs, rate and
% of peak of the forward), ``text`` (learnable prompts), ``smoothing``
(Gaussian on the device), ``headclip`` (scores and maps), ``checkpoint``
(safetensors + JSON), ``anomalyclip`` (importing AnomalyCLIP's prompts),
``factory`` (``create_model``, the front door), ``assets`` (the packaged demo
model) and ``configs/`` (open_clip model configs).
"""
