"""Glue for other ecosystems, one module per ecosystem; each imports its package only when used."""
