"""hiclip data pipeline: webdataset shards in, batches of tensors out (knows nothing of model/)."""
