"""Protection maths: pure functions over parameters, used by :class:`MergeGuardCallback`."""
