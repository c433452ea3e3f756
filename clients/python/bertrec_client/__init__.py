"""bertrec."""
