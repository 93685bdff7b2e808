"""Tools beside the pipeline: the synthetic demo data generator (not part of the haven)."""
