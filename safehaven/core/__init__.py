"""What every stage stands on: the home, files, the store and its schema, keys, audit, registers, identifiers."""
