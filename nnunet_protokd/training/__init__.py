"""Training: the bases of the plugin's nnU-Net trainers and their one training step, the frozen teacher, feature
capture, the losses (pure tensor functions), what a trained model records, and the loss-term progress plot.
trainers/ builds on it."""
