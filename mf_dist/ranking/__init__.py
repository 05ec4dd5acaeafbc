"""Top-N selection of scored rows (math layer): which items a user's scores rank first."""
