"""Estimating a job before it spends anything: tokens, cost and duration, nothing sent.

Modules:

- :mod:`pipeline.estimate.figures`: pure values and arithmetic: observed output statistics,
  the 95% interval, the duration, the output-length model, the cost figures, the
  :class:`~pipeline.estimate.figures.Estimate`. No file, tokenizer or journal.
- :mod:`pipeline.estimate.checks`: pure: the estimate's warnings.
- :mod:`pipeline.estimate.scan`: the I/O: one streaming pass over the input that plans and
  tokenizes every row, reads the journal's history, writes the per-row Parquet, and hands its
  totals to :mod:`pipeline.estimate.figures` (:func:`~pipeline.estimate.scan.compute_estimate`).
"""
