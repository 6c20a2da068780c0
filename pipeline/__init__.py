"""Self-supervised pretraining of vision transformers: data, models, methods, training, launch."""
