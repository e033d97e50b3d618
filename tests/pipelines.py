"""Small pipelines shared by the tests (fast: tiny MLPs on 200 MNIST images)."""

SMALL = """
seed = 0

[data]
use = "mnist5000"
split = "test"
per_class = 20

[activations]
layers = ["relu1", "relu2"]
batch_size = 100

[[models]]
name = "a"
use = "mlp"
hidden = [32, 32]

[models.train]
seed = 0
epochs = 6

[[models]]
name = "b"
use = "mlp"
hidden = [32, 32]

[models.train]
seed = 1
epochs = 6

[[steps]]
use = "interpolation"
models = ["a", "b"]
alphas = [0.0, 0.5, 1.0]

[[steps]]
use = "kendall-tau"
models = ["a", "b"]
allow_unaligned = true
"""

# Two one-epoch MLPs on sklearn's digits, no steps: a base for pipelines that only need to pass the check.
DIGITS_PAIR = """
[data]
use = "digits"
split = "test"

[activations]
layers = ["relu1"]

[[models]]
name = "a"
use = "mlp"
hidden = [16]
[models.train]
epochs = 1

[[models]]
name = "b"
use = "mlp"
hidden = [16]
[models.train]
epochs = 1
seed = 1
"""
