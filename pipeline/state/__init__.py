"""The state folder: results journal, intents, seals, the run history with its lock and
the requests left unanswered, and resume planning."""
