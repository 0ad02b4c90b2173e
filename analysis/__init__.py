"""Reading DistillSpec workdirs and plotting them: `plots` (PNGs and a markdown table), `wandb_files`
(fetch a W&B run's files into a local workdir), and the Colab notebook `distillspec_analysis.ipynb`."""
