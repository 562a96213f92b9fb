"""Sources and sinks: input files, the output Parquet written in input order, and OpenAI
batch files."""
