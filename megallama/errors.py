"""The one exception type the CLI turns into a single readable line and a non-zero exit."""

# A run stopped by a signal or ``train.time_limit_min`` after saving a checkpoint: "try again"
# (sysexits' EX_TEMPFAIL), distinct from a bad input (2) and a dead peer's watchdog exit (3).
PREEMPTED_EXIT = 75


class UserError(Exception):
    """Bad input from the user (config, file, argument); the message is one line.

    A message quoting user input (a key, a file name, a value) could carry a line break; it is
    escaped here so the one-line promise holds whatever the input was.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message)
        if "\n" in text or "\r" in text:
            text = text.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(text, *args)


# Megatron-DeepSpeed (and Hugging Face) argument names -> where the same setting lives here
MEGATRON_NAMES = {
    "train_iters": "train.steps", "tensor_model_parallel_size": "parallel.tp",
    "pipeline_model_parallel_size": "parallel.pp", "sequence_parallel": "parallel.sequence_parallel",
    "micro_batch_size": "train.micro_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size", "train_batch_size": "train.global_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps", "lr_warmup_iters": "train.warmup_steps",
    "seq_length": "train.seq_len", "encoder_seq_length": "train.seq_len", "num_layers": "model.n_layers",
    "num_hidden_layers": "model.n_layers", "encoder_num_layers": "model.n_encoder_layers",
    "hidden_size": "model.dim", "num_attention_heads": "model.n_heads", "num_key_value_heads": "model.n_kv_heads",
    "num_query_groups": "model.n_kv_heads", "ffn_hidden_size": "model.ffn_dim_multiplier",
    "intermediate_size": "model.ffn_dim_multiplier", "max_position_embeddings": "model.max_seq_len",
    "norm_epsilon": "model.norm_eps", "layernorm_epsilon": "model.norm_eps", "rms_norm_eps": "model.norm_eps",
    "rotary_base": "model.rope_theta", "rope_theta": "model.rope_theta", "padded_vocab_size": "model.vocab_size",
    "hidden_dropout": "model.dropout", "attention_dropout": "model.dropout", "init_method_std": "model.init_std",
    "seed": "train.seed", "save_interval": "checkpoint.every", "save": "checkpoint.dir", "load": "checkpoint.load",
    "eval_interval": "train.eval_every", "eval_iters": "train.eval_iters", "log_interval": "train.log_every",
    "exit_interval": "train.exit_at_step", "lr": "train.lr", "min_lr": "train.min_lr_ratio",
    "weight_decay": "train.weight_decay", "adam_beta1": "train.beta1", "adam_beta2": "train.beta2",
    "adam_eps": "train.eps", "clip_grad": "train.grad_clip",
    "recompute_granularity": "train.activation_checkpointing.mode",
    "recompute_activations": "train.activation_checkpointing.mode",
    "checkpoint_activations": "train.activation_checkpointing.mode",
    "recompute_num_layers": "train.activation_checkpointing.every",
    "checkpoint_num_layers": "train.activation_checkpointing.every",
    "distributed_timeout_minutes": "train.dist_timeout_s", "data_path": "data.prefixes",
    "tokenizer_model": "data.tokenizer", "zero_stage": "deepspeed.zero_optimization.stage",
}


def did_you_mean(word: str, choices, paths=None) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``: the tail of an unknown-key error.

    ``paths`` (a run config's field name -> dotted path) also turns on the exact names of other
    sections and of Megatron-DeepSpeed's arguments, which win over a near spelling here: ``train_iters``
    is ``train.steps``, not ``eval_iters``.
    """
    import difflib

    if paths is not None:
        name = word.strip().lstrip("-").replace("-", "_").lower()
        hit = paths.get(name) or MEGATRON_NAMES.get(name)
        if hit:
            return f"; did you mean '{hit}'?"
    close = difflib.get_close_matches(word, sorted(str(c) for c in choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def short_repr(value: object, limit: int = 80, _depth: int = 0) -> str:
    """``repr`` of user input cut to ``limit`` characters without ever building the whole repr:
    a "billion laughs" list or a 5000-digit int must cost nothing to mention."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * limit:
        text = f"<an integer of {value.bit_length()} bits>"
    elif value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, (str, bytes)):
        text = repr(value[:limit])
    elif isinstance(value, (list, tuple, dict)):
        text = f"<a {type(value).__name__} of {len(value)} items>"
        if len(value) <= 4 and _depth < 2:  # small and shallow: show it (a cycle stops here too)
            if isinstance(value, dict):
                inner = ", ".join(f"{short_repr(k, 20, _depth + 1)}: {short_repr(v, 20, _depth + 1)}"
                                  for k, v in value.items())
                text = "{" + inner + "}"
            else:
                inner = ", ".join(short_repr(v, 20, _depth + 1) for v in value)
                text = ("[{}]" if isinstance(value, list) else "({})").format(inner)
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
