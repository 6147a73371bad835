"""The training side: a plan applied to a live (possibly wrapped) model and optimizer."""
