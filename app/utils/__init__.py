"""Runtime machinery: the job executor and its task handlers."""
