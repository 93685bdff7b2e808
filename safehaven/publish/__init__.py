"""Publish: outputs, disclosure control, quality statements, publication, analysts' queries."""
