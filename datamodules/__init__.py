"""Where data comes from and how it becomes batches: sources, tokenizer, mixture sampler, datamodule."""
