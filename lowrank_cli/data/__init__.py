"""Training data on disk -> batches: images, texts, the order and seeds of an epoch, one object per modality."""
