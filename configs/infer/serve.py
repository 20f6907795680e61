"""Serve a training run's workdir or a Hugging Face directory over OpenAI's HTTP API.

  python -m infer.serve --config=configs/infer/serve.py --config.checkpoint=DIR \
    [--config.host=127.0.0.1 --config.port=8000]

then, e.g. with OpenAI's own client:

  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.completions.create(model="DIR's name", prompt="Once upon a time", max_tokens=32)

DIR is what `python -m infer` takes (rundir.load). Endpoints: POST /v1/completions and
/v1/chat/completions (streamed with `stream: true`), GET /v1/models, /health and /metrics
(Prometheus). The model answers to `model_name` (default: DIR's last path component), and each
LoRA adapter of `adapters` to its name.

chat_template: '' uses the Hugging Face directory's own (`chat_template` in its
tokenizer_config.json) when it has one, else 'chatml'; or name one of align.chat.TEMPLATES.
The engine keys are infer.EngineConfig's (infer/engine.py), with 0 meaning "auto" for num_blocks
(max_num_seqs sequences of max_model_len) and max_model_len (the model's max_position_embeddings).
The model is served from one device.
"""

import ml_collections


def get_config(arg: str | None = None):
  del arg  # no variants: everything is a --config.KEY flag
  config = ml_collections.ConfigDict()
  config.checkpoint = ""  # required: a run's workdir or a Hugging Face directory
  config.step = -1  # a run's checkpoint step; -1: the latest
  config.host = "127.0.0.1"  # 0.0.0.0 to listen on every interface
  config.port = 8000
  config.model_name = ""  # the `model` requests name; '': the checkpoint directory's name
  config.chat_template = ""  # '': the HF directory's chat_template, else 'chatml'; or an align.chat template
  # LoRA adapters (PEFT directories) served beside the base: "name=DIR,name2=DIR2"; a request's `model`
  # names one (or the base), and requests with different adapters share the engine's steps.
  config.adapters = ""
  # infer.EngineConfig
  config.block_size = 16  # tokens per KV-cache block
  config.num_blocks = 0  # KV-cache blocks; 0: max_num_seqs sequences of max_model_len
  config.max_num_seqs = 32  # sequences running at once
  config.max_num_batched_tokens = 256  # tokens computed in one engine step
  config.max_model_len = 0  # prompt + completion; 0: the model's max_position_embeddings
  config.enable_prefix_caching = True
  config.max_waiting = 1024  # requests waiting beyond this are refused with 429
  config.seed = 0  # seeds requests that give none
  # Compile every step shape before serving (infer.Engine.warmup), so no compilation stalls requests.
  config.warmup = True
  return config
