"""⑥ The round functions a session's lifecycle (``apa.lifecycle.next_action``) drives, for `apa align`,
`apa serve` and `apa compare` alike:

  sampling.py  sample round r with FKC-SMC and choose what to show      (SAMPLE)
  fitting.py   refit the surrogate on the ratings remembered           (FIT)
  final.py     the final batch from the last surrogate                 (FINAL)
  checks.py    what a configuration or machine cannot run, refused before anything is written

Each is a part of :class:`apa.session.Session`, which holds one person's store, configuration,
shared components and timings; the parts read those and nothing else.
"""
