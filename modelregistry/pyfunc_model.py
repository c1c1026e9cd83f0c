"""MLflow "models from code" file for a merged model: logged with every registered version.

MLflow copies this file into the registered model and executes it when the model is loaded
(``mlflow.pyfunc.load_model("models:/NAME@champion")``); nothing is unpickled (MLflow 3 refuses
pickled Python models by default). It must therefore stay self-contained: it imports only mlflow,
torch and transformers (and peft for an adapter), never ``metamerge`` or ``modelregistry``.

The model directory comes from the pyfunc artifacts, one of:

``merged``     the merged Hugging Face directory itself, copied into the registry (the default);
``reference``  a small JSON pointer ``{"path": ..., "files": {name: sha256}}`` written when the
               model was registered by reference (very large models): the weights stay where they
               are and must be readable at that path from wherever the model is loaded.

A LoRA adapter (``pipeline.output: adapter``, ``metamerge merge --as-adapter``) is stored like a
merged directory (it is megabytes); its base is by reference: loaded from the adapter config's
``base_model_name_or_path``, which must be readable where the model is loaded.

``predict`` takes prompts (a list of strings, a string, a DataFrame with a ``prompt`` column or
one column, or ``{"prompt": [...]}``) and returns the generated continuations (prompt excluded),
greedy unless ``params={"do_sample": True}``. Params: ``max_new_tokens`` (default 32),
``do_sample``, ``temperature``.
"""

from __future__ import annotations

import json
import os

import mlflow
from mlflow.pyfunc import PythonModel


def _model_dir(artifacts: dict) -> str:
    if "merged" in artifacts:
        return artifacts["merged"]
    if "reference" in artifacts:
        with open(artifacts["reference"], encoding="utf-8") as fh:
            path = json.load(fh)["path"]
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"this model version was registered by reference to {path}, which is not a directory "
                "here; copy the merged model there or load it on the machine that holds it")
        return path
    raise KeyError("model has neither a 'merged' nor a 'reference' artifact")


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", next(iter(model_input.values())))
        return [value] if isinstance(value, str) else [str(v) for v in value]
    if hasattr(model_input, "columns"):  # pandas DataFrame
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[col].tolist()]
    return [str(v) for v in model_input]


class MergedCausalLM(PythonModel):
    """A merged causal LM loaded with transformers; predict generates text."""

    # predict has no type hints on purpose: the explicit signature logged with the model (which
    # declares the generation params) is what MLflow validates inputs against. This attribute
    # (MLflow's own opt-out, checked in PythonModel.__init_subclass__) skips the type-hint wrapper
    # and its "Add type hints" warning at every load.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = _model_dir(context.artifacts)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        adapter = os.path.join(path, "adapter_config.json")
        if os.path.isfile(adapter):  # a LoRA adapter (merge --as-adapter): loaded onto its base
            from peft import PeftModel

            with open(adapter, encoding="utf-8") as fh:
                base = json.load(fh)["base_model_name_or_path"]
            if not os.path.isdir(base):
                raise FileNotFoundError(
                    f"this model version is a LoRA adapter of the base at {base}, which is not a directory "
                    "here; the base is registered by reference: make it readable at that path")
            self.model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path).merge_and_unload()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path)
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import torch

        opts = {"max_new_tokens": 32, "do_sample": False, **(params or {})}
        gen = {"max_new_tokens": int(opts["max_new_tokens"]), "do_sample": bool(opts["do_sample"])}
        if gen["do_sample"]:
            gen["temperature"] = float(opts.get("temperature", 1.0))
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        out = []
        with torch.no_grad():
            for prompt in _prompts(model_input):
                enc = self.tokenizer(prompt, return_tensors="pt")
                ids = self.model.generate(**enc, pad_token_id=pad, **gen)
                out.append(self.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return out


mlflow.models.set_model(MergedCausalLM())
