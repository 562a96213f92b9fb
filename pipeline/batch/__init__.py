"""Provider batch mode: rows sent through an OpenAI-style Batch API at the batch price, each
step durable in the job's state folder (:mod:`pipeline.batch.run` tells the whole flow)."""
