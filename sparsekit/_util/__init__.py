"""Leaves every layer may import: atomic file writes, argument validators, seeding, optional extras."""
