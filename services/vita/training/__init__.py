"""Training: VITA's three stages, their data (manifests, loaders for public sets, a synthetic curriculum)."""
