"""Data: shard writing, the deterministic resumable stream, CPU views and device-side augmentation,
resolution buckets and NaViT packing. Imports nothing of ours but `pipeline.config`."""
