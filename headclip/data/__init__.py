"""Images in: decoding, preprocessing, listing inputs, labelled data sets, generated surfaces.

``decode`` (bytes to upright RGB, one-line errors), ``transforms`` (PIL to
uint8 tensors), ``loading`` (an image and its mask for one record),
``listing`` (an input to a sorted image table), ``datasets`` (labelled
layouts: MVTec, VisA, meta.json, manifest), ``synthetic`` (textured
surfaces with known defects).
"""
