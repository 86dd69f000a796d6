"""Stage 0: the foundation model's per-pixel scores, computed once (`logits`) into the chunked store (`store`).

The annotators themselves are pipeline.backends, one file each behind the backend protocol."""
