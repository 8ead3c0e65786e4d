"""transformers' standard loading path for layershare directories.

config.json carries `quantization_config: {"quant_method": "layershare", ...}`. Importing
layershare registers LayershareConfig and LayershareQuantizer with transformers (its public
`register_quantization_config` / `register_quantizer`), so that

    AutoModelForCausalLM.from_pretrained(DIR)            # or AutoModelForImageClassification

returns the compressed model: before the weights are read, the quantizer verifies the directory
(checkpoint.py) and puts the compressed structure into transformers' empty skeleton
(io.build_skeleton); transformers' own loader then reads the tensors by name (shards, device
maps and dtypes as usual); after it, the layers are put in their run-time form (runtime.py,
`runtime` below). `save_pretrained` on such a model writes the compressed tensors again, and
layershare.json with their hashes (so that the copy is verified when it is loaded).

Without layershare, transformers only warns about an unknown quant_method and would load the
dense skeleton with random MLPs. What stops it: the guard, an empty tensor saved under the name
of one replaced dense weight (io.guard_key). transformers >= 4.48 refuses a checkpoint tensor
whose shape differs from the model's unless `ignore_mismatched_sizes=True` is passed, so the
load fails after its "Unknown quantization type, got layershare" warning (tested in
tests/test_hf_loading.py by loading with the registration removed).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from layershare.checkpoint.verify import (
    DTYPES,
    FORMAT_VERSION,
    META,
    QUANT_METHOD,
    CheckpointError,
    read_headers,
    weight_files,
)



class LayershareConfig(QuantizationConfigMixin):
    """runtime: the run-time form the layers are put in after loading (runtime.RUNTIMES;
    "compact", "factored" or "csr" keep the factors, so that save_pretrained can write them
    again; "auto", the default, merges where that is smaller and faster). verify: check the
    recorded SHA-256 of the weights (the structure is always checked)."""

    def __init__(self, runtime: str = "auto", verify: bool = True, format_version: int = FORMAT_VERSION, **kwargs):
        from layershare.runtime.forms import RUNTIMES

        if runtime not in RUNTIMES:
            raise ValueError(f"LayershareConfig: unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
        self.quant_method = QUANT_METHOD
        self.runtime, self.verify, self.format_version = runtime, verify, format_version

    def to_dict(self) -> dict:  # what save_pretrained writes: not the load-time choices
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version}

    def get_loading_attributes(self) -> dict:
        """What a LayershareConfig passed to from_pretrained changes (transformers merges these
        into the directory's own config)."""
        return {"runtime": self.runtime, "verify": self.verify}

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """The directory's own quantization_config: its load-time choices are the caller's, never
        the file's (a `"verify": false` written into config.json must not switch the checks off)."""
        kept = {k: v for k, v in config_dict.items() if k not in ("runtime", "verify")}
        return super().from_dict(kept, return_unused_kwargs=return_unused_kwargs, **kwargs)


class LayershareQuantizer(HfQuantizer):
    requires_calibration = True  # it loads layershare directories; it cannot compress on the fly

    def __init__(self, quantization_config: LayershareConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.entry: dict | None = None
        self.meta: dict = {}  # the loaded directory's layershare.json (what save_pretrained keeps of it)

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("a LayershareConfig loads a directory layershare wrote; to compress a model, use "
                             "layershare.compress or `layershare compress`")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from layershare.checkpoint.read import build_skeleton, read_meta

        if not checkpoint_files:
            raise CheckpointError("a layershare directory loads from its safetensors files")
        folder = Path(checkpoint_files[0]).parent
        where = repr(str(folder))
        config, self.meta = read_meta(folder, verify=self.quantization_config.verify)
        self.entry = entry = config["layershare"]
        shapes = {k: v[1] for k, v in read_headers(folder, weight_files(folder, where), where).items()}
        build_skeleton(model, entry, shapes, where, tie=False)
        expected = set(model.state_dict()) | {entry.get("guard")}
        unexpected = sorted(k for k in shapes if k not in expected)
        if unexpected:  # transformers would only warn and drop them
            raise CheckpointError(f"{where}: unexpected tensors {unexpected[:5]} in the weights (not part of the "
                                  f"model config.json describes)")
        # every tensor under a replaced layer's parent comes from the file (a missing one stays on the
        # meta device and is refused after loading): the model's own init must not run there (GPT-2's
        # re-initialises its MLP's c_proj.weight, which a compressed layer does not have)
        for name in [*entry["layers"], *entry.get("tied", {}), *entry.get("quant", {}).get("tensors", {})]:
            path = name.rpartition(".")[0]
            model.get_submodule(path)._is_hf_initialized = True
            if name in entry["layers"] or name in entry.get("tied", {}):
                model.get_submodule(name)._is_hf_initialized = True
            elif "." in path:  # a quantized tensor's owner's parent (GPT-2's MLP re-initialises its c_proj)
                model.get_submodule(path.rpartition(".")[0])._is_hf_initialized = True
        ignore = {re.escape(entry["guard"])} if entry.get("guard") else set()
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignore
        model.config.layershare = entry
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from layershare.checkpoint.read import without_tensors, pack_quantized, tie_modules
        from layershare.runtime.forms import to_runtime

        if self.entry.get("quant"):
            from layershare.quant.model import dequantize_model, drop_codes

            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            where = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
            packed = pack_quantized(model, self.entry["quant"], self.quantization_config.runtime, where)
            dequantize_model(model, without_tensors(self.entry["quant"], packed), dtype)
            if packed:  # not saved again (check_not_merged): the dequantized tensors' codes are not needed
                drop_codes(model, without_tensors(self.entry["quant"], packed))
            model.layershare_quant = self.entry["quant"]
        tie_modules(model, self.entry)
        still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                      if p.device.type == "meta"]
        if still_meta:
            raise CheckpointError(f"tensors missing from the weights: {still_meta[:5]}")
        model = to_runtime(model, self.quantization_config.runtime, getattr(torch, self.entry.get("dtype", ""), None))
        model.save_pretrained = SavePretrained(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """The compressed tensors (and the guard) for save_pretrained; the config it writes keeps
        the layershare entry and this quantization_config."""
        from layershare.checkpoint.save import check_not_merged, weights_to_save

        check_not_merged(model, "save_pretrained")
        entry = getattr(model.config, "layershare", None) or self.entry
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        name = str(dtype).removeprefix("torch.")
        if name in DTYPES and entry.get("dtype") != name:  # the entry says what the file holds
            entry = model.config.layershare = {**entry, "dtype": name}
        sd = weights_to_save(model, entry, dtype)
        return sd, {"format": "pt"}

    def is_serializable(self, **kwargs):
        return True

    @property
    def is_trainable(self):
        return False


class SavePretrained:
    """A loaded model's save_pretrained: transformers' (through the quantizer: the compressed
    tensors, config.json with the entry), then layershare.json, recording the SHA-256 of the files
    it wrote and of config.json, and what the loaded directory's layershare.json said of the
    compression (method, recipe, sizes, source; not its evaluation, which the copy was not given).
    An object, not a bound function, so that copy.deepcopy and pickle keep it with the model."""

    def __init__(self, model):
        self.model = model

    def __deepcopy__(self, memo):
        import copy

        return type(self)(copy.deepcopy(self.model, memo))

    def __reduce__(self):
        return type(self), (self.model,)

    def __call__(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        if push_to_hub:
            raise CheckpointError("save_pretrained(push_to_hub=True) would upload the directory before its "
                                  "layershare.json is written: call model.push_to_hub(REPO), which writes it")
        model = self.model
        type(model).save_pretrained(model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", args[0] if args else True):
            write_meta(Path(save_directory), getattr(model.hf_quantizer, "meta", {}))


def write_meta(folder: Path, loaded: dict) -> None:
    """layershare.json of a directory save_pretrained wrote."""
    import json

    from layershare.checkpoint.save import hashes
    from layershare.checkpoint.verify import file_sha256

    where = repr(str(folder))
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
             for name in weight_files(folder, where)}
    kept = {k: v for k, v in loaded.items() if k not in ("weights_bytes", "weights_files", "weights_sha256",
                                                         "entry_sha256", "config_sha256", "eval", "threads")}
    info = {**kept, **hashes(folder, files), "saved_by": "save_pretrained"}
    tmp = folder / f"{META}.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str, sort_keys=True))
    tmp.replace(folder / META)


def attach(model, entry: dict, runtime: str, meta: dict | None = None) -> None:
    """Make a model layershare.load built look like one from_pretrained built (its save_pretrained
    then writes the compressed tensors, this quantization_config and layershare.json)."""
    quantizer = LayershareQuantizer(LayershareConfig(runtime=runtime), pre_quantized=True)
    quantizer.entry = entry
    quantizer.meta = meta or {}
    model.hf_quantizer = quantizer
    model.save_pretrained = SavePretrained(model)
    model.config.quantization_config = quantizer.quantization_config
    model.config.layershare = entry
    model._weight_conversions = []  # the names are the model's own (as layershare wrote them): no renaming on save


def register() -> None:
    """Register the config and the quantizer with transformers (once; importing layershare does it),
    and list the config among those whose loading attributes a from_pretrained argument sets
    (`from_pretrained(DIR, quantization_config=LayershareConfig(runtime="compact"))`)."""
    from transformers.quantizers import auto
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    loading = getattr(auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if loading is not None and LayershareConfig not in loading:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*loading, LayershareConfig)

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LayershareConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(LayershareConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LayershareQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LayershareQuantizer)


def unregister() -> None:
    """Remove the registration (tests: what a user without layershare gets)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
    AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
