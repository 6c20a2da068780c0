"""Evaluation of a pretrained backbone: k-NN, linear probe and fine-tune stages, and export.

- `features.py`: frozen-backbone feature extraction on every rank through accelerate, gathered,
  de-duplicated and ordered by sample id, cached in the run directory;
- `knn.py`: weighted k-NN (`knn_stage`); `linear.py`: a grid of linear heads trained together
  (`linear_stage`, also few-shot); `finetune.py`: full fine-tuning with checkpoints and exact
  resume (`finetune_stage`);
- `export.py`: a pretrained backbone to one safetensors file.

Nothing is imported here, so `import pipeline.eval.export` stays light: import the submodules.
"""
