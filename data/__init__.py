"""Data sources and tools (repo-local, run from the repository root): the embedded scikit-image sample,
ImageFolder trees, webdataset shards, the shard converter and token shards."""
