"""The shared base of every run config.

A config fully determines a run, seed included, and is saved next to its checkpoints. The method
files (`grpo.py`, `sft.py`, `dpo.py`, `eval.py`) start from `get_base_config()` and change what their
method needs. Every value can be overridden on the command line:

    python -m train.main --config=configs/grpo.py --config.steps=100 --config.mesh.fsdp=8

Defaults run a short but real run on the embedded SmolLM2-135M-Instruct on a CPU. The comments give
the usual values for a Llama-3.1-8B run on a TPU pod (see tpu/README.md).
"""

from ml_collections import ConfigDict


def get_base_config(method: str) -> ConfigDict:
    c = ConfigDict()
    c.method = method               # "sft" | "dpo" | "grpo" | "eval"
    c.seed = 0
    c.deterministic = True          # deterministic GPU kernels (exact resume); False may be faster

    # Several processes (GPU hosts, CPU tests): each value given here replaces the environment's
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. All unset and no such variables:
    # one process, or on a Cloud TPU slice the TPU metadata (playpen_jax/distributed.py).
    c.distributed = ConfigDict()
    c.distributed.coordinator_address = ""   # host:port of process 0
    c.distributed.num_processes = 0          # 0 = from the environment
    c.distributed.process_id = -1            # -1 = from the environment
    c.run_dir = f"runs/{method}"    # checkpoints, metrics, records, plots, the exported model
    c.resume = False                # continue from the newest complete checkpoint in run_dir
    c.steps = 4                     # optimizer steps (8B: a few hundred)

    c.model = ConfigDict()
    c.model.name = "smollm2-135m-instruct"  # a known name, an HF checkpoint directory or a .gguf file
    c.model.tokenizer = ""          # tokenizer path when it is not beside the model
    c.model.param_dtype = "float32"  # "float32" | "bfloat16" (8B on TPU: bfloat16)
    c.model.dtype = "float32"       # compute dtype
    c.model.matmul_dtype = ""       # "" (= dtype) | "bfloat16": the weight matmuls' inputs, accumulated
    #                                 in f32, under f32 activations (about 2x faster matmuls on CPUs
    #                                 with bf16 units; the sampler decodes from a bf16 weight copy)
    #                                 | "auto": bfloat16 on CPUs with bf16 units, else "" (on CPUs
    #                                 without them, bf16 matmuls made a train step 1.25x slower)

    # Mesh axes (data, fsdp, tensor); one may be -1 = all remaining devices. 8B on v5e-64: fsdp=-1.
    c.mesh = ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # LoRA adapters (models/lora.py): rank 0 trains every weight; rank > 0 trains adapters on the
    # target projections only (the optimizer holds state for them alone). quantize: QLoRA, the
    # frozen base held as int8 per channel or 4-bit blocks of `block` and dequantized in the forward.
    c.lora = ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0             # the adapters' scale is alpha / rank
    c.lora.dropout = 0.0            # on the adapters' input, in training only
    c.lora.targets = "all"          # "all" or q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    c.lora.quantize = "none"        # "none" | "int8" | "int4"
    c.lora.block = 32               # int4 block length along the input axis

    c.optimizer = ConfigDict()
    c.optimizer.learning_rate = 1e-5
    c.optimizer.schedule = "constant"  # "constant" | "cosine" | "linear" (decay to 0 at `steps`)
    c.optimizer.warmup_steps = 0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.99
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0     # global-norm clip; 0 = off

    # How token sequences become device batches.
    c.batch = ConfigDict()
    c.batch.max_seq_len = 1024      # longer sequences are left out (and counted in the metrics)
    c.batch.micro_batch = 4         # rows per micro-batch (gradients are accumulated over them)
    c.batch.pack = True             # several sequences per row where the objective is per token

    # Which games, who plays what, and how episodes become rewards.
    c.games = ConfigDict()
    c.games.names = "train"         # "train" | "heldout" | "all" | comma-separated game names
    c.games.learner_roles = "all"   # "all", or player numbers / role names, e.g. "2" or "Guesser"
    c.games.partner = "strong"      # "strong" | "weak" (programmatic) | "reference" | "self"
    #                                 | "openai:MODEL" (an OpenAI-compatible server: see `remote`)
    c.games.reward = "quality"      # "quality" (Main Score / 100) | "success"
    c.games.abort_penalty = 0.5     # an aborted episode's reward is -abort_penalty

    c.rollout = ConfigDict()
    c.rollout.max_new_tokens = 64
    c.rollout.temperature = 1.0
    c.rollout.top_k = 0
    c.rollout.top_p = 1.0
    c.rollout.batch_size = 32       # prompts per sampler call
    c.rollout.prefix_cache = True   # a turn prefills only what its prompt adds to the last turn's
    c.rollout.prefix_cache_gb = 0.0  # bound on the caches kept for it, per policy; 0 = a quarter of
    #                                  the memory of the devices sampled on (host memory on CPU),
    #                                  halved for each of two policies (games.partner=reference)
    c.rollout.cache_dtype = "auto"  # KV cache storage: "auto" (= model.dtype) | "bfloat16" (half the
    #                                 memory under float32 activations) | "float32"

    # A partner "openai:MODEL" is served at $OPENAI_BASE_URL with the key $OPENAI_API_KEY (both read
    # from the environment only, never written to the run directory); models/remote.py.
    c.remote = ConfigDict()
    c.remote.timeout_s = 60.0       # per HTTP request
    c.remote.retries = 4            # on connection errors, timeouts, 408/409/429/5xx
    c.remote.backoff_s = 1.0        # backoff_s x 2^k between tries (or the server's Retry-After)
    c.remote.requests_per_second = 0.0   # 0 = no limit
    c.remote.concurrency = 8        # requests in flight at once

    c.checkpoint = ConfigDict()
    c.checkpoint.every = 2          # steps between checkpoints (and one at the end); 0 = end only
    c.checkpoint.keep = 3

    # clemscore on validation instances, played greedily with the configured partner.
    c.eval = ConfigDict()
    c.eval.every = 0                # steps between evals; 0 = at the start and the end only
    c.eval.at_start = True
    c.eval.games = "train"
    c.eval.split = "validation"
    c.eval.limit = 1                # instances per game (0 = all), from each experiment in turn
    c.eval.max_new_tokens = 64

    c.log = ConfigDict()
    c.log.every = 1
    c.log.tensorboard = True
    c.log.progress = True           # a tqdm bar
    c.log.plots = True              # curves.png at the end, clemscore.png for each evaluation

    c.export = ConfigDict()
    c.export.hf = True              # write the final policy as an HF safetensors directory
    c.export.dtype = "float32"
    return c
