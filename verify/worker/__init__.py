"""The worker process (python -m verify.worker) and what both sides of the process
boundary share: messages, dtypes, the gradients fed, the pinned Keras config."""
