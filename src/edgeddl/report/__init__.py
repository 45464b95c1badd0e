"""The run folder: the recorder, progress, plots, summaries and comparisons."""
