"""The control path: the scheduler-side controller that places partitions, and scaling."""
