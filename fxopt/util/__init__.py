"""Small shared utilities below every other layer: atomic files and multi-file artefacts."""
