"""safehaven: a health-data safe haven run the way the HSCIC Code of Practice asks.

The package is the domain core. It knows nothing of Dagster (see ``assets.definitions``
for the single Dagster entry point, which lives here only because workspace.yaml loads it).
"""

__version__ = "0.1.0"
