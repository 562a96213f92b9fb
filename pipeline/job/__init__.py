"""The job file: the frozen :class:`JobSpec`, read from TOML and validated at the edge, and
what is known of each model."""
