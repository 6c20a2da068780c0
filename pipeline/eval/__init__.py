"""Evaluation of a pretrained backbone: k-NN, logistic regression, linear probe and fine-tune
stages, their baselines, plots, and export.

- `features.py`: frozen-backbone feature extraction on every rank through accelerate, gathered,
  de-duplicated and ordered by sample id, cached in the run directory;
- `knn.py`: weighted k-NN (`knn_stage`); `logreg.py`: logistic regression by full-batch L-BFGS,
  C chosen on a held-out split (`logreg_stage`); `linear.py`: a grid of linear heads trained
  together by SGD (`linear_stage`, also few-shot); `finetune.py`: full fine-tuning with
  checkpoints and exact resume (`finetune_stage`);
- `plots.py`: a run's figures as PNG files (training curves, the probes against the baselines);
- `export.py`: a pretrained backbone to one safetensors file.

Nothing is imported here, so `import pipeline.eval.export` stays light: import the submodules.
"""
