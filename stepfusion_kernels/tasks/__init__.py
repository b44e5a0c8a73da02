"""Training tasks: data, model, metrics and plots behind the training command line."""
