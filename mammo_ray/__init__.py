"""mammo-ray."""
