"""What runs a lowered artefact outside the compiler (e.g. pipeline stages)."""
