"""Dataset sources and device loaders (installed as rnp_fast.loaders)."""
