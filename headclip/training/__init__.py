"""Fitting: HeadCLIP's prompts and head weights, and the demo backbone.

``loss`` (image cross-entropy + focal + Dice), ``loop`` (one worker's
epochs, checkpoints, resume), ``launcher`` (in-process or Ray Train),
``pretrain`` and ``captions`` (CLIP-style pre-training of the tiny demo
backbone on generated surfaces).
"""
