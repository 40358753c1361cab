"""Pipeline steps: one module per step, discovered by avg.cli."""
