"""Tables, figures and image grids of the continual results (matplotlib, pandas)."""
