"""A small FastAPI service on a module-level async engine, as most FastAPI projects are built."""
