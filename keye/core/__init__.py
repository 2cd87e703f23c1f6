"""The ground floor: config schema, workspace, atomic writes, hashing, lineage (DuckDB) and tracking (MLflow)."""
