"""The training side: the job environment, the launcher, artifacts."""
