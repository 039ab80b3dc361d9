"""sdlab's training recipes, all on one loop (sdlab.train.loop)."""
