"""The special tokens of DeepSeek-V4's chat format (the one place their spelling is written down).

| token                    | where it appears                                                       |
|--------------------------|------------------------------------------------------------------------|
| `<｜begin▁of▁sentence｜>` | once, at the start of every prompt                                   |
| `<｜end▁of▁sentence｜>`   | ends every assistant turn; the model's stop token                    |
| `<｜User｜>`              | opens a user (or developer, or merged tool-result) turn              |
| `<｜Assistant｜>`         | opens an assistant turn                                              |
| `<think>`                | after `<｜Assistant｜>`: thinking mode (the model reasons first)       |
| `</think>`               | after `<｜Assistant｜>`: chat mode; in thinking mode it ends reasoning  |
| `｜DSML｜`                | prefixes every tool-call tag (`<｜DSML｜tool_calls>`, `invoke`, ...)   |
| `<｜latest_reminder｜>`   | opens a `latest_reminder` message (date / locale context)            |

`<think>`, `</think>` and `｜DSML｜` are text the output parsers must see, so a tokenizer keeps them when
decoding with special tokens skipped (they are added tokens but not "special" ones).
"""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"

# Control tokens: dropped when decoding with skip_special_tokens.
CONTROL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, LATEST_REMINDER)
# Added tokens that decode as visible text (the reasoning and tool-call parsers read them).
TEXT_TOKENS = (THINK_START, THINK_END, DSML)
