"""Share: data-sharing agreements, linkage, releases, re-identification, subject access."""
