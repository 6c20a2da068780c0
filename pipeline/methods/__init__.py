"""Pretraining objectives (MAE, DINO): each wraps a backbone and returns a loss and logs."""
