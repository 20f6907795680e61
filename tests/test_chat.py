"""Chat templates render the published formats, and only assistant turns are trainable."""

import pytest

from align import chat

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def _text(pieces):
  return "".join(text for text, _ in pieces)


def _trainable(pieces):
  return [text for text, trainable in pieces if trainable]


def test_chatml():
  pieces = chat.render(MESSAGES, "chatml")
  assert _text(pieces) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
      "Hello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
  )
  assert _trainable(pieces) == ["Hello.<|im_end|>\n", "4<|im_end|>\n"]


def test_llama3():
  pieces = chat.render(MESSAGES[1:3], "llama3", add_generation_prompt=False)
  assert _text(pieces) == (
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
  )
  assert _trainable(pieces) == ["Hello.<|eot_id|>"]


def test_gemma_folds_the_system_turn_into_the_first_user_turn():
  pieces = chat.render(MESSAGES[:3], "gemma")
  assert _text(pieces) == (
      "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
  )


def test_plain_and_generation_prompt():
  pieces = chat.render(MESSAGES[1:2], "plain", add_generation_prompt=True)
  assert pieces == [("User: Hi\n\nAssistant: ", False)]
  assert chat.prompt_completion("Q?", " A") == [("Q?", False), (" A", True)]


@pytest.mark.parametrize(
    "messages, match",
    [([], "empty"), ([{"role": "bot", "content": "x"}], "role='bot'"), ([{"role": "user", "content": 3}], "content"),
     (["hi"], r"messages\[0\]")],
)
def test_bad_messages_are_named(messages, match):
  with pytest.raises(ValueError, match=match):
    chat.render(messages, "chatml")
  with pytest.raises(ValueError, match="template"):
    chat.render(MESSAGES, "vicuna")
