"""The model: pure PyTorch building blocks, plus the one LightningModule in `modules.model`."""
