"""Lightning MergeGuard."""
