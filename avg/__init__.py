"""AVG pipeline."""
