"""One rank's side of a step: the runner, re-sharding between layouts, the KV tiers."""
