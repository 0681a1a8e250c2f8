"""Framework-neutral core shared by both backends (numpy, PIL, yaml only)."""
