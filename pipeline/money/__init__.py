"""Pure money logic: prices (built in, and the job's overrides) and the budget."""
