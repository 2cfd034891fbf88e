"""After training: merge an adapter into its base, quantize with llm-compressor, serve with vLLM, chat in Gradio.

Each module is the command of the same name; `sidecar` holds what they share (side-environment interpreters and
the address to bind). vLLM and llm-compressor run in venvs of their own, as child processes.
"""
