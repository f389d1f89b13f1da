"""Training a parallel drafter against your target: self-distilled data, target features, the training loop,
and the recipe that ties them together (what ``jetspec-compile train-drafter`` runs)."""
