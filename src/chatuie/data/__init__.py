"""Records, schemas, prompts, the answer format, converters, splits, samples and their validation."""
