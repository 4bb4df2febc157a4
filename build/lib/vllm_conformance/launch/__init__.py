"""Getting a server for a matrix entry, and ending it.

- :mod:`~vllm_conformance.launch.serving`: an entry turned into a launch, and the launchers;
- :mod:`~vllm_conformance.launch.local`: one local vLLM process group (:class:`VllmServer`);
- :mod:`~vllm_conformance.launch.endpoint`: a handle on a serving deployment, launched or not;
- :mod:`~vllm_conformance.launch.procs`: processes found and ended by tag;
- :mod:`~vllm_conformance.launch.gpus`: which GPUs a worker may use;
- :mod:`~vllm_conformance.launch.logparse`: what vLLM's startup log says;
- :mod:`~vllm_conformance.launch.discover`: the largest ``max_model_len`` an entry serves.
"""
