"""Training the networks `apa` ships: one seeded, resumable loop and a recipe per network.

- ``common``: the loop every recipe runs (``train``: Adam with warm-up, gradient clipping, an EMA
  copy that ships, an atomic checkpoint ``<run_dir>/ckpt.pt`` and ``<run_dir>/loss.csv``; a
  restarted run resumes from the checkpoint) and ``load_checkpoint_model`` to read a run back.
- ``ddpm``: the built-in DDPM prior (``apa.priors.ddpm``'s ε-UNet on MNIST / Fashion-MNIST);
  `apa train-prior`. Weights go to ``apa/weights/ddpm_<dataset>.safetensors``, written by
  ``apa.priors.ddpm.export_prior`` and read by ``apa.priors.ddpm.load_prior``.
- ``oracle``: the classifier behind the simulated user (``apa.feedback.classifier``), with the
  off-data it must not call a class; `apa train-oracle`. Weights go to
  ``apa/weights/oracle_<dataset>.safetensors`` (``apa.feedback.classifier.load_oracle`` reads them).
- ``judge``: the independent judge of the evaluation (``apa.evaluation.judge``), on its own split;
  `apa train-judge`. Weights go to ``apa/weights/judge_<dataset>.safetensors``
  (``apa.evaluation.judge.load_judge`` reads them).

Each recipe's run directory (``runs/<kind>-<dataset>`` by default) holds the checkpoint, the loss
log and the settings; the export writes the weights with their config and training record in the
safetensors metadata. The data flow is one way: this package imports the priors, the feedback
models and the evaluation's networks; none of them imports it.
"""
