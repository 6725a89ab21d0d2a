"""The review loop: scored images out to labelling tools, reviewed labels back in.

- :mod:`.selection` chooses what to review from a run (top N, flagged, a stratified
  sample of unflagged images per group, a DuckDB ``WHERE`` clause) and records how.
- :mod:`.coco` writes COCO instance annotations (RLE masks) and reads COCO back.
- :mod:`.labelstudio` writes Label Studio tasks with pre-annotations and reads its export.
- :mod:`.export` writes an export folder; :mod:`.importing` turns reviews into a manifest.
- :mod:`.estimates` gives the flagged set's precision and the unflagged defect rate, with intervals.
"""
