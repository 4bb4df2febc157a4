"""Root conftest: load the plugin and the fixtures; everything else lives in them."""

pytest_plugins = [
    "vllm_conformance.plugin",
    "fixtures.server",
    "fixtures.tokenizer",
    "fixtures.recorder",
]
