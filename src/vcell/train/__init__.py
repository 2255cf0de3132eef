"""Training of vcell models (Lightning modules, data modules, pickle-free checkpoints)."""
