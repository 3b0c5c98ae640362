"""Using one framework imports no other: adapters are found lazily, by what the caller has."""

from __future__ import annotations

import json
import subprocess
import sys

# (the caller's code, then the ntkcore calls): frameworks imported by the first (Keras imports
# JAX when it is installed) are the caller's; the second may add none.
SNIPPETS = {
    "torch": (
        "import torch\nm = torch.nn.Linear(3, 2)",
        "k = ntkcore.ntk(m, torch.ones(2, 3))\nntkcore.factorize(m, 1)",
    ),
    "jax": (
        "import jax.numpy as jnp",
        "k = ntkcore.ntk(lambda p, x: x @ p, jnp.ones((2, 3)), params=jnp.ones((3, 2)))\n"
        "ntkcore.factorize(lambda p, x: x @ p, 1, params=jnp.ones((3, 2)))",
    ),
    "tensorflow": (
        "import keras\nm = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])",
        "k = ntkcore.ntk(m, np.ones((2, 3)))\nntkcore.factorize(m, 1)",
    ),
}
OTHERS = {
    "torch": ("jax", "tensorflow", "keras"),
    "jax": ("torch", "tensorflow", "keras"),
    "tensorflow": ("torch", "jax"),
}


def test_only_the_callers_framework_is_imported(backend):
    caller, call = SNIPPETS[backend]
    script = (
        f"import json, sys\nimport numpy as np\n{caller}\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        f"import ntkcore\n{call}\n"
        "new = sorted({m.split('.')[0] for m in sys.modules} - before)\n"
        "print(json.dumps({'shape': list(k.shape), 'modules': new}))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 2, 2, 2]
    loaded = [name for name in OTHERS[backend] if name in result["modules"]]
    assert loaded == [], f"computing a {backend} kernel imported {loaded}"
