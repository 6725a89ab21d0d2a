"""Reading results for people: HTML reports, overlays, nightly audits.

``html`` (self-contained report pages and SVG plots), ``overlay`` (masks
drawn on images), ``audit`` (a day's figures against its baseline, alerts).
"""
