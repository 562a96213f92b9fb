"""Pure row logic: templating, request keys, planning, output schema, token counts, prompt
prefix blocks and the verdict on an answer. No I/O."""
