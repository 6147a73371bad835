"""Torch-free planning on names and shapes: parameter table, rules, groups, phases, memory."""
