# litellm (the `llm` extra) reads files that sit next to its modules: the model price map (with
# LITELLM_LOCAL_MODEL_COST_MAP=True it never fetches it), tokenizer JSON and the tiktoken BPE
# files it points TIKTOKEN_CACHE_DIR at (so tiktoken never downloads them). The proxy server's
# web UI, examples and docs are left out: the server only calls litellm.acompletion().
from PyInstaller.utils.hooks import collect_data_files

datas = collect_data_files("litellm", excludes=["proxy", "**/*.md", "**/*.pyi"])
# tiktoken finds its encodings by iterating the tiktoken_ext namespace package.
hiddenimports = ["tiktoken_ext.openai_public"]
