"""The policy model: a pure-functional Llama-family decoder, its loaders and tokenizers.

    from models import registry, llama
    model = registry.load("smollm2-135m-instruct")        # or an HF dir / .gguf path
    logits, _ = llama.forward(model.params, tokens, config=model.config)
"""
