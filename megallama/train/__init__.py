"""Training on DeepSpeed. ``megallama.train.engine`` is the only caller of ``deepspeed.initialize``."""
