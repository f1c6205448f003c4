"""The reference pass, training, the loss, log-probs, guards and metrics."""
