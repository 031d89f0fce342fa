"""Seed sweeps: grids of training runs from a spec (`run`, `launch`) and their statistics (`report`)."""
