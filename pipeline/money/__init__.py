"""Pure money logic: prices (the job's overrides, the built-in table, genai-prices' bundled
data in :mod:`pipeline.money.catalog`) and the budget."""
