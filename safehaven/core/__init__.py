"""What every stage stands on: the home, files, the store, keys, audit, registers, identifiers."""
