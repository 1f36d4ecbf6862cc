"""DeepSeek-V4's chat protocol as pure functions: the prompt encoding (`encoding`), the request mapping
(`options`), and incremental parsers for the model's output (`reasoning_parser`, `tool_parser`,
`completion_parser`). docs/serving.md "Chat encoding" describes the format."""
