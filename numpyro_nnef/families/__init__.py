"""Built-in exponential families."""
