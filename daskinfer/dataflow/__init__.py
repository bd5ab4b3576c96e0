"""The data path: batches, batching policy, stages, pipelines and the partition loop."""
