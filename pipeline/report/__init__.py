"""``pipeline report``: one self-contained HTML page of how a job's runs went.

``gather`` reads the state folder (the history of runs, the journal's results, a run's
timeline) into a :class:`~pipeline.report.data.ReportData`; ``figures`` (pure) sums the
timeline into time bins and the rows into histograms; ``svg`` (pure) draws the charts and
``page`` (pure) lays out the page; ``build`` writes it.
"""
