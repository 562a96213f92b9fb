"""Estimating a job before it spends anything: the tokenizing scan and the figures."""
