"""Measures of a batch of images, pure functions of tensors, a prior and a simulated user (no session):

  metrics.py   Fréchet distance, diversity, coverage of preferred classes
  novelty.py   near-copies of rated images, class mix against the tilted prior, the prior reference
  yields.py    what a person takes home: distinct, new, liked images
  records.py   what a session's end records of its final batch (``FinalView`` in, JSON records out)

The session records them (``apa.session``); the reports and comparisons above show them.
"""
