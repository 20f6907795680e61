"""python -m infer.serve --config=configs/infer/serve.py --config.checkpoint=DIR [--config.port=8000]

Only parses flags, and hands infer.serve.run align's chat templates (infer may not import align; an
entry point may). A bad config, key or path is one line with exit status 2 (configs/cli.py).
"""

from absl import app, flags
from ml_collections import config_flags

from align import chat
from configs import cli as configs_cli
from infer.serve import server

_CONFIG = config_flags.DEFINE_config_file("config", None, "Serving config file (configs/infer/serve.py).")
# Accepted so every entry point takes the same flags; serving writes nothing.
flags.DEFINE_string("workdir", None, "Unused by serving.")
flags.mark_flags_as_required(["config"])


def _renderer(template: str):
  def render(messages: list[dict]) -> str:
    return "".join(text for text, _ in chat.render(messages, template, add_generation_prompt=True))

  return render


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  server.run(_CONFIG.value, chat_templates={name: _renderer(name) for name in chat.TEMPLATES})


if __name__ == "__main__":
  configs_cli.run(main)
