"""Data stages' library code: sources (collect), the built-in corpus, validation (clean)."""
