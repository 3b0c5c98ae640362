"""The built-in backends: the one list of them, read by the registry, the demo, the test suite
and the noxfile. It imports nothing, so the noxfile reads it without installing ntkcore.

name -> (framework module that must be importable, ``"adapter_module:Class"``); the pip extra
that installs a backend's framework is its name (``pip install 'ntkcore[torch]'``). The order
is the order of detection, and one in which the frameworks import safely into one process
(torch before TensorFlow): the demo and the test suite import them in it.
"""

BUILTIN: dict[str, tuple[str, str]] = {
    "jax": ("jax", "ntkcore_jax:JaxBackend"),
    "torch": ("torch", "ntkcore_torch:TorchBackend"),
    "tensorflow": ("tensorflow", "ntkcore_tensorflow:TensorFlowBackend"),
}
