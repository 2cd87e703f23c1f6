"""Prefect flows: thin wiring of keye.* calls (the only code that imports prefect)."""
