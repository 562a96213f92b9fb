"""Running a job: the runner and its parts, the run's figures, report and summary, and
the status of a job."""
